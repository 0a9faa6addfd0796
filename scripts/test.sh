#!/usr/bin/env bash
# Install what the tests need, then run them. Usage: bash scripts/test.sh [pytest args]
# (`bash scripts/test.sh -m slow` runs the long soak and the deep fuzz instead of the default suite.)
# Without a torch already installed, this installs the CPU build first (TORCH_SPEC overrides which),
# so no CUDA packages are pulled onto a machine that has no GPU. Everything else is installed at the
# exact versions of constraints.txt, so a fresh clone tests with what CI tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# MiniCPM-2B's real tokenizer.model, for the tests that check tokenization against it: the team's
# shared copy beside the clone when there is one (CI has it); those tests are skipped without it.
shared_tokenizer="$(cd .. && pwd)/shared/minicpm-2b-tokenizer"
if [ -z "${MINICPM_REAL_TOKENIZER:-}" ] && [ -f "$shared_tokenizer/tokenizer.model" ]; then
  export MINICPM_REAL_TOKENIZER="$shared_tokenizer"
fi
bash scripts/install.sh --test
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
