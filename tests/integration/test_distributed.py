"""``torchrun --nproc_per_node=2`` (gloo, CPU) prompt tuning of a SentenceTransformer, patched two ways.

Runs ``examples/distributed_train.py`` on a tiny random BERT for a few steps of
SentenceTransformerTrainer + MultipleNegativesRankingLoss under DDP, once with ``maskpatch.apply``
in the script and once with only ``MASKPATCH_AUTO=1`` in the environment (every torchrun worker
inherits it; the script calls no maskpatch function then). Invariants protected: the model is
patched on every rank, the loss on the training pairs falls, both ranks end with identical prompt
parameters (each saw different data, so only gradient synchronisation makes them equal), the
prompt did train, and the trained model's embeddings are batch invariant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distributed_train.py"
MASKPATCH_VARIABLES = ("MASKPATCH_AUTO", "MASKPATCH_POLICY", "MASKPATCH_STRICT", "MASKPATCH_DISABLED_ADAPTERS")


def torchrun(model_dir: str, tmp_path: Path, *args: str, **variables: str) -> dict:
    """Run the example under torchrun with 2 CPU workers; return rank 0's report."""
    env = {k: v for k, v in os.environ.items() if k not in MASKPATCH_VARIABLES}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **variables)
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLE),
        "--model",
        model_dir,
        "--steps",
        "6",
        "--virtual-tokens",
        "4",
        "--output-json",
        str(report),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(report.read_text())


def check(report: dict) -> None:
    assert report["world_size"] == 2
    assert report["patched"] is True
    assert report["loss_after"] < report["loss_before"], report
    assert report["prompt_changed"] > 1e-3, report
    assert report["rank_difference"] == 0.0, report
    assert report["batch_gap"] <= 1e-5, report
    assert len(report["logged_losses"]) == 6


def test_torchrun_with_maskpatch_applied_in_the_script(tiny_model_dir, tmp_path):
    """`maskpatch.apply(model)` in the script, no variable set."""
    report = torchrun(tiny_model_dir("bert"), tmp_path, "--maskpatch", "apply")
    assert report["mode"] == "apply"
    check(report)


def test_torchrun_with_only_maskpatch_auto(tiny_model_dir, tmp_path):
    """Only MASKPATCH_AUTO=1 in torchrun's environment: each worker patches the model it creates."""
    report = torchrun(tiny_model_dir("bert"), tmp_path, "--maskpatch", "auto", MASKPATCH_AUTO="1")
    assert report["mode"] == "auto"
    check(report)
