"""The built distribution: stock setuptools puts the auto-enable ``.pth`` at the wheel root, ships
the license, and carries the project's metadata.

Invariant protected: what ``pip install maskpatch`` puts in ``site-packages`` is what auto-enable
and the docs rely on: ``maskpatch_auto.pth`` next to the packages (not inside ``maskpatch/``), listed
in ``RECORD`` so that ``pip uninstall`` removes it; the Apache-2.0 license in the wheel and the sdist;
the name, version, requirements and extras of ``pyproject.toml``. The wheel is built here without
build isolation (``pip wheel --no-build-isolation``), from this checkout, with the setuptools
installed in this environment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DIST_INFO = "maskpatch-0.1.0.dist-info"


def _build(kind: str, out: Path) -> Path:
    """Build a ``wheel`` (pip) or an ``sdist`` (setuptools' PEP 517 hook) of this checkout into ``out``.

    From a copy of the checkout: setuptools writes ``build/`` and ``*.egg-info`` into the tree it builds.
    """
    source = out / "source"
    skip = (".git", ".venv", "build", "dist", "site", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    if kind == "wheel":
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    else:
        command = [sys.executable, "-c", f"import setuptools.build_meta as b; b.build_sdist({str(out)!r})"]
    done = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("maskpatch-*.whl" if kind == "wheel" else "maskpatch-*.tar.gz")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    with zipfile.ZipFile(_build("wheel", tmp_path_factory.mktemp("wheel"))) as built:
        yield built


def test_wheel_is_built_by_stock_setuptools():
    """No in-tree backend: pip builds with setuptools.build_meta itself."""
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert "backend-path" not in PYPROJECT["build-system"]


def test_pth_sits_at_the_wheel_root_and_in_record(wheel):
    """maskpatch_auto.pth is installed next to the packages, byte for byte, and pip can uninstall it."""
    names = wheel.namelist()
    assert "maskpatch_auto.pth" in names
    assert [n for n in names if n.endswith(".pth")] == ["maskpatch_auto.pth"]  # not also inside maskpatch/
    assert wheel.read("maskpatch_auto.pth") == (ROOT / "maskpatch_auto.pth").read_bytes()
    record = wheel.read(f"{DIST_INFO}/RECORD").decode().splitlines()
    assert any(line.startswith("maskpatch_auto.pth,sha256=") for line in record)
    assert "maskpatch/auto/bootstrap.py" in names  # what the .pth line imports


def test_wheel_ships_the_apache_license(wheel):
    """The full Apache-2.0 text is in the wheel, and the metadata names it."""
    text = wheel.read(f"{DIST_INFO}/licenses/LICENSE").decode()
    assert text == (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    metadata = HeaderParser().parsestr(wheel.read(f"{DIST_INFO}/METADATA").decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]


def test_wheel_metadata_matches_the_project(wheel):
    """Name, version, Python range, requirements and extras are those pyproject.toml declares."""
    import maskpatch

    metadata = HeaderParser().parsestr(wheel.read(f"{DIST_INFO}/METADATA").decode())
    assert metadata["Name"] == "maskpatch"
    assert metadata["Version"] == maskpatch.__version__ == "0.1.0"
    assert metadata["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    requires = {str(Requirement(r)) for r in metadata.get_all("Requires-Dist")}
    expected = {str(Requirement(r)) for r in PYPROJECT["project"]["dependencies"]}
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        expected |= {str(Requirement(f'{r}; extra == "{extra}"')) for r in reqs}
    assert requires == expected
    assert {"torch>=2.4", "wrapt>=1.16"} <= requires
    assert set(metadata.get_all("Provides-Extra")) == set(PYPROJECT["project"]["optional-dependencies"])
    assert {"st", "demo", "test", "docs"} <= set(metadata.get_all("Provides-Extra"))
    entry_points = wheel.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert f"maskpatch = {PYPROJECT['project']['scripts']['maskpatch']}" in entry_points


def test_sdist_carries_what_the_wheel_needs(tmp_path):
    """The sdist holds the .pth and the license, so a wheel built from it is complete too."""
    with tarfile.open(_build("sdist", tmp_path)) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"maskpatch_auto.pth", "LICENSE", "maskpatch/auto/bootstrap.py", "pyproject.toml"} <= names
