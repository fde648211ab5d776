#!/usr/bin/env bash
# Build llama.cpp (the copy vendored in the llama-cpp-python sdist, since PyPI is the only source
# reachable here) into ${LLAMACPP_DIR:-/work/llama.cpp}: binaries under build/bin, plus
# convert_hf_to_gguf.py and gguf-py. Used by the slow GGUF round-trip tests.
# Run under `flock /tmp/llamacpp.lock` so two builds never race. Reuses an existing build.
set -euo pipefail
DEST=${LLAMACPP_DIR:-/work/llama.cpp}
if [ -x "$DEST/build/bin/llama-cli" ] && [ -x "$DEST/build/bin/llama-simple" ] && [ -f "$DEST/convert_hf_to_gguf.py" ]; then
  echo "llama.cpp already built in $DEST"; exit 0
fi
PIP=${PIP:-/work/main/.venv/bin/pip}
DL=$(mktemp -d)
trap 'rm -rf "$DL"' EXIT
# --no-binary for this package only: with :all: pip would also build its build backends from source.
"$PIP" download --no-deps --no-binary llama-cpp-python llama-cpp-python -d "$DL"
SDIST=$(ls "$DL"/llama_cpp_python-*.tar.gz | head -1)
tar -xzf "$SDIST" -C "$DL"
SRC=$(ls -d "$DL"/llama_cpp_python-*/vendor/llama.cpp | head -1)
mkdir -p "$DEST"
cp -a "$SRC"/. "$DEST"/
# The CPU advertises AMX that the kernel cannot run (Q8_0 crashes with it): no native, no AMX.
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$DEST" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=ON \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS"
# Only the tools the tests, benchmarks and docs use (a full build of every example takes far longer).
TARGETS=${LLAMACPP_TARGETS:-llama-cli llama-simple llama-server llama-bench llama-quantize llama-perplexity}
cmake --build "$DEST/build" --config Release -j2 --target $TARGETS
ls "$DEST/build/bin"
echo "llama.cpp built in $DEST"
