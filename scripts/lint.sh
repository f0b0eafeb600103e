#!/usr/bin/env bash
# Static checks: ruff lint, ruff format check (Python files) and mypy --strict on maskpatch/.
# Configuration lives in pyproject.toml ([tool.ruff], [tool.mypy]); versions are pinned in
# constraints/ci.txt and installed with the `test` extra by scripts/bootstrap.sh.
#
#   bash scripts/lint.sh          check only (what scripts/test.sh runs)
#   bash scripts/lint.sh --fix    apply ruff's safe fixes and formatting first, then check
#
# PYTHON picks the interpreter whose ruff and mypy run (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--fix" ]; then
  "$PY" -m ruff check --fix --quiet . || true
  "$PY" -m ruff format --quiet .
fi
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
echo "lint: ruff and mypy clean"
