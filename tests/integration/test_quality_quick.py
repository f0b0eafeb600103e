"""``benchmarks/quality.py``: its ``--quick`` mode runs end to end and writes well-formed results.

Invariants protected here (no score and no time is asserted: those are what the benchmark
reports, docs/cost.md):

* ``--quick --out DIR`` exits 0 and writes ``results.json`` (every trained arm x served mode x
  encode batch size, a Spearman in [-1, 1] each, the data's provenance with its sha256),
  ``results.md`` (the table) and ``quality.png`` (a PNG);
* the data is checked before anything runs: missing or altered data is one line on stderr and
  exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "quality.py"
ARMS = ["unpatched", "extend", "ignore", "strip"]
#: sha256 of gensim 4.4.0's gensim/test/test_data/simlex999.txt, written out here (not read from the script).
SIMLEX_SHA256 = "d5e0501971478a511430ee880bd0121e94ac701ba86d90544d83e6d2ba3db05d"


def load_script():
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_quick_mode_writes_table_json_and_figure(tmp_path: Path):
    """``python benchmarks/quality.py --quick --out DIR``: exit 0, a cell per arm x served x batch size, a PNG."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert config["mode"] == "quick" and config["batch_sizes"] == [1, 16, 128]
    cells = {(c["m"], c["seed"], c["trained"], c["served"], c["batch_size"]) for c in results["cells"]}
    expected = {
        (m, seed, trained, served, b)
        for m in config["ms"]
        for seed in config["seeds"]
        for trained in ARMS
        for served in ARMS
        for b in config["batch_sizes"]
    }
    assert cells == expected and len(results["cells"]) == len(expected)
    assert all(math.isfinite(c["spearman"]) and -1 <= c["spearman"] <= 1 for c in results["cells"])
    assert set(results["zero_shot"]) == {"1", "16", "128"}
    assert results["data"]["sha256"] == SIMLEX_SHA256
    assert results["data"]["path_in_package"] == "gensim/test/test_data/simlex999.txt"
    assert all(len(row["losses"]) == len(config["padding_steps"]) for row in results["loss_vs_padding"])
    table = (tmp_path / "results.md").read_text()
    assert "| M | trained | served | batch 1 | batch 16 | batch 128 |" in table
    assert table.count("\n| 8 |") >= len(ARMS) * len(ARMS)
    png = (tmp_path / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_quality_refuses_altered_data_with_one_line_and_exit_2(monkeypatch, tmp_path: Path, capsys):
    """A SimLex file whose sha256 is not the known one: exit 2, one line naming both hashes, nothing written."""
    quality = load_script()
    monkeypatch.setattr(quality, "SIMLEX_SHA256", "0" * 64)
    assert quality.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected " + "0" * 64 in err and SIMLEX_SHA256 in err
    assert not (tmp_path / "out").exists()


def test_quality_says_how_to_install_missing_data(monkeypatch, tmp_path: Path, capsys):
    """gensim not installed: exit 2 and one line saying how to install the data."""
    quality = load_script()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        quality.importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a)
    )
    assert quality.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "gensim" in err


def test_render_rewrites_table_and_figure_of_the_committed_results(tmp_path: Path):
    """``--render docs/assets/cost/results.json``: the table the docs page shows, and a PNG, without training."""
    quality = load_script()
    source = ROOT / "docs" / "assets" / "cost" / "results.json"
    assert quality.main(["--render", str(source), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    page = (ROOT / "docs" / "cost.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 8 |")]
    # scores: 4 trained x 4 served; loss: the unpatched prompt served 4 ways, each patched one 2 ways
    assert len(rows) == 4 * 4 + (4 + 3 * 2)
    assert all(row in page for row in rows), "docs/cost.md does not show the numbers of its results.json"
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
