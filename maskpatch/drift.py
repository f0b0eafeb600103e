"""Pure tensor functions: measure drift, and repair a mask or an output for it.

*Drift* is the number of positions a token-level output has beyond its mask: PEFT prompt
learning prepends ``M`` virtual tokens, so the output has ``N + M`` positions while the caller's
mask has ``N``. Nothing here reads a tensor's values on the host: every function is safe on an
accelerator and under ``torch.compile``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .conventions import MaskConvention, fill_value
from .errors import DriftError, PolicyError

__all__ = [
    "POLICIES",
    "Policy",
    "check_excess",
    "positions_from_mask",
    "prefix_mask",
    "strip_positions",
    "validate_policy",
]

Policy = Literal["extend", "ignore", "strip"]
POLICIES: tuple[Policy, ...] = ("extend", "ignore", "strip")


def validate_policy(policy: object) -> Policy:
    """Return ``policy`` if it is one of :data:`POLICIES`; raise :class:`PolicyError` otherwise."""
    if policy not in POLICIES:
        raise PolicyError(f"expected a policy out of {', '.join(map(repr, POLICIES))}, but got {policy!r}")
    return policy


def check_excess(observed: int, expected: int, *, where: str, adapter: str | None) -> int:
    """Return the number of positions to repair, given the ``observed`` and ``expected`` excess.

    An excess of 0 needs no repair (prefix tuning, LoRA, a disabled adapter). An excess equal to
    the active adapter's ``num_virtual_tokens`` (``expected``) is repaired. Anything else raises
    :class:`DriftError`, naming ``where`` the drift was seen, the adapter and both numbers.
    """
    if observed == 0:
        return 0
    if observed == expected:
        return expected
    if adapter is None:
        cause = "no active prompt-learning adapter adds virtual tokens, so 0 extra were expected"
    else:
        cause = f"the active adapter {adapter!r} adds {expected} virtual tokens, so {expected} extra were expected"
    raise DriftError(f"{where}: {cause}, but found {observed}; maskpatch does not repair an excess it cannot explain")


def prefix_mask(mask: Tensor, m: int, *, attend: bool, convention: MaskConvention = MaskConvention.ONES) -> Tensor:
    """Return ``mask`` (``ONES`` by default: 1 attends) with ``m`` leading columns prepended.

    The new columns attend when ``attend`` is true (policy ``extend``) and do not attend otherwise
    (policy ``ignore``), spelled in ``convention``. ``mask`` has shape ``(B, N)``; the result has
    shape ``(B, m + N)`` with ``mask``'s dtype and device. ``mask`` itself is not modified::

        mask        attend=True (extend)      attend=False (ignore)
        1 1 1 0     1 1 | 1 1 1 0             0 0 | 1 1 1 0
        1 1 1 1     1 1 | 1 1 1 1             0 0 | 1 1 1 1
    """
    if m < 0:
        raise DriftError(f"expected a non-negative number of mask columns to prepend, but got {m}")
    value = fill_value(convention, attend=attend, dtype=mask.dtype)
    # One op, one allocation (the result): no separate prefix tensor, no read of mask's values.
    # constant_pad_nd is the op F.pad dispatches, called without F.pad's Python wrapper.
    pad = (m, 0) if mask.dim() == 2 else (0, 0) * (mask.dim() - 2) + (m, 0)
    return torch.constant_pad_nd(mask, pad, value)


def strip_positions(output: Tensor, m: int, *, dim: int = 1) -> Tensor:
    """Return a view of ``output`` without its first ``m`` positions along ``dim`` (policy ``strip``)."""
    return output.narrow(dim, m, output.shape[dim] - m)


def positions_from_mask(mask: Tensor, first: int = 0) -> Tensor:
    """Return position ids that follow the attended tokens of ``mask`` (``ONES``: 0/1, 1 attends), from ``first``.

    Attended tokens count up from ``first`` in order, so left padding does not shift them. A pad
    gets the position of the attended token before it, and a leading pad gets ``first``: any valid
    id would do, since nothing attends to a pad. ``first`` is the model's own first position
    (:func:`maskpatch.positions.position_scheme`)::

        mask  1 1 0 0 1 1 1 0    (2 virtual tokens, 2 pads, 3 real tokens, 1 pad)
        ids   0 1 1 1 2 3 4 4    first = 0 (BERT, GPT-2, rotary models)
        ids   2 3 3 3 4 5 6 6    first = 2 (RoBERTa with padding_idx 1)
        mask  0 0 1 1            (a leading pad)
        ids   0 0 0 1            first = 0

    The mask's values must be 0 or 1 (transformers' convention), of any dtype. The result is
    ``torch.long`` on ``mask``'s device.
    """
    # Three ops, each costing little more than its dispatch on small tensors: one cumsum that
    # casts as it sums, then two in-place ops on that one temporary (no allocation, no scalar
    # wrapped as a tensor as torch.where needs).
    ranks = mask.cumsum(-1, dtype=torch.long)  # 1-based rank of each attended token; a pad repeats its predecessor's
    if first != 1:
        ranks.add_(first - 1)
    return ranks.clamp_(min=first)  # a leading pad's rank is 0: first - 1 before the clamp
