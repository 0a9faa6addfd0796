#!/usr/bin/env bash
# The GPU tier, for a machine with one CUDA GPU: the engine's CUDA paths under pytest, then a
# short benchmark of the native engine on MiniCPM-2B's shape in bf16. Under 8 minutes from a bare
# checkout with the requirements installed (`bash scripts/install.sh --test` with a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print('torch', torch.__version__, torch.version.cuda)"
start=$SECONDS
python -m pytest -m gpu -q "$@"
echo "pytest -m gpu: $((SECONDS - start)) s"
python -m bench.gpu --quick
echo "total: $((SECONDS - start)) s"
