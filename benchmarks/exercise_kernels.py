"""Run every CUDA kernel path once on small inputs (for compute-sanitizer).

``compute-sanitizer --tool memcheck python benchmarks/exercise_kernels.py`` (and
``--tool racecheck``) then sees each kernel of the project at least once:
the cluster path forward/backward in both layouts, with and without the
residual epilogue, in several geometries (a sample split across CTAs, several
samples per cluster, a padded last group, persistent clusters that each walk
several groups with one or two chunk buffers), and the two-pass path's kernels
(channel sums, the excitation MLP over two sample groups, the weight
gradients, the scale), over the whole batch and one sample per chunk, and the
pipelined path (its own CTAs, 2 CTAs walking 1024-byte tiles, so that each CTA
waits on groups that other CTAs finish, and the direct group MLP beside the staged one),
the two-pass MLP kernels with several row tiles per block and pieces per split, the
tiled MLP kernel, and the NCHW channel sums a warp per row (the default stages them).
The script also checks each result against the eager backend (on the CPU, in
float64, so that the sanitizers spend their time on this project's kernels), so a
run that the sanitizer passes but computes garbage still fails.

Usage: ``python benchmarks/exercise_kernels.py [--quick] [--cpu-dry-run] [--max-seconds S]``;
``--cpu-dry-run`` runs the same loop on the CPU backend (rehearsal without a GPU);
``--max-seconds`` starts no case after S seconds and then exits 3 (every path runs on a
shape before the next shape, so a short run still sees each path).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import zlib

import torch

import _common as common
import se_fused

# (path, knobs) as _common.set_knobs takes them; knobs not named are unset (the path's own choice).
# plan "M,G" = CTAs per sample, samples per cluster; clusters: at most this many persistent clusters,
# so that one cluster walks several groups; cluster_buffers: one chunk buffer instead of two;
# chunk_bytes 1: the two-pass path one sample per chunk (the chunks' sums, MLPs and scales on three
# streams, their 16-byte kernels with L2 eviction hints, the scale on 2 blocks per SM; chunk_streams 1:
# on one); pipeline_blocks, tile_bytes, pipeline_mlp: the pipelined path's CTAs, tiles and group MLP;
# mlp_split, mlp_row_tiles: the two-pass MLP kernels' splits of C and row tiles per block;
# nchw_sums "warp": the NCHW channel sums a warp per row where H*W is not a multiple of the vector
# (the default stages whole rows through shared memory);
# mlp "tiled": the MLP's products in the tiled kernel;
# pipeline_trace: the pipelined kernels' trace stores (written to the null device).
CASES = [("two_pass", {}), ("two_pass", dict(chunk_bytes=1)), ("two_pass", dict(chunk_bytes=1, chunk_streams=1)),
         ("two_pass", dict(mlp_split=512, mlp_row_tiles=3)),
         ("two_pass", dict(nchw_sums="warp")), ("two_pass", dict(mlp="tiled")),
         ("cluster", {}), ("cluster", dict(plan="2,4")), ("cluster", dict(plan="4,1")), ("cluster", dict(plan="1,2")),
         ("cluster", dict(plan="2,1", clusters=1)), ("cluster", dict(plan="1,2", clusters=1, cluster_buffers=1)),
         ("pipelined", {}), ("pipelined", dict(pipeline_blocks=2, tile_bytes=1024)),
         ("pipelined", dict(pipeline_mlp="direct")),
         ("pipelined", dict(pipeline_blocks=2, tile_bytes=1024, pipeline_trace=os.devnull))]
KNOBS = common.CUDA_KNOBS
# (N, C, R, H, W): small, C*H*W a multiple of 8; the first has 144 pixels, so the channels_last
# sums split them over blocks (nhwc_sum_splits); the third has 9 samples (two MLP sample groups of
# 8), C = 264 (two splits of the MLP's products over C) and R = 40 (two column blocks of its
# backward); the last 64 samples, which the weight gradients split in two halves of the batch, and
# C = 96, so that fc1's gradient takes tiles of two row groups (fc2's take eight, and four at R = 40;
# one at C = 264).
SHAPES = [(3, 64, 4, 12, 12), (2, 40, 3, 5, 5), (9, 264, 40, 2, 2), (64, 96, 8, 2, 2)]
# C*H*W odd (37 channels of 7x7), on the two-pass path only (the cluster and pipelined paths refuse
# it): the scale passes' element kernels, and in chunks of one sample, which start off 16-byte
# boundaries, the NCHW sums staging their terms an element at a time (channel_sums_nchw_staged_kernel
# without vector loads). Run after the first shape's cases.
ODD_SHAPE = (3, 37, 2, 7, 7)
ODD_CASES = [("two_pass", {}), ("two_pass", dict(chunk_bytes=1))]


def run_case(device: str, backend: str, shape, dtype, channels_last: bool, residual: bool) -> float:
    """Forward + backward through ``backend``; returns the max abs difference to the eager backend
    run on the CPU in float64 from the same (rounded) inputs. The reference stays off the GPU so
    that the sanitizers check (and spend their time on) the project's kernels only, not the
    reference's cuBLAS and ATen kernels."""
    n, c, r, h, w = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype), channels_last, residual)).encode()))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=fmt)
    params = [torch.randn(r, c, 1, 1, generator=gen) * 0.3, torch.randn(r, generator=gen) * 0.3,
              torch.randn(c, r, 1, 1, generator=gen) * 0.3, torch.randn(c, generator=gen) * 0.3]
    params = [p.to(dtype) for p in params]
    res = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=fmt) if residual else None
    grad = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=fmt)
    results = []
    for be, dev, dt in ((backend, device, dtype), ("eager", "cpu", torch.float64)):
        leaves = [t.detach().to(dev, dt).requires_grad_() for t in [x] + params + ([res] if residual else [])]
        out = se_fused.squeeze_excitation(*leaves[:5], residual=leaves[5] if residual else None, backend=be)
        out.backward(grad.to(dev, dt))
        results.append([t.detach().to("cpu", torch.float64) for t in [out] + [t.grad for t in leaves]])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def case_order(quick: bool):
    """The ``((path, knobs), shape, dtype, (channels_last, residual))`` runs in order: every path once
    per (shape, dtype, form) before the next one, so that a run cut short by --max-seconds has seen
    every path on the first shapes (and the two-pass path on ODD_SHAPE after the first). Quick: bf16
    only, and two of the four (layout, form) pairs, each layout and each form once."""
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    forms = [(False, False), (True, True)] if quick else list(itertools.product((False, True), (False, True)))
    runs = [(case, shape, dtype, form) for shape, dtype, form in itertools.product(SHAPES, dtypes, forms)
            for case in CASES]
    odd = [(case, ODD_SHAPE, dtype, form) for dtype, form in itertools.product(dtypes, forms) for case in ODD_CASES]
    first = len(dtypes) * len(forms) * len(CASES)
    return runs[:first] + odd + runs[first:]


def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one dtype, two of the four layout/form pairs")
    parser.add_argument("--cpu-dry-run", action="store_true", help="rehearse on the CPU backend")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no case after this many seconds of the script's run; exit 3 when a case "
                             "was left out (the sanitizer has checked the cases before it)")
    args = parser.parse_args()
    device, backend = ("cpu", "cpu") if args.cpu_dry_run else ("cuda", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("exercise_kernels: no GPU; use --cpu-dry-run to rehearse", file=sys.stderr)
        return 2
    runs = case_order(args.quick)
    failures = count = 0
    stopped = False
    for index, ((path, knobs), shape, dtype, (cl, residual)) in enumerate(runs):
        if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
            print(f"exercise_kernels: stopped at --max-seconds {args.max_seconds:g} before case {index + 1} "
                  f"of {len(runs)} (shape {shape}); {count} cases ran")
            stopped = True
            break
        common.set_knobs(KNOBS, path=path, **knobs)
        try:
            diff = run_case(device, backend, shape, dtype, cl, residual)
        except RuntimeError as exc:
            if "does not fit this call" in str(exc):
                continue  # this forced geometry is not valid for this shape (e.g. more samples per cluster than N)
            raise
        tol = 0.1 if dtype == torch.bfloat16 else 1e-3
        count += 1
        if not diff <= tol:
            failures += 1
            named = " ".join(f"{key}={value}" for key, value in knobs.items())
            print(f"MISMATCH path={path} {named} shape={shape} {dtype} "
                  f"{'NHWC' if cl else 'NCHW'} residual={residual}: max diff {diff:.3e} > {tol}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"exercise_kernels: {count} cases on {device}, {failures} mismatches, "
          f"{time.monotonic() - started:.0f} s")
    return 1 if failures else (3 if stopped else 0)


if __name__ == "__main__":
    sys.exit(main())
