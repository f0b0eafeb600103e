"""Mask conventions: each convention spells "attend" and "do not attend" in the caller's dtype."""

from __future__ import annotations

import pytest
import torch

from maskpatch import MaskConvention, MaskpatchError, PolicyError
from maskpatch.conventions import fill_value

ONES, KEY_PADDING, ADDITIVE = MaskConvention.ONES, MaskConvention.KEY_PADDING, MaskConvention.ADDITIVE


@pytest.mark.parametrize(
    ("convention", "dtype", "attend", "expected"),
    [
        (ONES, torch.long, True, 1),
        (ONES, torch.long, False, 0),
        (ONES, torch.bool, True, True),
        (ONES, torch.bool, False, False),
        (ONES, torch.float32, True, 1.0),
        (ONES, torch.float32, False, 0.0),
        (KEY_PADDING, torch.bool, True, False),
        (KEY_PADDING, torch.bool, False, True),
        (KEY_PADDING, torch.long, True, 0),
        (KEY_PADDING, torch.long, False, 1),
        (ADDITIVE, torch.float32, True, 0.0),
        (ADDITIVE, torch.float32, False, torch.finfo(torch.float32).min),
        (ADDITIVE, torch.float16, False, torch.finfo(torch.float16).min),
        (ADDITIVE, torch.bfloat16, False, torch.finfo(torch.bfloat16).min),
    ],
)
def test_fill_value_spells_attend_in_the_convention_and_dtype(convention, dtype, attend, expected):
    """fill_value returns the literal each convention uses for attend / do-not-attend, typed for the dtype."""
    value = fill_value(convention, attend=attend, dtype=dtype)
    assert value == expected
    assert type(value) is type(expected)


def test_fill_value_written_into_a_tensor_keeps_its_meaning():
    """A value from fill_value, written into a tensor of that dtype, reads back as the same literal."""
    for convention in MaskConvention:
        for dtype in (torch.float32, torch.float16):
            for attend in (True, False):
                value = fill_value(convention, attend=attend, dtype=dtype)
                assert torch.full((1,), value, dtype=dtype).item() == value


def test_additive_convention_refuses_integer_and_bool_masks():
    """An additive mask must be floating point: an int or bool dtype raises PolicyError naming the dtype."""
    for dtype in (torch.long, torch.bool):
        with pytest.raises(PolicyError, match=str(dtype)):
            fill_value(ADDITIVE, attend=True, dtype=dtype)


def test_unknown_convention_raises_policy_error():
    """Anything but a MaskConvention raises PolicyError (also a ValueError and a MaskpatchError)."""
    with pytest.raises(PolicyError, match="expected a MaskConvention") as info:
        fill_value("ones", attend=True, dtype=torch.long)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MaskpatchError)


def test_conventions_are_exactly_the_three_documented_ones():
    """The enum holds ONES, KEY_PADDING and ADDITIVE and nothing else (docs and adapters rely on it)."""
    assert {c.name for c in MaskConvention} == {"ONES", "KEY_PADDING", "ADDITIVE"}
