"""``maskpatch.output_mask`` builds no message unless it raises (issue 11, item 6). Nothing here is timed.

Invariant protected here: users call ``output_mask`` per batch, so its input checks format their
"expected ... dimensions" text only on the way to raising. Before this change ``require_tensor``
built that text (iterating the allowed dimensions) on every call; the first test fails then.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import maskpatch
from maskpatch.errors import PolicyError
from maskpatch.inputs import require_tensor

from helpers import add_prompt_learning, st_model

M = 4


class CountingDims:
    """A collection of allowed dimensions that counts how often it is iterated (as formatting does)."""

    def __init__(self, *dims: int) -> None:
        self.dims = dims
        self.iterated = 0

    def __contains__(self, value: object) -> bool:
        return value in self.dims

    def __iter__(self) -> Iterator[int]:
        self.iterated += 1
        return iter(self.dims)

    def __len__(self) -> int:
        return len(self.dims)


def test_require_tensor_formats_nothing_for_a_valid_tensor():
    dims = CountingDims(2)
    mask = torch.ones(2, 3)
    assert require_tensor(mask, name="attention_mask", where="output_mask", dims=dims) is mask
    assert dims.iterated == 0


def test_require_tensor_still_names_the_dimensions_when_it_raises():
    dims = CountingDims(2)
    with pytest.raises(
        PolicyError, match=r"attention_mask to be a torch.Tensor with 2 dimensions, but got shape \(3,\)"
    ):
        require_tensor(torch.ones(3), name="attention_mask", where="output_mask", dims=dims)
    assert dims.iterated > 0


def test_output_mask_follows_a_peft_model_swapped_in_after_it_was_asked(tiny_model_dir):
    """output_mask remembers where the PeftModel sits; a PeftModel with another width swapped in is read anew."""
    model = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    other = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M + 2)[0].model
    mask = torch.tensor([[1, 1, 0]])
    with maskpatch.patched(model):
        assert maskpatch.output_mask(model, mask).tolist() == [[1] * M + [1, 1, 0]]
        first = model[0].model
        model[0].model = other
        try:
            assert maskpatch.output_mask(model, mask).tolist() == [[1] * (M + 2) + [1, 1, 0]]
        finally:
            model[0].model = first
        assert maskpatch.output_mask(model, mask).tolist() == [[1] * M + [1, 1, 0]]
