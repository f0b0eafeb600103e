"""The mask that lines up with a patched PeftModel's outputs under ``extend`` and ``ignore``."""

from __future__ import annotations

from torch import Tensor, nn

from ...conventions import MaskConvention
from ...drift import prefix_mask
from ...errors import PolicyError, UnsupportedModelError
from ...handle import find_record
from ...inputs import require_module, require_tensor
from ...layout import NO_LAYOUT, VirtualLayout, active_layout, is_peft_model
from ..generic import installed_count, prepended_mask

__all__ = ["output_mask"]


def output_mask(
    model: nn.Module, attention_mask: Tensor, *, convention: MaskConvention = MaskConvention.ONES
) -> Tensor:
    """Return the mask (in ``convention``, ``ONES`` by default: 1 attends) that lines up with ``model``'s outputs now.

    ``model`` is a model patched by :func:`maskpatch.apply`: a PeftModel, a model holding one (a
    SentenceTransformer), or a module patched with ``prepended_tokens=M``; and
    ``attention_mask`` the caller's ``(B, N)`` mask. While the active adapter prepends ``M``
    virtual tokens, under ``extend`` the result has ``M`` leading attending entries and under
    ``ignore`` ``M`` non-attending ones (``(B, M + N)``, like the outputs); under ``strip``, and
    when nothing is prepended (prefix tuning, LoRA, a disabled adapter), it is ``attention_mask``
    itself. Dtype and device are ``attention_mask``'s; it is not modified::

        mask  1 1 0     extend, M=2: 1 1 | 1 1 0     ignore: 0 0 | 1 1 0     strip: 1 1 0

    Raises :class:`UnsupportedModelError` when ``model`` is not patched.
    """
    require_module(model, where="output_mask")
    if installed_count(model) is not None:
        return prepended_mask(model, attention_mask, convention=convention)  # a prepended_tokens install
    record = find_record(model) if isinstance(model, nn.Module) else None
    if record is None:
        raise UnsupportedModelError(
            f"expected a model patched with maskpatch.apply(...), but {type(model).__name__} is not patched"
        )
    if record.adapter == "x-transformers":  # the prepended count is per call there
        raise PolicyError(
            "an x-transformers install prepends prepend_embeds per call: use "
            "maskpatch.adapters.x_transformers.output_mask(model, mask, prepend=prepend_embeds)"
        )
    require_tensor(attention_mask, name="attention_mask", where="output_mask", dims=(2,))
    layout = _peft_layout(model)
    if record.policy == "strip" or not layout.adds_positions:
        return attention_mask
    attend = record.policy == "extend"
    return prefix_mask(attention_mask, layout.num_virtual_tokens, attend=attend, convention=convention)


def _peft_layout(model: nn.Module) -> VirtualLayout:
    return next((active_layout(module) for module in model.modules() if is_peft_model(module)), NO_LAYOUT)
