#!/usr/bin/env bash
# Create .venv (if needed) and install maskpatch with its test/demo/docs extras at the pinned,
# tested versions of constraints/ci.txt. Idempotent: a stamp skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "maskpatch: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.maskpatch-installed
want=$(cat pyproject.toml constraints/ci.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "maskpatch: installing pinned dependencies (torch 2.13.0 CPU, transformers, sentence-transformers, peft)" >&2
  # torch first, pinned, so nothing pulls the CUDA build from the index.
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints/ci.txt torch
  .venv/bin/python -m pip install --quiet -c constraints/ci.txt -e ".[test,docs]"
  echo "$want" > "$stamp"
fi
# An editable install (pip install -e) holds only setuptools' finder, never a file at the root of
# site-packages: put the auto-enable .pth there as a regular wheel does (tests/integration rely on it).
# pip does not record it, so `pip uninstall maskpatch` leaves it behind (see docs/auto-enable.md).
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cmp -s maskpatch_auto.pth "$purelib/maskpatch_auto.pth" || cp maskpatch_auto.pth "$purelib/maskpatch_auto.pth"
