"""ResNet-50 against SE-ResNet-50: what the SE blocks cost in a whole network (SPEC §5, §6).

Variants (``--variants``; ``se`` of SPEC §6):

* ``none``: :func:`se_fused.models.resnet50`, the baseline,
* ``eager``: ``se_resnet50(se="eager")``, SE in plain PyTorch ops,
* ``fused-cuda``, ``fused-triton``, ``fused-cpu``: ``se_resnet50(se="fused", backend=...)``,
* ``compile-eager``, ``compile-fused``: ``torch.compile`` of the eager model and of
  the fused model (with the fastest fused backend of the device).

Two modes: ``train`` (one training step: zero the gradients, forward, cross
entropy, backward; ``--sgd`` adds an SGD step) and ``inference`` (eval mode,
``torch.inference_mode``, forward only). The variants are timed in turns
(A B C, B C A, ...) and each one's median over the rounds is reported, with the
SE overhead ``t(variant) / t(resnet50) − 1`` and, on a GPU, the peak memory of
one step. The paper's row (190 ms vs 209 ms, +10.0%, 8 Titan X) is printed beside.

GPU defaults: batch 256 at 224², bf16 autocast, channels_last, cudnn.benchmark.
CPU defaults: batch 8 at 224², float32, NCHW, 2 threads; ``--quick``: 2 images at 112².
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import _common as common

import se_fused

VARIANTS = ("none", "eager", "fused-cuda", "fused-triton", "fused-cpu", "compile-eager", "compile-fused")
MODES = ("train", "inference")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--variants", default=None,
                        help=f"comma list of {VARIANTS}; default: those usable on the device "
                             "(no compile variants with --quick on GPU or without --compile on CPU)")
    parser.add_argument("--compile", action="store_true", help="on CPU, add compile-eager and compile-fused")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on GPU; CPU 8 (--quick 2)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (CPU --quick: 112)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="autocast dtype (float32: no autocast); default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--memory-format", default=None, choices=("channels_last", "nchw"),
                        help="default channels_last on GPU, nchw on CPU")
    parser.add_argument("--sgd", action="store_true", help="train mode: add an SGD (momentum 0.9) step")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3; CPU 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default GPU 10, CPU 7; "
                                                                 "--quick 5)")
    parser.add_argument("--iters", type=int, default=None, help="steps per variant per round (GPU 3, --quick 2; "
                                                                "CPU 1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch.set_num_threads")
    parser.add_argument("--glibc-trim", action="store_true",
                        help="CPU: leave glibc malloc at its default, which gives freed memory back to the OS, so "
                             "fresh full-size tensors page-fault on first touch (see _common.keep_freed_cpu_memory)")
    parser.add_argument("--quick", action="store_true", help="small run for the GPU check script / a CPU smoke test")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT_DIR), help="folder for the JSON and PNG")
    parser.add_argument("--json-name", default=None, help="file name of the JSON (the PNG gets the same stem)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def best_fused_backend(device: torch.device) -> Optional[str]:
    """The fastest usable fused backend for ``device`` (what ``compile-fused`` compiles), or ``None``."""
    usable = common.usable_backends()
    for name in (("cuda", "triton") if device.type == "cuda" else ("cpu",)):
        if name in usable:
            return name
    return None


def default_variants(device: torch.device, with_compile: bool) -> List[str]:
    """Variants worth timing on ``device``: baseline, eager, each usable fused backend, the compiled ones."""
    usable = common.usable_backends()
    serving = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    variants = ["none", "eager"] + [f"fused-{b}" for b in serving if b in usable]
    if with_compile:
        variants += ["compile-eager"] + (["compile-fused"] if best_fused_backend(device) else [])
    return variants


def skipped_variants(device: torch.device, variants: List[str]) -> Dict[str, str]:
    """Why each fused backend serving ``device`` is missing from ``variants``."""
    serving = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return {f"fused-{b}": common.backend_states()[b][1] for b in serving if f"fused-{b}" not in variants}


def build_model(variant: str, device: torch.device, memory_format) -> tuple:
    """``(callable model, module, backend)`` for ``variant`` (the callable is compiled for compile-*)."""
    from se_fused import models
    if variant == "none":
        module, backend = models.resnet50(), None
    elif variant in ("eager", "compile-eager"):
        module, backend = models.se_resnet50(se="eager"), "eager"
    elif variant.startswith("fused-"):
        backend = variant[len("fused-"):]
        module = models.se_resnet50(se="fused", backend=backend)
    elif variant == "compile-fused":
        backend = best_fused_backend(device)
        if backend is None:
            raise RuntimeError(f"compile-fused: no fused backend is usable on {device}")
        module = models.se_resnet50(se="fused", backend=backend)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    module = module.to(device=device, memory_format=memory_format)
    model = torch.compile(module) if variant.startswith("compile-") else module
    return model, module, backend


def make_step(mode: str, model, module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              autocast_dtype: Optional[torch.dtype], optimizer) -> Callable[[], None]:
    """One training step (``train``) or one forward (``inference``) of ``model`` on the fixed batch."""
    device_type = images.device.type

    def autocast():
        return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    if mode == "train":
        def step():
            module.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
        return step

    def forward():
        with torch.inference_mode(), autocast():
            model(images)
    return forward


def peak_step_memory_mib(step: Callable[[], None], module: torch.nn.Module, device: torch.device) -> float:
    """GPU memory one step allocates on top of what was allocated before it, at its peak (MiB).

    Activations, gradients and workspaces; the weights themselves are
    excluded (they were allocated before). Gradients are cleared first so the
    previous step's do not count.
    """
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_mode(mode: str, args, device, built: Dict[str, tuple], images, labels, autocast_dtype, errors, bar
             ) -> Dict[str, dict]:
    """Warm up, measure peak memory, then time every working variant in turns; ``errors`` collects failures."""
    steps = {}
    for variant, (model, module, backend) in built.items():
        if variant in errors:
            continue
        bar.set_postfix_str(f"{mode} warm-up {variant}")
        try:
            module.train(mode == "train")
            optimizer = (torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
                         if args.sgd and mode == "train" else None)
            step = make_step(mode, model, module, images, labels, autocast_dtype, optimizer)
            for _ in range(args.warmup):
                step()
            common.synchronize(device)
            steps[variant] = step
        except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the others
            errors[variant] = common.format_error(exc)
            bar.write(f"FAILED {variant} {mode} (warm-up): {errors[variant]}")
        bar.update(1)
        common.free_memory(device)
    results = {v: {} for v in steps}
    if device.type == "cuda":
        for variant in list(steps):
            try:
                results[variant]["peak_mem_mib"] = peak_step_memory_mib(steps[variant], built[variant][1], device)
            except Exception as exc:  # noqa: BLE001
                errors[variant] = common.format_error(exc)
                bar.write(f"FAILED {variant} {mode} (memory): {errors[variant]}")
                del steps[variant], results[variant]
            common.free_memory(device)
    bar.set_postfix_str(f"{mode} timing {len(steps)} variants in turns")
    if steps:
        try:
            timings = common.interleaved_median_ms(steps, device, rounds=args.rounds, number=args.iters,
                                                   threads=args.threads)
            for variant, t in timings.items():
                results[variant].update(t)
        except Exception as exc:  # noqa: BLE001
            for variant in steps:
                errors[variant] = common.format_error(exc)
                results.pop(variant, None)
            bar.write(f"FAILED timing {mode}: {common.format_error(exc)}")
    bar.update(1)
    return results


def overhead_rows(rows: List[dict]) -> None:
    """``overhead_vs_resnet50`` = ms / ms of resnet50 (same mode) − 1; ``None`` without a baseline."""
    base = {r["mode"]: r["ms"] for r in rows if r["se"] == "none" and r.get("ms")}
    for r in rows:
        b = base.get(r["mode"])
        r["overhead_vs_resnet50"] = r["ms"] / b - 1.0 if b and r.get("ms") else None


def print_results(rows: List[dict], header: str) -> None:
    print()
    print(header)
    columns = [("mode", "mode", ""), ("model", "model", ""), ("se", "se", ""), ("backend", "backend", ""),
               ("ms", "ms", ".1f"), ("q25-q75 ms", lambda r: None if r.get("ms") is None
                                     else f"{r['ms_q25']:.1f}-{r['ms_q75']:.1f}", ""),
               ("images/s", "images_per_s", ".1f"), ("SE overhead", "overhead_vs_resnet50", "+.1%"),
               ("peak MiB", "peak_mem_mib", ".0f"), ("error", lambda r: r.get("error"), "")]
    if not any(r.get("error") for r in rows):
        columns = columns[:-1]
    if not any(r.get("peak_mem_mib") is not None for r in rows):
        columns = [c for c in columns if c[0] != "peak MiB"]
    common.print_table(columns, rows)
    paper = common.PAPER_ROW
    print(f"paper ({paper['source']}): resnet50 {paper['resnet50_ms']:.0f} ms, se_resnet50 "
          f"{paper['se_resnet50_ms']:.0f} ms, SE overhead {paper['overhead']:+.1%}")
    print("SE overhead = t(SE-ResNet-50 variant) / t(ResNet-50) - 1, both measured in this run, in turns; "
          "train = one forward+backward" + " (+ SGD step)" * bool(rows and rows[0].get("sgd"))
          + ("; peak MiB = memory one step allocates beyond the weights"
             if any(r.get("peak_mem_mib") is not None for r in rows) else ""))


def plot(rows: List[dict], path: Path, title: str) -> Optional[Path]:
    """Two panels: ms per variant and mode; SE overhead per variant and mode with the paper's +10% line."""
    plt = common.pyplot()
    if plt is None:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    variants = [v for v in VARIANTS if any(r["se"] == v for r in rows)]
    fig, (ax_ms, ax_over) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        ms, over = [], []
        for mode in modes:
            match = [r for r in rows if r["se"] == variant and r["mode"] == mode]
            ms.append((match[0].get("ms") or 0.0) if match else 0.0)
            over.append(100 * (match[0].get("overhead_vs_resnet50") or 0.0) if match else 0.0)
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(modes))]
        ax_ms.bar(xs, ms, width, label="resnet50" if variant == "none" else f"se_resnet50 {variant}")
        if variant != "none":
            ax_over.bar(xs, over, width, label=variant, color=f"C{k}")
    paper = common.PAPER_ROW
    ax_over.axhline(100 * paper["overhead"], color="black", linestyle="--", linewidth=1,
                    label=f"paper: +{100 * paper['overhead']:.1f}% (190 vs 209 ms, 8 Titan X, train)")
    ax_over.axhline(0, color="grey", linewidth=0.5)
    for ax in (ax_ms, ax_over):
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes)
    ax_ms.set_ylabel("ms per step (median)")
    ax_ms.set_title("time per step", fontsize=9)
    ax_over.set_ylabel("SE overhead vs resnet50 (%)")
    ax_over.set_title("t(se_resnet50) / t(resnet50) - 1", fontsize=9)
    ax_ms.legend(fontsize=7)
    ax_over.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    device, gpu = common.run_device(args)
    args.batch = args.batch or (256 if gpu else (2 if args.quick else 8))
    args.image_size = args.image_size or (112 if args.quick and not gpu else 224)
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    autocast_dtype = None if dtype_name == "float32" else common.DTYPES[dtype_name]
    format_name = args.memory_format or ("channels_last" if gpu else "nchw")
    memory_format = common.MEMORY_FORMATS[format_name]
    modes = common.parse_list(args.modes, MODES, "mode")
    with_compile = (gpu and not args.quick) or (not gpu and args.compile)
    variants = (common.parse_list(args.variants, VARIANTS, "variant") if args.variants
                else default_variants(device, with_compile))
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    args.rounds = args.rounds or (5 if args.quick else (10 if gpu else 7))
    args.iters = args.iters or ((2 if args.quick else 3) if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    try:
        import se_fused.models  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"se_fused.models is not importable: {exc}")

    skipped = skipped_variants(device, variants)
    env, json_path, png_path, copy_gbps = common.open_run("network", device, args, "variants", variants, skipped,
                                                          quick_copy=True)

    torch.manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    errors: Dict[str, str] = {}
    built: Dict[str, tuple] = {}
    for variant in variants:
        try:
            torch.manual_seed(args.seed)
            built[variant] = build_model(variant, device, memory_format)
        except Exception as exc:  # noqa: BLE001
            errors[variant] = common.format_error(exc)
            print(f"FAILED building {variant}: {errors[variant]}", file=sys.stderr)

    bar = common.progress(len(modes) * (len(variants) + 1), "bench_network", enabled=not args.no_progress)
    rows: List[dict] = []
    for mode in modes:
        mode_errors = dict(errors)
        results = run_mode(mode, args, device, built, images, labels, autocast_dtype, mode_errors, bar)
        for variant in variants:
            model, module, backend = built.get(variant, (None, None, None))
            row = {"model": "resnet50" if variant == "none" else "se_resnet50", "se": variant, "mode": mode,
                   "batch": args.batch, "dtype": dtype_name, "memory_format": format_name,
                   "image_size": args.image_size, "autocast": autocast_dtype is not None,
                   "backend": backend, "compiled": variant.startswith("compile-"),
                   "sgd": bool(args.sgd and mode == "train"),
                   "params": sum(p.numel() for p in module.parameters()) if module is not None else None}
            if variant in results and results[variant].get("ms"):
                r = results[variant]
                row.update(ms=r["ms"], ms_q25=r["ms_q25"], ms_q75=r["ms_q75"], rounds=r["rounds"],
                           iters_per_round=r["number"], images_per_s=args.batch / (r["ms"] * 1e-3),
                           peak_mem_mib=r.get("peak_mem_mib"))
            else:
                row.update(ms=None, error=mode_errors.get(variant, "not measured"))
            rows.append(row)
    bar.close()
    overhead_rows(rows)

    timing = (f"variants in turns, median of {args.rounds} rounds x {args.iters} steps, "
              + ("CUDA events" if gpu else f"torch.utils.benchmark, {args.threads} threads"))
    header = (f"ResNet-50 vs SE-ResNet-50 on {env['device']} | batch {args.batch} at {args.image_size}x"
              f"{args.image_size} | {'autocast ' + dtype_name if autocast_dtype else dtype_name} | "
              f"{format_name}" + ("" if gpu else f" | {args.threads} threads") + f" | commit {env['commit'][:12]}")
    record = {**env, "load_average_after": common.load_average(), "copy_bandwidth_gbps": copy_gbps,
              "settings": {"batch": args.batch, "image_size": args.image_size, "dtype": dtype_name,
                           "autocast": autocast_dtype is not None, "memory_format": format_name,
                           "modes": modes, "variants": variants, "sgd": args.sgd, "warmup": args.warmup,
                           "rounds": args.rounds, "iters": args.iters, "quick": args.quick,
                           "threads": None if gpu else args.threads, "timing": timing,
                           "cudnn_benchmark": gpu},
              "paper": common.PAPER_ROW, "skipped_variants": skipped, "network": rows}
    print_results(rows, header)
    common.write_json(record, json_path)
    written_png = None if args.no_plot else plot(rows, png_path, header + f"\n{timing}")
    print()
    common.announce_outputs({"json": json_path, "png": written_png})
    failures = [r for r in rows if r.get("error")]
    if failures:
        print(f"{len(failures)} row(s) failed; see the 'error' column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
