#!/usr/bin/env bash
# The one script a lent GPU machine runs (README: "Running on a GPU machine").
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --dry-run  # rehearsal on a CPU-only machine
#
# Steps, each with its own time limit so the whole run ends inside ~8 minutes on
# an H100/H200: build the extension (sm_90), print the installation, run the GPU
# tests, the block and network benchmarks (quick), merge them into the SPEC §6
# record, profile host vs device time per call (profile_block.py, the chunk
# pipeline's forms and the Triton pipelined path beside the shipped rows) and
# check the profile against the predictions written before the run
# (check_predictions.py), sweep the two-pass path's forms at the stage shapes
# (the batch in chunks, the NCHW sums, the MLP's splits; then the Triton MLP's
# tiles), time the pipelined paths with the block benchmark (into the log) and
# run Nsight Compute on the pipelined forward (these two, and the pipelined
# trace, only when GPU_CHECK_ONLY names them), run compute-sanitizer
# (memcheck, racecheck) over every kernel path, time the block in NCHW and
# against torch.compile, and, with the time left, train a few steps and run
# Nsight Compute on the MLP kernels. Files come back in $OUT
# (the device tool's folder; benchmarks/results/ when unset): the record
# <date>-<gpu>-<commit>.json, gpu_check.log, profile.json, block.png, network.png,
# block-nchw.json/.png and block-compile.json: 8 files, as many as the device tool
# returns (block.json and network.json are inside the record). A summary table is
# printed last. Exit status: 0 only when every step passed.
#
# GPU_CHECK_SKIP="racecheck bench-nchw ..." skips the named steps (a shorter run, for
# a second look within one session's device time); GPU_CHECK_ONLY="memcheck racecheck ..."
# runs only the named steps beside env, build, info and usable (the pipelined paths' trace-pipelined,
# bench-pipelined and ncu-pipelined run only so, since their code has a record: ON_REQUEST below);
# GPU_CHECK_BUDGET_S sets the budget; GPU_CHECK_TUNE_S the tune step's sweep time.
set -uo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
if [[ $DRY_RUN -eq 1 ]]; then OUT_DIR=${OUT:-$ROOT/benchmarks/out/dry-run}; else OUT_DIR=${OUT:-$ROOT/benchmarks/results}; fi
WORK=$(mktemp -d)
LOG="$OUT_DIR/gpu_check.log"
mkdir -p "$OUT_DIR"
: > "$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}   # leave room under the device call's limit
SUMMARY=()
FAILED=0
LAST_STATUS=""
export PYTHONUNBUFFERED=1 SE_FUSED_CUDA_VERBOSE=${SE_FUSED_CUDA_VERBOSE:-0}

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S COMMAND...: run with a time limit (clamped to the budget left),
# log everything, record status. A step that cannot get 15 s is skipped.
step() {
  local name=$1 limit=$2; shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then skip "$name" "GPU_CHECK_SKIP"; return 0; fi
  if ! selected "$name"; then
    if [[ -z "${GPU_CHECK_ONLY:-}" ]]; then skip "$name" "runs only when GPU_CHECK_ONLY names it"
    else skip "$name" "not in GPU_CHECK_ONLY"; fi
    return 0
  fi
  if (( $(left) < 15 )); then skip "$name" "out of time budget ($(elapsed)s used)"; FAILED=1; return 0; fi
  (( limit > $(left) )) && limit=$(left)
  local t0; t0=$(date +%s)
  echo "=== [$name] (limit ${limit}s, at $(elapsed)s) $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMEOUT"; FAILED=1
  elif [[ $rc -eq 3 && ( $name == memcheck || $name == racecheck ) ]]; then
    status="PARTIAL"; FAILED=1   # exercise_kernels stopped at --max-seconds: the cases before were checked
  elif [[ $rc -ne 0 ]]; then status="FAIL(rc=$rc)"; FAILED=1; fi
  LAST_STATUS=$status
  SUMMARY+=("$(printf '%-16s %-14s %4ss' "$name" "$status" "$(( $(date +%s) - t0 ))")")
  echo "=== [$name] $status" | tee -a "$LOG"
  return 0
}

# step_if NEED_S NAME LIMIT_S COMMAND...: `step`, started only with more than NEED_S of the
# budget left (a step the budget cuts short fails); otherwise recorded as skipped.
step_if() {
  local need=$1 name=$2; shift
  if [[ " ${GPU_CHECK_SKIP:-} " != *" $name "* ]] && selected "$name" && (( $(left) <= need )); then
    skip "$name" "out of time budget ($(elapsed)s used)"; return 0
  fi
  step "$@"
}

# Steps that repeat what a record already measured on code that has not changed since (the
# pipelined paths at 72c11ba: trace, sweep and ncu in the files 2026-11-27-h100-72c11ba*): they run
# only when GPU_CHECK_ONLY names them, so that a default run spends its minutes on the open questions.
ON_REQUEST=" trace-pipelined bench-pipelined ncu-pipelined "

# selected NAME: whether GPU_CHECK_ONLY (when set) lets step NAME run; the setup steps always run;
# the ON_REQUEST steps only when GPU_CHECK_ONLY names them.
selected() {
  if [[ -z "${GPU_CHECK_ONLY:-}" ]]; then [[ "$ON_REQUEST" != *" $1 "* ]]; return; fi
  [[ " env build info usable ${GPU_CHECK_ONLY} " == *" $1 "* ]]
}

# chosen_out NAME: whether the caller left step NAME out (GPU_CHECK_SKIP names it, or GPU_CHECK_ONLY does not).
chosen_out() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]] || ! selected "$1"; }

# skip NAME REASON: record a step that did not run.
skip() { SUMMARY+=("$(printf '%-16s %-14s %s' "$1" "skipped" "$2")"); echo "=== [$1] skipped: $2" | tee -a "$LOG"; }

left() { echo $(( BUDGET - $(elapsed) )); }

# keep FILE...: copy what a step wrote from the work folder to $OUT_DIR (8 files in all, see above).
keep() { local f; for f in "$@"; do [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$OUT_DIR/"; done; return 0; }

if [[ $DRY_RUN -eq 1 ]]; then
  DEVICE_ARGS=(--device cpu)
  SANITIZE=()
  EXERCISE_ARGS=(--cpu-dry-run --quick)
  TEST_FILES=(tests/test_cuda.py tests/test_correctness.py)
  TEST_K="cuda or (cpu-cpu and 2048)"
else
  DEVICE_ARGS=(--device cuda)
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo compute-sanitizer)
  SANITIZE=("$SANITIZER" --error-exitcode 1 --print-limit 20)
  EXERCISE_ARGS=(--quick)
  TEST_FILES=(tests/test_cuda.py tests/test_correctness.py tests/test_triton.py tests/test_compile.py
              tests/test_opcheck.py)
  TEST_K="cuda or triton"
fi

# --- 1. environment and build -------------------------------------------------
# The commit measured: SE_FUSED_COMMIT when the caller knows it (a tree copied without .git), else git's.
if [[ -z "${SE_FUSED_COMMIT:-}" ]] && git rev-parse HEAD >/dev/null 2>&1; then
  SE_FUSED_COMMIT=$(git rev-parse HEAD)$([[ -n "$(git status --porcelain --untracked-files=no)" ]] && echo -dirty)
fi
export SE_FUSED_COMMIT=${SE_FUSED_COMMIT:-unknown}
# The tree measured, whatever the label says: a copied tree can carry a stale .git (one
# record was labelled with the session's first commit so). Check: git rev-parse <commit>^{tree}.
tree_hash() {
  local index; index=$(mktemp)
  GIT_INDEX_FILE=$index git read-tree HEAD 2>/dev/null && GIT_INDEX_FILE=$index git add -A . 2>/dev/null \
    && GIT_INDEX_FILE=$index git write-tree 2>/dev/null || echo unknown
  rm -f "$index"
}
SE_FUSED_TREE=$(tree_hash)
step env 30 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'; echo commit \$SE_FUSED_COMMIT, tree $SE_FUSED_TREE"
# The extension is built again only when its sources or build settings changed since the last
# build of this folder: a second call on a warm machine keeps the ignored build outputs, and at
# a482069 that call spent 71 s of device time rebuilding the same sources.
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
BUILD_STAMP=build/gpu_check-build.stamp
build_key() {
  { find csrc -type f -print0 | sort -z | xargs -0 sha256sum; sha256sum setup.py pyproject.toml
    echo "arch $ARCH"; "$PY" -c 'import sys, torch; print(sys.version, torch.__version__)'; } | sha256sum | cut -d' ' -f1
}
BUILD_KEY=$(build_key)
CHECK_BUILT=("$PY" -c "import se_fused._C, se_fused._ops as o; print('extension present; CUDA kernels built:', o.cuda_kernels_built())")
if [[ $DRY_RUN -eq 1 ]]; then
  step build 60 "${CHECK_BUILT[@]}"
elif [[ -f $BUILD_STAMP && "$(cat "$BUILD_STAMP")" == "$BUILD_KEY" ]] && compgen -G "se_fused/_C*.so" >/dev/null; then
  echo "build: the extension in se_fused/ was built from these sources (stamp $BUILD_STAMP)" | tee -a "$LOG"
  step build 60 "${CHECK_BUILT[@]}"
else
  rm -f "$BUILD_STAMP"
  step build 240 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -q -e .
  [[ $LAST_STATUS == ok ]] && mkdir -p build && echo "$BUILD_KEY" > "$BUILD_STAMP"
fi
step info 60 "$PY" -m se_fused
if [[ $DRY_RUN -eq 0 ]]; then
  step usable 30 "$PY" -c "import se_fused, sys; b = se_fused.available_backends(); print(b); sys.exit(0 if 'cuda' in b else 1)"
fi

# --- 2. GPU tests -------------------------------------------------------------
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null && [[ $DRY_RUN -eq 0 ]]; then XDIST=(-n 12); fi
# The pipelined paths' tests (CUDA and Triton; their kernels have not yet run on a GPU) in a
# process of their own, after the rest: a trap ends a process's CUDA context, and every later
# test in that process would fail with it.
# A test that hangs fails alone (pytest-timeout, where installed), and each failed or crashed
# test's id is written as it is reported (tests/conftest.py, SE_FUSED_FAILURES_FILE) and listed
# after the step: at a482069 a worker's crash and a pytest that never exited took the summary with them.
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_ARGS=(--timeout 120); fi
export SE_FUSED_FAILURES_FILE="$WORK/failures.txt"
PYTEST=("$PY" -m pytest -q -rfE --no-header -p no:cacheprovider "${XDIST[@]}" "${TIMEOUT_ARGS[@]}" "${TEST_FILES[@]}")
# show_failures NAME: the tests step NAME's failed test ids, as reported.
show_failures() {
  if [[ -s $SE_FUSED_FAILURES_FILE ]]; then
    echo "=== [$1] failed or crashed tests:" | tee -a "$LOG"
    tee -a "$LOG" < "$SE_FUSED_FAILURES_FILE"
  fi
  rm -f "$SE_FUSED_FAILURES_FILE"
}
step tests 170 "${PYTEST[@]}" -k "($TEST_K) and not pipelined"
show_failures tests
step tests-pipelined 90 "${PYTEST[@]}" -k "($TEST_K) and pipelined"
show_failures tests-pipelined

# --- 3. benchmarks and the record ---------------------------------------------
step bench-block 130 "$PY" benchmarks/bench_block.py --quick "${DEVICE_ARGS[@]}" --out "$WORK" --json-name block.json --no-progress
step bench-net 130 "$PY" benchmarks/bench_network.py --quick "${DEVICE_ARGS[@]}" --out "$WORK" --json-name network.json --no-progress
if chosen_out record || chosen_out bench-block || chosen_out bench-net; then
  skip record "GPU_CHECK_SKIP or GPU_CHECK_ONLY left it or its benchmarks out"
elif [[ -f "$WORK/block.json" && -f "$WORK/network.json" ]]; then
  step record 30 "$PY" benchmarks/make_record.py --block "$WORK/block.json" --network "$WORK/network.json" --out "$OUT_DIR" --markdown "$WORK/summary.md"
else
  skip record "a benchmark wrote no JSON"
  FAILED=1
fi
# Host vs device time per call, the shipped rows beside the forms not yet measured (the chunk
# pipeline's four rows, the Triton pipelined path), side by side (profile.json).
# --python-top: where the host time of a host-bound call goes (the Triton backend's at conv3_x-conv5_x).
if [[ $DRY_RUN -eq 1 ]]; then PROFILE_ARGS=(--device cpu --batch 2 --stages conv5_x --calls 5 --python-top 8)
else PROFILE_ARGS=(--device cuda --python-top 12); fi
# --max-seconds: no variant starts after 60 s (the pipelined ones, last, first compile their Triton
# kernels here unless the tests did); the JSON is rewritten after each variant, so even a TIMEOUT keeps
# the variants finished before it.
step profile 90 "$PY" benchmarks/profile_block.py "${PROFILE_ARGS[@]}" --max-seconds 60 --out "$WORK" \
  --json-name profile.json
keep profile.json block.png network.png
# The predictions written before this GPU run (benchmarks/predictions.json) against the profile: into the log.
if [[ -f "$WORK/profile.json" ]]; then
  step predictions 20 "$PY" benchmarks/check_predictions.py "$WORK/profile.json"
fi

# --- 3a. the CUDA pipelined path's per-step trace (SE_FUSED_CUDA_PIPELINE_TRACE): which phase
# holds its steps up (at a482069 it took 2.6-42x the two-pass path's time); the summaries go into
# the log. One forward and one backward per stage, about 20 s.
[[ $DRY_RUN -eq 0 ]] && step_if 40 trace-pipelined 40 "$PY" benchmarks/pipeline_trace.py run \
  --stages conv2_x,conv4_x,conv5_x --out "$WORK/trace"

# --- 3b. the two-pass path's sweep against its default (tune_cluster.py's default families: the
# batch in chunks whose sums, MLPs and scales run on three streams, the question since
# 2026-11-27; the NCHW sums; the MLP's splits of C), before the steps that only repeat what
# earlier records measured. Each stage gets a share of the time, so the sweep reaches conv5_x.
# (The cluster, pipelined and weight-gradient families were swept at 72c11ba: tune_cluster.py
# --paths names them.) GPU_CHECK_TUNE_S (default 40) sets the sweep's time, for a call that runs
# little else.
TUNE_S=${GPU_CHECK_TUNE_S:-40}
[[ $DRY_RUN -eq 0 ]] && step_if $(( TUNE_S + 20 )) tune $(( TUNE_S + 10 )) "$PY" benchmarks/tune_cluster.py --max-seconds "$TUNE_S"
# The Triton MLP's program tiles (one tile per program since 2026-11-27, not yet run on a GPU),
# the Triton ops against CUDA's auto and two-pass columns of the same run.
[[ $DRY_RUN -eq 0 ]] && step_if 45 tune-triton 35 "$PY" benchmarks/tune_cluster.py --paths triton-mlp --max-seconds 25

# --- 3c. the pipelined paths (CUDA and Triton, both passes) through the block benchmark: the
# issues' own measure (bytes_min / time against the copy bandwidth of the same run), beside the
# shipped rows of step 3, before the steps that profile or check them (the budget may
# not reach them all). The table goes into the log. (The rehearsal times the CPU kernel.)
step_if 60 bench-pipelined 45 env SE_FUSED_CUDA_PATH=pipelined SE_FUSED_TRITON_PATH=pipelined \
  "$PY" benchmarks/bench_block.py --quick "${DEVICE_ARGS[@]}" --impls "$([[ $DRY_RUN -eq 1 ]] && echo cpu || echo cuda,triton)" \
  --out "$WORK" --json-name block-pipelined.json --no-progress

# --- 3d. Nsight Compute on the pipelined forward (conv2_x, channels_last, its default
# geometry, printed by SE_FUSED_CUDA_VERBOSE=1; its profile row, cuda/pipelined, runs only with
# --all-variants since 2026-11-27; --variants: that row alone): DRAM and L2 throughput, the L2 hit rate
# of the re-reads, where the warps wait (the ready-flag spins show as sleep). Into the log;
# about 20 s.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [[ $DRY_RUN -eq 0 && -n "$NCU" ]]; then
  step_if 75 ncu-pipelined 60 env SE_FUSED_CUDA_VERBOSE=1 "$NCU" \
    -k regex:se_forward_pipelined -c 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
    --section SourceCounters "$PY" benchmarks/profile_block.py --device cuda --stages conv2_x --passes forward \
    --calls 1 --all-variants --variants cuda/pipelined --out "$WORK" --json-name ncu-pipelined-profile.json
fi

# --- 4. compute-sanitizer over every kernel path --------------------------------
# On an H100 at cca1da2 memcheck took ~11 s and racecheck ~81 s for 60 quick cases (1.35 s a case),
# with the eager reference on the GPU too, whose cuBLAS and ATen kernels racecheck checked as well.
# Since 2026-11-27 the reference runs on the CPU (exercise_kernels.py), so the tools check this
# project's kernels only; the 132 quick cases' time is not measured yet (at 1.35 s a case, racecheck's
# 180 s would end PARTIAL near the last cases). exercise_kernels starts no case after --max-seconds
# (its limit less 30 s for the sanitizer's start and end), running every path on a shape before the
# next shape: a run the budget cuts short reports PARTIAL with the cases it checked, instead of a
# TIMEOUT that shows none.
declare -A SANITIZER_NEEDS=([memcheck]=60 [racecheck]=90)
for tool in memcheck racecheck; do
  limit=$(( $(left) < 230 ? $(left) - 20 : 210 ))
  if [[ ${#SANITIZE[@]} -gt 0 ]]; then
    step_if "${SANITIZER_NEEDS[$tool]}" "$tool" "$limit" \
      "${SANITIZE[@]}" --tool "$tool" "$PY" benchmarks/exercise_kernels.py "${EXERCISE_ARGS[@]}" \
      --max-seconds $(( limit - 30 ))
  else
    step_if "${SANITIZER_NEEDS[$tool]}" "$tool" "$limit" "$PY" benchmarks/exercise_kernels.py "${EXERCISE_ARGS[@]}" \
      --max-seconds $(( limit - 30 ))
  fi
done

# --- 5. the rows the quick block run leaves out: NCHW, and torch.compile of the eager block ---
# (the CUDA issue's goals name both). The rehearsal times the CPU kernel instead of
# torch.compile (inductor takes minutes per shape on a 2-core machine).
for extra in nchw compile; do
  if [[ $extra == nchw ]]; then EXTRA_ARGS=(--memory-format nchw); else
    EXTRA_ARGS=(--memory-format channels_last --impls "$([[ $DRY_RUN -eq 1 ]] && echo cpu || echo cuda,compile),eager"
                --residual no --passes forward+backward); fi
  step_if 89 "bench-$extra" $(( $(left) - 60 )) "$PY" benchmarks/bench_block.py --quick "${DEVICE_ARGS[@]}" "${EXTRA_ARGS[@]}" \
    --out "$WORK" --json-name "block-$extra.json" --no-progress
  keep "block-$extra.json"
done
keep block-nchw.png

# --- 6. a short training run on the GPU (the DDP entry point, single process) ----
if [[ $DRY_RUN -eq 0 ]]; then
  step_if 60 train 50 "$PY" -m se_fused.train --synthetic --arch se_resnet50 --se-backend auto --synthetic-train-size 1024 \
    --synthetic-val-size 256 --batch-size 128 --epochs 1 --max-steps 4 --workers 4 --progress print --print-freq 1 \
    --output-dir "$WORK/train"
fi

# --- 6b. Nsight Compute on one forward+backward's MLP, weight-gradient and scale kernels
# at conv5_x (where the MLP costs most): where the warps wait, and whether the scale
# kernels' per-channel loads are wide (channel_values). Into the log.
if [[ $DRY_RUN -eq 0 && -n "$NCU" ]]; then
  step_if 75 ncu 60 "$NCU" -k "regex:excitation_|weight_gradients|scale_(forward|backward)_vec" -c 7 \
    --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section LaunchStats "$PY" benchmarks/profile_block.py --device cuda --stages conv5_x \
    --passes forward+backward --calls 1 --out "$WORK" --json-name ncu-profile.json
fi

# --- summary (printed last) -----------------------------------------------------
{
  echo
  echo "==================== gpu_check summary ($(elapsed)s, dry-run=$DRY_RUN) ===================="
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  [[ -f "$WORK/summary.md" ]] && cat "$WORK/summary.md"
  echo "files in $OUT_DIR:"; ls -1 "$OUT_DIR" | head -20
  SKIPPED=$(printf '%s\n' "${SUMMARY[@]}" | grep -c " skipped " || true)
  if [[ $FAILED -ne 0 ]]; then echo "RESULT: SOME STEPS FAILED (see above and gpu_check.log)"
  elif [[ $SKIPPED -gt 0 ]]; then echo "RESULT: every step that ran passed; $SKIPPED skipped (listed above)"
  else echo "RESULT: all steps passed"; fi
} 2>&1 | tee -a "$LOG"
rm -rf "$WORK"
exit $FAILED
