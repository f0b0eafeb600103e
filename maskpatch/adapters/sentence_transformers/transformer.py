"""The hooks on a sentence-transformers ``Transformer`` module: where the drift is repaired.

sentence-transformers calls ``self.model.forward(...)`` directly, so hooks on the PeftModel never
fire; the ``Transformer`` module's output dict holds the token embeddings and the caller's mask
together, so the repair sits there:

* :class:`TransformerOutputHook` measures the drift and repairs the dict for every consumer
  downstream (``Pooling``, ``encode(output_value="token_embeddings")``, ``all_layer_embeddings``);
* :class:`TransformerPositionHook` makes sure the PEFT base model gets position ids that skip
  padding (:class:`maskpatch.hooks.PositionIdsHook`), also for an adapter set after ``apply``;
* :class:`InlineMaskGuardHook` (sentence-transformers 3.3 - 6.1, which extend the mask inline
  themselves) hands the ``Transformer`` a copy of the features dict, and the output hook measures
  the drift against the caller's mask (:mod:`maskpatch.compat.st_inline_mask`).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import Tensor, nn

from ...compat.st_inline_mask import caller_mask
from ...compat.st_inner import inner_model
from ...drift import check_excess
from ...errors import DriftError
from ...features import copy_features, repair_features
from ...hooks import (
    LOCK,
    ForwardHook,
    ForwardPreHook,
    InstallRecord,
    ensure_position_hook,
    position_hook_key,
    submodule,
)
from ...layout import active_layout, is_peft_model
from ...limits import PART_MODEL_POOLING, ensure_limit_hook, report

__all__ = ["InlineMaskGuardHook", "TransformerOutputHook", "TransformerPositionHook"]


class TransformerPositionHook(ForwardPreHook):
    """Pre-hook on ``Transformer``: position ids for the PEFT model it holds now (see module doc).

    Runs on every forward. Once it has seen a :class:`~maskpatch.hooks.PositionIdsHook` on the
    base model, it remembers that hook's key (torch never reuses one) with the PEFT and base model
    it found, so a later forward checks in three lookups that the same hook is still there,
    instead of scanning the pre-hooks. What it remembers is not pickled: a copy scans again.
    """

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


class TransformerOutputHook(ForwardHook):
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


class InlineMaskGuardHook(ForwardPreHook):
    """Pre-hook on ``Transformer`` (sentence-transformers 3.3 - 6.1): a copy of the features dict.

    Those releases write their inline-extended ``attention_mask`` into the dict they are given;
    handing them a shallow copy keeps the caller's dict as it was, so the same features forwarded
    twice give the same result twice (see :mod:`maskpatch.compat.st_inline_mask`).
    """

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
