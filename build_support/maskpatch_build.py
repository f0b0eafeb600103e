"""In-tree PEP 517 build backend: setuptools, plus ``maskpatch_auto.pth`` in every wheel.

setuptools has no setting that puts a file at the root of ``site-packages``, and its editable
wheels (``pip install -e .``) leave out files a custom ``build_py`` adds. This backend lets
setuptools build the wheel (regular or editable) and then adds the ``.pth`` file at the root of
the wheel, with its line in ``RECORD``, so that pip installs it next to the packages in both
cases and removes it on uninstall.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every hook not overridden below

__all__ = list(_setuptools.__all__)  # noqa: PLE0605

PTH = Path(__file__).with_name("maskpatch_auto.pth")


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):  # noqa: ANN001, ANN201
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_file(Path(wheel_directory, name), PTH.name, PTH.read_bytes())
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):  # noqa: ANN001, ANN201
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_file(Path(wheel_directory, name), PTH.name, PTH.read_bytes())
    return name


def add_file(wheel: Path, arcname: str, data: bytes) -> None:
    """Rewrite ``wheel`` with ``data`` stored at ``arcname`` and listed in its ``RECORD``."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=wheel.parent)
    os.close(fd)
    added = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    added.external_attr = 0o644 << 16
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dst.writestr(added, data)
        for info in src.infolist():
            if info.filename == arcname:
                continue
            content = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                content = _add_record_line(content, f"{arcname},sha256={digest},{len(data)}", arcname)
            dst.writestr(info, content)
    os.replace(tmp, wheel)


def _add_record_line(record: bytes, line: str, arcname: str) -> bytes:
    lines = [row for row in record.decode().splitlines() if row and not row.startswith(f"{arcname},")]
    return ("\n".join([line, *lines]) + "\n").encode()
