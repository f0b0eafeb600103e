"""The hostile review's method for the command line: bad arguments and bad model directories.

Invariant protected here, for every row: ``maskpatch ...`` ends with its documented exit status
(2 for a usage error or a directory it cannot load, 127 for a command ``run`` cannot find), says
why on stderr in at most a usage block or one ``maskpatch ...: error:`` line, and never prints a
traceback. Grow the table with every bug found.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskpatch import cli

ROOT = Path(__file__).resolve().parents[2]


def bad_dirs(tmp: Path, tiny: str) -> dict[str, list[str]]:
    """Argument lists naming bad inputs, each built under ``tmp`` (``tiny``: a loadable model directory)."""

    def folder(name: str, files: dict[str, str]) -> str:
        path = tmp / name
        path.mkdir()
        for file, text in files.items():
            (path / file).write_text(text)
        return str(path)

    st_config = "config_sentence_transformers.json"
    return {
        "missing-dir": ["doctor", str(tmp / "nope")],
        "file-not-dir": ["doctor", folder("f", {"x": ""}) + "/x"],
        "empty-dir": ["doctor", folder("empty", {})],
        "config-not-json": ["doctor", folder("notjson", {st_config: "{"})],
        "config-list": ["doctor", folder("list", {st_config: "[]"})],
        "config-null": ["doctor", folder("null", {st_config: "null"})],
        "config-type-attr": ["doctor", folder("attr", {st_config: '{"model_type": "__spec__"}'})],
        "config-type-number": ["doctor", folder("num", {st_config: '{"model_type": 1e999}'})],
        "hf-config-garbage": ["doctor", folder("hf", {"config.json": "{not json"})],
        "adapter-missing": ["doctor", tiny, "--adapter", str(tmp / "no-adapter")],
        "adapter-empty": ["doctor", tiny, "--adapter", folder("adapter", {})],
        "adapter-garbage": ["doctor", tiny, "--adapter", folder("adapter2", {"adapter_config.json": "[1]"})],
    }


USAGE = {
    "no-command": [],
    "unknown-command": ["frobnicate"],
    "doctor-no-dir": ["doctor"],
    "doctor-bad-type": ["doctor", ".", "--model-type", "Bogus"],
    "doctor-unknown-flag": ["doctor", ".", "--bogus"],
    "run-no-command": ["run"],
    "run-bad-policy": ["run", "--policy", "banana", "--", "true"],
    "demo-unknown-flag": ["demo", "--bogus"],
}


def said(err: str) -> list[str]:
    """The lines of ``err`` that say something (transformers' progress bars left out)."""
    return [line for line in err.splitlines() if line.strip() and "it/s]" not in line]


def check(status: int, err: str, expected_status: int) -> None:
    assert status == expected_status, err
    assert "Traceback" not in err, err
    lines = said(err)
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert not lines[-1].startswith("  File "), err


@pytest.mark.parametrize("name", sorted(USAGE))
def test_usage_errors_exit_2_without_a_traceback(name, capsys):
    """A usage error: exit status 2, one error line (after argparse's usage), no traceback."""
    status = cli.main(USAGE[name])
    check(status, capsys.readouterr().err, 2)


BAD_DIRS = (
    "missing-dir",
    "file-not-dir",
    "empty-dir",
    "config-not-json",
    "config-list",
    "config-null",
    "config-type-attr",
    "config-type-number",
    "hf-config-garbage",
    "adapter-missing",
    "adapter-empty",
    "adapter-garbage",
)


def test_the_table_of_bad_directories_is_complete(tmp_path):
    """Every row built by bad_dirs is run (the parametrization lists names; the folders are built per test)."""
    assert sorted(bad_dirs(tmp_path, str(tmp_path))) == sorted(BAD_DIRS)


@pytest.mark.parametrize("name", BAD_DIRS)
def test_bad_model_directories_exit_2_with_one_line(name, tmp_path, tiny_model_dir, capsys):
    """A directory the doctor cannot load or trust: exit status 2 and one `maskpatch doctor: error:` line."""
    argv = bad_dirs(tmp_path, tiny_model_dir("bert"))[name]
    status = cli.main(argv)
    err = capsys.readouterr().err
    check(status, err, 2)
    lines = said(err)
    assert len(lines) == 1 and lines[0].startswith("maskpatch doctor: error:"), err


def test_the_installed_command_prints_no_traceback(tmp_path):
    """Through a real interpreter: `maskpatch doctor` on a JSON list config and `maskpatch run` of a missing command."""
    (tmp_path / "config_sentence_transformers.json").write_text("[]")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKPATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs = {
        2: [sys.executable, "-m", "maskpatch.cli", "doctor", str(tmp_path)],
        127: [sys.executable, "-m", "maskpatch.cli", "run", "--", str(tmp_path / "no-such-command")],
    }
    for status, command in runs.items():
        result = subprocess.run(
            command, check=False, capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path)
        )
        assert result.returncode == status, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
