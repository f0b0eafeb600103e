"""A PeftModel called directly, on encoder tasks: feature extraction, token classification,
question answering and sequence classification (tiny random BERT, raw token ids, M virtual tokens).

Invariants protected here:

* under every policy the outputs equal a reference computed by hand: prompt (``pm.get_prompt``)
  + word embeddings, the extended mask, position ids that follow the real tokens, shifted labels
  / answer positions, the base model run directly; ``strip`` returns exactly ``[:, M:]`` of it;
* a text alone equals the same text inside a padded batch (max abs diff <= 1e-5), left or right padded;
* ``maskpatch.output_mask`` returns the mask that lines up with the outputs under each policy;
* cases without drift are bit-identical to the unpatched model: sequence-classification scores,
  prefix tuning, LoRA, the disabled adapter;
* several adapters (``set_adapter``), ``disable_adapter()`` on BERT, multitask prompt tuning;
* a plain transformers model and a second, unpatched PeftModel are untouched; ``remove`` is exact;
  a deep copy or pickle of a patched model stays patched.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import maskpatch
from maskpatch.adapters.peft import PeftCall, PeftOutputHook
from maskpatch.errors import DriftError, PolicyError, UnsupportedModelError
from maskpatch.handle import find_record

from helpers import assert_no_residue, residue_snapshot

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*"),
]

M = 4
POLICIES = ("extend", "ignore", "strip")
ATOL = 1e-5

# Row 0 alone is [7, 8, 9, 10]; in the batch it is padded to 7 tokens (right padding, as BERT's tokenizer).
ALONE = torch.tensor([[7, 8, 9, 10]])
BATCH = torch.tensor([[7, 8, 9, 10, 0, 0, 0], [11, 12, 13, 14, 15, 16, 17]])
BATCH_LEFT = torch.tensor([[0, 0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]])


def _mask(ids: Tensor) -> Tensor:
    return (ids != 0).long()


def bert(cls_name: str, **extra: Any):
    """A tiny random BERT of ``transformers.<cls_name>`` (no dropout, so training is deterministic)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )
    return getattr(transformers, cls_name)(config).eval()


TASKS = {
    "FEATURE_EXTRACTION": ("BertModel", {}),
    "TOKEN_CLS": ("BertForTokenClassification", {"num_labels": 3}),
    "QUESTION_ANS": ("BertForQuestionAnswering", {}),
    "SEQ_CLS": ("BertForSequenceClassification", {"num_labels": 3}),
}


def peft_config(task: str, kind: str, m: int = M):
    from peft import (
        LoraConfig,
        MultitaskPromptTuningConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    return {
        "prompt": lambda: PromptTuningConfig(task_type=task, num_virtual_tokens=m),
        "ptuning": lambda: PromptEncoderConfig(task_type=task, num_virtual_tokens=m, encoder_hidden_size=16),
        "prefix": lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=m),
        "lora": lambda: LoraConfig(task_type=task, r=4, target_modules=["query", "value"], init_lora_weights=False),
        "mpt": lambda: MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=m, num_tasks=3),
    }[kind]()


def peft_model(task: str = "FEATURE_EXTRACTION", kind: str = "prompt", m: int = M, seed: int = 1):
    """A PeftModel for ``task`` over a tiny BERT, with non-trivial random prompt parameters."""
    from peft import get_peft_model

    cls_name, extra = TASKS[task]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(bert(cls_name, **extra), peft_config(task, kind, m))
    _randomize_trainable(pm, seed)
    return pm.eval()


def _randomize_trainable(pm, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if param.requires_grad and "classifier" not in name and "qa_outputs" not in name:
                param.normal_(0, 1.0)


def by_hand(pm, ids: Tensor, mask: Tensor, *, task_ids: Tensor | None = None, **kwargs: Any):
    """The reference: prompt + word embeddings, extended mask, positions following real tokens, base model."""
    m = pm.active_peft_config.num_virtual_tokens
    batch = ids.shape[0]
    prompts = pm.get_prompt(batch_size=batch, task_ids=task_ids)
    embeds = torch.cat([prompts, pm.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(batch, m, dtype=mask.dtype), mask], dim=1)
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)  # a pad repeats the position before it
    with torch.no_grad():
        return pm.base_model(inputs_embeds=embeds, attention_mask=full, position_ids=positions, **kwargs)


def cut(tensor: Tensor, policy: str, m: int = M, dim: int = 1) -> Tensor:
    return tensor.narrow(dim, m, tensor.shape[dim] - m) if policy == "strip" else tensor


def call(pm, ids: Tensor, policy: str, **kwargs: Any):
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        return pm(input_ids=ids, attention_mask=_mask(ids), **kwargs)


# --- feature extraction ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
@pytest.mark.parametrize("policy", POLICIES)
def test_feature_extraction_equals_reference(policy, kind):
    """last_hidden_state and every hidden_states[i] equal the hand-built run; strip gives exactly [:, M:]."""
    pm = peft_model(kind=kind)
    out = call(pm, BATCH, policy, output_hidden_states=True)
    ref = by_hand(pm, BATCH, _mask(BATCH), output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == BATCH.shape[1] + (0 if policy == "strip" else M)
    torch.testing.assert_close(out.last_hidden_state, cut(ref.last_hidden_state, policy), atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(got, cut(want, policy), atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [BATCH, BATCH_LEFT], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("policy", POLICIES)
def test_feature_extraction_is_batch_invariant(policy, batch):
    """The real tokens of a text alone equal the same tokens inside a padded batch (<= 1e-5)."""
    pm = peft_model()
    alone = call(pm, ALONE, policy).last_hidden_state[0]
    padded = call(pm, batch, policy).last_hidden_state[0]
    keep = _mask(batch)[0].bool()
    if policy != "strip":
        keep = torch.cat([torch.ones(M, dtype=torch.bool), keep])
    assert (alone - padded[keep]).abs().max() <= ATOL


def test_feature_extraction_left_padding_varies_without_maskpatch():
    """Why the position hook exists: unpatched, PEFT numbers pads, so left padding moves BERT's real tokens."""
    pm = peft_model()
    with torch.no_grad():
        alone = pm(input_ids=ALONE, attention_mask=_mask(ALONE)).last_hidden_state[0, M:]
        padded = pm(input_ids=BATCH_LEFT, attention_mask=_mask(BATCH_LEFT)).last_hidden_state[0, M + 3 :]
    assert (alone - padded).abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_output_mask_lines_up_with_outputs(policy):
    """Mean pooling with output_mask equals pooling the reference over the positions the policy names."""
    pm = peft_model()
    mask = _mask(BATCH)
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        tokens = pm(input_ids=BATCH, attention_mask=mask).last_hidden_state
        lined_up = maskpatch.output_mask(pm, mask)
    prefix = {"extend": [[1] * M] * 2, "ignore": [[0] * M] * 2, "strip": [[]] * 2}[policy]
    assert torch.equal(lined_up, torch.cat([torch.tensor(prefix, dtype=mask.dtype).reshape(2, -1), mask], dim=1))
    assert lined_up.dtype == mask.dtype and tokens.shape[1] == lined_up.shape[1]
    pooled = (tokens * lined_up[..., None]).sum(1) / lined_up.sum(1, keepdim=True)
    ref = cut(by_hand(pm, BATCH, mask).last_hidden_state, policy)
    rows = [ref[b][lined_up[b].bool()].mean(0) for b in range(2)]
    torch.testing.assert_close(pooled, torch.stack(rows), atol=ATOL, rtol=0)


def test_output_mask_needs_a_patched_model():
    """output_mask on a model maskpatch has not patched raises instead of guessing a policy."""
    with pytest.raises(UnsupportedModelError, match="not patched"):
        maskpatch.output_mask(peft_model(), _mask(BATCH))


@pytest.mark.parametrize("policy", POLICIES)
def test_attentions_are_cut_on_both_axes_under_strip(policy):
    """With eager attention, every attention map is (M+N)x(M+N) and strip cuts queries and keys."""
    pm = peft_model()
    pm.base_model.config._attn_implementation = "eager"
    out = call(pm, BATCH, policy, output_attentions=True)
    ref = by_hand(pm, BATCH, _mask(BATCH), output_attentions=True)
    for got, want in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(got, cut(cut(want, policy, dim=2), policy, dim=3), atol=ATOL, rtol=0)


# --- token classification ----------------------------------------------------------------------

LABELS = torch.tensor([[0, 1, 2, 1, -100, -100, -100], [2, 2, 1, 0, 1, 0, 2]])


def test_token_classification_labels_crash_without_maskpatch():
    """Why: PEFT prepends M positions to the logits but not to the labels."""
    pm = peft_model("TOKEN_CLS")
    with pytest.raises(ValueError, match="batch_size"):
        pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=LABELS)


@pytest.mark.parametrize("policy", POLICIES)
def test_token_classification_logits_and_loss_equal_reference(policy):
    """Logits equal the reference (strip: [:, M:], aligned with the caller's labels); the loss skips virtual tokens."""
    pm = peft_model("TOKEN_CLS")
    out = call(pm, BATCH, policy, labels=LABELS)
    shifted = torch.cat([torch.full((2, M), -100), LABELS], dim=1)
    ref = by_hand(pm, BATCH, _mask(BATCH), labels=shifted)
    torch.testing.assert_close(out.logits, cut(ref.logits, policy), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
    # The loss over the caller's own tokens, from the logits the user sees, is the same number.
    visible = cut(out.logits, "strip") if policy != "strip" else out.logits
    by_user = torch.nn.functional.cross_entropy(visible.reshape(-1, 3), LABELS.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, by_user, atol=ATOL, rtol=0)
    assert torch.equal(LABELS, torch.tensor([[0, 1, 2, 1, -100, -100, -100], [2, 2, 1, 0, 1, 0, 2]]))


@pytest.mark.parametrize("policy", POLICIES)
def test_token_classification_is_batch_invariant(policy):
    """Token logits of a text alone equal those inside a padded batch (<= 1e-5)."""
    pm = peft_model("TOKEN_CLS")
    alone = call(pm, ALONE, policy).logits[0]
    padded = call(pm, BATCH_LEFT, policy).logits[0]
    keep = _mask(BATCH_LEFT)[0].bool()
    if policy != "strip":
        keep = torch.cat([torch.ones(M, dtype=torch.bool), keep])
    assert (alone - padded[keep]).abs().max() <= ATOL


@pytest.mark.parametrize("policy", ["extend", "strip"])
def test_token_classification_trains_through_hf_trainer(policy, tmp_path):
    """Two HF Trainer steps (SGD, full batch) on a patched model give the prompt a hand-computed loop's values."""
    from transformers import Trainer, TrainingArguments

    pm = peft_model("TOKEN_CLS")
    ref_model = copy.deepcopy(pm)
    rows = [{"input_ids": BATCH[i], "attention_mask": _mask(BATCH)[i], "labels": LABELS[i]} for i in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    with maskpatch.patched(pm, policy=policy), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=pm, args=args, train_dataset=rows, optimizers=(optimizer, None)).train()

    params = [p for p in ref_model.parameters() if p.requires_grad]
    ref_opt = torch.optim.SGD(params, lr=0.5)
    shifted = torch.cat([torch.full((2, M), -100), LABELS], dim=1)
    ref_model.train()
    for _ in range(2):
        ref_opt.zero_grad()
        m_ids, mask = BATCH, _mask(BATCH)
        embeds = torch.cat([ref_model.get_prompt(batch_size=2), ref_model.word_embeddings(m_ids)], dim=1)
        full = torch.cat([torch.ones(2, M, dtype=mask.dtype), mask], dim=1)
        positions = (full.long().cumsum(-1) - 1).clamp(min=0)  # a pad repeats the position before it
        out = ref_model.base_model(inputs_embeds=embeds, attention_mask=full, position_ids=positions, labels=shifted)
        out.loss.backward()
        ref_opt.step()
    trained = dict(pm.named_parameters())
    for name, param in ref_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(trained[name], param, atol=ATOL, rtol=0)
    start = dict(peft_model("TOKEN_CLS").named_parameters())
    moved = {name: (trained[name] - start[name]).abs().max().item() for name in start if start[name].requires_grad}
    assert moved["prompt_encoder.default.embedding.weight"] > 0 and max(moved.values()) > 1e-3


# --- question answering ------------------------------------------------------------------------

START, END = torch.tensor([1, 2]), torch.tensor([3, 5])


def span_loss_by_hand(start_logits: Tensor, end_logits: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """The QA loss over the N real positions (the M virtual ones cut), in the caller's frame: clamp to [0, N], N ignored."""
    real_start, real_end = start_logits[:, M:], end_logits[:, M:]
    n = real_start.shape[1]
    ce = torch.nn.CrossEntropyLoss(ignore_index=n)
    return (ce(real_start, start.clamp(0, n)) + ce(real_end, end.clamp(0, n))) / 2


@pytest.mark.parametrize("policy", POLICIES)
def test_question_answering_positions_are_shifted(policy):
    """Start/end logits equal the reference; the loss is the span loss over the real positions, caller's frame."""
    pm = peft_model("QUESTION_ANS")
    types = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    out = call(pm, BATCH, policy, token_type_ids=types, start_positions=START, end_positions=END)
    zero_types = torch.cat([torch.zeros(2, M, dtype=types.dtype), types], dim=1)
    ref = by_hand(pm, BATCH, _mask(BATCH), token_type_ids=zero_types, start_positions=START + M, end_positions=END + M)
    torch.testing.assert_close(out.start_logits, cut(ref.start_logits, policy), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.end_logits, cut(ref.end_logits, policy), atol=ATOL, rtol=0)
    loss = span_loss_by_hand(ref.start_logits, ref.end_logits, START, END)
    torch.testing.assert_close(out.loss, loss, atol=ATOL, rtol=0)
    assert torch.equal(START, torch.tensor([1, 2]))
    if policy == "strip":  # the caller's positions index the logits the caller gets back
        assert out.start_logits.shape == BATCH.shape


def test_question_answering_is_wrong_without_maskpatch():
    """Why: unpatched, PEFT leaves the answer positions pointing M tokens too early."""
    pm = peft_model("QUESTION_ANS")
    with torch.no_grad():
        loss = pm(input_ids=BATCH, attention_mask=_mask(BATCH), start_positions=START, end_positions=END).loss
    ref = by_hand(pm, BATCH, _mask(BATCH))
    assert (loss - span_loss_by_hand(ref.start_logits, ref.end_logits, START, END)).abs() > 1e-3


# --- controls: no token-level drift, bit-identical -------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_sequence_classification_scores_are_unchanged(policy):
    """Sequence-classification scores and loss are bit-identical to the unpatched PeftModel."""
    pm = peft_model("SEQ_CLS")
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        before = pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=labels)
    after = call(pm, BATCH, policy, labels=labels)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.loss, before.loss)


@pytest.mark.parametrize("kind", ["prefix", "lora"])
@pytest.mark.parametrize("policy", POLICIES)
def test_adapters_without_virtual_positions_are_unchanged(policy, kind):
    """Prefix tuning and LoRA add no positions: output bit-identical to the unpatched model."""
    pm = peft_model(kind=kind)
    with torch.no_grad():
        before = pm(input_ids=BATCH, attention_mask=_mask(BATCH), output_hidden_states=True)
    after = call(pm, BATCH, policy, output_hidden_states=True)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, before.hidden_states, strict=True))


@pytest.mark.parametrize("task", ["FEATURE_EXTRACTION", "TOKEN_CLS"])
def test_disable_adapter_works_on_bert_and_is_bit_identical(task):
    """disable_adapter() (PEFT crashes on BERT) runs the bare base model under maskpatch; nothing is left behind."""
    pm = peft_model(task)
    base_keys, pm_keys = set(pm.base_model.__dict__), set(pm.__dict__) | {"forward"}  # PEFT leaves `forward`
    with torch.no_grad():
        bare = pm.base_model(input_ids=BATCH, attention_mask=_mask(BATCH))
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        with pm.disable_adapter():
            out = pm(input_ids=BATCH, attention_mask=_mask(BATCH))
        again = pm(input_ids=BATCH, attention_mask=_mask(BATCH))
    key = "last_hidden_state" if task == "FEATURE_EXTRACTION" else "logits"
    assert torch.equal(out[key], bare[key])
    assert again[key].shape[1] == BATCH.shape[1]  # the adapter is active again (stripped)
    assert not pm._adapters_disabled
    assert set(pm.base_model.__dict__) == base_keys and set(pm.__dict__) <= pm_keys


def test_disable_adapter_on_unpatched_model_is_peft_unchanged():
    """The class-level wrapper leaves unpatched models to PEFT (which still fails on BERT)."""
    patched_pm, other = peft_model(), peft_model()
    with maskpatch.patched(patched_pm):
        with pytest.raises((AttributeError, UnboundLocalError)):
            with other.disable_adapter():
                pass


# --- several adapters, multitask prompt tuning -----------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_set_adapter_switches_virtual_token_count(policy):
    """Two adapters with M=4 and M=7: each call follows the adapter active at call time."""
    pm = peft_model(m=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("long", peft_config("FEATURE_EXTRACTION", "prompt", m=7))
    torch.manual_seed(5)
    with torch.no_grad():
        pm.prompt_encoder["long"].embedding.weight.normal_()
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        results = {}
        for name in ("long", "default", "long"):
            pm.set_adapter(name)
            tokens = pm(input_ids=BATCH, attention_mask=_mask(BATCH)).last_hidden_state
            results[name] = (tokens, maskpatch.output_mask(pm, _mask(BATCH)))
    for name, m in (("default", 4), ("long", 7)):
        pm.set_adapter(name)
        tokens, mask = results[name]
        ref = by_hand(pm, BATCH, _mask(BATCH)).last_hidden_state
        torch.testing.assert_close(tokens, cut(ref, policy, m), atol=ATOL, rtol=0)
        assert mask.shape[1] == tokens.shape[1]


@pytest.mark.parametrize(
    ("task", "key"), [("FEATURE_EXTRACTION", "last_hidden_state"), ("QUESTION_ANS", "start_logits")]
)
@pytest.mark.parametrize("policy", POLICIES)
def test_multitask_prompt_tuning_routes_task_ids(policy, task, key):
    """Multitask prompt tuning takes the caller's task_ids where PEFT never passes them on (FE, QA)."""
    pm = peft_model(task, kind="mpt")
    task_ids = torch.tensor([2, 0])
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        pm(input_ids=BATCH, attention_mask=_mask(BATCH), task_ids=task_ids)
    out = call(pm, BATCH, policy, task_ids=task_ids)
    ref = by_hand(pm, BATCH, _mask(BATCH), task_ids=task_ids)
    torch.testing.assert_close(out[key], cut(ref[key], policy), atol=ATOL, rtol=0)
    other = by_hand(pm, BATCH, _mask(BATCH), task_ids=torch.tensor([1, 1]))
    assert (out[key] - cut(other[key], policy)).abs().max() > 1e-4  # the task ids matter
    with maskpatch.patched(pm, policy=policy), pytest.raises(PolicyError, match="needs task_ids"):
        pm(input_ids=BATCH, attention_mask=_mask(BATCH))


# --- isolation, undo, copies -----------------------------------------------------------------------


def test_other_models_are_untouched_while_one_is_patched():
    """A plain transformers model and a second, unpatched PeftModel keep their outputs and get no hooks."""
    plain, other, target = bert("BertModel"), peft_model(seed=3), peft_model()
    with torch.no_grad():
        plain_before = plain(input_ids=BATCH, attention_mask=_mask(BATCH)).last_hidden_state
        other_before = other(input_ids=BATCH, attention_mask=_mask(BATCH)).last_hidden_state
    with maskpatch.patched(target, policy="strip"), torch.no_grad():
        plain_during = plain(input_ids=BATCH, attention_mask=_mask(BATCH)).last_hidden_state
        other_during = other(input_ids=BATCH, attention_mask=_mask(BATCH)).last_hidden_state
        assert not maskpatch.is_patched(plain) and not maskpatch.is_patched(other)
    assert torch.equal(plain_during, plain_before)
    assert torch.equal(other_during, other_before)
    assert other_during.shape[1] == BATCH.shape[1] + M


def _hook_state(model) -> list[tuple[str, int, int, int, frozenset[str]]]:
    return [
        (
            name,
            len(mod._forward_pre_hooks),
            len(mod._forward_hooks),
            len(mod._forward_hooks_always_called),
            frozenset(mod.__dict__),
        )
        for name, mod in model.named_modules()
    ]


def test_remove_is_exact_and_idempotent():
    """After remove(), every module has the hooks and attributes it had before, and the output is PEFT's again."""
    pm = peft_model("TOKEN_CLS")
    before = _hook_state(pm)
    with torch.no_grad():
        raw = pm(input_ids=BATCH, attention_mask=_mask(BATCH)).logits
    residue = residue_snapshot(pm)
    handle = maskpatch.apply(pm, policy="strip")
    assert maskpatch.is_patched(pm) and handle.adapter == "peft"
    handle.remove()
    handle.remove()
    assert _hook_state(pm) == before and not maskpatch.is_patched(pm)
    assert_no_residue(residue, pm)  # the disable_adapter() wrapper went with the install
    with torch.no_grad():
        assert torch.equal(pm(input_ids=BATCH, attention_mask=_mask(BATCH)).logits, raw)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_stay_patched(clone):
    """A deep copy or pickle round trip of a patched model is patched and gives the same outputs."""
    pm = peft_model("TOKEN_CLS")
    handle = maskpatch.apply(pm, policy="strip")
    try:
        twin = clone(pm)
        assert maskpatch.is_patched(twin)
        with torch.no_grad():
            a = pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=LABELS)
            b = twin(input_ids=BATCH, attention_mask=_mask(BATCH), labels=LABELS)
        assert torch.equal(a.logits, b.logits) and a.logits.shape[1] == BATCH.shape[1]
        assert maskpatch.remove(twin)
    finally:
        handle.remove()


def test_return_dict_false_gives_the_repaired_tuple():
    """return_dict=False returns the same repaired values as a tuple."""
    pm = peft_model("TOKEN_CLS")
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        as_tuple = pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=LABELS, return_dict=False)
        as_dict = pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=LABELS)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_unexplained_excess_raises_drift_error():
    """An output longer than the input by anything but the adapter's M raises DriftError, naming both numbers."""
    from transformers.modeling_outputs import BaseModelOutput

    pm = peft_model()
    record = find_record(pm) if maskpatch.is_patched(pm) else None
    assert record is None
    hook = PeftOutputHook(maskpatch.hooks.InstallRecord("strip", "peft", pinned=True))
    call_info = PeftCall(m=M, n=5, adapter="default")
    output = BaseModelOutput(last_hidden_state=torch.zeros(1, 5 + M + 2, 8))
    with pytest.raises(DriftError, match=r"adds 4 virtual tokens.*found 6"):
        hook(pm, (), {"maskpatch_peft_call": call_info}, output)
    fine = hook(pm, (), {"maskpatch_peft_call": call_info}, BaseModelOutput(last_hidden_state=torch.zeros(1, 5 + M, 8)))
    assert fine.last_hidden_state.shape[1] == 5


def test_positional_arguments_and_prealigned_labels():
    """pm(ids, mask) binds like keywords; labels the caller already padded to M + N are not padded twice."""
    pm = peft_model("TOKEN_CLS")
    shifted = torch.cat([torch.full((2, M), -100), LABELS], dim=1)
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        by_keyword = pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=LABELS)
        by_position = pm(BATCH, _mask(BATCH), labels=LABELS)
        prealigned = pm(input_ids=BATCH, attention_mask=_mask(BATCH), labels=shifted)
    assert torch.equal(by_position.logits, by_keyword.logits) and torch.equal(by_position.loss, by_keyword.loss)
    assert torch.equal(prealigned.loss, by_keyword.loss)
