#!/usr/bin/env bash
# Create the era virtual environments the reference scripts run in, with exact pins.
#
#   tools/reference/make_venvs.sh              # all three: l2k komt ag2
#   tools/reference/make_venvs.sh komt         # one
#
# Each venv is installed from requirements/<venv>.txt (every package pinned, dependencies
# included, as `pip freeze` wrote it). Only transformers, tokenizers, sentencepiece, trl and
# datasets decide ids; torch merely builds the tensors the sources' code asks for, so a CPU build
# is enough (`+cpu` wheels come from PyTorch's own index, TORCH_INDEX; set it empty when the
# configured indexes already carry them).
# Environment: REFERENCE_VENVS (where to create them; default ~/.cache/qlora-kit/reference-venvs),
# PYTHON (a Python 3.11 interpreter; default python3.11), TORCH_INDEX.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${REFERENCE_VENVS:-$HOME/.cache/qlora-kit/reference-venvs}
PY=${PYTHON:-python3.11}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "need Python 3.11, found " + sys.version'
for v in "${@:-l2k komt ag2}"; do
  for name in $v; do
    req="$HERE/requirements/$name.txt"
    [ -f "$req" ] || { echo "no such venv: $name (one of: l2k komt ag2)" >&2; exit 2; }
    echo "== $ROOT/$name"
    "$PY" -m venv "$ROOT/$name"
    "$ROOT/$name/bin/python" -m pip install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r "$req"
    "$ROOT/$name/bin/python" - <<'PY'
import importlib
for m in ("transformers", "tokenizers", "sentencepiece", "trl", "datasets"):
    try:
        print(f"  {m} {importlib.import_module(m).__version__}")
    except ImportError:
        pass
PY
  done
done
