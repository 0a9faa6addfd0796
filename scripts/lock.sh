#!/usr/bin/env bash
# Rewrite constraints.txt: resolve requirements.txt + requirements-test.txt in a fresh venv and
# record the exact versions (torch and its CUDA wheels excluded: each machine keeps its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/pip" install -q -r requirements.txt -r requirements-test.txt
{
  head -n 3 constraints.txt
  "$venv/bin/pip" freeze | grep -v -iE '^(torch|nvidia|triton)([-_=]|$)'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
