#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and build se_fused into it.
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run on its own.
#   PYTHON          interpreter for the venv (default python3)
#   SE_FUSED_TORCH  torch requirement when the venv has no torch yet (default torch==2.14.1,
#                   the CUDA 13.0 build this project is developed with; any torch >= 2.4 works)
#   SE_FUSED_CPU_ONLY=1  skip the CUDA sources (faster build)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SE_FUSED_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel >/dev/null
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${SE_FUSED_TORCH:-torch==2.14.1}"
  "$PY" -m pip install -q "${SE_FUSED_TORCH:-torch==2.14.1}"
fi
echo "[setup] installing test/benchmark requirements"
"$PY" -m pip install -q -r "$ROOT/requirements-dev.txt"
echo "[setup] building se_fused (CUDA sources too when torch has CUDA and nvcc is found)"
( cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e . )
export SE_FUSED_PY="$PY"
