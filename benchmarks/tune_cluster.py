"""Sweep the read-once paths' geometries (pipelined and cluster) on a GPU.

For each SE-ResNet-50 stage shape (batch 256, bfloat16 by default), layout and
pass, times the raw forward/backward op under the automatic choice, the
two-pass path and every geometry of the read-once paths, and prints them as
GB/s of the pass's minimum traffic (SPEC §4):

* chunks: the two-pass path over the batch in chunks of at most ``6M``, ``12M`` or ``24M``
  bytes of re-read input (``SE_FUSED_CUDA_CHUNK_BYTES``), whose channel sums, MLPs and scales
  run as a pipeline on three streams (the default since 2026-11-27), and ``12M/serial``: the
  same chunks with every kernel in order on one stream (``SE_FUSED_CUDA_CHUNK_STREAMS=1``, as
  the cuda/l2-chunks profile row measured before); ``12M/no-hints``: the 12M pipeline without
  the L2 eviction hints that chunked calls carry by default (``SE_FUSED_CUDA_CACHE_HINTS=off``),
  ``12M/grid32`` and ``12M/grid4``: its scale pass on 32 or 4 blocks per SM instead of 2
  (``SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS``), ``whole/hints``: the whole batch with the hints
  (``SE_FUSED_CUDA_CACHE_HINTS=all``), and ``auto-chunks``: the policy that would become the
  default (``SE_FUSED_CUDA_CHUNK_BYTES=auto``: 12M chunks where the batch re-reads more than 64 MiB);
* pipelined (``SE_FUSED_CUDA_PATH=pipelined``): ``default`` (the planner's choice),
  then ``G,tileK,+d``: G samples per MLP group (``SE_FUSED_CUDA_PIPELINE_GROUP``),
  tiles of tile KiB (``SE_FUSED_CUDA_TILE_BYTES``), d steps of delay beyond the
  minimum (``SE_FUSED_CUDA_PIPELINE_DELAY``), with ``/direct`` the group MLP loading
  its weights from L2 as it goes (``SE_FUSED_CUDA_PIPELINE_MLP=direct``) instead of
  streaming them through shared memory;
* cluster (``SE_FUSED_CUDA_PLAN=M,G``: M CTAs per sample, G samples per cluster),
  ``M,G`` with two chunk buffers where they fit, ``M,G/1`` with one
  (``SE_FUSED_CUDA_CLUSTER_BUFFERS=1``);
* mlp-split: the two-pass path with its MLP products over C split every k
  channels (``SE_FUSED_CUDA_MLP_SPLIT``; 256 by default, the ``2-pass`` column)
  and t row tiles per block of the forward's rows kernels
  (``SE_FUSED_CUDA_MLP_ROW_TILES``; 1 by default), ``k1024`` or ``k256xr4``:
  fewer, longer blocks (the MLP kernels are 50 of the forward's 112 us at conv5_x);
  ``tiled``: the MLP's products in the tiled kernel instead (``SE_FUSED_CUDA_MLP=tiled``;
  tiles of samples by outputs, as a GEMM; the ``2-pass`` column takes it by the shape:
  C*R >= 32768 and N >= 32);
* nchw-sums: the two-pass path with ``SE_FUSED_CUDA_NCHW_SUMS=warp`` (NCHW channel
  sums a warp per row where H*W is not a multiple of the vector: conv4_x and conv5_x in
  16-bit dtypes), against the default's rows staged through shared memory in the
  ``2-pass`` column (staged was the knob's side until 2026-11-27's second H100 session);
  the NHWC rows repeat the two-pass path.
* wgrad: the two-pass path with ``SE_FUSED_CUDA_WGRAD_TILES=wide`` (the weight
  gradients in 256-column tiles, as before 2026-11-27, against the tiles fitted to
  the gradient's columns in the ``2-pass`` column; the backward rows are the ones that
  differ, the forward rows repeat the two-pass path).
* triton-mlp: the Triton backend's two-pass ops (not the CUDA ones) with its MLP
  programs' tile ``n,j,k,split`` (samples, outputs, piece of the reduction per
  iteration, reduction elements per program; ``SE_FUSED_TRITON_MLP_TILE``), ``default``
  first (se_fused/triton/_common.py's GPU_BLOCKS); not in the default ``--paths``
  (gpu_check runs it as a step of its own).

It tells whether a read-once path beats the two-pass one, and with which
geometry, which is what ``auto`` needs to know before it takes one.
The pipelined family (when asked for) is swept last in a table of its own: a
trap in its kernels ends the CUDA context (and the sweep) after the other families have
covered every stage. The other families get 40% of ``--max-seconds`` when it follows, and
within each table every stage gets an equal share of the table's time (what a stage leaves
goes to the next), so that a short budget still reaches conv5_x; ``auto`` and ``2-pass``
are timed in every row.

Usage: ``python benchmarks/tune_cluster.py [--batch 256] [--dtype bfloat16] [--max-seconds 120]
[--paths chunks,nchw-sums,mlp-split,wgrad,cluster,pipelined,triton-mlp]``; the default sweeps
chunks, nchw-sums and mlp-split (cluster, pipelined and wgrad were swept at 72c11ba on an H100:
docs/cuda-notes.md)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Tuple

import torch

import _common as common
import se_fused  # noqa: F401  (loads the ops)

triton_ops = None  # se_fused.triton.ops, imported by main() when the triton-mlp family is swept

STAGES = {"conv2_x": (256, 16, 56, 56), "conv3_x": (512, 32, 28, 28), "conv4_x": (1024, 64, 14, 14),
          "conv5_x": (2048, 128, 7, 7)}
PLANS = [f"{m},{g}" for m in (1, 2, 4, 8, 16) for g in (1, 2, 4, 8, 16) if m * g <= 16]
PIPELINE_PLANS = [(g, kib, d, "") for g in (1, 4, 16) for kib in (16, 32, 64) for d in (0, 1, 3)]
PIPELINE_PLANS += [(g, 32, 1, "direct") for g in (1, 4)]
# (label, chunk bytes or None for the whole batch, streams, L2 hints, scale blocks per SM; None: the default)
CHUNK_PLANS = [("6M", 6 << 20, "3", None, None), ("12M", 12 << 20, "3", None, None),
               ("24M", 24 << 20, "3", None, None), ("12M/serial", 12 << 20, "1", None, None),
               ("12M/no-hints", 12 << 20, "3", "off", None), ("12M/grid32", 12 << 20, "3", None, "32"),
               ("12M/grid4", 12 << 20, "3", None, "4"), ("whole/hints", None, None, "all", None),
               ("auto-chunks", "auto", None, None, None)]
MLP_PLANS = [(512, 1), (1024, 1), (2048, 1), (256, 2), (256, 4), (256, 8), (1024, 4)]  # (split, row tiles)
# The Triton MLP's program tiles (samples, outputs, reduction piece, split of C) around the default
# 16,32,128,256; 16,32,16,256 is the default until 2026-11-27.
TRITON_MLP_TILES = ["16,32,16,256", "16,32,64,256", "16,64,128,256", "32,32,128,256", "16,32,128,128",
                    "16,32,128,512"]
KNOBS = common.CUDA_KNOBS
TRITON_KNOBS = ("SE_FUSED_TRITON_MLP_TILE",)


def time_ms(fn, reps: int = 10) -> float:
    """Median of ``reps`` timed calls (CUDA events) after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def set_path(path: str, **knobs: str) -> None:
    """SE_FUSED_CUDA_PATH and the knobs named (:func:`_common.set_knobs`); the rest of KNOBS and
    TRITON_KNOBS unset. ``path="triton"``: the Triton ops time instead, the knobs are TRITON_KNOBS'."""
    triton = path == "triton"
    common.set_knobs(TRITON_KNOBS, prefix="SE_FUSED_TRITON_", **(knobs if triton else {}))
    common.set_knobs(KNOBS, path=None if triton else path, **({} if triton else knobs))


def candidates(paths) -> list:
    """(label, family, path, knobs) for the automatic choice, the two-pass path and each geometry;
    knobs as :func:`set_path` takes them."""
    found = [("auto", "", "auto", {}), ("2-pass", "", "two_pass", {})]
    if "chunks" in paths:
        found += [(label, "chunks", "two_pass",
                   dict(chunk_bytes=nbytes and str(nbytes), chunk_streams=streams, cache_hints=hints,
                        chunk_scale_blocks=blocks))
                  for label, nbytes, streams, hints, blocks in CHUNK_PLANS]
    if "pipelined" in paths:
        found.append(("default", "pipelined", "pipelined", {}))
        found += [(f"{g},{kib}K,+{d}" + (f"/{mlp}" if mlp else ""), "pipelined", "pipelined",
                   dict(pipeline_group=str(g), tile_bytes=str(kib * 1024), pipeline_delay=str(d), pipeline_mlp=mlp))
                  for g, kib, d, mlp in PIPELINE_PLANS]
    if "cluster" in paths:
        found += [(p, "cluster", "cluster", dict(plan=p)) for p in PLANS]
        found += [(f"{p}/1", "cluster", "cluster", dict(plan=p, cluster_buffers="1")) for p in PLANS]
    if "mlp-split" in paths:
        # The split and row tiles apply to the rows kernels, which the shape may not choose.
        found += [(f"k{k}" + (f"xr{t}" if t > 1 else ""), "mlp-split", "two_pass",
                   dict(mlp="kernels", mlp_split=str(k), mlp_row_tiles=str(t))) for k, t in MLP_PLANS]
        found += [("rows", "mlp-split", "two_pass", dict(mlp="kernels")),
                  ("tiled", "mlp-split", "two_pass", dict(mlp="tiled"))]
    if "nchw-sums" in paths:
        found.append(("warp", "nchw-sums", "two_pass", dict(nchw_sums="warp")))
    if "wgrad" in paths:
        found.append(("wide", "wgrad", "two_pass", dict(wgrad_tiles="wide")))
    if "triton-mlp" in paths:
        found.append(("default", "triton-mlp", "triton", {}))
        found += [(tile, "triton-mlp", "triton", dict(mlp_tile=tile)) for tile in TRITON_MLP_TILES]
    return found


def stage_deadline(start: float, end: float, index: int, count: int) -> float:
    """When stage ``index`` of ``count`` must stop starting plans: an equal share of ``[start, end]`` per
    stage, a share a stage leaves unused going to the stages after it."""
    return start + (end - start) * (index + 1) / count


def sweep(paths, batch: int, dtype: torch.dtype, deadline: float) -> Tuple[bool, int]:
    """Time every candidate of ``paths`` at each stage, layout and pass, and print a row per pass. Each
    stage gets its share of the time to ``deadline`` (:func:`stage_deadline`), so that a budget too
    short for every plan still reaches conv5_x; ``auto`` and ``2-pass`` are timed in every row.
    Returns (whether the CUDA context was lost, how many candidates failed)."""
    ops = torch.ops.se_fused
    print(f"{'stage':8s} {'layout':6s} {'pass':8s} {'auto':>7s} {'2-pass':>7s}  best per path (GB/s), then every plan")
    start = time.time()
    failures = 0
    for index, (stage, (c, r, h, w)) in enumerate(STAGES.items()):
        stage_end = stage_deadline(start, deadline, index, len(STAGES))
        for layout in ("NHWC", "NCHW"):
            if time.time() > deadline:
                print("tune_cluster: time budget used up")
                return False, failures
            fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
            x = torch.randn(batch, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            g = torch.randn_like(x)
            w1 = torch.randn(r, c, 1, 1, device="cuda") * 0.05
            b1 = torch.zeros(r, device="cuda")
            w2 = torch.randn(c, r, 1, 1, device="cuda") * 0.1
            b2 = torch.zeros(c, device="cuda")
            t_bytes = x.numel() * x.element_size()
            set_path("auto")
            _, pooled, hidden, scale = ops.squeeze_excitation_forward(x, w1, b1, w2, b2, None, "relu", "sigmoid")
            passes = {  # pass -> (bytes, {"cuda": call, "triton": call})
                "forward": (2 * t_bytes, {
                    "cuda": lambda: ops.squeeze_excitation_forward(x, w1, b1, w2, b2, None, "relu", "sigmoid"),
                    "triton": lambda: triton_ops.run_forward(x, w1, b1, w2, b2, None, "relu", "sigmoid")}),
                "backward": (3 * t_bytes, {
                    "cuda": lambda: ops.squeeze_excitation_backward(g, x, None, w1, w2, pooled, hidden, scale, "relu",
                                                                    "sigmoid"),
                    "triton": lambda: triton_ops.run_backward(g, x, None, w1, w2, pooled, hidden, scale, "relu",
                                                              "sigmoid")}),
            }
            for name, (nbytes, calls) in passes.items():
                results = {}  # family -> {label: GB/s}
                not_run = 0
                for label, family, path, knobs in candidates(paths):
                    if family and time.time() > stage_end:
                        not_run += 1
                        continue
                    set_path(path, **knobs)
                    fn = calls["triton" if path == "triton" else "cuda"]
                    try:
                        results.setdefault(family, {})[label] = nbytes / time_ms(fn) / 1e6
                    # Exception, not only RuntimeError: a Triton tile that does not compile raises a
                    # TritonError (an Exception), a refused knob a ValueError; one candidate's failure
                    # must not end the sweep.
                    except Exception as exc:
                        if isinstance(exc, RuntimeError) and any(
                                m in str(exc) for m in ("does not fit this call", "cannot run this call")):
                            continue  # this geometry does not fit the shape
                        print(f"  {stage} {layout} {name} {family or 'base'}/{label} failed: "
                              f"{common.failure_message(exc)}")
                        failures += 1
                        if not common.context_alive():
                            print("tune_cluster: the CUDA context is lost (a kernel trapped); stopping the sweep")
                            return True, failures
                        continue
                set_path("auto")
                base = results.get("", {})
                bests = []
                for family in paths:
                    plans = results.get(family, {})
                    best = max(plans, key=plans.get) if plans else "-"
                    bests.append(f"{family} {best} ({plans.get(best, 0):.0f})")
                print(f"{stage:8s} {layout:6s} {name:8s} {base.get('auto', 0):7.0f} {base.get('2-pass', 0):7.0f}  "
                      + "; ".join(bests))
                for family in paths:
                    listing = " ".join(f"{k}:{v:.0f}" for k, v in results.get(family, {}).items())
                    print(f"{'':24s} {family}: {listing}")
                if not_run:
                    print(f"{'':24s} ({not_run} plans not run: the stage's share of --max-seconds was used)")
            x = g = passes = None  # free the tensors before the next layout (the lambdas hold them)
            torch.cuda.empty_cache()
    return False, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--paths", default="chunks,nchw-sums,mlp-split",
                        help="what to sweep (comma-separated: chunks, nchw-sums, mlp-split, wgrad, cluster, "
                             "pipelined, triton-mlp)")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if not torch.cuda.is_available():
        print("tune_cluster: needs a GPU", file=sys.stderr)
        return 2
    if "triton-mlp" in paths:
        global triton_ops
        from se_fused.triton import ops as triton_ops  # Triton loads only when its family is swept
    start = time.time()
    print(f"device {torch.cuda.get_device_name()}, batch {args.batch}, {args.dtype}; GB/s of minimum traffic")
    # A trap in the pipelined kernels would end the CUDA context, so
    # they are swept last, in a table of their own, after every other family at every stage. The
    # other families get 40% of the time when the pipelined one follows (what they leave, it gets).
    # Exit status: 1 where the CUDA context was lost, 4 where a candidate failed (each printed as it
    # failed) but the sweep went on, so that a failing plan shows in gpu_check's summary too.
    failures = 0
    groups = ([p for p in paths if p != "pipelined"], [p for p in paths if p == "pipelined"])
    for group, share in zip(groups, (0.4 if all(groups) else 1.0, 1.0)):
        if group:
            lost, failed = sweep(group, args.batch, getattr(torch, args.dtype), start + args.max_seconds * share)
            failures += failed
            if lost:
                return 1  # no later group could run
    if failures:
        print(f"tune_cluster: {failures} candidates failed (listed above)")
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
