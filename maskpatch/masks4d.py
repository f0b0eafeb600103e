"""Pure functions that put ``M`` virtual tokens in front of 4-D masks, position ids and labels.

Hugging Face models accept a custom 4-D attention mask ``(B, H, Q, K)`` (tree attention, packed
sequences). PEFT prompt learning prepends ``M`` virtual tokens but only knows how to extend a 2-D
mask, so maskpatch extends the 4-D mask here, the way the 2-D path of a causal model behaves:
real tokens attend every virtual token, and virtual tokens attend each other causally and no real
token. Position ids and labels get the matching ``M`` leading entries.

Nothing here reads a tensor's values on the host, and no input tensor is modified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import PolicyError

__all__ = [
    "IGNORE_INDEX",
    "extend_4d_mask",
    "prefix_labels",
    "shift_position_ids",
    "shift_span_positions",
]

#: The label value Hugging Face losses skip.
IGNORE_INDEX = -100


def extend_4d_mask(mask: Tensor, m: int) -> Tensor:
    """Return 4-D ``mask`` (additive float: ``0.0`` attends; bool: ``True`` attends) with ``m`` virtual tokens first.

    ``mask`` has shape ``(B, H, N, N)`` (``H`` is usually 1): query rows, key columns. The result
    has shape ``(B, H, m + N, m + N)``, ``mask``'s dtype and device::

                  keys:  v0 v1 | caller's N keys
        v0 (virtual)      a  . |  .  .  .
        v1 (virtual)      a  a |  .  .  .        a = attend, . = masked
        -----------------------+---------
        caller's N rows   a  a |  mask
                          a  a |  (unchanged)

    Virtual tokens attend each other causally and no real token (the 2-D causal path does the
    same); every real row attends every virtual token. New masked entries of a float mask take
    the caller's masked value (``-inf`` or the dtype minimum) when the caller's mask has one, the
    dtype minimum otherwise. Raises :class:`PolicyError` for another rank, a non-square mask (a
    mask for a cached decoding step) or an integer dtype.
    """
    _check_4d(mask)
    batch, heads, n, _ = mask.shape
    device = mask.device
    virtual = torch.ones(m, m, dtype=torch.bool, device=device).tril()
    top = torch.cat((virtual, virtual.new_zeros(m, n)), dim=1).expand(batch, heads, m, m + n)
    if mask.dtype == torch.bool:
        left = mask.new_ones(batch, heads, n, m)
    else:
        masked = torch.minimum(mask.amin(), mask.new_full((), torch.finfo(mask.dtype).min))
        top = torch.where(top, mask.new_zeros(()), masked)
        left = mask.new_zeros(batch, heads, n, m)
    return torch.cat((top, torch.cat((left, mask), dim=3)), dim=2)


def _check_4d(mask: Tensor) -> None:
    if mask.dim() != 4:
        shape = tuple(mask.shape)
        raise PolicyError(f"expected a 4-D attention mask (batch, heads, queries, keys), but got shape {shape}")
    if mask.shape[2] != mask.shape[3]:
        raise PolicyError(
            f"expected a square 4-D attention mask (as many queries as keys, no cache), but got shape "
            f"{tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise PolicyError(f"expected a bool or floating-point (additive) 4-D mask, but got dtype {mask.dtype}")


def shift_position_ids(position_ids: Tensor, m: int, *, first: int = 0) -> Tensor:
    """Return ``position_ids`` (``(..., N)``) with ``first..first+m-1`` in front and the caller's ids moved up by ``m``.

    Virtual tokens take the model's first ``m`` positions (``first`` is 0 for most models,
    ``padding_idx + 1`` for RoBERTa-style ones); each real token keeps its distance to the others::

        caller   0 1 2 0 1 2      (two packed sequences)
        m = 2    0 1 | 2 3 4 2 3 4
    """
    virtual = torch.arange(first, first + m, dtype=position_ids.dtype, device=position_ids.device)
    virtual = virtual.expand(*position_ids.shape[:-1], m)
    return torch.cat((virtual, position_ids + m), dim=-1)


def prefix_labels(labels: Tensor, m: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Return per-token ``labels`` ``(B, N, ...)`` with ``m`` leading ``ignore_index`` entries (losses skip them)."""
    prefix = labels.new_full((labels.shape[0], m, *labels.shape[2:]), ignore_index)
    return torch.cat((prefix, labels), dim=1)


def shift_span_positions(positions: Tensor, m: int) -> Tensor:
    """Return answer-span ``positions`` (indices into the caller's ``N`` tokens) as indices into ``m + N`` positions."""
    return positions + m
