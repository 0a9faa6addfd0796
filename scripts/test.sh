#!/usr/bin/env bash
# Install what the tests need, then run them. Usage: bash scripts/test.sh [pytest args]
# Without a torch already installed, this installs the CPU build first (TORCH_SPEC overrides which),
# so no CUDA packages are pulled onto a machine that has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "no torch installed: installing ${TORCH_SPEC:-torch==2.13.0} (CPU build)"
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -r requirements.txt -r requirements-test.txt
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
