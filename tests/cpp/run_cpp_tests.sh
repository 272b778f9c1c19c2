#!/usr/bin/env bash
# Configure, build and run the C++ test of the se_fused ops against libtorch (CMakeLists.txt).
#
#   tests/cpp/run_cpp_tests.sh [PYTHON]        # PYTHON: the interpreter whose torch to build against
#
# PYTHON defaults to $PYTHON, else .venv/bin/python, else python3. Environment:
#   SE_FUSED_WITH_CUDA=1   also build csrc/cuda/*.cu (the test itself runs the CPU ops)
#   BUILD_DIR              build folder (default build/cmake-cpu, or build/cmake-cuda with CUDA)
#   JOBS                   parallel compile jobs (default 2)
# Exits non-zero when configuring, building or any test fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${1:-${PYTHON:-}}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
WITH_CUDA="${SE_FUSED_WITH_CUDA:-0}"
if [[ "$WITH_CUDA" == 1 ]]; then CUDA_FLAG=ON; DEFAULT_DIR=build/cmake-cuda; else CUDA_FLAG=OFF; DEFAULT_DIR=build/cmake-cpu; fi
BUILD="${BUILD_DIR:-$ROOT/$DEFAULT_DIR}"
JOBS="${JOBS:-2}"

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
echo "se_fused C++ test: torch $("$PY" -c 'import torch; print(torch.__version__)') from $TORCH_PREFIX"
echo "  build dir $BUILD, CUDA kernels: $CUDA_FLAG"

# A CUDA build of torch needs a CUDA toolkit (nvcc) for its CMake config, even for our
# CPU-only library; nvcc on the PATH may be a wrapper script, so look where it really is.
CUDA_ARGS=()
if [[ -n "$("$PY" -c 'import torch; print(torch.version.cuda or "")')" ]]; then
  CUDA_ROOT=""
  candidates=("${CUDA_HOME:-}" "${CUDA_PATH:-}")
  if command -v nvcc >/dev/null 2>&1; then candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"); fi
  candidates+=(/usr/local/cuda /usr/local/cuda-*)
  for dir in "${candidates[@]}"; do
    if [[ -n "$dir" && -x "$dir/bin/nvcc" && -f "$dir/include/cuda_runtime.h" ]]; then CUDA_ROOT="$dir"; break; fi
  done
  if [[ -z "$CUDA_ROOT" ]]; then
    echo "error: torch is a CUDA build; its CMake config (find_package(Torch)) needs a CUDA toolkit with nvcc." >&2
    echo "       Install one and set CUDA_HOME, or use a CPU build of torch." >&2
    exit 1
  fi
  echo "  CUDA toolkit (for torch's CMake config): $CUDA_ROOT"
  CUDA_ARGS=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
  # A runtime-only toolkit lacks NVRTC, which torch's CUDA libraries list; torch's wheels ship it.
  if [[ "$WITH_CUDA" == 1 ]] && ! ls "$CUDA_ROOT"/lib*/libnvrtc.so* >/dev/null 2>&1; then
    NVRTC="$("$PY" - <<'PYEOF'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
print(next((f for f in found if "builtins" not in f and ".alt." not in f), ""))
PYEOF
)"
    if [[ -n "$NVRTC" ]]; then CUDA_ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC"); fi
  fi
fi

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi
# A folder configured with another generator cannot be reused by this one.
if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GENERATOR[1]:-Unix Makefiles}" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi
cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DSE_FUSED_WITH_CUDA="$CUDA_FLAG" "${CUDA_ARGS[@]}"
cmake --build "$BUILD" -j "$JOBS"
# One OpenMP thread per core is plenty for these small tensors; passive waiting keeps a shared machine usable.
OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" ctest --test-dir "$BUILD" --output-on-failure
