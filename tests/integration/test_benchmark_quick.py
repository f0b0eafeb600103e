"""The encode benchmark's ``--quick`` mode runs end to end and prints every section of its table.

Nothing here looks at a number: timings on a shared CI machine are noise, and the targets are
reported by the benchmark itself (docs/performance.md), never asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "## 1. Encode throughput",
    "## 2. The hook alone",
    "## 3. Peak memory",
    "## 4. Interpreter start-up",
    "## 5. torch.compile",
)


@pytest.mark.slow
def test_benchmark_quick_mode_runs_and_prints_its_tables():
    """``python benchmarks/encode.py --quick`` exits 0 and prints each section with a table row per variant."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "encode.py"), "--quick", "--no-startup"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for section in SECTIONS:
        assert section in out, f"{section!r} missing from:\n{out}"
    for variant in ("unpatched", "hand hook", "maskpatch extend", "maskpatch ignore", "maskpatch strip"):
        assert f"| {variant}" in out, variant
    assert "| M | batch | texts | unpatched texts/s" in out
    assert "torch threads 1" in out
