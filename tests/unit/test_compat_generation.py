"""The cache keyword of generation, ``past_key_values`` or ``cache`` (transformers 5.24+), known in one place.

Invariants protected here:

* the installed transformers' name is the one its version documents (``cache`` from 5.24 on);
* a keyword dict's cache is found under either name; two different caches are refused, not guessed;
* renaming returns a new dict and leaves the caller's alone;
* the position hook takes a decoding step for one under either name (new token after a cache:
  the last position ids of the whole mask), and a call without a cache for a full one.
"""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

import maskpatch
from maskpatch.compat.generation import cache_name_in, generation_cache_name, with_cache_name

A, B = object(), object()


def _prompt_tuned_causal_lm(m: int):
    import warnings

    import transformers
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base_config = transformers.Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)
        return get_peft_model(transformers.Qwen2ForCausalLM(base_config).eval(), peft_config)


def test_installed_transformers_name_follows_its_version():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` in generate."""
    import transformers

    renamed = Version(transformers.__version__).release >= (5, 24)
    assert generation_cache_name() == ("cache" if renamed else "past_key_values")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"cache": A}, "cache"),
        ({"past_key_values": A}, "past_key_values"),
        ({"cache": None, "past_key_values": A}, "past_key_values"),
        ({"cache": A, "past_key_values": A}, "cache"),
        ({"cache": None, "past_key_values": None}, None),
        ({"input_ids": A}, None),
    ],
)
def test_cache_is_found_under_either_name(kwargs, name):
    """A value that is not None under ``cache`` or ``past_key_values`` is the cache."""
    assert cache_name_in(kwargs) == name


def test_two_different_caches_are_refused():
    """transformers would silently drop one of them: maskpatch says so instead of picking one."""
    with pytest.raises(maskpatch.UnsupportedVersionError, match="two different ones"):
        cache_name_in({"cache": A, "past_key_values": B})


def test_renaming_returns_a_new_dict():
    """The cache moves to the name asked for; the caller's dict keeps its own keys."""
    given = {"past_key_values": A, "input_ids": B, "cache": None}
    assert with_cache_name(given, "cache") == {"cache": A, "input_ids": B}
    assert given == {"past_key_values": A, "input_ids": B, "cache": None}
    assert with_cache_name({"input_ids": B}, "past_key_values") == {"input_ids": B}


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_position_hook_takes_a_cached_step_under_either_name(name):
    """One new token after a cache gets the last position id of the extended mask (pads skipped)."""
    from maskpatch.hooks import InstallRecord, PositionIdsHook

    pm = _prompt_tuned_causal_lm(m=2)
    hook = PositionIdsHook(InstallRecord("extend", "peft", pinned=True), pm)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # M=2 virtual, then 2 pads in row 0
    _, step = hook(pm.base_model, (), {"input_ids": torch.tensor([[5], [6]]), "attention_mask": mask, name: A})
    assert step["position_ids"].tolist() == [[4], [6]]
    assert hook(pm.base_model, (), {"input_ids": torch.tensor([[5], [6]]), "attention_mask": mask}) is None
