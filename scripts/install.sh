#!/usr/bin/env bash
# Install the server's dependencies into the current Python (use a venv if you like).
# Where no torch is installed, the CPU build comes first (TORCH_SPEC overrides which), so a machine
# without a GPU does not download several GB of CUDA packages; an installed torch (AutoDL's CUDA
# build, say) is kept. The rest is pinned to the versions in constraints.txt.
# Usage: bash scripts/install.sh [--test]   (--test adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "no torch installed: installing ${TORCH_SPEC:-torch==2.13.0} (CPU build)"
  # PyTorch's CPU index has the same version with a "+cpu" tag, which pip prefers; where that
  # index cannot be reached, the configured index's build is used.
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" \
    --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 20
fi
reqs=(-r requirements.txt)
[ "${1:-}" = "--test" ] && reqs+=(-r requirements-test.txt)
"$PY" -m pip install -q "${reqs[@]}" -c constraints.txt
# Our CPU kernels (minicpm_server/engine/native/kernels) are compiled on first use, once; do it
# now where g++ is present, so the first server start does not wait for it. Without a compiler
# the server still runs (with PyTorch's products) and says so.
"$PY" -c "
from minicpm_server.engine.native.kernels import cpu_products
print('CPU kernels:', 'built' if cpu_products() else 'not available here (the server will say why)')
" || true
