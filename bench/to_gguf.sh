#!/usr/bin/env bash
# A Hugging Face folder (e.g. from `shardserve synth`) to a Q4_0 GGUF with llama.cpp's own tools,
# for the llama-server baseline on the same weights (docs/scale.md):
#   bash bench/to_gguf.sh DIR OUT.gguf [TYPE]          # TYPE: Q4_0 (default), Q8_0, ...
# Needs deploy/build-llama-server.sh's tree (converter, gguf-py, llama-quantize) and the bench
# extra (sentencepiece, which the converter imports): .venv/bin/pip install -e '.[bench]'.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$1 OUT=$2 TYPE=${3:-Q4_0}
LLAMA=$(ls -d .llama/src/llama_cpp_python-*/vendor/llama.cpp | tail -1)
QUANTIZE=.llama/build/bin/llama-quantize
[ -x "$QUANTIZE" ] || { echo "no $QUANTIZE: run deploy/build-llama-server.sh" >&2; exit 1; }
F16="$OUT.f16.tmp"
PYTHONPATH="$LLAMA/gguf-py" .venv/bin/python "$LLAMA/convert_hf_to_gguf.py" "$SRC" --outfile "$F16" --outtype f16
"$QUANTIZE" "$F16" "$OUT" "$TYPE" "$(nproc)"
rm -f "$F16"
echo "wrote $OUT ($TYPE)"
