"""Where one SE block's time goes: host launch cost, device kernel time, launches per call.

The block benchmark reports the time a caller waits (``bench_block.py``). At
the small stage shapes that time can be the host's, not the GPU's: the kernels
of conv5_x move 51 MB (about 15 µs at 3.4 TB/s) while a forward through
autograd costs more host time than that. This script splits the two, for each
stage shape, pass and implementation:

* ``wall ms``: the block benchmark's measure (``do_bench`` median, L2 cleared);
* ``host ms``: Python + dispatcher + launch time per call, measured on the host
  while the GPU runs behind (calls enqueued back to back, no synchronisation);
* ``device ms``: the sum of the kernels' durations per call (``torch.profiler``),
  i.e. the GPU-busy time, and ``launches`` per call; the top kernels are listed;
* with ``--python-top N``, for the fused backends (not their variants, not eager):
  the N Python functions with the most own time per call (``cProfile``), which
  says where a host-bound call (the Triton backend's) spends it.

On CUDA the fused backends run as shipped, the CUDA backend's two-pass path in chunks of
12 MiB as a three-stream pipeline (with and without its L2 hints and its scale grid, and on
one stream), the Triton backend on its pipelined path (``SE_FUSED_TRITON_PATH=pipelined``
with one and two programs per SM: read once, the re-read from L2), and with
``--all-variants`` also the CUDA MLP as ATen ops (``SE_FUSED_CUDA_MLP=aten``), in the rows
and columns kernels and in the tiled kernel (``=kernels`` / ``=tiled``; as shipped it takes
one of the two by the shape), the CUDA pipelined path (``SE_FUSED_CUDA_PATH=pipelined``) and
both two-pass paths in L2-sized batch chunks on one stream, so each pair is compared side
by side in one run.
Writes ``profile.json`` (or ``--json-name``) into ``--out``.

    python benchmarks/profile_block.py                 # GPU: batch 256, bf16, channels_last
    python benchmarks/profile_block.py --device cpu --batch 2 --stages conv5_x   # a CPU rehearsal
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import _common as common
import bench_block

import se_fused

try:  # the Triton backend's chunk budget as this process started (SE_FUSED_TRITON_CHUNK_BYTES or None)
    from se_fused.triton._common import CHUNK_BYTES_OVERRIDE as DEFAULT_TRITON_CHUNK_BYTES
except ImportError:
    DEFAULT_TRITON_CHUNK_BYTES = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--memory-format", default="channels_last", choices=["channels_last", "nchw"])
    parser.add_argument("--stages", default="all", help="comma-separated stages (conv2_x..conv5_x) or all")
    parser.add_argument("--passes", default="forward,forward+backward")
    parser.add_argument("--calls", type=int, default=20, help="calls per host-time and profiler measurement")
    parser.add_argument("--top", type=int, default=10,
                        help="kernels listed per row (10: every kernel of the CUDA two-pass forward+backward)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (CPU runs)")
    parser.add_argument("--python-top", type=int, default=0,
                        help="list the N Python functions with the most own time per call (cProfile) for "
                             "the fused backends (default 0: off)")
    parser.add_argument("--all-variants", action="store_true",
                        help="also the variants earlier records settled (GPU: cuda/aten-mlp, cuda/l2-chunks, "
                             "cuda/rows-mlp, cuda/tiled-mlp, cuda/pipelined, triton/l2-chunks)")
    parser.add_argument("--variants", default="",
                        help="comma-separated variant labels to profile, of those the other flags choose "
                             "(default: all of them), e.g. cuda/pipelined with --all-variants")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no variant after this many seconds; the variants left out get rows that say "
                             "so (the JSON is rewritten after each variant, so a run stopped from outside keeps "
                             "the variants it finished)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    parser.add_argument("--json-name", default="profile.json")
    return parser.parse_args(argv)


def variants(device: torch.device, everything: bool = False) -> List[tuple]:
    """(label, impl, settings) for each implementation profiled; settings: see :func:`apply_settings`.

    The paths not yet measured on a GPU (the chunk pipeline's forms, the Triton pipelined path) come
    last: main() profiles variant by variant, and a kernel that traps ends the CUDA context for every
    variant after it. ``everything`` adds the variants whose question earlier records answered (the
    MLP as ATen ops: slower, host-bound; the two-pass path in L2-sized chunks on one stream: each
    chunk's MLP launches cost more than the L2 re-read saves, H100 dd6c3b3; the rows and tiled MLP
    kernels, between which the shipped row chooses by the shape since a482069; the CUDA pipelined
    path, which its trace at 72c11ba showed cannot beat the two-pass path), which a GPU run's time
    budget no longer repeats by default."""
    usable = common.usable_backends()
    if device.type != "cuda":
        return ([("cpu", "cpu", {})] if "cpu" in usable else []) + [("eager", "eager", {})]
    shipped, settled, unmeasured, pipelined = [], [], [], []
    if "cuda" in usable:
        shipped.append(("cuda", "cuda", {}))
        # The MLP's two forms side by side (the shipped row takes one of them by the shape).
        settled += [("cuda/aten-mlp", "cuda", {"mlp": "aten"}),
                    ("cuda/l2-chunks", "cuda", {"cuda_chunk_bytes": "l2", "cuda_chunk_streams": "1"}),
                    ("cuda/rows-mlp", "cuda", {"mlp": "kernels"}), ("cuda/tiled-mlp", "cuda", {"mlp": "tiled"}),
                    ("cuda/pipelined", "cuda", {"cuda_path": "pipelined"})]
        unmeasured += [# The batch in chunks of 12 MiB of re-read input: the three-stream pipeline
                       # (run_chunks, since 2026-11-27) and the same chunks on one stream.
                       ("cuda/chunks-12m", "cuda", {"cuda_chunk_bytes": str(12 << 20)}),
                       ("cuda/chunks-12m-serial", "cuda", {"cuda_chunk_bytes": str(12 << 20),
                                                           "cuda_chunk_streams": "1"}),
                       # The pipeline without the L2 eviction hints that chunked calls carry by default.
                       ("cuda/chunks-12m-no-hints", "cuda", {"cuda_chunk_bytes": str(12 << 20),
                                                             "cuda_cache_hints": "off"}),
                       # ... and with the scale pass's usual grid (32 blocks per SM, not 2).
                       ("cuda/chunks-12m-full-grid", "cuda", {"cuda_chunk_bytes": str(12 << 20),
                                                              "cuda_chunk_scale_blocks": "32"})]
    if "triton" in usable:
        # Triton as shipped: the whole batch in one chunk (one MLP over the batch).
        shipped.append(("triton", "triton", {}))
        settled.append(("triton/l2-chunks", "triton", {"triton_chunk_bytes": "l2"}))
        # One program per SM, and two.
        pipelined += [("triton/pipelined", "triton", {"triton_path": "pipelined"}),
                      ("triton/pipelined-2x", "triton", {"triton_path": "pipelined", "triton_per_sm": 2})]
    return shipped + (settled if everything else []) + [("eager", "eager", {})] + unmeasured + pipelined


# The settings a variant may name, and the environment variable each sets.
SETTINGS = (("mlp", "SE_FUSED_CUDA_MLP"), ("cuda_chunk_bytes", "SE_FUSED_CUDA_CHUNK_BYTES"),
            ("cuda_chunk_streams", "SE_FUSED_CUDA_CHUNK_STREAMS"), ("cuda_cache_hints", "SE_FUSED_CUDA_CACHE_HINTS"),
            ("cuda_chunk_scale_blocks", "SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS"),
            ("cuda_path", "SE_FUSED_CUDA_PATH"), ("triton_path", "SE_FUSED_TRITON_PATH"),
            ("triton_per_sm", "SE_FUSED_TRITON_PIPELINE_PER_SM"))


def apply_settings(settings: Dict[str, object]) -> None:
    """Set what a variant chooses (anything not named goes back to the default):
    ``mlp`` -> ``SE_FUSED_CUDA_MLP``; ``cuda_chunk_bytes`` -> ``SE_FUSED_CUDA_CHUNK_BYTES`` (the CUDA
    two-pass path's batch chunks); ``cuda_chunk_streams`` -> ``SE_FUSED_CUDA_CHUNK_STREAMS`` (3: the
    chunks as a pipeline on three streams, 1: in order on one); ``cuda_cache_hints`` ->
    ``SE_FUSED_CUDA_CACHE_HINTS`` (chunks, all, off: where the two-pass kernels carry L2 eviction
    hints); ``cuda_chunk_scale_blocks`` -> ``SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS`` (the overlapped
    chunks' scale grid, blocks per SM); ``cuda_path`` ->
    ``SE_FUSED_CUDA_PATH``; ``triton_path`` -> ``SE_FUSED_TRITON_PATH``; ``triton_per_sm`` ->
    ``SE_FUSED_TRITON_PIPELINE_PER_SM``;
    ``triton_chunk_bytes`` -> the Triton backend's batch chunk budget
    (``SE_FUSED_TRITON_CHUNK_BYTES``: bytes, or "l2"; unset: the whole batch in one chunk)."""
    for key, name in SETTINGS:
        common.set_env(name, settings.get(key))
    try:
        from se_fused.triton import _common as triton_common
    except ImportError:  # Triton missing: no Triton variant runs
        return
    triton_common.CHUNK_BYTES_OVERRIDE = settings.get("triton_chunk_bytes", DEFAULT_TRITON_CHUNK_BYTES)


def host_ms_per_call(fn, calls: int, device: torch.device) -> float:
    """Host time per call with the GPU left to run behind (no synchronisation inside the loop)."""
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    common.synchronize(device)
    return elapsed * 1e3 / calls


# The variants --python-top profiles: the fused backends as shipped.
PYTHON_PROFILED = ("cuda", "triton", "cpu")


def python_profile(fn, calls: int, device: torch.device, top: int) -> List[Dict[str, object]]:
    """The ``top`` Python functions by own time over ``calls`` calls (cProfile), per call: the host
    side of a call, builtins included (a C++ op shows as its Python entry point)."""
    import cProfile
    import pstats

    common.synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    common.synchronize(device)
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}({name})", "us_per_call": tottime * 1e6 / calls,
             "calls_per_call": ncalls / calls}
            for (file, line, name), (_, ncalls, tottime, _, _) in stats.items()]
    rows.sort(key=lambda r: -r["us_per_call"])
    return rows[:top]


def kernel_label(name: str) -> str:
    """A kernel's name for the table: without ``void`` and the project's namespaces (which made the
    two instantiations of one kernel template indistinguishable once cut), at most 80 characters."""
    return re.sub(r"^void |se_fused::cuda::|\(anonymous namespace\)::", "", name)[:80]


def device_profile(fn, calls: int, device: torch.device, top: int) -> Dict[str, object]:
    """Kernel time and launches per call, and the ``top`` kernels by time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        common.synchronize(device)
    kernels = []
    for evt in prof.key_averages():
        # On a GPU the kernels; on the CPU (a rehearsal) every op's self time.
        if device.type == "cuda" and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total_us = getattr(evt, "self_device_time_total", None) if device.type == "cuda" else evt.self_cpu_time_total
        if total_us is None:  # older torch
            total_us = evt.self_cuda_time_total
        kernels.append({"name": evt.key, "per_call": evt.count / calls, "us_per_call": total_us / calls})
    kernels.sort(key=lambda k: -k["us_per_call"])
    return {"device_ms": sum(k["us_per_call"] for k in kernels) / 1e3,
            "launches": sum(k["per_call"] for k in kernels),
            "top": kernels[:top]}


def profile_variant(label: str, impl: str, channels: int, dtype, device: torch.device, reference, pass_name: str,
                    sets, args) -> Dict[str, object]:
    """Wall, host and device time of one variant's pass (its settings applied), as a row's fields."""
    block, module = bench_block.make_block(impl, channels, dtype, device, reference)
    fn = bench_block.pass_callable(pass_name, block, list(module.parameters()), sets)
    for _ in range(3):
        fn()
    common.synchronize(device)
    host = host_ms_per_call(fn, args.calls, device)
    # On the CPU every call runs on the host: wall time is the host time.
    wall = common.gpu_median_ms(fn, 10, 50)["ms"] if device.type == "cuda" else host
    prof = device_profile(fn, args.calls, device, args.top)
    if args.python_top > 0 and label in PYTHON_PROFILED:
        prof["python_top"] = python_profile(fn, args.calls, device, args.python_top)
    return {"wall_ms": wall, "host_ms": host, **prof}


def report_failure(what: str, exc: Exception, device: torch.device) -> Tuple[str, Optional[str]]:
    """Print that ``what`` (a variant, a stage and a pass, or the stage's inputs) failed with ``exc``.
    Returns the message for its rows and, where the failure left the CUDA context lost (a kernel that
    trapped), why no later row can run (else None)."""
    message = common.failure_message(exc)
    print(f"profile: {what} failed: {message}", file=sys.stderr)
    if common.context_alive(device):
        return message, None
    lost = f"not run: the CUDA context is lost ({what} failed)"
    print(f"profile: {lost}; no later row can run", file=sys.stderr)
    return message, lost


def failed_row(row: dict, message: str) -> dict:
    """``row`` of a variant that did not run or raised: no numbers (NaN in the table, null in the JSON)
    and the ``error``."""
    return {**row, "wall_ms": float("nan"), "host_ms": float("nan"), "device_ms": float("nan"),
            "launches": float("nan"), "top": [], "error": message}


def main(argv=None) -> int:
    args = parse_args(argv)
    device, gpu = common.run_device(args)
    dtype = getattr(torch, args.dtype)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    stages = common.parse_stages(args.stages)
    passes = common.parse_list(args.passes, ("forward", "backward", "forward+backward"), "pass")
    # CPU: the allocator setting of the benchmarks (see _common.keep_freed_cpu_memory), so the
    # profiled calls are the benchmarked ones.
    allocator = "default" if gpu else common.keep_freed_cpu_memory()
    env = common.describe_environment(device)
    env["cpu_allocator"] = allocator
    print(f"SE block profile on {env['device_detail']} | batch {args.batch} | dtype {args.dtype} | "
          f"memory format {args.memory_format} | commit {env['commit'][:12]}")
    rows = []
    started = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {key: os.environ.get(name) for key, name in SETTINGS}
    # Variant by variant (the stages inside), so that a variant that fails (a kernel not yet run on
    # a GPU: the pipelined ones come last) costs its own rows only. A kernel that traps ends the
    # process's CUDA context: after a failed row the profile checks the context, and where it is lost
    # the rows after it say so instead of being run.
    inputs = {}
    profiled = variants(device, args.all_variants)
    if args.variants:
        chosen = common.parse_list(args.variants, [label for label, _, _ in profiled], "variant")
        profiled = [v for v in profiled if v[0] in chosen]
    lost = None  # why no later variant can run: the CUDA context is lost
    bar = common.progress(len(stages) * len(passes) * len(profiled), "profile", enabled=sys.stderr.isatty())
    order = {label: i for i, (label, _, _) in enumerate(profiled)}

    def row_of(label, stage, pass_name):
        channels, hw = common.STAGES[stage]
        return {"stage": stage, "shape": [args.batch, channels, hw, hw], "pass": pass_name, "impl": label}

    def write_rows():
        rows.sort(key=lambda r: (stages.index(r["stage"]), passes.index(r["pass"]), order[r["impl"]]))
        return common.write_json({"kind": "profile", "env": env, "batch": args.batch, "dtype": args.dtype,
                                  "memory_format": args.memory_format, "rows": rows}, out_dir / args.json_name)

    try:
        for label, impl, settings in profiled:
            why = lost or (f"not run: --max-seconds {args.max_seconds:g}" if args.max_seconds is not None
                           and time.monotonic() - started > args.max_seconds else None)
            if why:
                print(f"profile: {label} {why}", file=sys.stderr)
                rows.extend(failed_row(row_of(label, stage, pass_name), why) for stage in stages for pass_name in passes)
                bar.update(len(stages) * len(passes))
                continue
            apply_settings(settings)
            for stage in stages:
                channels, hw = common.STAGES[stage]
                shape = (args.batch, channels, hw, hw)
                if not lost and stage not in inputs:  # a lost context: the passes below say so
                    try:
                        inputs[stage] = bench_block.make_input_sets(shape, dtype, memory_format, False, device, 2)
                    except Exception as exc:  # out of memory, or a context that a trap ended
                        message, lost = report_failure(f"{label} {stage} inputs", exc, device)
                        rows.extend(failed_row(row_of(label, stage, pass_name), message) for pass_name in passes)
                        bar.update(len(passes))
                        continue
                for pass_name in passes:
                    bar.update()
                    if lost:
                        rows.append(failed_row(row_of(label, stage, pass_name), lost))
                        continue
                    torch.manual_seed(0)
                    reference = se_fused.SEBlock(channels, common.SE_REDUCTION)
                    row = row_of(label, stage, pass_name)
                    try:
                        row.update(profile_variant(label, impl, channels, dtype, device, reference, pass_name,
                                                   inputs[stage], args))
                    # Exception, not only RuntimeError: a Triton kernel that does not compile raises a
                    # TritonError (an Exception); it must cost its own row, not the profile's table.
                    except Exception as exc:
                        message, lost = report_failure(f"{label} {stage} {pass_name}", exc, device)
                        row = failed_row(row, message)
                    rows.append(row)
            write_rows()
    finally:
        bar.close()
        apply_settings(saved)
    path = write_rows()

    what = "device ms" if gpu else "op self-CPU ms"
    columns = [("stage", "stage", None), ("pass", "pass", None), ("impl", "impl", None),
               ("wall ms", "wall_ms", ".3f"), ("host ms", "host_ms", ".3f"), (what, "device_ms", ".3f"),
               ("launches", "launches", ".0f")]
    print()
    common.print_table(columns, rows)
    print("\ntop kernels (µs per call):" if gpu else "\ntop ops (self-CPU µs per call):")
    for r in rows:
        tops = "; ".join(f"{kernel_label(k['name'])} {k['us_per_call']:.1f}" for k in r["top"])
        print(f"  {r['stage']} {r['pass']} {r['impl']}: {tops}")
    python_rows = [r for r in rows if "python_top" in r]
    if python_rows:
        print("\ntop Python functions by own time (cProfile, µs per call; calls per call):")
        for r in python_rows:
            tops = "; ".join(f"{f['function']} {f['us_per_call']:.1f} ({f['calls_per_call']:.0f})"
                             for f in r["python_top"])
            print(f"  {r['stage']} {r['pass']} {r['impl']} (host {r['host_ms']:.3f} ms): {tops}")
    print(f"wrote json: {path}")
    failed = sum(1 for r in rows if r.get("error") and not r["error"].startswith("not run"))
    if failed:
        print(f"profile: {failed} rows failed (their errors above and in the JSON)")
    # Exit status 1 where the CUDA context was lost (every row after the trap is empty), so that the
    # trap shows in gpu_check's summary; a row that fails alone (a launch that does not fit, as
    # triton/pipelined-2x's cooperative grid at H100 72c11ba) is a finding in the table, status 0.
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
