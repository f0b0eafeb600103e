"""The compat subset: the core invariants on every supported row of the version matrix.

Run on every row of ``scripts/compat.sh`` (``-m compat``), so everything here is written against
the public API of every supported release: no sentence-transformers module path, and the
Transformer's model is found under ``model`` (5.4+) or ``auto_model`` (3.0 - 5.3) by the test
itself. References are computed by hand from the unpatched PEFT model: prompt + word embeddings,
the extended mask, the base model run directly, pooled over the policy's positions.

Invariants protected:

* a prompt-tuned all-MiniLM-L6-v2 SentenceTransformer gives the hand reference under every
  policy, alone and inside a padded batch, with default ``apply`` settings (on sentence-
  transformers 3.0 - 3.2 the unpatched model crashes in Pooling; on 3.3 - 6.1 it extends the
  mask inline, so ``ignore`` and ``strip`` gave ``extend``);
* a PeftModel called directly, with sentence-transformers imported, gives the hand reference;
* sentence-transformers' inline bugs are repaired: prefix tuning keeps the caller's mask,
  ``disable_adapter()`` gives the base model, and a features dict forwarded twice gives the same
  result twice and is not modified.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import maskpatch

from helpers import pool_by_hand

pytestmark = [
    pytest.mark.compat,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

M = 6
ATOL = 1e-5
POLICIES = ("extend", "ignore", "strip")
TEXTS = ["hello world", "a considerably longer sentence, so that the first one gets padded in a batch", "short"]


def _inner_name(transformer) -> str:
    return "model" if "model" in transformer._modules else "auto_model"


def _st(minilm_dir: str, kind: str = "prompt"):
    """all-MiniLM-L6-v2 as a SentenceTransformer whose Transformer holds a PEFT ``kind`` model."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(minilm_dir, device="cpu")
        config = {"prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}[kind](
            task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M
        )
        torch.manual_seed(0)
        name = _inner_name(model[0])
        setattr(model[0], name, get_peft_model(getattr(model[0], name), config))
    with torch.no_grad():
        for param in getattr(model[0], name).parameters():
            if param.requires_grad:
                param.normal_(0, 1.0)
    return model.eval()


def _peft(model):
    return getattr(model[0], _inner_name(model[0]))


def _normalizes(model) -> bool:
    return any(type(module).__name__ == "Normalize" for module in model)


def _features(model, texts: list[str]) -> dict[str, Tensor]:
    """The tokenized ``texts``: the tensors only (6.x adds non-tensor entries such as the task)."""
    return {key: value for key, value in model.tokenize(texts).items() if isinstance(value, Tensor)}


def _prompt_tokens(pm, ids: Tensor, mask: Tensor) -> Tensor:
    """The unpatched PEFT prompt-tuning forward, by hand: (B, M + N, D)."""
    prompts = pm.get_prompt(batch_size=ids.shape[0]).to(torch.float32)
    embeds = torch.cat([prompts, pm.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], M, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return pm.base_model(inputs_embeds=embeds, attention_mask=full).last_hidden_state


def _mean(tokens: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1)


def _reference(model, text: str, policy: str) -> Tensor:
    """The embedding of ``text`` alone under ``policy``, by hand (mean pooling, MiniLM's Normalize)."""
    feats = _features(model, [text])
    ids, mask = feats["input_ids"], feats["attention_mask"]
    tokens = _prompt_tokens(_peft(model), ids, mask)
    if policy == "strip":
        pooled = _mean(tokens[:, M:], mask)
    else:
        prefix = torch.full((1, M), 1 if policy == "extend" else 0, dtype=mask.dtype)
        pooled = _mean(tokens, torch.cat([prefix, mask], dim=1))
    return F.normalize(pooled, dim=-1)[0] if _normalizes(model) else pooled[0]


def _encode(model, texts: list[str]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.encode(texts, convert_to_tensor=True, batch_size=len(texts))


@pytest.fixture(scope="module")
def prompt_st(minilm_dir):
    return _st(minilm_dir)


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_tuned_minilm_gives_the_hand_reference_alone_and_in_a_batch(prompt_st, policy):
    """Single-text identity, batch invariance and the policy's reference, with default apply settings."""
    with maskpatch.patched(prompt_st, policy=policy):
        batch = _encode(prompt_st, TEXTS)
        alone = [_encode(prompt_st, [text])[0] for text in TEXTS]
    for i, text in enumerate(TEXTS):
        expected = _reference(prompt_st, text, policy)
        torch.testing.assert_close(alone[i], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(batch[i], expected, atol=ATOL, rtol=0)


def test_policies_give_different_embeddings(prompt_st):
    """ignore and strip pool the real tokens only, extend pools the virtual tokens too: they must differ."""
    with maskpatch.patched(prompt_st, policy="extend"):
        extend = _encode(prompt_st, TEXTS[:1])[0]
    with maskpatch.patched(prompt_st, policy="ignore"):
        ignore = _encode(prompt_st, TEXTS[:1])[0]
    assert (extend - ignore).abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_features_forwarded_twice_give_the_same_result_and_are_not_modified(prompt_st, policy):
    """Gradient caching forwards one features dict twice: same output twice, the caller's inputs untouched."""
    features = _features(prompt_st, TEXTS)
    before = {key: value.clone() for key, value in features.items()}
    with maskpatch.patched(prompt_st, policy=policy), torch.no_grad():
        first = prompt_st(features)["sentence_embedding"]
        second = prompt_st(features)["sentence_embedding"]
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    # sentence-transformers itself adds its outputs to the dict; what the caller put in stays as it was.
    for key, value in before.items():
        assert torch.equal(features[key], value), key


@pytest.mark.parametrize("policy", POLICIES)
def test_disable_adapter_gives_the_base_model(prompt_st, policy):
    """Inside disable_adapter() nothing is prepended: the base model's own embedding, by hand."""
    pm = _peft(prompt_st)
    feats = _features(prompt_st, TEXTS)
    with torch.no_grad():
        tokens = pm.base_model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"]).last_hidden_state
    expected = _mean(tokens, feats["attention_mask"])
    expected = F.normalize(expected, dim=-1) if _normalizes(prompt_st) else expected
    with maskpatch.patched(prompt_st, policy=policy), pm.disable_adapter():
        got = _encode(prompt_st, TEXTS)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_prefix_tuning_keeps_the_callers_mask(minilm_dir, policy):
    """Prefix tuning adds no positions: the output mask is the caller's, and the embedding pools real tokens."""
    model = _st(minilm_dir, "prefix")
    feats = _features(model, TEXTS)
    with torch.no_grad():
        tokens = _peft(model)(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"]).last_hidden_state
    expected = _mean(tokens, feats["attention_mask"])
    expected = F.normalize(expected, dim=-1) if _normalizes(model) else expected
    with maskpatch.patched(model, policy=policy), torch.no_grad():
        out = model(_features(model, TEXTS))
    assert torch.equal(out["attention_mask"], feats["attention_mask"])
    torch.testing.assert_close(out["sentence_embedding"], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_peft_model_called_directly_gives_the_hand_reference(minilm_dir, policy):
    """apply(peft_model) with sentence-transformers imported: outputs and output_mask follow the policy."""
    import transformers
    from peft import PromptTuningConfig, TaskType, get_peft_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    base = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = _prompt_tokens(pm, ids, mask)
    handle = maskpatch.apply(pm, policy=policy)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pm(input_ids=ids, attention_mask=mask).last_hidden_state
            alone = pm(input_ids=ids[:1, : int(mask[0].sum())], attention_mask=mask[:1, : int(mask[0].sum())])
        lined_up = maskpatch.output_mask(pm, mask)
    finally:
        handle.remove()
    real = torch.cat([torch.ones(3, M, dtype=mask.dtype), mask], dim=1).bool()  # padding positions may differ
    if policy == "strip":
        expected, real = expected[:, M:], real[:, M:]
    assert out.shape == expected.shape
    # Raw hidden states reach ~10 in magnitude: compare them relatively (1e-5) too.
    torch.testing.assert_close(out[real], expected[real], atol=ATOL, rtol=1e-5)
    n0 = alone.last_hidden_state.shape[1]
    torch.testing.assert_close(alone.last_hidden_state[0], out[0, :n0], atol=ATOL, rtol=1e-5)
    prefix = {"extend": 1, "ignore": 0}.get(policy)
    want = mask if prefix is None else torch.cat([torch.full((3, M), prefix, dtype=mask.dtype), mask], dim=1)
    assert torch.equal(lined_up, want)


@pytest.mark.parametrize("mode", ["weightedmean", "cls"])
def test_column_read_pooling_under_ignore_gives_the_hand_reference(minilm_dir, mode):
    """ignore pools the real tokens only, also where Pooling reads positions by column (before 6.2).

    sentence-transformers before 6.2 weigh weightedmean by column index and before 5.5 take cls
    from column 0: the M excluded virtual columns in front would shift the weights and make cls
    take virtual token 0. The reference is the text alone, pooled by hand over its real tokens
    (``[CLS]`` for cls), from the unpatched PEFT model; alone and right-padded in a batch. No
    known limit is reported.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models

    model = _st(minilm_dir)
    dimension = getattr(model[0], "get_embedding_dimension", None) or model[0].get_word_embedding_dimension
    pooled = SentenceTransformer(modules=[model[0], st_models.Pooling(dimension(), mode)], device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with maskpatch.patched(pooled, policy="ignore", strict=True):
            batch = _encode(pooled, TEXTS)
            alone = [_encode(pooled, [text])[0] for text in TEXTS]
    assert not [w for w in caught if issubclass(w.category, maskpatch.MaskpatchWarning)]
    for i, text in enumerate(TEXTS):
        feats = _features(pooled, [text])
        tokens = _prompt_tokens(_peft(pooled), feats["input_ids"], feats["attention_mask"])[:, M:]
        expected = pool_by_hand(tokens, feats["attention_mask"], mode)[0]  # the real tokens, all attended
        torch.testing.assert_close(alone[i], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(batch[i], expected, atol=ATOL, rtol=0)


def test_the_demo_repairs_every_pooling_mode_on_this_release(capsys):
    """``maskpatch demo`` on this row: every pooling mode under every policy equals its hand reference.

    The demo computes each mode's reference by hand (its ``_pool_by_hand``) from the unpatched
    PEFT model, so this covers cls, max, weightedmean and lasttoken too, where the tests above
    pool by mean. No mode may run into a known limit on any row: weightedmean and cls under
    ignore read positions by column before 6.2 and 5.5, and maskpatch hands Pooling the real
    columns there.
    """
    import os

    from maskpatch.cli import demo

    environ = dict(os.environ)
    try:
        status = demo.main([])
    finally:
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr().out
    assert status == 0, out
    assert [line for line in out.splitlines() if line.startswith("KNOWN LIMIT")] == []


@pytest.mark.parametrize("policy", POLICIES)
def test_an_instruction_is_left_out_of_the_pooling_on_every_row(minilm_dir, policy):
    """``Pooling(include_prompt=False)`` leaves out the instruction, never the virtual tokens (every policy).

    Before sentence-transformers 5.3 Pooling zeroes the first ``prompt_length`` columns; under
    ``ignore`` those would be the M virtual columns, so maskpatch hands Pooling the real columns.
    The reference: the prompted text alone, run by hand through the unpatched PEFT model, mean
    pooled over the policy's positions minus the instruction's tokens ([CLS] and the prompt).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models

    model = _st(minilm_dir)
    dimension = getattr(model[0], "get_embedding_dimension", None) or model[0].get_word_embedding_dimension
    pooling = st_models.Pooling(dimension(), "mean", include_prompt=False)
    prompted = SentenceTransformer(modules=[model[0], pooling], device="cpu")
    prompt = "query: "
    with maskpatch.patched(prompted, policy=policy):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = prompted.encode(TEXTS[:2], prompt=prompt, convert_to_tensor=True, batch_size=2)
    count = len(prompted.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # [CLS] + the prompt
    for i, text in enumerate(TEXTS[:2]):
        feats = _features(prompted, [prompt + text])
        ids, mask = feats["input_ids"], feats["attention_mask"]
        tokens = _prompt_tokens(_peft(prompted), ids, mask)
        real = mask.clone()
        real[:, :count] = 0  # one unpadded text: its first ``count`` tokens are the instruction
        if policy == "strip":
            expected = _mean(tokens[:, M:], real)[0]
        else:
            prefix = torch.full((1, M), 1 if policy == "extend" else 0, dtype=mask.dtype)
            expected = _mean(tokens, torch.cat([prefix, real], dim=1))[0]
        torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=0)
