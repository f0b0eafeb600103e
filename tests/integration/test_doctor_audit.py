"""``maskpatch doctor MODEL --adapter ADAPTER --audit TEXT ...``: audit mode on a saved model and sample texts.

Invariants protected here: the doctor reports, for a saved SentenceTransformer with a saved
prompt-tuning adapter (M=4), one finding at module ``0`` whose lengths are the batch width counted
with the saved tokenizer (N) and N + M, explained by the adapter, with what each policy would do
(exit 0: repairable); without the adapter nothing is found; an empty or unloadable input exits 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from maskpatch import cli
from maskpatch.cli import doctor

M = 4
TEXTS = ("hello world", "a considerably longer sentence that pads the first one")


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A saved SentenceTransformer (tiny BERT, mean pooling) and a saved prompt-tuning adapter (M=4) for its model."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("doctor_audit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(tiny_model_dir("bert"), device="cpu")
        model.save(str(root / "model"))
        torch.manual_seed(0)
        config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M)
        get_peft_model(model[0].model, config).save_pretrained(str(root / "adapter"))
    return {"model": str(root / "model"), "adapter": str(root / "adapter")}


def batch_width(model_dir: str) -> int:
    """N: the padded width of TEXTS in one batch, counted with the saved tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return max(len(tokenizer(text)["input_ids"]) for text in TEXTS)


def test_doctor_audit_reports_the_drift_of_a_saved_adapter_as_json(saved):
    """JSON: one finding at '0' with N and N + M, adapter 'default' M=4, explained; exit 0 (repairable)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "maskpatch.cli", "doctor", saved["model"], "--adapter", saved["adapter"]]
    result = subprocess.run(
        [*command, "--json", "--audit", *TEXTS], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (finding,) = json.loads(result.stdout)["findings"]
    n = batch_width(saved["model"])
    assert (finding["site"], finding["module_type"], finding["output"]) == ("0", "Transformer", "token_embeddings")
    assert (finding["mask_length"], finding["output_length"]) == (n, n + M)
    assert (finding["adapter"], finding["num_virtual_tokens"], finding["explained"]) == ("default", M, True)
    assert sorted(finding["policies"]) == ["extend", "ignore", "strip"]


def test_doctor_audit_text_report_and_unaffected_model(saved, capsys):
    """Text report in-process: the adapter's finding and 'affected: repairable'; the bare model is 'not affected'."""
    assert cli.main(["doctor", saved["model"], "--adapter", saved["adapter"], "--audit", *TEXTS]) == 0
    out = capsys.readouterr().out
    assert "SentenceTransformer.0 (Transformer) 'token_embeddings'" in out
    assert "'default' (M=4); explained" in out and "affected: repairable" in out
    assert cli.main(["doctor", saved["model"], "--audit", *TEXTS]) == 0
    assert "this model is not affected" in capsys.readouterr().out


def test_doctor_audit_refuses_what_it_cannot_load(tmp_path, capsys):
    """A missing directory exits 2 with its name; audit_saved without texts raises DoctorError."""
    assert cli.main(["doctor", str(tmp_path / "nope"), "--audit", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(doctor.DoctorError, match="at least one text"):
        doctor.audit_saved(tmp_path, [])
