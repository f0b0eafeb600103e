"""A ``PeftModelForCausalLM`` called directly (tiny random Qwen2, RoPE, raw token ids, M virtual tokens).

Invariants protected here:

* logits and loss equal a reference computed by hand (prompt + word embeddings, extended mask,
  ``-100`` label prefix, position ids that follow the real tokens, base model run directly);
  ``strip`` returns exactly ``logits[:, M:]``;
* with left padding a text alone equals the same text in the batch (<= 1e-5), in ``forward`` and
  in every step of ``generate`` (PEFT drops the position ids transformers builds, so unpatched it
  is batch-variant), and ``generate`` picks the same tokens as a hand-built ``generate``;
* a custom 4-D attention mask with explicit ``position_ids`` (bool, additive ``finfo.min`` and
  additive ``-inf``), which PEFT rejects, gives the hand-built result; in the tree-attention
  example two branches sharing a prefix give equal logits, equal to the linear sequence;
* prefix tuning and the disabled adapter are bit-identical to the unpatched model.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor

import maskpatch

pytestmark = [pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*")]

M = 4
POLICIES = ("extend", "ignore", "strip")
ATOL = 1e-5

ALONE = torch.tensor([[7, 8, 9, 10]])
LEFT = torch.tensor([[0, 0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]])  # row 0 is ALONE, left-padded


def _mask(ids: Tensor) -> Tensor:
    return (ids != 0).long()


def causal_lm(kind: str = "prompt", m: int = M):
    """A PeftModelForCausalLM over a tiny random Qwen2 with non-trivial prompt parameters."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

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
    base = transformers.Qwen2ForCausalLM(config).eval()
    task = TaskType.CAUSAL_LM
    peft_config = {
        "prompt": lambda: PromptTuningConfig(task_type=task, num_virtual_tokens=m),
        "ptuning": lambda: PromptEncoderConfig(task_type=task, num_virtual_tokens=m, encoder_hidden_size=16),
        "prefix": lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=m),
    }[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, peft_config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.normal_(0, 1.0)
    return pm.eval()


def embeds_by_hand(pm, ids: Tensor) -> Tensor:
    return torch.cat([pm.get_prompt(batch_size=ids.shape[0]), pm.word_embeddings(ids)], dim=1)


def by_hand(pm, ids: Tensor, mask: Tensor, **kwargs: Any):
    """The reference forward: prompt + word embeddings, extended mask, positions following real tokens."""
    full = torch.cat([torch.ones(ids.shape[0], M, dtype=mask.dtype), mask], dim=1)
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)  # a pad repeats the position before it
    with torch.no_grad():
        embeds = embeds_by_hand(pm, ids)
        return pm.base_model(inputs_embeds=embeds, attention_mask=full, position_ids=positions, **kwargs)


def cut(tensor: Tensor, policy: str, dim: int = 1) -> Tensor:
    return tensor.narrow(dim, M, tensor.shape[dim] - M) if policy == "strip" else tensor


@pytest.fixture(scope="module")
def pm():
    return causal_lm()


# --- forward: logits, loss, left padding -----------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_logits_and_loss_equal_reference(pm, policy):
    """Logits equal the hand-built run (strip: [:, M:]); the loss skips the virtual tokens."""
    labels = torch.where(_mask(LEFT).bool(), LEFT, -100)
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        out = pm(input_ids=LEFT, attention_mask=_mask(LEFT), labels=labels)
    ref = by_hand(pm, LEFT, _mask(LEFT), labels=torch.cat([torch.full((2, M), -100), labels], dim=1))
    torch.testing.assert_close(out.logits, cut(ref.logits, policy), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_left_padding_is_batch_invariant(pm, policy):
    """The logits of a text alone equal its logits inside a left-padded batch (<= 1e-5)."""
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        alone = pm(input_ids=ALONE, attention_mask=_mask(ALONE)).logits[0]
        padded = pm(input_ids=LEFT, attention_mask=_mask(LEFT)).logits[0]
    keep = _mask(LEFT)[0].bool()
    if policy != "strip":
        keep = torch.cat([torch.ones(M, dtype=torch.bool), keep])
    assert (alone - padded[keep]).abs().max() <= ATOL


def test_left_padding_varies_without_maskpatch(pm):
    """Why: PEFT drops position ids, so RoPE sees the pads between the virtual and the real tokens."""
    with torch.no_grad():
        alone = pm(input_ids=ALONE, attention_mask=_mask(ALONE)).logits[0, M:]
        padded = pm(input_ids=LEFT, attention_mask=_mask(LEFT)).logits[0, M + 3 :]
    assert (alone - padded).abs().max() > 1e-4


def test_callers_position_ids_are_shifted_past_the_virtual_tokens(pm):
    """Explicit 2-D-mask position ids (dropped by PEFT) reach the model as 0..M-1 then the caller's + M."""
    mask = _mask(LEFT)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        out = pm(input_ids=LEFT, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # pads keep the caller's own (shifted) filler position, so compare real tokens
    torch.testing.assert_close(out[real], by_hand(pm, LEFT, mask).logits[:, M:][real], atol=ATOL, rtol=0)


# --- generate ------------------------------------------------------------------------------------


def _generate(model, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            **kwargs,
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )


def _step_diff(a, b) -> float:
    return max((x[0] - y[0]).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


@pytest.mark.parametrize("policy", ["extend", "strip"])
def test_generate_with_left_padding_is_batch_invariant(pm, policy):
    """Every generate step's logits for a text alone equal those in a left-padded batch; same tokens as by hand."""
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        alone = _generate(pm, input_ids=ALONE, attention_mask=_mask(ALONE))
        padded = _generate(pm, input_ids=LEFT, attention_mask=_mask(LEFT))
    assert _step_diff(alone, padded) <= ATOL
    assert torch.equal(alone.sequences[0, ALONE.shape[1] :], padded.sequences[0, LEFT.shape[1] :])
    full = torch.cat([torch.ones(1, M, dtype=torch.long), _mask(ALONE)], dim=1)
    with torch.no_grad():
        ref = _generate(pm.get_base_model(), inputs_embeds=embeds_by_hand(pm, ALONE), attention_mask=full)
    assert torch.equal(alone.sequences[0, ALONE.shape[1] :], ref.sequences[0])
    assert _step_diff(alone, ref) <= ATOL


def test_generate_with_left_padding_varies_without_maskpatch(pm):
    """Why: generate builds position ids, and PEFT drops them."""
    with torch.no_grad():
        alone = _generate(pm, input_ids=ALONE, attention_mask=_mask(ALONE))
        padded = _generate(pm, input_ids=LEFT, attention_mask=_mask(LEFT))
    assert _step_diff(alone, padded) > 1e-4


# --- custom 4-D masks: tree attention ------------------------------------------------------------

# A shared prefix [7, 8] and two identical branches [9, 10] packed in one row: [7, 8, 9, 10, 9, 10].
TREE = torch.tensor([[7, 8, 9, 10, 9, 10]])
TREE_POSITIONS = torch.tensor([[0, 1, 2, 3, 2, 3]])
T, F = True, False
TREE_ALLOWED = torch.tensor(
    [
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, T, T, F, F, F],
        [T, T, T, T, F, F],
        [T, T, F, F, T, F],
        [T, T, F, F, T, T],
    ]
)


def _tree_mask(convention: str) -> Tensor:
    if convention == "bool":
        return TREE_ALLOWED[None, None]
    masked = torch.finfo(torch.float32).min if convention == "finfo-min" else float("-inf")
    return torch.zeros(6, 6).masked_fill(~TREE_ALLOWED, masked)[None, None]


def _extended_tree_by_hand(convention: str) -> Tensor:
    """The M+6 by M+6 mask written out: virtual rows causal among themselves, real rows see every virtual token."""
    allowed = torch.zeros(M + 6, M + 6, dtype=torch.bool)
    allowed[:M, :M] = torch.ones(M, M, dtype=torch.bool).tril()
    allowed[M:, :M] = True
    allowed[M:, M:] = TREE_ALLOWED
    if convention == "bool":
        return allowed[None, None]
    masked = torch.finfo(torch.float32).min if convention == "finfo-min" else float("-inf")
    return torch.zeros(M + 6, M + 6).masked_fill(~allowed, masked)[None, None]


@pytest.mark.parametrize("convention", ["bool", "finfo-min", "-inf"])
def test_4d_mask_is_rejected_by_peft_without_maskpatch(pm, convention):
    """Why: PEFT concatenates a 2-D prefix to the 4-D mask."""
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        pm(input_ids=TREE, attention_mask=_tree_mask(convention), position_ids=TREE_POSITIONS)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("convention", ["bool", "finfo-min", "-inf"])
def test_tree_attention_with_virtual_tokens(pm, convention, policy):
    """Both branches give equal logits, equal to the linear sequence and to the hand-extended 4-D mask run."""
    mask = _tree_mask(convention)
    before = mask.clone()
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        out = pm(input_ids=TREE, attention_mask=mask, position_ids=TREE_POSITIONS).logits
    assert torch.equal(mask, before)
    real = out[0, -6:]  # the six real tokens, under every policy
    assert (real[2:4] - real[4:6]).abs().max() <= ATOL
    linear = by_hand(pm, TREE[:, :4], torch.ones(1, 4, dtype=torch.long)).logits[0, M:]
    assert (real[:4] - linear).abs().max() <= ATOL
    positions = torch.cat([torch.arange(M)[None], TREE_POSITIONS + M], dim=1)
    with torch.no_grad():
        ref = pm.base_model(
            inputs_embeds=embeds_by_hand(pm, TREE),
            attention_mask=_extended_tree_by_hand(convention),
            position_ids=positions,
        ).logits
    torch.testing.assert_close(out, cut(ref, policy), atol=ATOL, rtol=0)


def test_4d_mask_of_wrong_size_is_refused(pm):
    """A 4-D mask that does not cover the input tokens is refused with the shapes in the message."""
    with maskpatch.patched(pm), pytest.raises(maskpatch.PolicyError, match=r"\(batch, heads, 6, 6\)"):
        pm(input_ids=TREE, attention_mask=torch.zeros(1, 1, 5, 5), position_ids=TREE_POSITIONS)


# --- controls ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_prefix_tuning_and_disabled_adapter_are_unchanged(policy):
    """Prefix tuning (no added positions) and a disabled prompt adapter are bit-identical to unpatched."""
    prefix = causal_lm("prefix")
    prompt = causal_lm("prompt")
    with torch.no_grad():
        prefix_before = prefix(input_ids=LEFT, attention_mask=_mask(LEFT)).logits
        with prompt.disable_adapter():
            disabled_before = prompt(input_ids=LEFT, attention_mask=_mask(LEFT)).logits
    with maskpatch.patched(prefix, policy=policy), maskpatch.patched(prompt, policy=policy), torch.no_grad():
        prefix_after = prefix(input_ids=LEFT, attention_mask=_mask(LEFT)).logits
        with prompt.disable_adapter():
            disabled_after = prompt(input_ids=LEFT, attention_mask=_mask(LEFT)).logits
    assert torch.equal(prefix_after, prefix_before)
    assert torch.equal(disabled_after, disabled_before)


@pytest.mark.parametrize("policy", ["strip"])
def test_ptuning_generate_is_batch_invariant(policy):
    """P-tuning (a prompt encoder MLP) gets the same position fix in generate."""
    model = causal_lm("ptuning")
    with maskpatch.patched(model, policy=policy), torch.no_grad():
        alone = _generate(model, input_ids=ALONE, attention_mask=_mask(ALONE))
        padded = _generate(model, input_ids=LEFT, attention_mask=_mask(LEFT))
    assert _step_diff(alone, padded) <= ATOL


@pytest.mark.parametrize("policy", POLICIES)
def test_feature_extraction_on_a_decoder_with_left_padding(policy):
    """PeftModelForFeatureExtraction over a Qwen2Model: equals the reference and is batch invariant when left-padded."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fe = get_peft_model(
            transformers.Qwen2Model(config).eval(),
            PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M),
        ).eval()
    with torch.no_grad():
        fe.prompt_encoder.default.embedding.weight.normal_()
        with maskpatch.patched(fe, policy=policy):
            alone = fe(input_ids=ALONE, attention_mask=_mask(ALONE)).last_hidden_state[0]
            padded = fe(input_ids=LEFT, attention_mask=_mask(LEFT)).last_hidden_state
    torch.testing.assert_close(padded, cut(by_hand(fe, LEFT, _mask(LEFT)).last_hidden_state, policy), atol=ATOL, rtol=0)
    keep = _mask(LEFT)[0].bool()
    if policy != "strip":
        keep = torch.cat([torch.ones(M, dtype=torch.bool), keep])
    assert (alone - padded[0][keep]).abs().max() <= ATOL
