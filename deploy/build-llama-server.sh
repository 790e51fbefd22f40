#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-quantize offline, for `shardserve bench`'s baseline: the llama-cpp-python
# sdist on PyPI vendors llama.cpp, so the package index is all it needs. Output:
# .llama/build/bin/llama-server (the bench finds it there; or set LLAMA_SERVER). ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p .llama/src
[ -f ".llama/src/llama_cpp_python-$VERSION.tar.gz" ] ||
  .venv/bin/pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .llama/src
[ -d ".llama/src/llama_cpp_python-$VERSION" ] || tar xzf ".llama/src/llama_cpp_python-$VERSION.tar.gz" -C .llama/src
# ggml's AMX kernels are off: on this machine kind (a Firecracker guest) cpuid and XCR0 report AMX
# tiles and the kernel grants them, yet ggml's first `tilezero` raised SIGILL at "threadpool init"
# (seen with gdb); -march=native would turn them on. LLAMA_AMX=1 keeps them.
NO_AMX=$([ "${LLAMA_AMX:-0}" = 1 ] || echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
cmake -B .llama/build ".llama/src/llama_cpp_python-$VERSION/vendor/llama.cpp" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX"
cmake --build .llama/build --target llama-server llama-quantize -j"$(nproc)"
echo "built: $(pwd)/.llama/build/bin/llama-server and llama-quantize"
