"""One SE block, forward and backward, per implementation, against the bandwidth limit (SPEC §3–§6).

Implementations (``--impls``):

* ``cuda``, ``triton``, ``cpu``: :class:`se_fused.FusedSEBlock` with that backend,
* ``eager``: :class:`se_fused.SEBlock`, the SE forward in plain PyTorch ops
  (what timm's ``SEModule`` does), differentiated by autograd,
* ``compile``: ``torch.compile`` of that eager block.

Each is timed per SE-ResNet-50 stage shape (SPEC §3), dtype, memory format,
with and without the residual epilogue ``relu(x·s + residual)``, for three passes:

* ``forward``: one training-mode forward (inputs require grad, so the kernels
  save what their backward needs, as in training);
* ``backward``: the backward alone. The forward is run once per input set
  outside the timing; the timed call is ``torch.autograd.grad(out, [x,
  (residual,) *params], grad_out, retain_graph=True)``, which returns fresh
  gradients (nothing accumulates) and keeps the graph for the next call;
* ``forward+backward``: both, timed together (what a training step pays).

Each row reports ms (median), ``bytes_min`` of SPEC §4, GB/s = bytes_min/time,
that as a fraction of the copy bandwidth measured in the same run, and the
speedup over ``eager`` in the same configuration.

GPU: ``triton.testing.do_bench`` medians (it clears the L2 before each call)
and the input sets rotate, so repeated calls do not find x in the cache.
CPU: ``torch.utils.benchmark``, the implementations of a configuration timed
in turns, round by round, median over rounds; inputs rotate past the
last-level cache too.

Run ``python benchmarks/bench_block.py --help`` for the options; README.md in
this folder explains the output.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

import _common as common

import se_fused

IMPLS = ("cuda", "triton", "cpu", "eager", "compile")
PASSES = ("forward", "backward", "forward+backward")
FUSED_BACKENDS = ("cuda", "triton", "cpu")
SE_REDUCTION = common.SE_REDUCTION


@dataclass
class InputSet:
    """One set of inputs for one call: ``x``, ``residual`` (or None), ``grad_out``, all (N, C, H, W)."""
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    grad_out: torch.Tensor

    def grad_inputs(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """What a training step differentiates for: x, the residual (when given), the block's parameters."""
        return [self.x] + ([self.residual] if self.residual is not None else []) + params


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--impls", default=None,
                        help=f"comma list of {IMPLS}; default: the usable ones for the device "
                             "(GPU: cuda, triton, eager, compile; CPU: cpu, eager)")
    parser.add_argument("--compile", action="store_true",
                        help="on CPU, add 'compile' to the default impls (slow to compile on CPU)")
    parser.add_argument("--shapes", default="all", help="stages: all, or a comma list like conv2_x,conv5_x or 2,5")
    parser.add_argument("--dtype", default=None, help="comma list; default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--memory-format", default=None,
                        help="comma list of channels_last, nchw; default both (--quick: channels_last on GPU, "
                             "nchw on CPU)")
    parser.add_argument("--residual", default="both", choices=("both", "yes", "no"),
                        help="with the residual epilogue relu(x*s + residual), without, or both")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma list of {PASSES}")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch.set_num_threads")
    parser.add_argument("--glibc-trim", action="store_true",
                        help="CPU: leave glibc malloc at its default, which gives freed memory back to the OS, so "
                             "fresh full-size tensors page-fault on first touch (see _common.keep_freed_cpu_memory)")
    parser.add_argument("--rounds", type=int, default=None, help="CPU: interleaved rounds (default 7, --quick 5)")
    parser.add_argument("--min-round-ms", type=float, default=None,
                        help="CPU: calls per round fill at least this long (default 100, --quick 30)")
    parser.add_argument("--warmup-ms", type=float, default=None, help="GPU do_bench warmup (default 25, --quick 10)")
    parser.add_argument("--rep-ms", type=float, default=None, help="GPU do_bench repetition (default 100, --quick 40)")
    parser.add_argument("--rotate-mb", type=float, default=None,
                        help="cycle through input sets covering this many MB (default: twice the last-level cache)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing each impl's output and dx with eager's")
    parser.add_argument("--quick", action="store_true",
                        help="small run: GPU channels_last, no compile; CPU NCHW, fewer rounds")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT_DIR), help="folder for the JSON and PNG")
    parser.add_argument("--json-name", default=None, help="file name of the JSON (the PNG gets the same stem)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def default_impls(device: torch.device, with_compile: bool) -> List[str]:
    """The impls worth timing on ``device``: the usable fused backends serving it, eager, and compile if asked."""
    usable = common.usable_backends()
    serving = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return [b for b in serving if b in usable] + ["eager"] + (["compile"] if with_compile else [])


def skipped_impls(device: torch.device, impls: List[str]) -> Dict[str, str]:
    """Why each fused backend serving ``device`` is not among ``impls`` (printed and recorded)."""
    serving = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return {name: common.backend_states()[name][1] for name in serving if name not in impls}


def make_block(impl: str, channels: int, dtype: torch.dtype, device: torch.device, reference: torch.nn.Module):
    """The module that computes ``impl``, holding ``reference``'s weights (so all impls compute the same)."""
    if impl in FUSED_BACKENDS:
        block = se_fused.FusedSEBlock(channels, SE_REDUCTION, backend=impl)
    elif impl in ("eager", "compile"):
        block = se_fused.SEBlock(channels, SE_REDUCTION)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    block.load_state_dict(reference.state_dict())
    block = block.to(device=device, dtype=dtype)
    if impl == "compile":
        return torch.compile(block, dynamic=False), block
    return block, block


def make_input_sets(shape, dtype, memory_format, residual: bool, device, count: int) -> List[InputSet]:
    """``count`` independent input sets; x and residual require grad (they come out of convolutions in a network)."""
    sets = []
    for _ in range(count):
        def tensor(requires_grad):
            t = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
            return t.requires_grad_(requires_grad)
        sets.append(InputSet(tensor(True), tensor(True) if residual else None, tensor(False)))
    return sets


def pass_callable(pass_name: str, block, params: List[torch.Tensor], sets: List[InputSet]):
    """A no-argument function doing one ``pass_name`` on the next input set (see the module docstring)."""
    order = itertools.cycle(range(len(sets)))
    if pass_name == "forward":
        def run():
            s = sets[next(order)]
            block(s.x, s.residual)
        return run
    if pass_name == "backward":
        # Forward once per set, outside the timing; the graph is kept (retain_graph) for every timed call.
        outs = [block(s.x, s.residual) for s in sets]
        inputs = [s.grad_inputs(params) for s in sets]

        def run():
            i = next(order)
            torch.autograd.grad(outs[i], inputs[i], sets[i].grad_out, retain_graph=True)
        return run
    if pass_name == "forward+backward":
        def run():
            s = sets[next(order)]
            out = block(s.x, s.residual)
            torch.autograd.grad(out, s.grad_inputs(params), s.grad_out)
        return run
    raise ValueError(f"unknown pass {pass_name!r}")


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖₂ / ‖expected‖₂`` in float32 (a sanity check, not a test).

    An L2 ratio, not a max-norm one: in bf16 the residual form's ReLU mask
    flips at a few of ~10⁸ elements where ``x·s + residual`` rounds to the
    other side of 0 in eager's bf16 sum; each flip changes dx by a full
    ``g·s``, which a max-norm ratio reports as a ~70% "difference" (seen on an
    H200) although the kernels agree everywhere else. A real bug moves the L2
    ratio to order 1; rounding leaves it near the dtype's epsilon.
    """
    expected = expected.float()
    scale = torch.linalg.vector_norm(expected).item() or 1.0
    return torch.linalg.vector_norm(actual.float() - expected).item() / scale


def check_against_eager(block, reference, s: InputSet) -> Dict[str, float]:
    """Relative difference of ``block``'s output and dx from the eager block's on one input set."""
    out = block(s.x, s.residual)
    ref_out = reference(s.x, s.residual)
    dx = torch.autograd.grad(out, [s.x], s.grad_out)[0]
    ref_dx = torch.autograd.grad(ref_out, [s.x], s.grad_out)[0]
    return {"forward": relative_difference(out, ref_out), "backward": relative_difference(dx, ref_dx)}


def run_config(args, device, stage, dtype, memory_format, residual, impls, passes, copy_gbps, bar) -> List[dict]:
    """All rows of one (stage, dtype, memory format, residual) configuration."""
    channels, hw = common.STAGES[stage]
    shape = (args.batch, channels, hw, hw)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    tensor_bytes = args.batch * channels * hw * hw * element_bytes
    per_set = tensor_bytes * (3 if residual else 2)
    rotate_bytes = None if args.rotate_mb is None else int(args.rotate_mb * 1e6)
    n_sets = common.rotation_count(per_set, device, rotate_bytes)
    base = {"residual": residual, "shape": list(shape), "dtype": common.dtype_name(dtype),
            "memory_format": common.memory_format_name(memory_format), "stage": stage, "input_sets": n_sets}

    torch.manual_seed(args.seed)
    reference = se_fused.SEBlock(channels, SE_REDUCTION)  # weights shared by every impl
    errors: Dict[str, str] = {}
    blocks = {}
    for impl in impls:
        try:
            blocks[impl] = make_block(impl, channels, dtype, device, reference)
        except Exception as exc:  # noqa: BLE001 - one impl failing must not stop the others
            errors[impl] = common.format_error(exc)
    sets = make_input_sets(shape, dtype, memory_format, residual, device, n_sets)
    eager_reference = reference.to(device=device, dtype=dtype)

    diffs: Dict[str, Dict[str, float]] = {}
    if not args.no_check:
        for impl, (block, module) in blocks.items():
            if impl == "eager":
                continue
            try:
                diffs[impl] = check_against_eager(block, eager_reference, sets[0])
            except Exception as exc:  # noqa: BLE001
                errors[impl] = common.format_error(exc)

    rows = []
    for pass_name in passes:
        bar.set_postfix_str(f"{stage} {base['dtype']} {base['memory_format']} res={residual} {pass_name}")
        fns, pass_errors = {}, dict(errors)
        for impl, (block, module) in blocks.items():
            if impl in pass_errors:
                continue
            try:
                fn = pass_callable(pass_name, block, list(module.parameters()), sets)
                for _ in range(3):  # compile, autotune, allocator warm-up
                    fn()
                common.synchronize(device)
                fns[impl] = fn
            except Exception as exc:  # noqa: BLE001
                pass_errors[impl] = common.format_error(exc)
        timings = {}
        if device.type == "cuda":
            for impl, fn in fns.items():
                try:
                    timings[impl] = common.gpu_median_ms(fn, args.warmup_ms, args.rep_ms)
                except Exception as exc:  # noqa: BLE001
                    pass_errors[impl] = common.format_error(exc)
        elif fns:
            try:
                timings = common.interleaved_median_ms(fns, device, rounds=args.rounds,
                                                       min_round_ms=args.min_round_ms, threads=args.threads)
            except Exception as exc:  # noqa: BLE001
                pass_errors.update({impl: common.format_error(exc) for impl in fns})
        del fns
        common.free_memory(device)

        nbytes = common.bytes_min(pass_name, residual, shape, dtype)
        for impl in impls:
            row = {"pass": pass_name, "impl": impl, **base, "bytes_min": nbytes}
            if impl in timings:
                t = timings[impl]
                gbps = nbytes / (t["ms"] * 1e-3) / 1e9
                row.update(ms=t["ms"], ms_q25=t["ms_q25"], ms_q75=t["ms_q75"], gbps=gbps,
                           fraction_of_copy=gbps / copy_gbps if copy_gbps else None)
                if pass_name in ("forward", "backward") and impl in diffs:
                    row["rel_diff_vs_eager"] = diffs[impl][pass_name]
            else:
                row.update(ms=None, gbps=None, fraction_of_copy=None,
                           error=pass_errors.get(impl, "not measured"))
                bar.write(f"FAILED {impl} {pass_name} {stage} {base['dtype']} {base['memory_format']} "
                          f"residual={residual}: {row['error']}")
            rows.append(row)
        bar.update(1)
    del blocks, sets, eager_reference
    if "compile" in impls:
        torch._dynamo.reset()  # drop this configuration's compiled graphs (and the tensors they hold)
    common.free_memory(device)
    return rows


def add_speedups(rows: List[dict]) -> None:
    """``speedup_vs_eager`` = eager's ms / this row's ms, within the same configuration and pass."""
    def key(r):
        return (r["pass"], r["residual"], tuple(r["shape"]), r["dtype"], r["memory_format"])
    eager = {key(r): r["ms"] for r in rows if r["impl"] == "eager" and r.get("ms")}
    for r in rows:
        base = eager.get(key(r))
        r["speedup_vs_eager"] = base / r["ms"] if base and r.get("ms") else None


def print_results(rows: List[dict], header: str, copy_gbps: float, device: torch.device) -> None:
    print()
    print(header)
    columns = [("stage", "stage", ""), ("shape", lambda r: "x".join(map(str, r["shape"])), ""),
               ("dtype", "dtype", ""), ("format", "memory_format", ""),
               ("residual", lambda r: "yes" if r["residual"] else "no", ""), ("pass", "pass", ""),
               ("impl", "impl", ""), ("ms", "ms", ".3f"), ("bytes_min MB", lambda r: r["bytes_min"] / 1e6, ".1f"),
               ("GB/s", lambda r: common.format_rate(r.get("gbps")), ""), ("of copy", "fraction_of_copy", ".1%"),
               ("vs eager", lambda r: None if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.2f}x",
                ""),
               ("diff vs eager", "rel_diff_vs_eager", ".1e"),
               ("error", lambda r: r.get("error"), "")]
    if not any(r.get("error") for r in rows):
        columns = columns[:-1]
    common.print_table(columns, rows)
    print(f"(copy bandwidth measured in this run: {copy_gbps:.1f} GB/s, read+write; 'of copy' = GB/s / that; "
          f"'vs eager' = eager ms / ms; 'diff vs eager' = ||out - eager||_2 / ||eager||_2 (dx for backward))")
    print_speedup_summary(rows, device)


def print_speedup_summary(rows: List[dict], device: torch.device) -> None:
    """Per configuration: each fused impl's forward / backward / forward+backward speedup over eager.

    For the C++ CPU kernel this is the foundation issue's acceptance check:
    forward+backward at least 2x faster than eager at every stage shape.
    """
    fused = [i for i in IMPLS if i != "eager" and any(r["impl"] == i and r.get("speedup_vs_eager") for r in rows)]
    for impl in fused:
        table = {}
        for r in rows:
            if r["impl"] != impl:
                continue
            key = (r["stage"], r["dtype"], r["memory_format"], r["residual"])
            table.setdefault(key, {"stage": r["stage"], "dtype": r["dtype"], "format": r["memory_format"],
                                   "residual": "yes" if r["residual"] else "no"})
            table[key][r["pass"]] = r
        if not table:
            continue

        def cell(p):
            def get(entry):
                r = entry.get(p)
                if r is None or r.get("ms") is None:
                    return None
                eager_ms = r["ms"] * r["speedup_vs_eager"] if r.get("speedup_vs_eager") else None
                if eager_ms is None:
                    return f"{r['ms']:.3f}"
                return f"{eager_ms:.3f} -> {r['ms']:.3f} ms  {r['speedup_vs_eager']:.2f}x"
            return get

        columns = [("stage", "stage", ""), ("dtype", "dtype", ""), ("format", "format", ""),
                   ("residual", "residual", "")] + [(f"{p}: eager -> {impl}", cell(p), "") for p in PASSES]
        needs_2x = impl == "cpu" and device.type == "cpu"
        if needs_2x:
            columns.append(("fwd+bwd >= 2x", lambda e: None if e.get("forward+backward", {}).get(
                "speedup_vs_eager") is None else ("yes" if e["forward+backward"]["speedup_vs_eager"] >= 2.0
                                                  else "NO"), ""))
        print()
        print(f"{impl} vs eager, measured side by side in this run (speedup = eager ms / {impl} ms):")
        common.print_table(columns, list(table.values()))
        if needs_2x:
            fb = [e["forward+backward"]["speedup_vs_eager"] for e in table.values()
                  if e.get("forward+backward", {}).get("speedup_vs_eager")]
            if fb:
                verdict = "met" if min(fb) >= 2.0 else "NOT met"
                print(f"foundation requirement (cpu forward+backward >= 2x eager at every shape): {verdict}; "
                      f"speedups {min(fb):.2f}x .. {max(fb):.2f}x")


def plot(rows: List[dict], path: Path, title: str, copy_gbps: float) -> Optional[Path]:
    """Grouped bars of GB/s (= bytes_min / time) per shape and impl; one panel per pass and residual form."""
    plt = common.pyplot()
    if plt is None:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return None
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    residuals = [v for v in (False, True) if any(r["residual"] == v for r in rows)]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    multi_dtype = len({r["dtype"] for r in rows}) > 1
    n_groups = len({(r["stage"], r["memory_format"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(passes), len(residuals), squeeze=False,
                             figsize=(max(6.5, 0.9 * n_groups) * len(residuals), 3.6 * len(passes)))
    for i, pass_name in enumerate(passes):
        for j, residual in enumerate(residuals):
            ax = axes[i][j]
            sel = [r for r in rows if r["pass"] == pass_name and r["residual"] == residual]
            groups = list(dict.fromkeys((r["stage"], r["memory_format"], r["dtype"]) for r in sel))
            width = 0.8 / max(1, len(impls))
            for k, impl in enumerate(impls):
                values = []
                for g in groups:
                    match = [r for r in sel if (r["stage"], r["memory_format"], r["dtype"]) == g
                             and r["impl"] == impl]
                    values.append(match[0]["gbps"] or 0.0 if match else 0.0)
                ax.bar([x + (k - (len(impls) - 1) / 2) * width for x in range(len(groups))], values, width,
                       label=impl)
            if copy_gbps:
                ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1,
                           label=f"copy {copy_gbps:.0f} GB/s")
            labels = [f"{s}\n{'NHWC' if f == 'channels_last' else 'NCHW'}" + (f"\n{d}" if multi_dtype else "")
                      for s, f, d in groups]
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("GB/s (bytes_min / time)")
            ax.set_title(f"{pass_name}, {'with' if residual else 'no'} residual", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    device, gpu = common.run_device(args)
    args.batch = args.batch or (256 if gpu else 8)
    dtypes = [common.DTYPES[d] for d in common.parse_list(args.dtype or ("bfloat16" if gpu else "float32"),
                                                           common.DTYPES, "dtype")]
    formats_default = ("channels_last" if gpu else "nchw") if args.quick else "channels_last,nchw"
    formats = [common.MEMORY_FORMATS[f] for f in common.parse_list(args.memory_format or formats_default,
                                                                    common.MEMORY_FORMATS, "memory format")]
    stages = common.parse_stages(args.shapes)
    residuals = {"both": [False, True], "yes": [True], "no": [False]}[args.residual]
    passes = common.parse_list(args.passes, PASSES, "pass")
    # GPU: compile unless --quick (compiling 8 configurations does not fit its budget); CPU: only with --compile.
    with_compile = (gpu and not args.quick) or (not gpu and args.compile)
    impls = common.parse_list(args.impls, IMPLS, "impl") if args.impls else default_impls(device, with_compile)
    args.rounds = args.rounds or (5 if args.quick else 7)
    args.min_round_ms = args.min_round_ms if args.min_round_ms is not None else (30.0 if args.quick else 100.0)
    args.warmup_ms = args.warmup_ms or (10.0 if args.quick else 25.0)
    args.rep_ms = args.rep_ms or (40.0 if args.quick else 100.0)
    if "compile" in impls:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config
        # The timed backward reuses one graph (retain_graph=True); AOTAutograd's donated buffers forbid that.
        functorch_config.donated_buffer = False
        for limit in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, limit):
                setattr(dynamo_config, limit, max(64, getattr(dynamo_config, limit)))

    skipped = skipped_impls(device, impls)
    env, json_path, png_path, copy_gbps = common.open_run("block", device, args, "impls", impls, skipped,
                                                          quick_copy=args.quick)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")

    configs = [(s, d, f, r) for d in dtypes for f in formats for s in stages for r in residuals]
    bar = common.progress(len(configs) * len(passes), "bench_block", enabled=not args.no_progress)
    rows: List[dict] = []
    for stage, dtype, memory_format, residual in configs:
        try:
            rows += run_config(args, device, stage, dtype, memory_format, residual, impls, passes, copy_gbps, bar)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while making the inputs
            message = common.format_error(exc)
            bar.write(f"FAILED configuration {stage} {dtype} residual={residual}: {message}")
            channels, hw = common.STAGES[stage]
            shape = [args.batch, channels, hw, hw]
            for pass_name in passes:
                for impl in impls:
                    rows.append({"pass": pass_name, "impl": impl, "residual": residual, "shape": shape,
                                 "dtype": common.dtype_name(dtype),
                                 "memory_format": common.memory_format_name(memory_format), "stage": stage,
                                 "bytes_min": common.bytes_min(pass_name, residual, shape, dtype),
                                 "ms": None, "gbps": None, "fraction_of_copy": None, "error": message})
                bar.update(1)
            common.free_memory(device)
    bar.close()
    add_speedups(rows)

    timing = ("GPU: triton.testing.do_bench median (L2 cleared before each call), inputs rotated" if gpu else
              f"CPU: torch.utils.benchmark, impls interleaved per round, median of {args.rounds} rounds, "
              f"{args.threads} threads, inputs rotated")
    record = {**env, "load_average_after": common.load_average(), "copy_bandwidth_gbps": copy_gbps,
              "settings": {"batch": args.batch, "dtypes": [common.dtype_name(d) for d in dtypes],
                           "memory_formats": [common.memory_format_name(f) for f in formats],
                           "shapes": stages, "impls": impls, "passes": passes, "quick": args.quick,
                           "threads": args.threads if not gpu else None, "timing": timing,
                           "backward": "autograd.grad with retain_graph on a graph made once per input set",
                           "forward": "training mode (inputs require grad)"},
              "skipped_impls": skipped, "block": rows}
    header = (f"SE block on {env['device']} | batch {args.batch} | dtype "
              f"{', '.join(common.dtype_name(d) for d in dtypes)} | memory format "
              f"{', '.join(common.memory_format_name(f) for f in formats)}"
              + ("" if gpu else f" | {args.threads} threads") + f" | commit {env['commit'][:12]}")
    print_results(rows, header, copy_gbps, device)
    common.write_json(record, json_path)
    written_png = None
    if not args.no_plot:
        written_png = plot(rows, png_path, header + f"\n{timing}", copy_gbps)
    print()
    common.announce_outputs({"json": json_path, "png": written_png})
    failures = [r for r in rows if r.get("error")]
    if failures:
        print(f"{len(failures)} row(s) failed; see the 'error' column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
