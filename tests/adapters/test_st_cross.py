"""CrossEncoder with a prompt-learning adapter: 2-D scores, so there is nothing to repair.

Invariants protected here, on tiny random models with MiniLM's tokenizer (M=4):

* a sequence-classification CrossEncoder (BertForSequenceClassification) wrapped in a
  prompt-tuning PeftModel (SEQ_CLS or FEATURE_EXTRACTION task) returns bit-identical scores with
  and without maskpatch, under every policy, in a batch and alone;
* a causal-LM CrossEncoder (Qwen2ForCausalLM + LogitScore, left padding, ``logits_to_keep=1``)
  scores each pair like the PEFT model run by hand with position ids that skip the padding, so a
  pair alone scores like the same pair inside a padded batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

import maskpatch

from conftest import minilm_path

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*token_type_ids.*"),
    pytest.mark.filterwarnings("ignore:.*position_ids.*"),
]

M = 4
TOL = 1e-5
PAIRS = [
    ("how do I bake bread?", "knead the dough, let it rise for an hour and bake it at 220 degrees"),
    ("capital of france", "Paris"),
    ("fast cars", "a sports car that goes very fast on the motorway"),
]


def save_tiny(root, kind: str) -> str:
    """Save a tiny random ``cls`` (BertForSequenceClassification) or ``causal`` (Qwen2ForCausalLM) model."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
    if kind == "cls":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=1, **common))
    else:
        config = transformers.Qwen2Config(num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, **common)
        model = transformers.Qwen2ForCausalLM(config)
    path = root / kind
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cross")
    return {kind: save_tiny(root, kind) for kind in ("cls", "causal")}


def cross_encoder(path: str, task: str):
    """A CrossEncoder of ``path`` whose model is wrapped in a prompt-tuning PeftModel of ``task``."""
    from peft import PromptTuningConfig, get_peft_model
    from sentence_transformers import CrossEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CrossEncoder(path, device="cpu")
        torch.manual_seed(0)
        model[0].model = get_peft_model(model[0].model, PromptTuningConfig(task_type=task, num_virtual_tokens=M))
    with torch.no_grad():
        for param in model[0].model.parameters():
            if param.requires_grad:  # the prompt (and SEQ_CLS's classifier copy): non-trivial values
                param.normal_(0, 0.1)
    model.eval()
    return model


def predict(model, pairs) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.predict(pairs, convert_to_tensor=True, activation_fn=torch.nn.Identity(), batch_size=len(pairs))


@pytest.mark.parametrize("task", ["SEQ_CLS", "FEATURE_EXTRACTION"])
def test_sequence_classification_scores_are_bit_identical(model_dirs, task):
    """Scores are 2-D: no policy changes a single bit of them, in a batch or alone."""
    model = cross_encoder(model_dirs["cls"], task)
    before = predict(model, PAIRS)
    before_alone = [predict(model, [pair]) for pair in PAIRS]
    assert before.shape == (len(PAIRS),)
    for policy in maskpatch.POLICIES:
        with maskpatch.patched(model, policy=policy):
            assert maskpatch.is_patched(model)
            assert torch.equal(predict(model, PAIRS), before)
            assert all(torch.equal(predict(model, [p]), b) for p, b in zip(PAIRS, before_alone, strict=True))
    assert not maskpatch.is_patched(model)
    assert torch.equal(predict(model, PAIRS), before)


def causal_scores_by_hand(model, pairs) -> Tensor:
    """yes-minus-no logit at the last position of the PEFT causal LM run by hand (positions skip padding)."""
    features = model.preprocess(pairs)
    pm = model[0].model
    ids, mask = features["input_ids"], features["attention_mask"]
    embeds = torch.cat([pm.get_prompt(batch_size=ids.shape[0]), pm.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], M, dtype=mask.dtype), mask], dim=1)
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)  # a pad repeats the position before it
    with torch.no_grad():
        logits = pm.base_model(inputs_embeds=embeds, attention_mask=full, position_ids=positions).logits[:, -1]
    score = model[1]
    return logits[:, score.true_token_id] - logits[:, score.false_token_id]


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_causal_cross_encoder_equals_reference_and_is_batch_invariant(model_dirs, policy):
    """The LogitScore reads the last (left-padded) position: every policy gives the by-hand scores."""
    model = cross_encoder(model_dirs["causal"], "CAUSAL_LM")
    expected = causal_scores_by_hand(model, PAIRS)
    with maskpatch.patched(model, policy=policy):
        batch = predict(model, PAIRS)
        alone = torch.cat([predict(model, [pair]) for pair in PAIRS])
    assert (batch - expected).abs().max() <= TOL
    assert (batch - alone).abs().max() <= TOL
