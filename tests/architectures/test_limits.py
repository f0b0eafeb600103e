"""Known limits: combinations maskpatch cannot make right warn (once per install) or raise under strict.

Invariants protected here (each case is also shown to be really off, so the warning is not noise):

* a left-padded T5 batch warns ``left-padding`` once per install, a new install warns again, and
  ``apply(..., strict=True)`` raises :class:`KnownLimitError` instead; right padding stays silent;
* ``apply(model[0])`` under ``extend`` with an instruction prompt warns ``part-model-pooling``
  (it cannot reach ``Pooling(include_prompt=False)``); patching the whole model is silent and
  gives a different, correct, embedding;
* ``maskpatch doctor`` names the limit a saved left-padded T5 model runs into, and its verdict is a
  problem.

maskpatch 0.1.0 warned about none of these: every test here fails on it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import maskpatch
from maskpatch import KnownLimitError, MaskpatchWarning
from maskpatch.cli import doctor

from conftest import TEXTS
from helpers import add_prompt_learning, encode, st_model, with_head

M = 4
TOL = 1e-5
PROMPT = "query: "


def _limit_warnings(caught: list[warnings.WarningMessage], name: str) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, MaskpatchWarning) and repr(name) in str(w.message)]


def _encode_recording(model, texts, **kwargs) -> tuple[torch.Tensor, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.encode(texts, convert_to_tensor=True, batch_size=len(texts), **kwargs)
    return out, caught


@pytest.fixture(scope="module")
def t5(tiny_model_dir):
    """side -> a tiny T5 encoder SentenceTransformer (mean pooling) with prompt tuning."""
    return {
        side: add_prompt_learning(st_model(tiny_model_dir("t5"), padding_side=side), m=M) for side in ("left", "right")
    }


def test_left_padded_t5_warns_once_per_install_and_again_for_a_new_one(t5):
    """The first left-padded batch warns (naming T5 and what to do); later batches of the install do not."""
    model = t5["left"]
    with maskpatch.patched(model):
        _, first = _encode_recording(model, TEXTS)
        batch, second = _encode_recording(model, TEXTS)
    messages = _limit_warnings(first, "left-padding")
    assert len(messages) == 1 and "T5" in messages[0] and "padding_side = 'right'" in messages[0]
    assert _limit_warnings(second, "left-padding") == []
    alone = encode(model, TEXTS[:1])
    assert (alone[0] - batch[0]).abs().max() > TOL  # the limit is real: T5 left-padded is batch variant
    with maskpatch.patched(model):
        _, third = _encode_recording(model, TEXTS)
    assert len(_limit_warnings(third, "left-padding")) == 1


def test_right_padded_t5_and_a_single_text_do_not_warn(t5):
    """No padding before tokens, no limit: right padding and one text alone are silent."""
    with maskpatch.patched(t5["right"]):
        _, caught = _encode_recording(t5["right"], TEXTS)
    with maskpatch.patched(t5["left"]):
        _, alone = _encode_recording(t5["left"], TEXTS[:1])
    assert [w for w in caught + alone if issubclass(w.category, MaskpatchWarning)] == []


def test_strict_install_raises_known_limit_error_every_time(t5):
    """Under strict the limit is an error (a MaskpatchError and a RuntimeError), raised on each such batch."""
    model = t5["left"]
    with maskpatch.patched(model, strict=True):
        for _ in range(2):
            with pytest.raises(KnownLimitError, match="left-padding") as info:
                encode(model, TEXTS)
            assert isinstance(info.value, RuntimeError) and isinstance(info.value, maskpatch.MaskpatchError)
        encode(model, TEXTS[:1])  # no padding: nothing raised


@pytest.fixture(scope="module")
def bert_transformer(tiny_model_dir):
    return add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)[0]


def test_part_model_install_under_extend_with_a_prompt_warns(bert_transformer):
    """apply(model[0]) cannot reach Pooling(include_prompt=False): warned; the whole-model install is silent and differs."""
    model = with_head(bert_transformer, "mean", include_prompt=False)
    with maskpatch.patched(model[0], policy="extend"):
        part, caught = _encode_recording(model, TEXTS, prompt=PROMPT)
    assert len(_limit_warnings(caught, "part-model-pooling")) == 1
    with maskpatch.patched(model, policy="extend"):
        whole, silent = _encode_recording(model, TEXTS, prompt=PROMPT)
    assert [w for w in silent if issubclass(w.category, MaskpatchWarning)] == []
    assert (part - whole).abs().max() > TOL  # the part install pooled the instruction, not the virtual tokens


def test_part_model_install_without_a_prompt_is_silent(bert_transformer):
    """Without a prompt there is no prompt_length, so nothing to exclude and nothing to warn about."""
    model = with_head(bert_transformer, "mean", include_prompt=False)
    with maskpatch.patched(model[0], policy="extend"):
        _, caught = _encode_recording(model, TEXTS)
    assert [w for w in caught if issubclass(w.category, MaskpatchWarning)] == []


def test_doctor_names_the_known_limit_of_a_left_padded_t5(tiny_model_dir, tmp_path):
    """The doctor reports the limit each policy ran into, with what to do, and its verdict is a problem."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(tiny_model_dir("t5"), device="cpu")
        model[0].tokenizer.padding_side = "left"
        model.save(str(tmp_path / "model"))
        torch.manual_seed(0)
        peft_model = get_peft_model(
            model[0].model, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M)
        )
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    report = doctor.diagnose(tmp_path / "model", adapter_dir=tmp_path / "adapter")
    assert all(any("'left-padding'" in limit for limit in result.limits) for result in report.policies)
    assert not report.healthy and "known limit" in report.verdict
    assert "known limit: maskpatch known limit 'left-padding'" in doctor.format_report(report)
