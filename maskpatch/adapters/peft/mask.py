"""The mask that lines up with a patched PeftModel's outputs under ``extend`` and ``ignore``.

The ``output_mask`` capability of the adapters whose installs hold a PeftModel (``peft``,
``sentence-transformers``, the hosts): :func:`maskpatch.output_mask` asks the adapter that made
the install, through its record.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from ...conventions import MaskConvention
from ...drift import prefix_mask
from ...hooks import InstallRecord
from ...inputs import require_tensor
from ...layout import NO_LAYOUT, VirtualLayout, active_layout, is_peft_model

__all__ = ["prompt_output_mask"]


def prompt_output_mask(
    model: nn.Module,
    record: InstallRecord,
    attention_mask: Tensor,
    *,
    convention: MaskConvention = MaskConvention.ONES,
) -> Tensor:
    """Return the mask that lines up with the outputs of ``model`` (a PeftModel, or a model holding one) now.

    While the active adapter prepends ``M`` virtual tokens: ``M`` leading attending entries under
    ``extend``, non-attending ones under ``ignore``; ``attention_mask`` itself under ``strip`` and
    when nothing is prepended (prefix tuning, LoRA, a disabled adapter). See :func:`maskpatch.output_mask`.
    """
    require_tensor(attention_mask, name="attention_mask", where="output_mask", dims=(2,))
    if record.policy == "strip":
        return attention_mask
    layout = _peft_layout(model)
    if not layout.adds_positions:
        return attention_mask
    attend = record.policy == "extend"
    return prefix_mask(attention_mask, layout.num_virtual_tokens, attend=attend, convention=convention)


def _peft_layout(model: nn.Module) -> VirtualLayout:
    """The layout of the first PeftModel in ``model`` (itself, or in ``modules()`` order), else :data:`NO_LAYOUT`.

    Users call :func:`maskpatch.output_mask` per batch, so the path from ``model`` to the
    PeftModel found last is remembered (by child names, weakly keyed on ``model``) and followed
    again while it still leads to a PeftModel: a few dictionary lookups. When it does not (a
    module swapped out since), a depth-first walk of ``_modules`` finds the first PeftModel again:
    it is at the top of the install's tree or near it (a SentenceTransformer's first module's
    model), so this costs a few modules, not the whole model.
    """
    path = _PATHS.get(model)
    if path is not None:
        found = _follow(model, path)
        if found is not None:
            return active_layout(found)
    path = _first_peft_path(model)
    if path is None:
        return NO_LAYOUT
    _PATHS[model] = path
    return active_layout(_follow(model, path))


# model -> child names leading from it to the PeftModel found there last. Process-local: never
# pickled, and an entry goes with its model.
_PATHS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _follow(model: nn.Module, path: tuple[str, ...]) -> nn.Module | None:
    """Return the PeftModel at ``path`` below ``model``, or None when the path no longer leads to one."""
    module: nn.Module | None = model
    for name in path:
        module = module._modules.get(name)  # type: ignore[union-attr]
        if module is None:
            return None
    return module if is_peft_model(module) else None


def _first_peft_path(model: nn.Module) -> tuple[str, ...] | None:
    """Return the child names leading to the first PeftModel in ``model`` (depth first), or None."""
    stack: list[tuple[nn.Module, tuple[str, ...]]] = [(model, ())]
    while stack:
        module, path = stack.pop()
        if is_peft_model(module):
            return path
        children = [(child, (*path, name)) for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))
    return None
