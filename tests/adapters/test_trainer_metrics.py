"""``Trainer.evaluate`` / ``predict`` with ``compute_metrics`` on a prompt-tuned token classifier (tiny random BERT).

Invariants protected here, under every policy of ``maskpatch.apply(trainer, policy=...)``:

* ``compute_metrics`` gets predictions and label ids of the same shape, also when eval batches
  have different lengths (the Trainer pads across batches);
* each row's predictions (at its real tokens) equal the logits computed by hand from the PEFT model (prompt + word
  embeddings, extended mask, the base model run directly) with the ``M`` virtual positions cut,
  and the label ids are the caller's labels;
* token accuracy equals a hand-aligned computation, and the eval loss equals the hand loss;
* the model called directly keeps the install's policy; ``remove`` is exact.

Without the Trainer install (the model patched on its own under ``extend`` or ``ignore``),
``compute_metrics`` gets ``N + M`` predictions next to ``N`` labels, and the usual zip-style metric
is silently wrong; the main test checks that first, so its reference is not vacuous.
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

from helpers import class_state, residue_snapshot, state

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

M = 4
POLICIES = ("extend", "ignore", "strip")
ATOL = 1e-5

# Two eval batches of two rows: 7 tokens (one row right-padded), then 5 tokens.
IDS = [
    torch.tensor([[7, 8, 9, 10, 0, 0, 0], [11, 12, 13, 14, 15, 16, 17]]),
    torch.tensor([[21, 22, 23, 24, 25], [31, 32, 33, 0, 0]]),
]
LABELS = [
    torch.tensor([[0, 1, 2, 1, -100, -100, -100], [2, 1, 0, 1, 2, 0, 1]]),
    torch.tensor([[1, 1, 2, 0, 2], [0, 2, 1, -100, -100]]),
]


def _mask(ids: Tensor) -> Tensor:
    return (ids != 0).long()


def tagger():
    """A prompt-tuned tiny random BertForTokenClassification (no dropout), with a random N(0, 1) prompt."""
    import transformers
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        initializer_range=0.5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            transformers.BertForTokenClassification(config).eval(),
            PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=M),
        )
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.normal_(0, 1.0)
    return pm.eval()


def rows() -> list[dict[str, Tensor]]:
    return [
        {"input_ids": ids[i], "attention_mask": _mask(ids)[i], "labels": labels[i]}
        for ids, labels in zip(IDS, LABELS, strict=True)
        for i in range(ids.shape[0])
    ]


def logits_by_hand(pm, ids: Tensor) -> Tensor:
    """Real-token logits of one batch, by hand: prompt + word embeddings, extended mask, base model, [:, M:]."""
    mask = _mask(ids)
    embeds = torch.cat([pm.get_prompt(batch_size=ids.shape[0]), pm.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], M, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return pm.get_base_model()(inputs_embeds=embeds, attention_mask=full).logits[:, M:]


def hand_reference(pm) -> tuple[list[Tensor], float, float]:
    """Per batch real-token logits; token accuracy over labels != -100; mean of per-batch losses."""
    logits, hits, total, losses = [], 0, 0, []
    for ids, labels in zip(IDS, LABELS, strict=True):
        out = logits_by_hand(pm, ids)
        logits.append(out)
        keep = labels != -100
        hits += int((out.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
        losses.append(float(torch.nn.functional.cross_entropy(out.reshape(-1, 3), labels.reshape(-1))))
    return logits, hits / total, sum(losses) / len(losses)


class ZipAccuracy:
    """The usual token-classification metric (zip predictions with labels, skip -100); remembers the shapes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, prediction) -> dict[str, float]:
        predictions, labels = prediction.predictions.argmax(-1), prediction.label_ids
        self.shapes.append((predictions.shape, labels.shape))
        # zip as a user's metric would: unequal lengths (an unaligned model) are silently truncated.
        rows = zip(predictions, labels, strict=False)
        pairs = [(p, y) for row_p, row_y in rows for p, y in zip(row_p, row_y, strict=False) if y != -100]
        return {"accuracy": sum(int(p == y) for p, y in pairs) / len(pairs)}


def make_trainer(pm, tmp_path, metric: ZipAccuracy):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(model=pm, args=args, eval_dataset=rows(), compute_metrics=metric)


@pytest.mark.parametrize("policy", POLICIES)
def test_evaluate_and_predict_line_up_with_a_hand_aligned_computation(policy, tmp_path):
    """Same-shape predictions and label ids; predictions, accuracy and loss equal the hand reference. (With
    the model patched alone under extend or ignore, the shapes differ and the accuracy is silently wrong.)"""
    pm = tagger()
    logits, accuracy, loss = hand_reference(pm)
    if policy != "strip":
        alone = ZipAccuracy()
        with maskpatch.patched(pm, policy=policy):
            wrong = make_trainer(pm, tmp_path, alone).evaluate()
        assert alone.shapes[0][0] != alone.shapes[0][1]
        assert wrong["eval_accuracy"] != pytest.approx(accuracy)
    metric = ZipAccuracy()
    trainer = make_trainer(pm, tmp_path, metric)
    with maskpatch.patched(trainer, policy=policy):
        metrics = trainer.evaluate()
        prediction = trainer.predict(rows())
    assert metric.shapes == [((4, 7), (4, 7)), ((4, 7), (4, 7))]
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["eval_loss"] == pytest.approx(loss, abs=ATOL)
    assert prediction.predictions.shape == (4, 7, 3)
    expected_labels = np.full((4, 7), -100)
    for batch, (out, ids, labels) in enumerate(zip(logits, IDS, LABELS, strict=True)):
        n, real = out.shape[1], _mask(ids).bool()  # padding positions carry no meaning
        got = torch.from_numpy(prediction.predictions[2 * batch : 2 * batch + 2, :n])
        torch.testing.assert_close(got[real], out[real], atol=ATOL, rtol=0)
        expected_labels[2 * batch : 2 * batch + 2, :n] = labels.numpy()
    np.testing.assert_array_equal(prediction.label_ids, expected_labels)


def test_the_policy_still_holds_outside_the_trainer_and_remove_is_exact(tmp_path):
    """Under extend the model called directly keeps N + M logits; handle.remove() restores every module exactly."""
    pm = tagger()
    pm._is_accelerate_prepared = True  # what accelerate sets on the model in the first evaluation
    before = state(pm)
    trainer = make_trainer(pm, tmp_path, ZipAccuracy())
    handle = maskpatch.apply(trainer, policy="extend")
    assert handle.adapter == "trainer" and maskpatch.is_patched(trainer)
    with torch.no_grad():
        assert pm(input_ids=IDS[0], attention_mask=_mask(IDS[0])).logits.shape[1] == IDS[0].shape[1] + M
    trainer.evaluate()
    handle.remove()
    assert state(pm) == before and not maskpatch.is_patched(trainer)


def test_the_last_trainer_install_removed_leaves_the_trainer_class_exactly_as_before(tmp_path):
    """Exact class undo under nesting: apply(trainer) wraps ``Trainer.evaluation_loop``; a patched block on a second
    Trainer keeps the wrapper after the first handle.remove(), and its evaluation lined up (predictions shaped like
    the label ids); the block's exit (the last install) leaves ``Trainer.__dict__`` exactly as before."""
    from transformers import Trainer

    residue_snapshot()  # settles: class wrappers held only by installs of earlier tests come off
    before = class_state(Trainer)
    metric = ZipAccuracy()
    first, second = (
        make_trainer(tagger(), tmp_path / "a", ZipAccuracy()),
        make_trainer(tagger(), tmp_path / "b", metric),
    )
    handle = maskpatch.apply(first, policy="extend")
    assert class_state(Trainer) != before
    with maskpatch.patched(second, policy="extend"):
        handle.remove()
        assert class_state(Trainer) != before
        second.evaluate()
    assert metric.shapes and all(p == y for p, y in metric.shapes), metric.shapes
    assert class_state(Trainer) == before


def test_a_copy_of_the_trainer_model_is_not_aligned_by_another_trainer(tmp_path):
    """The alignment follows the Trainer's own model: a deep copy patched under extend, called inside the
    patched Trainer's evaluation, keeps its N + M outputs."""
    pm = tagger()
    other = copy.deepcopy(pm)
    seen: list[int] = []

    class Spy(ZipAccuracy):
        def __call__(self, prediction: Any) -> dict[str, float]:
            with torch.no_grad():
                seen.append(other(input_ids=IDS[0], attention_mask=_mask(IDS[0])).logits.shape[1])
            return super().__call__(prediction)

    trainer = make_trainer(pm, tmp_path, Spy())
    with maskpatch.patched(other, policy="extend"), maskpatch.patched(trainer, policy="extend"):
        trainer.evaluate()
    assert seen == [IDS[0].shape[1] + M]
