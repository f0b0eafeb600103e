"""Pure helpers of the PEFT adapter, checked against literal tensors (no model involved).

* ``extend_4d_mask`` puts M virtual tokens in front of a 4-D mask the way the 2-D causal path
  behaves, in both conventions, keeping the caller's dtype and masked value, without touching the input;
* ``shift_position_ids``, ``prefix_labels`` and ``shift_span_positions`` give virtual tokens
  positions 0..M-1 / ignored labels and move the caller's values past them.
"""

from __future__ import annotations

import pytest
import torch

from maskpatch.errors import PolicyError
from maskpatch.masks4d import extend_4d_mask, prefix_labels, shift_position_ids, shift_span_positions

T, F = True, False


def test_extend_4d_bool_mask_matches_drawing():
    """A bool mask gains causal virtual rows and attended virtual columns; the caller's block is unchanged."""
    mask = torch.tensor([[T, F], [T, T]])[None, None]
    expected = torch.tensor(
        [
            [T, F, F, F],
            [T, T, F, F],
            [T, T, T, F],
            [T, T, T, T],
        ]
    )[None, None]
    before = mask.clone()
    out = extend_4d_mask(mask, 2)
    assert out.dtype == torch.bool
    assert torch.equal(out, expected)
    assert torch.equal(mask, before)


@pytest.mark.parametrize("masked", [float("-inf"), torch.finfo(torch.float32).min])
def test_extend_4d_additive_mask_keeps_callers_masked_value(masked):
    """An additive mask gets 0.0 where it attends and the caller's own masked value elsewhere."""
    mask = torch.tensor([[0.0, masked], [0.0, 0.0]])[None, None]
    out = extend_4d_mask(mask, 1)
    expected = torch.tensor(
        [
            [0.0, masked, masked],
            [0.0, 0.0, masked],
            [0.0, 0.0, 0.0],
        ]
    )[None, None]
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_extend_4d_additive_mask_without_masked_entries_uses_dtype_minimum():
    """A mask that masks nothing has no masked value to copy: new masked entries use the dtype minimum."""
    mask = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    out = extend_4d_mask(mask, 2)
    low = torch.finfo(torch.float64).min
    expected = torch.tensor([[0.0, low, low], [0.0, 0.0, low], [0.0, 0.0, 0.0]], dtype=torch.float64)[None, None]
    assert torch.equal(out, expected)


def test_extend_4d_mask_keeps_batch_and_head_axes():
    """Per-row, per-head masks stay per row and per head."""
    mask = torch.zeros(3, 2, 4, 4)
    assert extend_4d_mask(mask, 5).shape == (3, 2, 9, 9)


@pytest.mark.parametrize(
    "mask",
    [torch.zeros(1, 3, 3), torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 2, dtype=torch.long)],
    ids=["rank3", "not-square", "integer"],
)
def test_extend_4d_mask_rejects_what_it_cannot_extend(mask):
    """Another rank, a cached-step (non-square) mask or an integer mask raises PolicyError."""
    with pytest.raises(PolicyError, match="expected"):
        extend_4d_mask(mask, 2)


def test_shift_position_ids_puts_virtual_positions_first():
    """Virtual tokens take 0..M-1 and every caller position moves up by M (packed sequences keep their restarts)."""
    ids = torch.tensor([[0, 1, 2, 0, 1, 2], [1, 1, 0, 1, 2, 3]])
    expected = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 4], [0, 1, 3, 3, 2, 3, 4, 5]])
    assert torch.equal(shift_position_ids(ids, 2), expected)
    assert torch.equal(ids, torch.tensor([[0, 1, 2, 0, 1, 2], [1, 1, 0, 1, 2, 3]]))


def test_prefix_labels_ignores_virtual_positions():
    """Token labels get M leading -100 (the index HF losses skip); the caller's labels are untouched."""
    labels = torch.tensor([[3, -100], [1, 2]])
    assert torch.equal(prefix_labels(labels, 2), torch.tensor([[-100, -100, 3, -100], [-100, -100, 1, 2]]))
    assert torch.equal(prefix_labels(labels, 1, ignore_index=0), torch.tensor([[0, 3, -100], [0, 1, 2]]))


def test_shift_span_positions_moves_answer_spans():
    """Answer start/end indices into N tokens become indices into M + N positions."""
    assert torch.equal(shift_span_positions(torch.tensor([0, 4]), 3), torch.tensor([3, 7]))
