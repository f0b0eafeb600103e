"""``generate`` of a patched PeftModel, whichever keyword the installed transformers gives the cache.

transformers 5.24 renamed the cache keyword ``past_key_values`` to ``cache``; peft 0.21.2's
``prepare_inputs_for_generation`` still reads the old name. Tiny random Qwen2 (RoPE) and T5 models.

Invariants protected here (on transformers before and from 5.24 alike):

* prompt tuning, P-tuning and multitask prompt tuning, under every policy: the tokens and every
  step's logits of a text alone equal a greedy decode computed by hand from the unpatched base
  model with the prompt prepended (the whole sequence recomputed each step, no cache), and equal
  the same text's row in a left-padded batch (batch invariance, <= 1e-5);
* prefix tuning and Cartridge (causal and seq2seq), while patched: the same, with PEFT's prefix
  given to the base model as its cache by hand;
* loud when the keyword assumption breaks: a transformers whose generate names the cache neither
  way is refused at ``apply``; a PEFT step that prepends the prompt again or replaces a filled
  cache raises instead of generating;
* models maskpatch has not patched generate exactly as PEFT alone makes them generate.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import maskpatch

pytestmark = [pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*")]

M = 4
STEPS = 5
POLICIES = ("extend", "ignore", "strip")
ATOL = 1e-5

ALONE = torch.tensor([[7, 8, 9, 10]])
LEFT = torch.tensor([[0, 0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]])  # row 0 is ALONE, left-padded
TASKS_ALONE, TASKS_LEFT = torch.tensor([1]), torch.tensor([1, 0])


def _mask(ids: Tensor) -> Tensor:
    return (ids != 0).long()


def _cache_keyword(model) -> str:
    """The keyword the installed transformers' forward takes the cache as (read here, not from maskpatch)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _randomised(pm):
    torch.manual_seed(1)
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.normal_(0, 1.0)
    return pm.eval()


def causal_lm(kind: str):
    """A PeftModelForCausalLM over a tiny random Qwen2 with non-trivial adapter parameters."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    task = peft.TaskType.CAUSAL_LM
    peft_config = {
        "prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=M),
        "ptuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=M, encoder_hidden_size=16),
        "mpt": lambda: peft.MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=M, num_tasks=2),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=M),
        "cartridge": lambda: peft.CartridgeConfig(task_type=task, num_virtual_tokens=M),
    }[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _randomised(peft.get_peft_model(transformers.Qwen2ForCausalLM(config).eval(), peft_config))


def seq2seq_lm(kind: str):
    """A PeftModelForSeq2SeqLM (prefix tuning or Cartridge) over a tiny random T5."""
    import peft
    import transformers

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
    task = peft.TaskType.SEQ_2_SEQ_LM
    make = peft.PrefixTuningConfig if kind == "prefix" else peft.CartridgeConfig
    base = transformers.T5ForConditionalGeneration(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _randomised(peft.get_peft_model(base, make(task_type=task, num_virtual_tokens=M)))


def _generate(model, ids: Tensor, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            input_ids=ids,
            attention_mask=_mask(ids),
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kwargs,
        )


# --- greedy decoding by hand, from the unpatched base model ----------------------------------------


def greedy_prompt_by_hand(pm, ids: Tensor, task_ids: Tensor | None = None) -> tuple[list[int], list[Tensor]]:
    """Prompt + word embeddings of the whole sequence, extended mask, positions of the real tokens; no cache."""
    seq, logits = ids, []
    with torch.no_grad():
        prompt = pm.get_prompt(batch_size=ids.shape[0], task_ids=task_ids)
        for _ in range(STEPS):
            full = torch.cat([torch.ones(ids.shape[0], M, dtype=torch.long), _mask(seq)], dim=1)
            positions = (full.long().cumsum(-1) - 1).clamp(min=0)  # a pad repeats the position before it
            embeds = torch.cat([prompt, pm.word_embeddings(seq)], dim=1)
            out = pm.get_base_model()(inputs_embeds=embeds, attention_mask=full, position_ids=positions)
            logits.append(out.logits[:, -1])
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, ids.shape[1] :].tolist(), logits


def greedy_prefix_by_hand(pm, ids: Tensor) -> tuple[list[int], list[Tensor]]:
    """PEFT's prefix as a fresh cache of the base model each step, the whole sequence after it; no generate cache."""
    base, seq, logits = pm.get_base_model(), ids, []
    with torch.no_grad():
        for _ in range(STEPS):
            full = torch.cat([torch.ones(ids.shape[0], M, dtype=torch.long), _mask(seq)], dim=1)
            positions = (_mask(seq).cumsum(-1) - 1).masked_fill(_mask(seq) == 0, 0) + M
            prefix = {_cache_keyword(base): pm.get_prompt(batch_size=ids.shape[0])}
            out = base(input_ids=seq, attention_mask=full, position_ids=positions, **prefix)
            logits.append(out.logits[:, -1])
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, ids.shape[1] :].tolist(), logits


def greedy_seq2seq_prefix_by_hand(pm, ids: Tensor) -> tuple[list[int], list[Tensor]]:
    """T5 with PEFT's prefix as a fresh cache each step, the whole decoder sequence recomputed; no generate cache."""
    base, decoded, logits = pm.get_base_model(), torch.zeros(ids.shape[0], 1, dtype=torch.long), []
    with torch.no_grad():
        for _ in range(STEPS):
            prefix = {_cache_keyword(base): pm.get_prompt(batch_size=ids.shape[0])}
            out = base(input_ids=ids, attention_mask=_mask(ids), decoder_input_ids=decoded, **prefix)
            logits.append(out.logits[:, -1])
            decoded = torch.cat([decoded, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded[0, 1:].tolist(), logits


def _max_step_diff(got, want: list[Tensor], row: int = 0) -> float:
    return max((g[row] - w[0]).abs().max().item() for g, w in zip(got.logits, want, strict=True))


# --- prompt tuning, P-tuning, multitask prompt tuning ------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["prompt", "ptuning", "mpt"])
def test_generate_equals_greedy_by_hand_and_is_batch_invariant(kind, policy):
    """A text alone generates the hand-built greedy tokens and logits, and so does its row in a left-padded batch."""
    pm = causal_lm(kind)
    tasks = ({"task_ids": TASKS_ALONE}, {"task_ids": TASKS_LEFT}) if kind == "mpt" else ({}, {})
    tokens, logits = greedy_prompt_by_hand(pm, ALONE, **tasks[0])
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        alone = _generate(pm, ALONE, **tasks[0])
        padded = _generate(pm, LEFT, **tasks[1])
    assert alone.sequences[0, ALONE.shape[1] :].tolist() == tokens
    assert padded.sequences[0, LEFT.shape[1] :].tolist() == tokens
    assert _max_step_diff(alone, logits) <= ATOL
    assert _max_step_diff(padded, logits) <= ATOL


# --- prefix tuning and Cartridge: no positions added, the prefix lives in the cache ------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["prefix", "cartridge"])
def test_prefix_generate_equals_greedy_by_hand_and_is_batch_invariant(kind, policy):
    """Patched, a causal prefix/Cartridge model generates the hand-built tokens and logits, alone and left-padded."""
    pm = causal_lm(kind)
    tokens, logits = greedy_prefix_by_hand(pm, ALONE)
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        alone = _generate(pm, ALONE)
        padded = _generate(pm, LEFT)
    assert alone.sequences[0, ALONE.shape[1] :].tolist() == tokens
    assert padded.sequences[0, LEFT.shape[1] :].tolist() == tokens
    assert _max_step_diff(alone, logits) <= ATOL
    assert _max_step_diff(padded, logits) <= ATOL


@pytest.mark.parametrize("kind", ["prefix", "cartridge"])
def test_seq2seq_prefix_generate_equals_greedy_by_hand(kind):
    """Patched, a T5 prefix/Cartridge model generates the hand-built tokens and logits, alone and right-padded."""
    pm = seq2seq_lm(kind)
    alone_ids = torch.tensor([[7, 8, 9, 1]])
    batch = torch.tensor([[7, 8, 9, 1, 0, 0], [11, 12, 13, 14, 15, 1]])
    tokens, logits = greedy_seq2seq_prefix_by_hand(pm, alone_ids)
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        alone = _generate(pm, alone_ids)
        padded = _generate(pm, batch)
    assert alone.sequences[0, 1:].tolist() == tokens
    assert _max_step_diff(alone, logits) <= ATOL
    assert _max_step_diff(padded, logits) <= ATOL


# --- loud when the assumption breaks -----------------------------------------------------------------


def test_transformers_naming_the_cache_neither_way_is_refused_at_apply(monkeypatch):
    """A generate step function that takes neither ``cache`` nor ``past_key_values`` is refused, naming what it takes."""
    from transformers.generation.utils import GenerationMixin

    from maskpatch.compat import generation

    def prepare_inputs_for_generation(self, input_ids, memory=None, attention_mask=None, **kwargs):
        raise AssertionError("never called")

    pm = causal_lm("prompt")
    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", prepare_inputs_for_generation)
    generation.generation_cache_name.cache_clear()
    try:
        with pytest.raises(maskpatch.UnsupportedVersionError, match=r"'cache', 'past_key_values'.*'memory'"):
            maskpatch.apply(pm)
        assert not maskpatch.is_patched(pm)
    finally:
        generation.generation_cache_name.cache_clear()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_reading_another_cache_name_raises_instead_of_generating(kind, monkeypatch):
    """If PEFT misses the cache (a name other than the one it is handed), the step raises; nothing is generated."""
    from maskpatch.adapters import peft_generation

    pm = causal_lm(kind)
    # PEFT is handed the cache under a name it does not read, as transformers 5.24 did to peft 0.21.2.
    monkeypatch.setattr(peft_generation, "PEFT_CACHE_NAME", "cache")
    monkeypatch.setattr(peft_generation, "generation_cache_name", lambda: "past_key_values")
    # Prompt tuning: the prompt is prepended at every step. Prefix tuning: a fresh prefix next to the real cache.
    expected = "prompt was prepended again" if kind == "prompt" else "two different ones"
    with maskpatch.patched(pm), pytest.raises(maskpatch.UnsupportedVersionError, match=expected):
        _generate(pm, ALONE)


# --- unpatched models are PEFT's business -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_unpatched_model_generates_as_peft_alone(kind):
    """With the class-level wrapper in place (another model patched), an unpatched model generates the same."""
    from maskpatch.adapters.peft_generation import ensure_generation_wrapper, remove_generation_wrapper

    unpatched, other = causal_lm(kind), causal_lm("prompt")
    remove_generation_wrapper()
    with torch.no_grad():
        before = _generate(unpatched, LEFT)
    with maskpatch.patched(other):
        ensure_generation_wrapper()
        with torch.no_grad():
            after = _generate(unpatched, LEFT)
    assert torch.equal(after.sequences, before.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, before.logits, strict=True))
