"""The sentence-transformers adapter: which modules of a model get which hooks.

:class:`SentenceTransformersAdapter` walks the model once and plans, for every ``Transformer``,
the hooks of :mod:`.transformer` (and the position hook on a PEFT model already inside it), for
every ``Pooling`` under ``extend`` (and under ``ignore`` before sentence-transformers 6.2) the
hooks of :mod:`.pooling`, and for every other module what :mod:`.consumers` says it needs. It
registers nothing itself (maskpatch does, all or none).
"""

from __future__ import annotations

from torch import nn

from ...compat.generation import generation_cache_name
from ...compat.st_inline_mask import pooling_reads_by_column, st_extends_mask_inline
from ...compat.st_inner import inner_model, inner_name
from ...compat.st_modules import st_classes
from ...compat.versions import SUPPORTED
from ...handle import HookSpec
from ...hooks import InstallRecord, position_hook_for
from ...layout import is_peft_model
from ...limits import limit_hook_for
from ..peft.mask import prompt_output_mask
from ..peft_generation import generates_with_peft
from .consumers import consumer_specs
from .pooling import (
    PoolingPromptHook,
    PoolingRealColumnsHook,
    WeightedMeanOrderHook,
    WeightedMeanRestoreHook,
    is_weighted_mean,
)
from .transformer import InlineMaskGuardHook, TransformerOutputHook, TransformerPositionHook

__all__ = ["SentenceTransformersAdapter"]


class SentenceTransformersAdapter:
    """Patches every sentence-transformers ``Transformer`` module inside the given model."""

    name = "sentence-transformers"
    requires = {dist: SUPPORTED[dist] for dist in ("sentence-transformers", "transformers", "torch")}
    optional = {"peft": SUPPORTED["peft"]}
    #: A part of a model this adapter patched (``apply(model)`` then ``apply(model[0])``) is planned
    #: as within the whole, so joining it is decided from the install record (optional capability).
    plans_parts_exactly = True

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
        by_column = pooling_reads_by_column()
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
            elif isinstance(module, classes.pooling) and record.policy == "ignore" and by_column:
                # Before 6.2 Pooling reads some positions by column: it sees the real columns only.
                specs.append(HookSpec(module, PoolingRealColumnsHook(record)))
                specs.append(HookSpec(module, WeightedMeanRestoreHook(record)))
            elif isinstance(module, classes.pooling) and record.policy == "extend":
                specs.append(HookSpec(module, PoolingPromptHook(record)))
                if is_weighted_mean(module):  # after PoolingPromptHook: it orders the mask that hook made
                    specs.append(HookSpec(module, WeightedMeanOrderHook(record)))
                    specs.append(HookSpec(module, WeightedMeanRestoreHook(record)))
            # Consumers that read N-column keys besides the mask (MultiVectorMask): see .consumers.
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
