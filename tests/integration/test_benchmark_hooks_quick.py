"""The hot-path benchmark's ``--quick`` mode runs end to end and prints both of its tables.

Nothing here looks at a number: timings on a shared CI machine are noise, and the targets (5 us of
hook time per forward, 10 us end to end at batch 1) are reported by the benchmark itself
(docs/performance.md), never asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_hooks_benchmark_quick_mode_runs_and_prints_its_tables():
    """``python benchmarks/hooks.py --quick`` exits 0 with hook time per hook and the end-to-end rows."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hooks.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "## 1. Hook time per forward" in out and "## 2. End to end" in out, out
    for variant in ("hand hook", "maskpatch extend", "maskpatch ignore", "maskpatch strip"):
        assert f"| {variant}" in out, variant
    for hook in ("TransformerPositionHook", "TransformerOutputHook", "PositionIdsHook"):
        assert hook in out, hook  # hook time is reported per hook
    assert "| tiny BERT | 1 " in out and "| MiniLM    | 32 " in out, out
    assert "target: at most 5 us" in out and "target: at most 10 us" in out
