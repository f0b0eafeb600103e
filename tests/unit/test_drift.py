"""Pure drift functions and features-dict repairs, checked against literal tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from maskpatch import POLICIES, DriftError, MaskConvention, PolicyError
from maskpatch.drift import check_excess, positions_from_mask, prefix_mask, strip_positions, validate_policy
from maskpatch.features import exclude_leading_tokens, repair_features

MIN32 = torch.finfo(torch.float32).min


def _shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    """True when ``view`` is a view: no copy, the same memory as ``base``."""
    return view._is_view() and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


# --- policies -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["extend", "ignore", "strip"])
def test_validate_policy_accepts_each_documented_policy(policy):
    """The three documented policies validate to themselves, and POLICIES lists exactly them."""
    assert validate_policy(policy) == policy
    assert set(POLICIES) == {"extend", "ignore", "strip"}


@pytest.mark.parametrize("bad", ["banana", "Extend", "", None, 1, ("extend",)])
def test_validate_policy_rejects_anything_else_naming_value_and_choices(bad):
    """An unknown policy raises PolicyError (a ValueError) naming the value and every valid policy."""
    with pytest.raises(PolicyError) as info:
        validate_policy(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert all(repr(p) in message for p in POLICIES)
    assert isinstance(info.value, ValueError)


# --- check_excess ---------------------------------------------------------------------------


def test_check_excess_zero_needs_no_repair_whatever_m():
    """No excess means nothing to repair, also when the active adapter has M > 0 (disabled adapter)."""
    assert check_excess(0, 0, where="x", adapter=None) == 0
    assert check_excess(0, 8, where="x", adapter="default") == 0


def test_check_excess_equal_to_m_is_repaired():
    """An excess of exactly the active adapter's M is the amount to repair."""
    assert check_excess(8, 8, where="x", adapter="default") == 8


@pytest.mark.parametrize(("observed", "expected"), [(3, 8), (9, 8), (-2, 8), (5, 0)])
def test_check_excess_unexplained_raises_drift_error_naming_everything(observed, expected):
    """Any other excess raises DriftError naming where, the adapter, M and the excess found."""
    adapter = "default" if expected else None
    with pytest.raises(DriftError) as info:
        check_excess(observed, expected, where="Transformer output has 25 positions", adapter=adapter)
    message = str(info.value)
    assert "Transformer output has 25 positions" in message
    assert f"found {observed}" in message
    if adapter is None:
        assert "no active prompt-learning adapter" in message
    else:
        assert f"'{adapter}' adds {expected} virtual tokens" in message
    assert isinstance(info.value, RuntimeError)


# --- prefix_mask ----------------------------------------------------------------------------


def test_prefix_mask_extend_prepends_attending_ones():
    """extend (ONES): m leading 1 columns, then the caller's mask unchanged."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(prefix_mask(mask, 2, attend=True), expected)


def test_prefix_mask_ignore_prepends_non_attending_zeros():
    """ignore (ONES): m leading 0 columns, then the caller's mask unchanged."""
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    assert torch.equal(prefix_mask(mask, 2, attend=False), expected)


@pytest.mark.parametrize(
    ("convention", "mask", "attend", "expected"),
    [
        (MaskConvention.ONES, torch.tensor([[True, False]]), True, torch.tensor([[True, True, False]])),
        (MaskConvention.ONES, torch.tensor([[True, False]]), False, torch.tensor([[False, True, False]])),
        (MaskConvention.KEY_PADDING, torch.tensor([[False, True]]), True, torch.tensor([[False, False, True]])),
        (MaskConvention.KEY_PADDING, torch.tensor([[False, True]]), False, torch.tensor([[True, False, True]])),
        (MaskConvention.ADDITIVE, torch.tensor([[0.0, MIN32]]), True, torch.tensor([[0.0, 0.0, MIN32]])),
        (MaskConvention.ADDITIVE, torch.tensor([[0.0, MIN32]]), False, torch.tensor([[MIN32, 0.0, MIN32]])),
        (MaskConvention.ONES, torch.tensor([[1.0, 0.0]]), True, torch.tensor([[1.0, 1.0, 0.0]])),
    ],
)
def test_prefix_mask_writes_the_prefix_in_the_callers_convention(convention, mask, attend, expected):
    """Each convention gets its own spelling of attend / do-not-attend in the prefix."""
    out = prefix_mask(mask, 1, attend=attend, convention=convention)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.float32, torch.float16])
def test_prefix_mask_keeps_dtype_device_and_leaves_input_untouched(dtype):
    """The result has the mask's dtype and device; the caller's mask object and values do not change."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]]).to(dtype)
    before = mask.clone()
    out = prefix_mask(mask, 3, attend=True)
    assert out.dtype == dtype and out.device == mask.device
    assert out.shape == (2, 6)
    assert torch.equal(mask, before)
    assert out.data_ptr() != mask.data_ptr()


def test_prefix_mask_zero_columns_returns_equal_values():
    """m = 0 prepends nothing (disabled adapter or prefix tuning)."""
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(prefix_mask(mask, 0, attend=True), mask)


# --- strip_positions ------------------------------------------------------------------------


def test_strip_positions_cuts_leading_positions_as_a_view():
    """strip drops the first m positions along dim 1 and returns a view of the same storage."""
    out = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    stripped = strip_positions(out, 2)
    assert torch.equal(stripped, out[:, 2:])
    assert stripped.shape == (2, 3, 3)
    assert _shares_storage(stripped, out)


def test_strip_positions_honours_dim_and_zero():
    """strip along another dim cuts that dim; m = 0 keeps every position."""
    out = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert torch.equal(strip_positions(out, 1, dim=1), torch.tensor([[2, 3, 4], [6, 7, 8]]))
    assert torch.equal(strip_positions(out, 1, dim=0), torch.tensor([[5, 6, 7, 8]]))
    assert torch.equal(strip_positions(out, 0), out)


# --- positions_from_mask --------------------------------------------------------------------


def test_positions_from_mask_skips_left_padding():
    """Attended tokens count up from 0 and a pad repeats the position before it: the documented example."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]])
    assert torch.equal(positions_from_mask(mask), torch.tensor([[0, 1, 1, 1, 2, 3, 4, 4]]))


def test_positions_from_mask_leading_pads_get_a_valid_first_position():
    """Leading pads (left padding with no virtual tokens before them) get ``first``, never ``first - 1``."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(positions_from_mask(mask), torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]]))
    assert torch.equal(positions_from_mask(mask, 2), torch.tensor([[2, 2, 2, 3], [2, 3, 4, 5]]))


def test_positions_from_mask_right_padding_and_full_rows():
    """A full row is 0..L-1; right padding leaves the real tokens at 0..n-1 and the pads at n-1."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(positions_from_mask(mask), torch.tensor([[0, 1, 2, 3], [0, 1, 1, 1]]))


@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.float32])
def test_positions_from_mask_returns_long_for_any_mask_dtype(dtype):
    """Position ids are torch.long whatever the mask dtype (PEFT's extended mask is float32)."""
    mask = torch.tensor([[0, 1, 1]]).to(dtype)
    out = positions_from_mask(mask)
    assert out.dtype == torch.long
    assert torch.equal(out, torch.tensor([[0, 0, 1]]))


# --- features dict repairs ------------------------------------------------------------------


def _features() -> dict:
    return {
        "input_ids": torch.tensor([[101, 7, 102, 0], [101, 7, 8, 102]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "token_embeddings": torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2),
        "all_layer_embeddings": tuple(torch.full((2, 6, 2), float(i)) for i in range(3)),
    }


@pytest.mark.parametrize("policy", POLICIES)
def test_repair_features_never_mutates_the_callers_dict_or_tensors(policy):
    """repair_features returns a new dict; the caller's keys, tensor objects and values are unchanged."""
    features = _features()
    snapshot = {
        k: (v, v.clone() if isinstance(v, torch.Tensor) else tuple(t.clone() for t in v)) for k, v in features.items()
    }
    repaired = repair_features(features, "token_embeddings", 2, policy)
    assert repaired is not features
    assert set(features) == set(snapshot)
    for key, (obj, values) in snapshot.items():
        assert features[key] is obj
        if isinstance(obj, torch.Tensor):
            assert torch.equal(obj, values)
        else:
            assert all(torch.equal(a, b) for a, b in zip(obj, values, strict=True))


def test_repair_features_extend_and_ignore_prefix_the_mask_only():
    """extend prepends m ones to attention_mask, ignore m zeros; token outputs are the same objects."""
    features = _features()
    extend = repair_features(features, "token_embeddings", 2, "extend")
    ignore = repair_features(features, "token_embeddings", 2, "ignore")
    assert torch.equal(extend["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))
    assert torch.equal(ignore["attention_mask"], torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]))
    for repaired in (extend, ignore):
        assert repaired["token_embeddings"] is features["token_embeddings"]
        assert repaired["all_layer_embeddings"] is features["all_layer_embeddings"]
        assert repaired["input_ids"] is features["input_ids"]


def test_repair_features_strip_cuts_every_token_level_output_as_views():
    """strip cuts m positions from the output key and every layer of all_layer_embeddings (views); mask kept."""
    features = _features()
    repaired = repair_features(features, "token_embeddings", 2, "strip")
    assert repaired["attention_mask"] is features["attention_mask"]
    assert torch.equal(repaired["token_embeddings"], features["token_embeddings"][:, 2:])
    assert _shares_storage(repaired["token_embeddings"], features["token_embeddings"])
    layers = repaired["all_layer_embeddings"]
    assert type(layers) is tuple and len(layers) == 3
    for cut, full in zip(layers, features["all_layer_embeddings"], strict=True):
        assert cut.shape == (2, 4, 2)
        assert _shares_storage(cut, full)


def test_repair_features_keeps_the_batch_encoding_type_and_leaves_the_original_alone():
    """A BatchEncoding in gives a BatchEncoding out; the caller's BatchEncoding keeps its N-long mask."""
    features = BatchEncoding(_features())
    repaired = repair_features(features, "token_embeddings", 2, "extend")
    assert isinstance(repaired, BatchEncoding)
    assert repaired["attention_mask"].shape == (2, 6)
    assert features["attention_mask"].shape == (2, 4)


@pytest.mark.parametrize(
    ("mask", "count", "expected"),
    [
        ([[1, 1, 1, 1, 0, 0]], 2, [[0, 0, 1, 1, 0, 0]]),
        ([[0, 0, 1, 1, 1, 1]], 2, [[0, 0, 0, 0, 1, 1]]),
        ([[1, 1, 1, 0], [0, 1, 1, 1]], 1, [[0, 1, 1, 0], [0, 0, 1, 1]]),
        ([[1, 1, 1, 0]], 0, [[1, 1, 1, 0]]),
    ],
)
def test_exclude_leading_tokens_zeroes_the_first_count_tokens_after_left_padding(mask, count, expected):
    """The first `count` attended tokens of each row are zeroed, counted from the row's first token."""
    mask = torch.tensor(mask)
    before = mask.clone()
    assert torch.equal(exclude_leading_tokens(mask, count), torch.tensor(expected))
    assert torch.equal(mask, before)


@pytest.mark.parametrize("count", [torch.tensor(2), torch.tensor([2]), torch.tensor([2, 2])])
def test_exclude_leading_tokens_accepts_the_tensor_forms_sentence_transformers_passes(count):
    """prompt_length as a 0-d, (1,) or (B,) tensor (training collators) behaves like the int."""
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    assert torch.equal(exclude_leading_tokens(mask, count), torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]))
