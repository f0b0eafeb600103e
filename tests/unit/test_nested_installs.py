"""Installs on a part of a model, lazily registered hooks and the flattened path.

A second apply() may join an existing install only when that install already holds every hook
patching the whole model needs; otherwise the model would be half repaired without a word.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import maskpatch
from maskpatch.adapters.sentence_transformers.transformer import TransformerOutputHook, TransformerPositionHook
from maskpatch.hooks import PositionIdsHook
from tests.helpers import add_prompt_learning, st_model


@pytest.fixture
def model(tiny_model_dir):
    return add_prompt_learning(st_model(tiny_model_dir("bert"), include_prompt=False), m=4)


def test_apply_on_the_peft_model_then_on_the_sentence_transformer_raises(model):
    """apply(peft_model) then apply(st): the PEFT install lacks the Transformer hooks, so it raises."""
    handle = maskpatch.apply(model[0].model)
    with pytest.raises(maskpatch.AlreadyPatchedError, match="TransformerOutputHook on Transformer"):
        maskpatch.apply(model)
    with pytest.raises(maskpatch.AlreadyPatchedError):
        with maskpatch.patched(model):
            pass
    handle.remove()
    assert not maskpatch.is_patched(model)


def test_apply_on_the_transformer_then_on_the_whole_model_raises_under_extend(model):
    """apply(model[0]) misses Pooling's prompt hook under extend: apply(model) must not join it."""
    handle = maskpatch.apply(model[0])
    with pytest.raises(maskpatch.AlreadyPatchedError, match="PoolingPromptHook on Pooling"):
        maskpatch.apply(model)
    handle.remove()


def test_a_part_install_that_covers_the_whole_model_is_joined(model):
    """Under ignore no Pooling hook exists, so apply(model[0]) then apply(model) joins (with a warning)."""
    first = maskpatch.apply(model[0], policy="ignore")
    with pytest.warns(maskpatch.MaskpatchWarning, match="already patched"):
        second = maskpatch.apply(model, policy="ignore")
    assert second.adapter == first.adapter
    second.remove()
    assert not maskpatch.is_patched(model)


def test_apply_on_a_part_of_a_patched_model_joins_the_whole_install(model):
    """apply(model) then apply(model[0]): the part is covered, the existing handle comes back."""
    handle = maskpatch.apply(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", maskpatch.MaskpatchWarning)
        again = maskpatch.apply(model[0])
    again.remove()
    assert not maskpatch.is_patched(model) and not handle.active


def test_a_position_hook_called_after_remove_registers_nothing(tiny_model_dir):
    """A forward that began before remove() on another thread must not leave a hook behind."""
    model = st_model(tiny_model_dir("qwen2"), pooling="lasttoken")
    handle = maskpatch.apply(model)
    hook = next(h for h in model[0]._forward_pre_hooks.values() if isinstance(h, TransformerPositionHook))
    handle.remove()
    add_prompt_learning(model, m=4)
    hook(model[0], (), {})  # what the in-flight forward would still run
    base = model[0].model.base_model
    assert not any(isinstance(h, PositionIdsHook) for h in base._forward_pre_hooks.values())


def test_packed_flash_attention_features_are_refused_with_prompt_learning(model):
    """Packed (FA2-unpadded) features carry no attention_mask; with virtual tokens they raise, not pass."""
    hook = TransformerOutputHook(maskpatch.hooks.InstallRecord("extend", "sentence-transformers", pinned=True))
    packed = {"token_embeddings": torch.zeros(1, 12, 32), "cu_seq_lens_q": torch.tensor([0, 5, 12])}
    with pytest.raises(maskpatch.DriftError, match="unpad_inputs=False"):
        hook(model[0], (), {}, packed)
