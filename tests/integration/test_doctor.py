"""``maskpatch doctor``, run as a subprocess on a saved tiny model and a saved prompt-tuning adapter.

Invariants protected here:

* on a saved SentenceTransformer directory plus a saved prompt-tuning adapter (M=4) the doctor
  finds N (the probe batch's mask width, counted here with the tokenizer), N+M and M, names the
  active adapter and its PEFT type, reports the unpatched model as batch-variant and every policy
  as batch invariant (cosine 1, max abs diff <= 1e-5), and exits 0;
* without an adapter it reports no drift in its text report and exits 0 (in-process, through
  ``maskpatch.cli.main``, to keep the suite fast);
* a directory that does not exist is refused with a clear message and exit status 2;
* the verdict is a problem (exit 1) for drift the adapter cannot explain or a policy that fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from maskpatch import cli
from maskpatch.cli import doctor

M = 4


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A saved SentenceTransformer (tiny BERT, mean pooling) and a saved prompt-tuning adapter for its model."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("doctor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(tiny_model_dir("bert"), device="cpu")
        model.save(str(root / "model"))
        torch.manual_seed(0)
        inner = model[0]._modules["model" if "model" in model[0]._modules else "auto_model"]  # auto_model before ST 5.4
        peft_model = get_peft_model(
            inner, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M)
        )
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.normal_(0, 1.0)
        peft_model.save_pretrained(str(root / "adapter"))
    return {"model": str(root / "model"), "adapter": str(root / "adapter")}


def _st_era() -> str:
    """What unpatched sentence-transformers does with the drift: crash (3.0-3.2), inline (3.3-6.1), pad (6.2+)."""
    from importlib.metadata import version

    from packaging.version import Version

    installed = Version(version("sentence-transformers"))
    return "crash" if installed < Version("3.3") else "inline" if installed < Version("6.2") else "pad"


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "maskpatch.cli", "doctor", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def probe_width(model_dir: str) -> int:
    """N: the padded width of the doctor's probe batch, counted with the saved tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return max(len(tokenizer(text)["input_ids"]) for text in (doctor.SHORT, doctor.LONG))


@pytest.mark.compat
def test_doctor_finds_prompt_tuning_drift_and_every_policy_repairs_it(saved):
    """JSON report: N, N+M, M, adapter and type are right; unpatched varies with padding, each policy does not."""
    result = run_doctor(saved["model"], "--adapter", saved["adapter"], "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    drift = report["drift"]
    n = probe_width(saved["model"])
    assert (drift["n"], drift["positions"], drift["excess"]) == (n, n + M, M)
    assert (drift["adapter"], drift["peft_type"], drift["num_virtual_tokens"]) == ("default", "PROMPT_TUNING", M)
    assert drift["status"] == "repairable"
    assert report["model_type"] == "SentenceTransformer"
    unpatched, era = report["unpatched"], _st_era()
    if era == "crash":  # sentence-transformers 3.0 - 3.2: Pooling's mask is M short
        assert unpatched["batch_invariant"] is False and "RuntimeError" in unpatched["error"]
    elif era == "inline":  # 3.3 - 6.1 extend the mask inline: batch invariant, virtual tokens pooled
        assert unpatched["batch_invariant"] is True
    else:  # 6.2+: Pooling pools the padding
        assert unpatched["batch_invariant"] is False
        assert unpatched["max_abs_diff"] > 1e-3
    assert [p["policy"] for p in report["policies"]] == ["extend", "ignore", "strip"]
    for policy in report["policies"]:
        assert policy["batch_invariant"] is True
        assert policy["max_abs_diff"] <= 1e-5
        assert policy["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert report["healthy"] is True


def test_doctor_without_adapter_reports_no_drift(saved, capsys):
    """Text report through ``maskpatch.cli.main`` (in-process): no active adapter, no drift, exit 0."""
    assert cli.main(["doctor", saved["model"]]) == 0
    out = capsys.readouterr().out
    assert "active adapter: none" in out
    assert "-> none" in out
    assert "ok: healthy: no drift" in out


def test_doctor_refuses_a_missing_directory(tmp_path: Path, capsys):
    """A model directory that does not exist: exit 2 and a message naming it, nothing on stdout."""
    missing = tmp_path / "nope"
    assert cli.main(["doctor", str(missing)]) == 2
    captured = capsys.readouterr()
    assert "is not a directory" in captured.err and str(missing) in captured.err
    assert captured.out == ""


def test_verdict_is_a_problem_for_unexplained_drift_or_a_failing_policy():
    """Unexplained drift (6 extra positions, adapter adds 4) and a batch-variant policy are not healthy."""
    drift = doctor.Drift("unexplained", "token_embeddings", 10, 16, 6, "default", "PROMPT_TUNING", 4)
    healthy, message = doctor.verdict(drift, [])
    assert not healthy and "adds 4" in message and "6 positions" in message

    drift = doctor.Drift("repairable", "token_embeddings", 10, 14, 4, "default", "PROMPT_TUNING", 4)
    results = [doctor.PolicyResult("extend", True), doctor.PolicyResult("strip", False)]
    healthy, message = doctor.verdict(drift, results)
    assert not healthy and "strip" in message
    healthy, _ = doctor.verdict(drift, results[:1])
    assert healthy
