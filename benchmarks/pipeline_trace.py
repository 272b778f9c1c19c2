"""Where the CUDA pipelined path's time goes: its per-step trace, summarised.

The pipelined kernels (csrc/cuda/pipelined.cu) record, with
``SE_FUSED_CUDA_PIPELINE_TRACE=<file>``, thread 0's global timer per CTA and step: at the
step's start, after its tile's reduction and arrival, after the group MLP it ran (if it
completed a group), after the ready flag it waited for, and after its scaling. This script

* ``run``: on a GPU, traces one forward (and one backward) of the pipelined path at the
  SE-ResNet-50 stage shapes (batch 256, bf16, channels_last by default) into ``--out``, then
  summarises each trace;
* ``summarize FILE...``: summarises traces already written.

The summary gives, per phase (reduce, MLP, wait, scale), how many there were, their median,
90th percentile and maximum in µs, and the share of all CTAs' time; then per step the
median start, the MLPs run and the longest wait; and how late the CTAs that ran an MLP
started their next step against the others. At a482069 (H100) the pipelined forward took
2.6-42x the two-pass forward's time, growing with the stage (docs/cuda-notes.md, "The H100
session of 2026-11-27"): this says which phase holds the steps up.

    python benchmarks/pipeline_trace.py run --out benchmarks/out/trace
    python benchmarks/pipeline_trace.py summarize benchmarks/out/trace/*.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

POINTS = ("start", "reduced", "finished", "ready", "scaled")


@dataclass
class Trace:
    """One traced launch: the plan line and, per CTA, its steps' timer values (ns; 0: no such point)."""
    plan: str
    rows: List[Dict[str, int]] = field(default_factory=list)


def read_trace(path: Path) -> Trace:
    """Parse a file written by the kernels' trace (csrc/cuda/squeeze_excitation_cuda.cu, write_pipeline_trace)."""
    with open(path, newline="", encoding="utf-8") as f:
        plan = f.readline().lstrip("# ").strip()
        rows = [{key: int(value) for key, value in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path}: no steps in the trace")
    return Trace(plan, rows)


@dataclass
class Phases:
    """Each phase's durations in µs."""
    reduce: List[float] = field(default_factory=list)
    mlp: List[float] = field(default_factory=list)
    wait: List[float] = field(default_factory=list)
    scale: List[float] = field(default_factory=list)


def wait_start(row: Dict[str, int]) -> int:
    """Where a step's wait for a ready flag begins: its last point before it (finished, else reduced,
    else start)."""
    return row["finished"] or row["reduced"] or row["start"]


def phases(trace: Trace) -> Phases:
    """A step's phases: reduce = reduced - start; MLP = finished - reduced; wait = ready - the
    step's previous point (finished, else reduced, else start); scale = scaled - ready."""
    out = Phases()
    for row in trace.rows:
        if row["reduced"]:
            out.reduce.append((row["reduced"] - row["start"]) / 1e3)
        if row["finished"]:
            out.mlp.append((row["finished"] - row["reduced"]) / 1e3)
        if row["ready"]:
            out.wait.append((row["ready"] - wait_start(row)) / 1e3)
            out.scale.append((row["scaled"] - row["ready"]) / 1e3)
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def span_us(trace: Trace) -> float:
    """First start to last point, in µs."""
    first = min(row["start"] for row in trace.rows)
    last = max(max(row[p] for p in POINTS) for row in trace.rows)
    return (last - first) / 1e3


def summarize(trace: Trace, step_rows: int = 12) -> str:
    """The summary described in the module docstring, as text."""
    lines = [trace.plan]
    span = span_us(trace)
    ctas = len({row["cta"] for row in trace.rows})
    lines.append(f"span {span:.1f} us over {ctas} CTAs ({ctas * span / 1e3:.1f} CTA-ms)")
    lines.append(f"{'phase':<8}{'count':>7}{'median us':>11}{'p90 us':>9}{'max us':>9}{'share':>8}")
    for name, values in vars(phases(trace)).items():
        if not values:
            lines.append(f"{name:<8}{0:>7}")
            continue
        share = sum(values) / (ctas * span) if span > 0 else 0.0
        lines.append(f"{name:<8}{len(values):>7}{statistics.median(values):>11.2f}{_percentile(values, 0.9):>9.2f}"
                     f"{max(values):>9.2f}{share:>8.1%}")
    first = min(row["start"] for row in trace.rows)
    by_step = rows_by_step(trace)
    steps = sorted(by_step)
    lines.append(f"{'step':>5}{'start us':>10}{'MLPs':>6}{'longest wait us':>17}")
    shown = steps if len(steps) <= step_rows else steps[:step_rows // 2] + steps[-(step_rows // 2):]
    for i, step in enumerate(shown):
        if i == step_rows // 2 and len(steps) > step_rows:
            lines.append(f"{'...':>5}")
        rows = by_step[step]
        start = statistics.median((row["start"] - first) / 1e3 for row in rows)
        mlps = sum(1 for row in rows if row["finished"])
        waits = [(row["ready"] - wait_start(row)) / 1e3 for row in rows if row["ready"]]
        lines.append(f"{step:>5}{start:>10.1f}{mlps:>6}{max(waits) if waits else 0.0:>17.2f}")
    late = finisher_lateness(trace, by_step)
    if late:
        lines.append(f"CTAs that ran an MLP began their next step {statistics.median(late):.1f} us (median; max "
                     f"{max(late):.1f}) after that step's median start")
    return "\n".join(lines)


def rows_by_step(trace: Trace) -> Dict[int, List[Dict[str, int]]]:
    """The trace's rows grouped by step."""
    by_step: Dict[int, List[Dict[str, int]]] = {}
    for row in trace.rows:
        by_step.setdefault(row["step"], []).append(row)
    return by_step


def finisher_lateness(trace: Trace, by_step: Optional[Dict[int, List[Dict[str, int]]]] = None) -> List[float]:
    """For each MLP run at step k by a CTA: its step k + 1's start less the median start of step k + 1, µs.
    ``by_step``: :func:`rows_by_step` of the trace, where the caller has it."""
    if by_step is None:
        by_step = rows_by_step(trace)
    starts = {(row["cta"], row["step"]): row["start"] for row in trace.rows}
    medians = {step: statistics.median(row["start"] for row in rows) for step, rows in by_step.items()}
    late = []
    for row in trace.rows:
        following = (row["cta"], row["step"] + 1)
        if row["finished"] and following in starts:
            late.append((starts[following] - medians[row["step"] + 1]) / 1e3)
    return late


def run(args) -> int:
    """Trace one forward and one backward per stage on the GPU; write the files and print their summaries."""
    import torch
    import se_fused

    if not torch.cuda.is_available():
        print("pipeline_trace: no GPU here; the trace needs the CUDA pipelined kernels", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = common.DTYPES[args.dtype]
    memory_format = common.MEMORY_FORMATS[args.memory_format]
    common.set_env("SE_FUSED_CUDA_PATH", "pipelined")
    written = []
    for stage in common.parse_stages(args.stages):
        c, hw = common.STAGES[stage]
        r = c // common.SE_REDUCTION
        x = torch.randn(args.batch, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
        weights = [torch.randn(r, c, device="cuda", dtype=dtype) * c ** -0.5, torch.zeros(r, device="cuda", dtype=dtype),
                   torch.randn(c, r, device="cuda", dtype=dtype) * r ** -0.5, torch.zeros(c, device="cuda", dtype=dtype)]
        x.requires_grad_(True)
        for traced_pass in ("forward", "backward"):
            path = out / f"trace-{stage}-{traced_pass}.csv"
            for traced in (False, True):  # the first call plans and warms up; the second is traced
                common.set_env("SE_FUSED_CUDA_PIPELINE_TRACE", str(path) if traced and traced_pass == "forward" else None)
                y = se_fused.squeeze_excitation(x, *weights, backend="cuda")
                common.set_env("SE_FUSED_CUDA_PIPELINE_TRACE", str(path) if traced and traced_pass == "backward" else None)
                y.backward(torch.ones_like(y))
                common.set_env("SE_FUSED_CUDA_PIPELINE_TRACE", None)
                torch.cuda.synchronize()
                x.grad = None
            written.append(path)
    common.set_env("SE_FUSED_CUDA_PATH", None)
    for path in written:
        print(f"--- {path.name}")
        print(summarize(read_trace(path)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="trace the pipelined path on the GPU and summarise")
    run_parser.add_argument("--stages", default="conv2_x,conv5_x")
    run_parser.add_argument("--batch", type=int, default=256)
    run_parser.add_argument("--dtype", default="bfloat16", choices=sorted(common.DTYPES))
    run_parser.add_argument("--memory-format", default="channels_last", choices=sorted(common.MEMORY_FORMATS))
    run_parser.add_argument("--out", default=str(common.DEFAULT_OUT_DIR / "trace"))
    summary_parser = sub.add_parser("summarize", help="summarise trace files")
    summary_parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    for name in args.files:
        print(f"--- {name}")
        print(summarize(read_trace(Path(name))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
