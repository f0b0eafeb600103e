"""The sentence-transformers family: SentenceTransformer and every model built from its modules.

sentence-transformers calls ``self.model.forward(...)`` directly, so hooks on the PeftModel never
fire. The repair therefore sits on the ``Transformer`` input module, whose output dict holds the
token embeddings and the caller's mask together:

* a forward hook measures the drift and repairs the dict for every consumer downstream
  (``Pooling``, ``encode(output_value="token_embeddings")``, ``all_layer_embeddings``);
* a forward pre-hook makes sure the PEFT base model gets position ids that skip padding
  (:class:`maskpatch.hooks.PositionIdsHook`), also for an adapter set after ``apply``;
* under ``extend``, a pre-hook on ``Pooling(include_prompt=False)`` moves the prompt exclusion
  past the virtual tokens, onto the instruction, and on a ``weightedmean`` ``Pooling`` a pre-hook
  and a forward hook move the virtual tokens past any left padding for the weights (and back);
* on sentence-transformers 3.3 - 6.1, which extend the mask inline themselves, a pre-hook hands
  the ``Transformer`` a copy of the features dict, and the output hook measures the drift against
  the caller's mask (:mod:`maskpatch.compat.st_inline_mask`).

Where sentence-transformers keeps these classes, and under which attribute the ``Transformer``
holds its model, differs between releases: :mod:`maskpatch.compat` knows.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ...compat.generation import generation_cache_name
from ...compat.st_inline_mask import caller_mask, pooling_weighs_by_column, st_extends_mask_inline
from ...compat.st_inner import inner_model, inner_name
from ...compat.st_modules import st_classes
from ...compat.versions import SUPPORTED, installed_version
from ...drift import check_excess
from ...errors import DriftError
from ...features import copy_features, exclude_leading_tokens, repair_features, virtual_after_padding
from ...handle import HookSpec
from ...hooks import (
    LOCK,
    InstallRecord,
    MaskpatchHook,
    ensure_position_hook,
    position_hook_for,
    position_hook_key,
    submodule,
)
from ...layout import active_layout, is_peft_model
from ...limits import INLINE_WEIGHTEDMEAN, PART_MODEL_POOLING, ensure_limit_hook, limit_hook_for, report
from ..peft.mask import prompt_output_mask
from ..peft_generation import generates_with_peft
from .consumers import consumer_specs

__all__ = [
    "InlineMaskGuardHook",
    "PoolingPromptHook",
    "SentenceTransformersAdapter",
    "TransformerOutputHook",
    "TransformerPositionHook",
    "WeightedMeanOrderHook",
    "WeightedMeanRestoreHook",
]


class SentenceTransformersAdapter:
    """Patches every sentence-transformers ``Transformer`` module inside the given model."""

    name = "sentence-transformers"
    requires = {dist: SUPPORTED[dist] for dist in ("sentence-transformers", "transformers", "torch")}
    optional = {"peft": SUPPORTED["peft"]}

    def matches(self, model: object) -> bool:
        classes = st_classes()
        if classes is None or not isinstance(model, nn.Module):
            return False
        return any(isinstance(module, classes.transformer) for module in model.modules())

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        classes = st_classes()
        if classes is None:  # matches() ran first, so sentence-transformers cannot have gone since
            return []
        inline = st_extends_mask_inline()
        weighs_by_column = pooling_weighs_by_column()
        specs: list[HookSpec] = []
        # An install on a part of the model (apply(model[0])) cannot reach the Pooling that follows.
        sees_pooling = any(isinstance(module, classes.pooling) for module in model.modules())
        for module in model.modules():
            if isinstance(module, classes.transformer):
                inner_name(module)  # raises if the model sits under no known attribute
                specs.append(HookSpec(module, TransformerPositionHook(record)))
                if inline:  # 3.3 - 6.1 write their extended mask into the features dict they get
                    specs.append(HookSpec(module, InlineMaskGuardHook(record)))
                specs.append(HookSpec(module, TransformerOutputHook(record, sees_pooling=sees_pooling, inline=inline)))
                specs.extend(_position_specs(inner_model(module), record))
            elif (
                isinstance(module, classes.pooling)
                and record.policy == "ignore"
                and _weighted(module)
                and weighs_by_column
            ):
                report(
                    record,
                    INLINE_WEIGHTEDMEAN,
                    f"sentence-transformers {installed_version('sentence-transformers')} weighs weightedmean "
                    "pooling by column index, so the M excluded virtual-token columns still shift every real "
                    "token's weight under 'ignore'",
                    stacklevel=4,
                )
            elif isinstance(module, classes.pooling) and record.policy == "extend":
                specs.append(HookSpec(module, PoolingPromptHook(record)))
                if _weighted(module):  # after PoolingPromptHook: it orders the mask that hook made
                    specs.append(HookSpec(module, WeightedMeanOrderHook(record)))
                    specs.append(HookSpec(module, WeightedMeanRestoreHook(record)))
            # Consumers that read N-column keys besides the mask (MultiVectorMask): see st_consumers.
            specs.extend(consumer_specs(module, record))
        return specs

    output_mask = staticmethod(prompt_output_mask)  # the mask capability (see maskpatch.registry.MaskAdapter)


def _position_specs(inner: object, record: InstallRecord) -> list[HookSpec]:
    """The position hook for a PEFT model already inside the Transformer (later ones: lazily)."""
    if not is_peft_model(inner):
        return []
    # The hooks hold the disable_adapter() and generation wrappers once registered (PositionIdsHook.attached).
    if generates_with_peft(inner):
        generation_cache_name()  # refuses, at apply, a transformers that names the cache neither way
    base = inner.base_model  # type: ignore[attr-defined]
    hooks = (position_hook_for(inner, record), limit_hook_for(inner, record))
    return [HookSpec(base, hook) for hook in hooks if hook is not None]


class TransformerPositionHook(MaskpatchHook):
    """Pre-hook on ``Transformer``: position ids for the PEFT model it holds now (see module doc).

    Runs on every forward. Once it has seen a :class:`~maskpatch.hooks.PositionIdsHook` on the
    base model, it remembers that hook's key (torch never reuses one) with the PEFT and base model
    it found, so a later forward checks in three lookups that the same hook is still there,
    instead of scanning the pre-hooks. What it remembers is not pickled: a copy scans again.
    """

    pre = True
    #: ``(PEFT model, its base model, key of the PositionIdsHook on it)`` last seen; None to scan.
    _seen: tuple[nn.Module, nn.Module, int] | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inner: Any = inner_model(module)
        seen = self._seen
        if seen is not None and inner is seen[0]:
            base = seen[1]
            if submodule(inner, "base_model") is base and seen[2] in base._forward_pre_hooks:
                return  # the usual case: the same hook as last time is in place
        if self.record.removed or not is_peft_model(inner):
            return
        base = inner.base_model
        key = position_hook_key(base)
        if key is not None:
            self._seen = (inner, base, key)  # nothing to register, and no lock taken
            return
        with LOCK:
            # A remove() on another thread may have run since this forward began: the record
            # registers nothing once its install is removed, so nothing of it is left behind.
            ensure_position_hook(inner, self.record)
            ensure_limit_hook(inner, self.record)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_seen", None)
        return state


class TransformerOutputHook(MaskpatchHook):
    """Forward hook on ``Transformer``: repair the features dict for the modules downstream.

    ``sees_pooling`` is false for an install on a part of the model (``apply(model[0])``): under
    ``extend`` it then reports the known limit ``part-model-pooling`` when the features carry a
    ``prompt_length``, since a ``Pooling(include_prompt=False)`` it cannot reach would exclude the
    virtual tokens instead of the instruction.
    """

    def __init__(self, record: InstallRecord, *, sees_pooling: bool = True, inline: bool = False) -> None:
        super().__init__(record)
        self.sees_pooling = sees_pooling
        #: sentence-transformers 3.3 - 6.1 extend the mask inline: decided once at install (a
        #: version lookup per forward would cost more than the whole repair).
        self.inline = inline

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        # The hot path: runs on every forward; messages are only formatted when they are raised or warned.
        if type(output) is not dict and not isinstance(output, MutableMapping):
            return None
        if "cu_seq_lens_q" in output:  # packed features carry no attention_mask: check first
            _refuse_flattened(module)
            return None
        key = getattr(module, "module_output_name", "token_embeddings")
        tokens, given = output.get(key), output.get("attention_mask")
        if not (isinstance(tokens, Tensor) and isinstance(given, Tensor)) or tokens.dim() != 3 or given.dim() != 2:
            return None
        inner = inner_model(module)
        mask = given
        if self.inline:  # measure against the caller's mask, not sentence-transformers' extension
            mask = caller_mask(given, output.get("input_ids"), inner, where=f"{type(module).__name__} output")
        features = output
        if mask is not given:
            features = copy_features(output)
            features["attention_mask"] = mask
        observed = tokens.shape[1] - mask.shape[1]
        if observed <= 0:
            # Equal: no drift. Shorter: the model kept only its last positions (a causal-LM
            # reranker's logits_to_keep), which PEFT's prefix does not shift.
            return None if features is output else features
        layout = active_layout(inner)
        if observed == layout.num_virtual_tokens:
            m = observed  # what check_excess returns for an excess it explains, without building `where`
        else:
            where = (
                f"{type(module).__name__} output {key!r} has {tokens.shape[1]} positions but "
                f"attention_mask has {mask.shape[1]}"
            )
            m = check_excess(observed, layout.num_virtual_tokens, where=where, adapter=layout.adapter)
        record = self.record
        if (
            not self.sees_pooling
            and record.policy == "extend"
            and output.get("prompt_length") is not None
            and (record.strict or PART_MODEL_POOLING.name not in record.reported)  # else report() does nothing
        ):
            report(
                record,
                PART_MODEL_POOLING,
                f"{type(module).__name__} was patched on its own under 'extend' and its features carry a "
                "prompt_length; a Pooling(include_prompt=False) after it would exclude the virtual tokens "
                "instead of the instruction",
                stacklevel=2,
            )
        return repair_features(features, key, m, record.policy)


class InlineMaskGuardHook(MaskpatchHook):
    """Pre-hook on ``Transformer`` (sentence-transformers 3.3 - 6.1): a copy of the features dict.

    Those releases write their inline-extended ``attention_mask`` into the dict they are given;
    handing them a shallow copy keeps the caller's dict as it was, so the same features forwarded
    twice give the same result twice (see :mod:`maskpatch.compat.st_inline_mask`).
    """

    pre = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        features = args[0] if args else None
        if not isinstance(features, MutableMapping):
            return None
        return (copy_features(features), *args[1:]), kwargs


def _refuse_flattened(module: nn.Module) -> None:
    layout = active_layout(inner_model(module))
    if layout.adds_positions:
        raise DriftError(
            f"{type(module).__name__} packed the batch into one row (flash-attention unpadding), but the active "
            f"adapter {layout.adapter!r} prepends {layout.num_virtual_tokens} virtual tokens per call, not per "
            "text; load the model with unpad_inputs=False to use prompt learning"
        )


class PoolingPromptHook(MaskpatchHook):
    """Pre-hook on ``Pooling`` under ``extend``: exclude the instruction, not the virtual tokens.

    ``Pooling(include_prompt=False)`` zeroes the first ``prompt_length`` attended positions. With
    ``m`` attending virtual-token entries in front, those would be the virtual tokens. This hook
    hands Pooling a mask with the instruction already excluded after the first ``m`` columns, and
    no ``prompt_length``, in a copy of the features dict.
    """

    pre = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        features = args[0] if args else None
        if getattr(module, "include_prompt", True) or not isinstance(features, MutableMapping):
            return None
        mask, ids, count = features.get("attention_mask"), features.get("input_ids"), features.get("prompt_length")
        if count is None or not isinstance(mask, Tensor) or not isinstance(ids, Tensor):
            return None
        m = mask.shape[1] - ids.shape[1]
        if m <= 0:
            return None
        real = exclude_leading_tokens(mask.narrow(1, m, mask.shape[1] - m), count)
        repaired = copy_features(features)
        del repaired["prompt_length"]
        repaired["attention_mask"] = torch.cat((mask.narrow(1, 0, m), real), dim=1)
        if _weighted(module):
            # WeightedMeanOrderHook must see where the padding is, not where the instruction was cut.
            repaired[_PADDING_MASK] = mask
        return (repaired, *args[1:]), kwargs


def _weighted(pooling: nn.Module) -> bool:
    # sentence-transformers 6.x: ``pooling_mode`` (a name or names); before: one flag per mode.
    if getattr(pooling, "pooling_mode_weightedmean_tokens", False):
        return True
    mode = getattr(pooling, "pooling_mode", ())
    return "weightedmean" in ((mode,) if isinstance(mode, str) else tuple(mode))


# Private keys, only ever in maskpatch's own copies of a features dict, popped again by
# WeightedMeanRestoreHook: the features WeightedMeanOrderHook reordered, and the padding mask
# PoolingPromptHook had before it cut the instruction out.
_ORIGINAL = "maskpatch_weightedmean_original"
_PADDING_MASK = "maskpatch_padding_mask"


class WeightedMeanOrderHook(MaskpatchHook):
    """Pre-hook on a ``weightedmean`` ``Pooling`` under ``extend``: the virtual tokens after the left padding.

    ``Pooling`` weighs the attended positions by their column counted from the first attended one.
    Under ``extend`` that is the first virtual token, so with left padding the pads between the
    virtual and the real tokens would shift every real token's weight. This hook hands ``Pooling``
    a copy of the features with the columns reordered (pads, virtual tokens, text): each position
    then gets the weight it gets for the text alone. Every other mode is order independent or picks
    the same position (``cls``: the first virtual token; ``lasttoken``: the last text token).
    :class:`WeightedMeanRestoreHook` puts the caller's order back in ``Pooling``'s output.
    """

    pre = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        features = args[0] if args else None
        if not isinstance(features, MutableMapping):
            return None
        tokens, mask, ids = features.get("token_embeddings"), features.get("attention_mask"), features.get("input_ids")
        if not (isinstance(tokens, Tensor) and isinstance(mask, Tensor) and isinstance(ids, Tensor)):
            return None
        m = mask.shape[1] - ids.shape[1]
        if m <= 0 or mask.dim() != 2 or tokens.dim() != 3 or tokens.shape[1] != mask.shape[1]:
            return None
        order = virtual_after_padding(features.get(_PADDING_MASK, mask), m)
        reordered = copy_features(features)
        reordered.pop(_PADDING_MASK, None)
        reordered["token_embeddings"] = tokens.gather(1, order.unsqueeze(-1).expand_as(tokens))
        reordered["attention_mask"] = mask.gather(1, order)
        reordered[_ORIGINAL] = (tokens, mask)
        return (reordered, *args[1:]), kwargs


class WeightedMeanRestoreHook(MaskpatchHook):
    """Forward hook on the same ``Pooling``: the features it returns carry the caller's column order again."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not isinstance(output, MutableMapping):
            return None
        # The dict is maskpatch's own copy (Pooling returns what it was given), so it is changed in place.
        if _ORIGINAL in output:
            output["token_embeddings"], output["attention_mask"] = output.pop(_ORIGINAL)
        output.pop(_PADDING_MASK, None)
        return None
