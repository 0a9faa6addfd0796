#!/usr/bin/env bash
# Build llama.cpp's llama-server, and a venv that can run its GGUF converter, for bench/peers.py.
#
#     bash bench/build_llama_server.sh          # once; later runs find the binary and return at once
#
# Everything lands in ${MINICPM_PEERS_DIR:-~/.cache/minicpm-server/peers} and nothing is committed.
# The llama.cpp source is the copy vendored in llama-cpp-python's sdist on PyPI (the pinned version
# below, fetched with pip), so no git clone is needed. The build is CPU-only, native instructions,
# Release, no curl, no OpenSSL, no web UI (nothing is downloaded at build time), and makes only the llama-server target, at low priority on 2 jobs (the machine
# is shared). The converter's `gguf` package comes from the same source tree, installed into a venv
# of its own (it sees the system's torch and sentencepiece but changes nothing outside the venv).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"   # vendors llama.cpp 0c1e57098 (its CHANGELOG)
LLAMA_COMMIT="${LLAMA_CPP_COMMIT:-0c1e57098}"
PEERS="${MINICPM_PEERS_DIR:-$HOME/.cache/minicpm-server/peers}"
SRC="$PEERS/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$PEERS/llama-build"
BIN="$BUILD/bin/llama-server"
VENV="$PEERS/convert-venv"

mkdir -p "$PEERS/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    if [ ! -f "$PEERS/src/llama_cpp_python-$VERSION.tar.gz" ]; then
        python3 -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$PEERS/src"
    fi
    tar xzf "$PEERS/src/llama_cpp_python-$VERSION.tar.gz" -C "$PEERS/src"
fi

if [ ! -x "$BIN" ]; then
    start=$(date +%s)
    nice -n 10 cmake -S "$SRC" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT"
    nice -n 10 cmake --build "$BUILD" --target llama-server -j2
    echo "llama-server built in $(( $(date +%s) - start )) s: $BIN"
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install --quiet "$SRC/gguf-py"
fi

echo "$BIN"
