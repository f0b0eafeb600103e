"""Mask conventions: how a mask tensor spells "attend".

Libraries disagree on what a mask entry means. maskpatch never guesses from the values (that
would need a host-device sync); the code that owns a mask states its convention, and the repair
functions in :mod:`maskpatch.drift` write new entries in that same convention, dtype and device.

==================  ===============  =====================  ==================================
convention          attend           do not attend          who uses it
==================  ===============  =====================  ==================================
``ONES``            ``1`` / ``True``  ``0`` / ``False``     Hugging Face 2-D ``attention_mask``
``KEY_PADDING``     ``False``        ``True``               torch ``key_padding_mask``
``ADDITIVE``        ``0.0``          dtype minimum          Hugging Face 4-D float masks
==================  ===============  =====================  ==================================
"""

from __future__ import annotations

import enum

import torch

from .errors import PolicyError

__all__ = ["MaskConvention", "fill_value"]


class MaskConvention(enum.Enum):
    """How a mask tensor spells "attend" (see the module table)."""

    ONES = "ones"
    KEY_PADDING = "key_padding"
    ADDITIVE = "additive"


def fill_value(convention: MaskConvention, *, attend: bool, dtype: torch.dtype) -> bool | int | float:
    """Return the scalar that means ``attend`` (or its opposite) under ``convention`` for ``dtype``.

    ``ONES``: 1/True attends. ``KEY_PADDING``: False attends. ``ADDITIVE``: 0.0 attends and the
    dtype's most negative finite value masks (what transformers uses).
    """
    if convention is MaskConvention.ONES:
        return _cast(1 if attend else 0, dtype)
    if convention is MaskConvention.KEY_PADDING:
        return _cast(0 if attend else 1, dtype)
    if convention is MaskConvention.ADDITIVE:
        if not dtype.is_floating_point:
            raise PolicyError(f"an additive mask must be a floating-point tensor, but got dtype {dtype}")
        return 0.0 if attend else torch.finfo(dtype).min
    raise PolicyError(f"expected a MaskConvention, but got {convention!r}")


def _cast(value: int, dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return bool(value)
    return float(value) if dtype.is_floating_point else value
