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
  and a forward hook move the virtual tokens past any left padding for the weights (and back).
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ..drift import check_excess
from ..errors import DriftError
from ..features import copy_features, exclude_leading_tokens, repair_features, virtual_after_padding
from ..handle import HookSpec
from ..hooks import (
    LOCK,
    InstallRecord,
    MaskpatchHook,
    ensure_position_hook,
    has_position_hook,
    position_hook_for,
)
from ..layout import active_layout, is_peft_model
from ..compat.generation import generation_cache_name
from .peft_generation import generates_with_peft
from ..limits import PART_MODEL_POOLING, ensure_limit_hook, limit_hook_for, report
from .peft.mask import prompt_output_mask
from .st_consumers import consumer_specs

__all__ = [
    "PoolingPromptHook",
    "SentenceTransformersAdapter",
    "TransformerOutputHook",
    "TransformerPositionHook",
    "WeightedMeanOrderHook",
    "WeightedMeanRestoreHook",
]


def _classes() -> tuple[type[nn.Module], type[nn.Module]] | None:
    if "sentence_transformers" not in sys.modules:
        return None
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    return Transformer, Pooling


class SentenceTransformersAdapter:
    """Patches every sentence-transformers ``Transformer`` module inside the given model."""

    name = "sentence-transformers"
    requires = {"sentence-transformers": ">=6.2,<7", "transformers": ">=5,<6", "torch": ">=2.4"}
    optional = {"peft": ">=0.21,<0.22"}

    def matches(self, model: object) -> bool:
        classes = _classes()
        if classes is None or not isinstance(model, nn.Module):
            return False
        return any(isinstance(module, classes[0]) for module in model.modules())

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        transformer_cls, pooling_cls = _classes()  # type: ignore[misc]  # matches() ran first
        specs: list[HookSpec] = []
        # An install on a part of the model (apply(model[0])) cannot reach the Pooling that follows.
        sees_pooling = any(isinstance(module, pooling_cls) for module in model.modules())
        for module in model.modules():
            if isinstance(module, transformer_cls):
                specs.append(HookSpec(module, TransformerPositionHook(record)))
                specs.append(HookSpec(module, TransformerOutputHook(record, sees_pooling=sees_pooling)))
                specs.extend(_position_specs(getattr(module, "model", None), record))
            elif isinstance(module, pooling_cls) and record.policy == "extend":
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
    """Pre-hook on ``Transformer``: position ids for the PEFT model it holds now (see module doc)."""

    pre = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inner: Any = getattr(module, "model", None)
        if self.record.removed or not is_peft_model(inner) or has_position_hook(inner.base_model):
            return  # the usual case: nothing to register, and no lock taken
        with LOCK:
            # A remove() on another thread may have run since this forward began: the record
            # registers nothing once its install is removed, so nothing of it is left behind.
            ensure_position_hook(inner, self.record)
            ensure_limit_hook(inner, self.record)


class TransformerOutputHook(MaskpatchHook):
    """Forward hook on ``Transformer``: repair the features dict for the modules downstream.

    ``sees_pooling`` is false for an install on a part of the model (``apply(model[0])``): under
    ``extend`` it then reports the known limit ``part-model-pooling`` when the features carry a
    ``prompt_length``, since a ``Pooling(include_prompt=False)`` it cannot reach would exclude the
    virtual tokens instead of the instruction.
    """

    def __init__(self, record: InstallRecord, *, sees_pooling: bool = True) -> None:
        super().__init__(record)
        self.sees_pooling = sees_pooling

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not isinstance(output, MutableMapping):
            return None
        if "cu_seq_lens_q" in output:  # packed features carry no attention_mask: check first
            _refuse_flattened(module)
            return None
        key = getattr(module, "module_output_name", "token_embeddings")
        tokens, mask = output.get(key), output.get("attention_mask")
        if not (isinstance(tokens, Tensor) and isinstance(mask, Tensor)) or tokens.dim() != 3 or mask.dim() != 2:
            return None
        observed = tokens.shape[1] - mask.shape[1]
        if observed <= 0:
            # Equal: no drift. Shorter: the model kept only its last positions (a causal-LM
            # reranker's logits_to_keep), which PEFT's prefix does not shift.
            return None
        layout = active_layout(getattr(module, "model", None))
        where = (
            f"{type(module).__name__} output {key!r} has {tokens.shape[1]} positions but "
            f"attention_mask has {mask.shape[1]}"
        )
        m = check_excess(observed, layout.num_virtual_tokens, where=where, adapter=layout.adapter)
        if not self.sees_pooling and self.record.policy == "extend" and output.get("prompt_length") is not None:
            report(
                self.record,
                PART_MODEL_POOLING,
                f"{type(module).__name__} was patched on its own under 'extend' and its features carry a "
                "prompt_length; a Pooling(include_prompt=False) after it would exclude the virtual tokens "
                "instead of the instruction",
                stacklevel=2,
            )
        return repair_features(output, key, m, self.record.policy)


def _refuse_flattened(module: nn.Module) -> None:
    layout = active_layout(getattr(module, "model", None))
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
