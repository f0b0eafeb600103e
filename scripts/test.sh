#!/usr/bin/env bash
# Set everything up (first run only), run the static checks (ruff, mypy), the test suite, and build
# the docs with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PYTHON=.venv/bin/python bash scripts/lint.sh
export HF_HUB_OFFLINE=1
# The suite decides itself where auto-enable is on; a developer's exported setting must not leak in.
unset MASKPATCH_AUTO MASKPATCH_POLICY MASKPATCH_STRICT MASKPATCH_DISABLED_ADAPTERS
.venv/bin/python -m pytest "$@"
.venv/bin/python -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
echo "docs: built without warnings"
