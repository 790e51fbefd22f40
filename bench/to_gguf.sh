#!/usr/bin/env bash
# A Hugging Face folder (e.g. from `shardserve synth`) to a Q4_0 GGUF with llama.cpp's own tools,
# for the llama-server baseline on the same weights (docs/scale.md):
#   bash bench/to_gguf.sh DIR OUT.gguf [TYPE]          # TYPE: Q4_0 (default), Q8_0, ...
# The converter writes a whole intermediate file first: f16 by default (2 bytes a weight, 29 GiB
# at 14B). MID=q8_0 halves it where the disk is short; Q4_0 from Q8_0 then requantizes, which
# changes the weights' values by Q8_0's rounding, not the shapes or bytes read a token.
# Needs deploy/build-llama-server.sh's tree (converter, gguf-py, llama-quantize) and the bench
# extra (sentencepiece, which the converter imports): .venv/bin/pip install -e '.[bench]'.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$1 OUT=$2 TYPE=${3:-Q4_0}
LLAMA=$(ls -d .llama/src/llama_cpp_python-*/vendor/llama.cpp | tail -1)
QUANTIZE=.llama/build/bin/llama-quantize
[ -x "$QUANTIZE" ] || { echo "no $QUANTIZE: run deploy/build-llama-server.sh" >&2; exit 1; }
MID=${MID:-f16}
TMP="$OUT.$MID.tmp"
# transformers picks the tokenizer class by the config's model_type (Qwen2Tokenizer for a qwen2
# folder), which swaps in that family's pre-tokenizer. A synth folder carries the default model's
# tokenizer, so the converter loads the class tokenizer_config.json declares.
PYTHONPATH="$LLAMA/gguf-py:$LLAMA" .venv/bin/python - "$LLAMA/convert_hf_to_gguf.py" \
    "$SRC" --outfile "$TMP" --outtype "$MID" <<'PY'
import runpy
import sys

from transformers.models.auto import tokenization_auto

tokenization_auto.TOKENIZER_MAPPING_NAMES.pop("qwen2", None)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY
REQUANT=()
[ "$MID" = f16 ] || [ "$MID" = bf16 ] || [ "$MID" = f32 ] || REQUANT=(--allow-requantize)
"$QUANTIZE" "${REQUANT[@]}" "$TMP" "$OUT" "$TYPE" "$(nproc)"
rm -f "$TMP"
echo "wrote $OUT ($TYPE)"
