#!/usr/bin/env bash
# The Ray Serve application's tests (`pytest -m ray`), on a local Ray cluster on the CPU, in a venv
# of their own with ray[serve] (requirements-ray.txt), made once and cached (MINICPM_RAY_VENV,
# default ~/.cache/minicpm-server/ray-venv). The venv sees the system's packages
# (--system-site-packages), so torch and the project's pinned requirements are reused, not
# installed again. CI runs this after the lm-eval tier; the default suite skips these tests where
# Ray is not installed.
# Usage: bash scripts/test-ray.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${MINICPM_RAY_VENV:-$HOME/.cache/minicpm-server/ray-venv}"
SPEC="$(grep -v '^#' requirements-ray.txt | sort | tr '\n' ' ')"

if [ "$(cat "$VENV/.minicpm-ray-spec" 2>/dev/null)" != "$SPEC" ]; then
  echo "making $VENV with $SPEC(about 2 minutes, once)"
  rm -rf "$VENV"
  "$PY" -m venv --system-site-packages "$VENV"
  # -c constraints.txt: Ray's own dependencies may not move the versions the server is tested with.
  "$VENV/bin/python" -m pip install -q -r requirements-ray.txt -c constraints.txt
  echo "$SPEC" > "$VENV/.minicpm-ray-spec"
fi
# The workers of the local cluster import the package from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Ray reports usage statistics unless told not to; CI has no network anyway.
export RAY_USAGE_STATS_ENABLED=0
"$VENV/bin/python" -m pytest -q -m ray tests/test_ray.py "$@"
