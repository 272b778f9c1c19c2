#!/usr/bin/env bash
# The README's test command: set everything up on a fresh machine and run all tests.
#   bash scripts/test.sh [extra pytest args]
# Runs: the Python suite (Triton kernels under TRITON_INTERPRET=1 when no GPU is
# present), the C++ test of the ops through libtorch (CMake + ctest), and shows
# what was built (python -m se_fused).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$SE_FUSED_PY" -m se_fused
if ! "$SE_FUSED_PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1   # Triton kernels run on CPU tensors, interpreted
fi
"$SE_FUSED_PY" -m pytest -q -rs --durations=15 "$@"
if [[ -x tests/cpp/run_cpp_tests.sh ]]; then
  PYTHON="$SE_FUSED_PY" bash tests/cpp/run_cpp_tests.sh
fi
