#!/usr/bin/env bash
# The README's main command: set everything up on a fresh machine and run the benchmarks.
#   bash scripts/bench.sh [--quick]
# With a GPU: the SE block against the bandwidth limit and ResNet-50 vs
# SE-ResNet-50 at batch 256 (bf16, channels_last). Without one: a small CPU run
# (well under 5 minutes) of the fused C++ kernel against eager, and the SE
# overhead of a small-batch network step. Tables are printed; JSON and PNG land
# in benchmarks/out/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$SE_FUSED_PY" -m se_fused
OUT_DIR=${SE_FUSED_BENCH_OUT:-$ROOT/benchmarks/out}
mkdir -p "$OUT_DIR"
if "$SE_FUSED_PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$SE_FUSED_PY" benchmarks/bench_block.py --out "$OUT_DIR" "$@"
  "$SE_FUSED_PY" benchmarks/bench_network.py --out "$OUT_DIR" "$@"
else
  echo "No GPU: small CPU run (batch 8 float32 block benchmark, batch 2 network step at 112x112)."
  "$SE_FUSED_PY" benchmarks/bench_block.py --device cpu --out "$OUT_DIR" "$@"
  "$SE_FUSED_PY" benchmarks/bench_network.py --device cpu --quick --out "$OUT_DIR"
fi
