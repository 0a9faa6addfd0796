#!/usr/bin/env bash
# One command for a first try: install what the server needs (the CPU build of torch where no torch
# is installed), then serve the built-in tiny random-weight model on CPU. Extra arguments go to api.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" api.py --demo "$@"
