#!/usr/bin/env bash
# Set everything up (first run only), run the test suite, and build the docs with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest "$@"
.venv/bin/python -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
echo "docs: built without warnings"
