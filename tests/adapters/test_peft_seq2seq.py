"""A ``PeftModelForSeq2SeqLM`` called directly (tiny random T5, eager attention, raw ids, M virtual tokens).

Invariants protected here:

* decoder logits and loss equal a reference computed by hand (prompt + word embeddings into the
  encoder, extended encoder mask, base model run directly) under every policy; ``strip`` cuts the
  encoder states, encoder attentions (both axes) and the key axis of cross-attentions;
* cached ``encoder_outputs`` work with either length: ``N + M`` states (computed with the prompt)
  give the full run's logits, ``N`` states computed without the prompt (``get_encoder()``) give
  exactly what the base model gives with them (unpatched, PEFT refuses both without input ids);
* ``generate`` equals a hand-built ``generate`` and a text alone equals the text in a padded batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import maskpatch

M = 4
POLICIES = ("extend", "ignore", "strip")
ATOL = 1e-5

ALONE = torch.tensor([[7, 8, 9, 1]])
BATCH = torch.tensor([[7, 8, 9, 1, 0, 0], [11, 12, 13, 14, 15, 1]])  # row 0 is ALONE, right-padded
LABELS = torch.tensor([[21, 22, -100], [23, 24, 25]])


def _mask(ids: Tensor) -> Tensor:
    return (ids != 0).long()


@pytest.fixture(scope="module")
def pm():
    """A PeftModelForSeq2SeqLM (prompt tuning) over a tiny random T5 with eager attention."""
    import transformers
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            transformers.T5ForConditionalGeneration(config).eval(),
            PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=M),
        )
    torch.manual_seed(1)
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.normal_()
    return model.eval()


def embeds_by_hand(pm, ids: Tensor) -> Tensor:
    return torch.cat([pm.get_prompt(batch_size=ids.shape[0])[:, :M], pm.word_embeddings(ids)], dim=1)


def full_mask(mask: Tensor) -> Tensor:
    return torch.cat([torch.ones(mask.shape[0], M, dtype=mask.dtype), mask], dim=1)


def by_hand(pm, ids: Tensor, **kwargs: Any):
    with torch.no_grad():
        return pm.base_model(inputs_embeds=embeds_by_hand(pm, ids), attention_mask=full_mask(_mask(ids)), **kwargs)


def cut(tensor: Tensor, policy: str, dim: int = 1) -> Tensor:
    return tensor.narrow(dim, M, tensor.shape[dim] - M) if policy == "strip" else tensor


@pytest.mark.parametrize("policy", POLICIES)
def test_labels_logits_and_encoder_outputs_equal_reference(pm, policy):
    """Decoder logits/loss equal the hand-built run; strip cuts every encoder-side axis, and only those."""
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        everything = {"labels": LABELS, "output_attentions": True, "output_hidden_states": True}
        out = pm(input_ids=BATCH, attention_mask=_mask(BATCH), **everything)
    ref = by_hand(pm, BATCH, **everything)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
    want = cut(ref.encoder_last_hidden_state, policy)
    torch.testing.assert_close(out.encoder_last_hidden_state, want, atol=ATOL, rtol=0)
    for got, want in zip(out.encoder_hidden_states, ref.encoder_hidden_states, strict=True):
        torch.testing.assert_close(got, cut(want, policy), atol=ATOL, rtol=0)
    for got, want in zip(out.encoder_attentions, ref.encoder_attentions, strict=True):
        torch.testing.assert_close(got, cut(cut(want, policy, dim=2), policy, dim=3), atol=ATOL, rtol=0)
    for got, want in zip(out.cross_attentions, ref.cross_attentions, strict=True):
        assert got.shape[2] == LABELS.shape[1]  # decoder queries are never cut
        torch.testing.assert_close(got, cut(want, policy, dim=3), atol=ATOL, rtol=0)
    for got, want in zip(out.decoder_hidden_states, ref.decoder_hidden_states, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_cached_encoder_outputs_are_refused_without_maskpatch(pm):
    """Why: PEFT needs input ids for the batch size, even when the encoder will not run."""
    from transformers.modeling_outputs import BaseModelOutput

    cached = BaseModelOutput(last_hidden_state=by_hand(pm, BATCH, labels=LABELS).encoder_last_hidden_state)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        pm(encoder_outputs=cached, attention_mask=_mask(BATCH), labels=LABELS)


@pytest.mark.parametrize("policy", POLICIES)
def test_cached_encoder_outputs_with_the_prompt(pm, policy):
    """N+M cached states (from the prompted encoder) with the caller's N mask give the full run's logits."""
    from transformers.modeling_outputs import BaseModelOutput

    ref = by_hand(pm, BATCH, labels=LABELS)
    cached = BaseModelOutput(last_hidden_state=ref.encoder_last_hidden_state)
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        out = pm(encoder_outputs=cached, attention_mask=_mask(BATCH), labels=LABELS)
        with_ids = pm(input_ids=BATCH, encoder_outputs=cached, attention_mask=_mask(BATCH), labels=LABELS)
    for got in (out, with_ids):
        torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.loss, ref.loss, atol=ATOL, rtol=0)
        assert got.encoder_last_hidden_state.shape[1] == BATCH.shape[1] + (0 if policy == "strip" else M)


@pytest.mark.parametrize("policy", POLICIES)
def test_cached_prompt_less_encoder_outputs_are_unchanged(pm, policy):
    """N cached states computed without the prompt give bit-identical results to the base model with them."""
    with torch.no_grad():
        cached = pm.get_encoder()(input_ids=BATCH, attention_mask=_mask(BATCH))
        ref = pm.base_model(encoder_outputs=cached, attention_mask=_mask(BATCH), labels=LABELS)
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        out = pm(encoder_outputs=cached, attention_mask=_mask(BATCH), labels=LABELS)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    assert out.encoder_last_hidden_state.shape[1] == BATCH.shape[1]


def test_cached_encoder_outputs_of_unexplained_length_raise(pm):
    """Cached states that are neither N nor N+M long for the caller's mask raise DriftError."""
    from transformers.modeling_outputs import BaseModelOutput

    cached = BaseModelOutput(last_hidden_state=torch.zeros(2, BATCH.shape[1] + 2, 32))
    with maskpatch.patched(pm), pytest.raises(maskpatch.DriftError, match="found 2"):
        pm(encoder_outputs=cached, attention_mask=_mask(BATCH), labels=LABELS)


def _generate(model, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            **kwargs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )


@pytest.mark.parametrize("policy", ["extend", "strip"])
def test_generate_equals_reference_and_is_batch_invariant(pm, policy):
    """generate gives the hand-built generate's tokens and logits, and a text alone equals it in a padded batch."""
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        alone = _generate(pm, input_ids=ALONE, attention_mask=_mask(ALONE))
        padded = _generate(pm, input_ids=BATCH, attention_mask=_mask(BATCH))
    with torch.no_grad():
        embeds = embeds_by_hand(pm, ALONE)
        ref = _generate(pm.get_base_model(), inputs_embeds=embeds, attention_mask=full_mask(_mask(ALONE)))
    assert torch.equal(alone.sequences, ref.sequences)
    steps = zip(alone.logits, padded.logits, ref.logits, strict=True)
    assert max(max((a[0] - b[0]).abs().max().item(), (a[0] - r[0]).abs().max().item()) for a, b, r in steps) <= ATOL
