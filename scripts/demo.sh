#!/usr/bin/env bash
# Set everything up (first run only) and run the demo on the bundled all-MiniLM-L6-v2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/maskpatch demo "$@"
