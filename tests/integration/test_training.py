"""Training a prompt-tuned SentenceTransformer through sentence-transformers losses with maskpatch.

Invariants protected here, on a tiny random BERT with a prompt-tuning adapter (M=4):

* MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss no longer depend on how the
  batch was padded (they do without maskpatch: ``Pooling`` pools the padding), and the cached loss
  equals the plain one at the same parameters;
* ``SentenceTransformerTrainer`` changes the prompt parameters and nothing else;
* DenoisingAutoEncoderLoss (TSDAE), which reads ``source_features["attention_mask"][:, 0:1]`` after
  the encoder ran, gives a finite loss, trains, and sees the caller's mask unchanged;
* the caller's features dict and tensors are never modified in place, so a dict forwarded twice
  gives the same result twice.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import maskpatch

from helpers import add_prompt_learning, st_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
]

POLICIES = ("extend", "ignore", "strip")
M = 4
PAIRS = [
    ("hello world", "hi there, world"),
    ("a cat sat on the mat", "the cat was sitting on a mat in the sun"),
    ("how do I bake bread at home without a bread machine?", "baking bread by hand"),
    ("fast cars", "a sports car that goes very fast on the motorway"),
    ("the weather today", "it will rain this afternoon and clear up by the evening"),
    ("python lists", "lists in python are mutable sequences"),
]
ANCHORS = [a for a, _ in PAIRS]
POSITIVES = [p for _, p in PAIRS]
EXTRA_PAD = 7


@pytest.fixture
def model(tiny_model_dir):
    """A fresh tiny BERT SentenceTransformer (mean pooling) with a randomised prompt-tuning adapter, in eval mode."""
    st = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M, seed=0)
    st.eval()
    return st


def features(model, texts: list[str], *, extra_pad: int = 0) -> dict[str, Any]:
    """Tokenize ``texts`` padded to the longest text, then right-pad ``extra_pad`` more columns by hand."""
    feats = dict(model.preprocess(texts))
    if extra_pad:
        pad_id = model.tokenizer.pad_token_id
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in feats:
                value = feats[key]
                feats[key] = torch.cat([value, value.new_full((value.shape[0], extra_pad), fill)], dim=1)
    return feats


def loss_value(loss, model, *, extra_pad: int = 0) -> float:
    """The loss of the anchor/positive pairs at the current parameters (no training step)."""
    feats = [features(model, ANCHORS, extra_pad=extra_pad), features(model, POSITIVES, extra_pad=extra_pad)]
    labels = torch.zeros(len(ANCHORS))
    with torch.no_grad():
        return float(loss(feats, labels))


def make_loss(kind: str, model):
    from sentence_transformers.sentence_transformer import losses

    if kind == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)


def snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


def train(model, loss, columns: dict[str, list[str]], output_dir) -> None:
    """Run ``SentenceTransformerTrainer`` for two steps of batch 3 on ``columns`` (quietly, on CPU)."""
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=3,
        learning_rate=0.05,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss
        )
        trainer.train()


# --- padding dependence: pinned upstream behaviour, then the repair ------------------------------


def test_unpatched_losses_depend_on_padding(model):
    """Without maskpatch Pooling pools the padding: the MNRL loss moves with extra pad columns, and
    CachedMNRL (which trims each mini-batch's padding) disagrees with MNRL."""
    mnrl, cached = make_loss("mnrl", model), make_loss("cached", model)
    assert abs(loss_value(mnrl, model) - loss_value(mnrl, model, extra_pad=EXTRA_PAD)) > 1e-3
    assert abs(loss_value(mnrl, model) - loss_value(cached, model)) > 1e-3


@pytest.mark.parametrize("kind", ["mnrl", "cached"])
@pytest.mark.parametrize("policy", POLICIES)
def test_patched_loss_does_not_depend_on_padding(model, policy, kind):
    """With maskpatch the loss on the same texts is the same padded to the longest text or 7 columns more."""
    loss = make_loss(kind, model)
    with maskpatch.patched(model, policy=policy):
        tight = loss_value(loss, model)
        padded = loss_value(loss, model, extra_pad=EXTRA_PAD)
    assert torch.isfinite(torch.tensor(tight))
    assert abs(tight - padded) <= 1e-5


@pytest.mark.parametrize("policy", POLICIES)
def test_cached_mnrl_equals_mnrl(model, policy):
    """CachedMNRL (mini-batches of 2, each trimmed to its own padding) equals MNRL at the same parameters."""
    with maskpatch.patched(model, policy=policy):
        plain = loss_value(make_loss("mnrl", model), model, extra_pad=EXTRA_PAD)
        cached = loss_value(make_loss("cached", model), model, extra_pad=EXTRA_PAD)
    assert abs(plain - cached) <= 1e-5


@pytest.mark.parametrize("policy", POLICIES)
def test_features_dict_forwarded_twice_gives_the_same_result(model, policy):
    """The caller's features dict keeps its tensors, and a second forward of it gives the same embedding."""
    feats = features(model, ANCHORS, extra_pad=EXTRA_PAD)
    before = {key: value for key, value in feats.items() if isinstance(value, Tensor)}
    values = {key: value.clone() for key, value in before.items()}
    with maskpatch.patched(model, policy=policy), torch.no_grad():
        first = model(feats)["sentence_embedding"]
        second = model(feats)["sentence_embedding"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    for key, tensor in before.items():
        assert feats[key] is tensor, key
        torch.testing.assert_close(tensor, values[key], rtol=0, atol=0)


# --- SentenceTransformerTrainer ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mnrl", "cached"])
@pytest.mark.parametrize("policy", POLICIES)
def test_trainer_changes_only_prompt_parameters(model, policy, kind, tmp_path):
    """Two trainer steps on a patched model move the prompt embedding and no other parameter."""
    before = snapshot(model)
    prompt = {name for name, p in model.named_parameters() if p.requires_grad}
    assert prompt == {"0.model.prompt_encoder.default.embedding.weight"}
    model.train()
    with maskpatch.patched(model, policy=policy):
        train(model, make_loss(kind, model), {"anchor": ANCHORS, "positive": POSITIVES}, tmp_path)
        assert maskpatch.is_patched(model)
    assert changed(before, model) == prompt
    assert not maskpatch.is_patched(model)


# --- TSDAE ---------------------------------------------------------------------------------------


class DecoderInputSpy:
    """Forward pre-hook on the TSDAE decoder that records what the encoder hands it."""

    def __init__(self) -> None:
        self.states: list[Tensor] = []
        self.masks: list[Tensor] = []

    def __call__(self, module, args, kwargs):
        self.states.append(kwargs["encoder_hidden_states"].detach().clone())
        self.masks.append(kwargs["encoder_attention_mask"].detach().clone())


def tsdae_loss(model, decoder_dir: str):
    """DenoisingAutoEncoderLoss with a separate (untied) decoder of the same tiny architecture.

    Tying is not used: it matches encoder and decoder parameters by module name, and the encoder's
    names sit under the PeftModel (``base_model.``...), so sentence-transformers would tie nothing.
    """
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    logger = logging.getLogger("sentence_transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the decoder's load report is noise here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = DenoisingAutoEncoderLoss(model, decoder_name_or_path=decoder_dir, tie_encoder_decoder=False)
    finally:
        logger.setLevel(level)
    loss.spy = DecoderInputSpy()
    loss.decoder.register_forward_pre_hook(loss.spy, with_kwargs=True)
    return loss


DAMAGED = ["cat mat", "bake bread home machine", "fast cars", "weather", "python mutable", "the rain evening"]


def tsdae_value(loss, model, *, extra_pad: int = 0, source: dict[str, Any] | None = None) -> float:
    """The TSDAE loss of (damaged, original) pairs, the damaged side padded ``extra_pad`` columns more."""
    if source is None:
        source = features(model, DAMAGED, extra_pad=extra_pad)
    target = features(model, POSITIVES)
    with torch.no_grad():
        return float(loss([source, target], torch.zeros(len(DAMAGED))))


def test_unpatched_tsdae_encoding_depends_on_source_padding(model, tiny_model_dir):
    """Without maskpatch the sentence embedding TSDAE hands its decoder moves with the source padding."""
    loss = tsdae_loss(model, tiny_model_dir("bert"))
    loss.eval()
    tsdae_value(loss, model)
    tsdae_value(loss, model, extra_pad=EXTRA_PAD)
    tight, padded = loss.spy.states
    assert (tight - padded).abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_tsdae_loss_is_finite_padding_invariant_and_leaves_features_alone(model, tiny_model_dir, policy):
    """Under every policy: a finite loss; the decoder gets the same encoding with more source padding
    and the caller's (unextended) first mask column; the caller's source dict keeps its tensors."""
    loss = tsdae_loss(model, tiny_model_dir("bert"))
    loss.eval()
    source = features(model, DAMAGED)
    before = {key: value for key, value in source.items() if isinstance(value, Tensor)}
    values = {key: value.clone() for key, value in before.items()}
    with maskpatch.patched(model, policy=policy):
        tight = tsdae_value(loss, model, source=source)
        padded = tsdae_value(loss, model, extra_pad=EXTRA_PAD)
    assert torch.isfinite(torch.tensor([tight, padded])).all()
    assert abs(tight - padded) <= 1e-5
    torch.testing.assert_close(loss.spy.states[0], loss.spy.states[1], rtol=0, atol=1e-5)
    # Right padding: every text's first token is real, so TSDAE's mask[:, 0:1] must be all ones.
    # An in-place "ignore" repair of the caller's mask would have made it all zeros instead.
    for seen in loss.spy.masks:
        torch.testing.assert_close(seen, torch.ones(len(DAMAGED), 1, dtype=seen.dtype), rtol=0, atol=0)
    for key, tensor in before.items():
        assert source[key] is tensor, key
        torch.testing.assert_close(tensor, values[key], rtol=0, atol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_tsdae_trains_prompt_and_decoder_only(model, tiny_model_dir, policy, tmp_path):
    """Two TSDAE trainer steps move the encoder's prompt and the decoder, and no other encoder parameter."""
    loss = tsdae_loss(model, tiny_model_dir("bert"))
    encoder_before, decoder_before = snapshot(model), snapshot(loss.decoder)
    model.train()
    with maskpatch.patched(model, policy=policy):
        train(model, loss, {"damaged": DAMAGED, "original": POSITIVES}, tmp_path)
    assert changed(encoder_before, model) == {"0.model.prompt_encoder.default.embedding.weight"}
    assert changed(decoder_before, loss.decoder)  # the decoder is trained, as TSDAE intends
