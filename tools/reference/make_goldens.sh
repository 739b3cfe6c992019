#!/usr/bin/env bash
# Regenerate every committed golden from the sources' own code (tools/reference/README.md).
#
#   tools/reference/make_goldens.sh DATA_DIR [WORK_DIR]
#
# DATA_DIR: the source data folder (the one with SOURCES.md and tokenizers/llama-2/).
# WORK_DIR: scratch space for the tokenizer folders, the row files and the full per-row outputs
# (default: a new temporary folder; the full outputs stay there for reading).
# Writes tests/fixtures/golden/{edge_cases.jsonl, <recipe>.edge.jsonl, summary.json}.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=$(cd "${1:?usage: make_goldens.sh DATA_DIR [WORK_DIR]}" && pwd)
WORK=${2:-$(mktemp -d)}
VENVS=${REFERENCE_VENVS:-$HOME/.cache/qlora-kit/reference-venvs}
GOLDEN="$HERE/../../tests/fixtures/golden"
TOK="$DATA/tokenizers/llama-2"
mkdir -p "$WORK/tok/hub" "$WORK/tok/komt" "$WORK/rows" "$WORK/out"
# a loadable folder = a layout's files + Meta's tokenizer.model beside them (tokenizers/llama-2/README.md)
cp "$TOK"/hub-layout/* "$TOK/tokenizer.model" "$WORK/tok/hub/"
cp "$TOK"/komt-layout/* "$TOK/tokenizer.model" "$WORK/tok/komt/"
chmod -R u+w "$WORK/tok"

"$VENVS/l2k/bin/python" "$HERE/make_edge_cases.py" --tokenizer "$WORK/tok/hub"
python3 "$HERE/real_rows.py" --data "$DATA" --out-dir "$WORK/rows"
cp "$GOLDEN/edge_cases.jsonl" "$WORK/rows/edge.jsonl"

run() {  # recipe venv script tokenizer
  for f in "$WORK"/rows/*.jsonl; do
    d=$(basename "$f" .jsonl)
    "$VENVS/$2/bin/python" "$HERE/$3" --tokenizer "$WORK/tok/$4" --input "$f" --out "$WORK/out/$1.$d.jsonl" 2>/dev/null
  done
}
run llama2-koalpaca l2k llama2_koalpaca.py hub
run komt komt komt.py komt
run alpagasus2 ag2 alpagasus2.py hub

python3 "$HERE/summarize.py" edge --results "$WORK/out"
python3 "$HERE/summarize.py" real --results "$WORK/out"
echo "full per-row outputs: $WORK/out"
