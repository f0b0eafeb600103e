"""Each model's own position numbering (``maskpatch.positions``) and the position ids built from it.

Invariants protected here:

* the first position of an unpadded input is read from the model itself: ``padding_idx + 1`` of a
  RoBERTa-style embeddings module whatever the pad id (RoBERTa with pad id 1 and 0, MPNet, whose
  embeddings fix it at 1 whatever the config says), 0 for BERT and rotary models;
* models without ``position_ids`` (T5, BLOOM) are recognised, and the limits no position ids can
  repair (T5's relative bias, a sliding window) are named;
* ``positions_from_mask(mask, first)`` and ``shift_position_ids(..., first=)`` count from ``first``
  (literal tensors);
* a RoBERTa PeftModel called directly with the caller's own ``position_ids`` (RoBERTa numbering,
  from 2) gives exactly the unpatched PEFT output: the virtual tokens take the model's first ``M``
  positions. maskpatch 0.1.0 put them at 0..M-1 and fails this.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import maskpatch
from maskpatch.drift import positions_from_mask
from maskpatch.masks4d import shift_position_ids
from maskpatch.positions import position_scheme

COMMON = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}


@pytest.mark.parametrize(
    ("config", "first"),
    [
        (transformers.BertConfig(**COMMON), 0),
        (transformers.RobertaConfig(**COMMON), 2),
        (transformers.RobertaConfig(**COMMON, pad_token_id=0), 1),
        (transformers.XLMRobertaConfig(**COMMON, pad_token_id=5), 6),
        (transformers.MPNetConfig(**COMMON, pad_token_id=0), 2),  # MPNet's embeddings fix padding_idx at 1
        (transformers.LlamaConfig(**COMMON), 0),
    ],
    ids=["bert", "roberta", "roberta-pad0", "xlm-roberta-pad5", "mpnet-config-pad0", "llama"],
)
def test_first_position_is_the_models_own(config, first):
    """The first of an unpadded input's positions is what the model's embeddings give it, not a constant."""
    scheme = position_scheme(transformers.AutoModel.from_config(config))
    assert scheme.takes_position_ids
    assert scheme.first == first


def test_models_without_position_ids_and_their_limits_are_recognised():
    """T5 takes no position ids and has a left-padding limit; BLOOM takes none and has none (ALiBi follows the mask)."""
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    )
    bloom = transformers.AutoModel.from_config(
        transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)
    )
    assert not position_scheme(t5).takes_position_ids
    assert "T5" in position_scheme(t5).left_padding_limit
    assert not position_scheme(bloom).takes_position_ids
    assert position_scheme(bloom).left_padding_limit is None
    assert position_scheme(bloom).sliding_window is None


def test_sliding_windows_are_read_only_where_a_layer_uses_them():
    """Mistral's window is its config's; Qwen2 carries a window in its config that no layer uses by default."""
    mistral = transformers.AutoModel.from_config(transformers.MistralConfig(**COMMON, sliding_window=6))
    qwen2 = transformers.AutoModel.from_config(transformers.Qwen2Config(**COMMON))
    assert position_scheme(mistral).sliding_window == 6
    assert position_scheme(qwen2).sliding_window is None


def test_the_scheme_is_computed_once_per_config():
    """The scheme is cached per model class and config object: a second lookup is the same object."""
    model = transformers.AutoModel.from_config(transformers.RobertaConfig(**COMMON))
    assert position_scheme(model) is position_scheme(model)


def test_positions_from_mask_counts_from_first():
    """Attended tokens count up from ``first``; a pad repeats the position of the token before it."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(positions_from_mask(mask, 2), torch.tensor([[2, 3, 3, 3, 4, 5, 6], [2, 3, 4, 5, 6, 6, 6]]))
    assert torch.equal(positions_from_mask(mask, 1), torch.tensor([[1, 2, 2, 2, 3, 4, 5], [1, 2, 3, 4, 5, 5, 5]]))
    assert torch.equal(positions_from_mask(mask), torch.tensor([[0, 1, 1, 1, 2, 3, 4], [0, 1, 2, 3, 4, 4, 4]]))


def test_shift_position_ids_puts_virtual_tokens_at_the_models_first_positions():
    """The caller's ids (RoBERTa numbering, from 2) move up by M; the M virtual tokens take 2..M+1."""
    ids = torch.tensor([[2, 3, 4]])
    assert torch.equal(shift_position_ids(ids, 2, first=2), torch.tensor([[2, 3, 4, 5, 6]]))


def test_roberta_peft_model_with_callers_position_ids_equals_unpatched():
    """A RoBERTa PeftModel called with its own position ids (2..N+1) equals the unpatched PEFT output."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    base = transformers.AutoModel.from_config(transformers.RobertaConfig(**COMMON, max_position_embeddings=64)).eval()
    pm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_()
    ids = torch.tensor([[0, 11, 12, 13, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        with maskpatch.patched(pm, policy="extend"):
            got = pm(input_ids=ids, attention_mask=mask, position_ids=torch.arange(2, 7).unsqueeze(0))
    assert (got.last_hidden_state - expected).abs().max() <= 1e-5
