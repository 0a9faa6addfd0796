#!/usr/bin/env bash
# The lm-evaluation-harness tier (`pytest -m lmeval`): lm-eval drives a running server through its
# `local-completions` and `local-chat-completions` models, on small local tasks (tests/lmeval), and
# the tests check its per-sample results against the plain-torch reference. lm-eval lives in a venv
# of its own, made once and cached (MINICPM_LMEVAL_VENV, default ~/.cache/minicpm-server/lmeval-venv);
# the tests and the server run in the main python, which calls the venv's `lm_eval` as a program.
# Usage: bash scripts/test-lmeval.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${MINICPM_LMEVAL_VENV:-$HOME/.cache/minicpm-server/lmeval-venv}"
# The `api` extra brings what the API models import (aiohttp, tenacity, requests, tiktoken).
LMEVAL_SPEC="${LMEVAL_SPEC:-lm-eval[api]==0.4.13}"

if [ "$(cat "$VENV/.minicpm-lmeval-spec" 2>/dev/null)" != "$LMEVAL_SPEC" ]; then
  echo "making $VENV with $LMEVAL_SPEC (a few minutes, once)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q "$LMEVAL_SPEC"
  echo "$LMEVAL_SPEC" > "$VENV/.minicpm-lmeval-spec"
fi
export MINICPM_LMEVAL_BIN="$VENV/bin/lm_eval"

shared_tokenizer="$(cd .. && pwd)/shared/minicpm-2b-tokenizer"
if [ -z "${MINICPM_REAL_TOKENIZER:-}" ] && [ -f "$shared_tokenizer/tokenizer.model" ]; then
  export MINICPM_REAL_TOKENIZER="$shared_tokenizer"
fi
"$PY" -m pytest -q -m lmeval tests/test_lmeval.py "$@"
