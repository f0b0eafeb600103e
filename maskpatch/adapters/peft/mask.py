"""The mask that lines up with a patched PeftModel's outputs under ``extend`` and ``ignore``.

The ``output_mask`` capability of the adapters whose installs hold a PeftModel (``peft``,
``sentence-transformers``, the hosts): :func:`maskpatch.output_mask` asks the adapter that made
the install, through its record.
"""

from __future__ import annotations

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

    A plain depth-first walk of ``_modules`` that stops at the first PeftModel: it is at the top of
    the install's tree or near it (a SentenceTransformer's first module's model), so this costs
    a few modules, not the whole model.
    """
    stack = [model]
    while stack:
        module = stack.pop()
        if is_peft_model(module):
            return active_layout(module)
        stack.extend(reversed([child for child in module._modules.values() if child is not None]))
    return NO_LAYOUT
