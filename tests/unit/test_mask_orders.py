"""Pure mask functions of the known-limit checks and the weightedmean repair, on literal tensors.

Invariants protected here:

* ``has_pads_before_tokens`` (``ONES``: 1 attends) is true exactly when a row has a non-attending
  entry before an attending one (left padding or a hole), whatever the dtype; right padding and
  the virtual-token prefix alone are not;
* ``virtual_after_padding`` moves the ``m`` leading virtual columns past each row's left padding
  and leaves right-padded and unpadded rows in order; it reads no values on the host.
"""

from __future__ import annotations

import pytest
import torch

from maskpatch.features import virtual_after_padding
from maskpatch.limits import has_pads_before_tokens


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.float32])
def test_pads_before_tokens_is_left_padding_or_a_hole(dtype):
    """Left padding behind the virtual entries and holes count; right padding does not."""
    right = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=dtype)
    left = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=dtype)
    hole = torch.tensor([[1, 1, 1, 0, 1, 0, 0]], dtype=dtype)
    assert not has_pads_before_tokens(right)
    assert has_pads_before_tokens(left)
    assert has_pads_before_tokens(hole)


def test_virtual_after_padding_orders_pads_virtual_text():
    """Row by row: pads first, then the m virtual columns, then the text and any right padding."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, 0]])
    expected = torch.tensor([[2, 3, 0, 1, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [2, 3, 4, 0, 1, 5, 6]])
    order = virtual_after_padding(mask, 2)
    assert torch.equal(order, expected)
    assert torch.equal(
        mask.gather(1, order), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0]])
    )


def test_virtual_after_padding_runs_on_meta_tensors():
    """No value is read on the host (a meta tensor has none): no device sync per forward."""
    order = virtual_after_padding(torch.ones(3, 9, device="meta"), 4)
    assert order.shape == (3, 9) and order.dtype == torch.long
