"""Merge a bench_block JSON and a bench_network JSON into one SPEC §6 record.

    python benchmarks/make_record.py --block out/block-....json --network out/network-....json \\
        --out benchmarks/results/

writes ``<date>-<gpu>-<short commit>.json`` (``-dirty`` appended to the commit
when the measured tree had uncommitted changes; ``-2``, ``-3`` ... when the name
is taken) with the header fields of SPEC §6 (device, torch, cuda, commit, date,
copy_bandwidth_gbps), the ``block`` and ``network`` rows, and the settings of
both runs. It checks that both files come from the same device and that every
row has the SPEC fields, prints a short Markdown summary (for the README's
results section; ``--markdown PATH`` also writes it), and prints
``wrote record: <path>``. Exit status 1 when a row failed or a field is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import _common as common

HEADER_FIELDS = ("device", "torch", "cuda", "commit", "date", "copy_bandwidth_gbps")
BLOCK_FIELDS = ("pass", "impl", "residual", "shape", "dtype", "memory_format", "ms", "bytes_min", "gbps",
                "fraction_of_copy")
NETWORK_FIELDS = ("model", "se", "mode", "batch", "dtype", "memory_format", "ms", "overhead_vs_resnet50")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", help="JSON written by bench_block.py")
    parser.add_argument("--network", help="JSON written by bench_network.py")
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"),
                        help="folder of the record (default benchmarks/results/)")
    parser.add_argument("--name", default=None, help="file name instead of <date>-<gpu>-<short commit>.json")
    parser.add_argument("--markdown", default=None, help="also write the Markdown summary to this file")
    return parser.parse_args(argv)


def record_problems(record: dict) -> List[str]:
    """What keeps ``record`` from being a SPEC §6 record: missing header fields, rows missing fields, failed rows."""
    problems = [f"missing header field {k!r}" for k in HEADER_FIELDS if k not in record]
    for kind, fields in (("block", BLOCK_FIELDS), ("network", NETWORK_FIELDS)):
        for i, row in enumerate(record.get(kind, [])):
            missing = [f for f in fields if f not in row]
            if missing:
                problems.append(f"{kind}[{i}] lacks {missing}")
            if row.get("error"):
                problems.append(f"{kind}[{i}] ({row.get('impl') or row.get('se')} {row.get('pass') or row.get('mode')})"
                                f" failed: {row['error']}")
    return problems


def short_commit(commit: str) -> str:
    """``"<40 hex>-dirty"`` -> ``"<7 hex>-dirty"``."""
    sha, _, suffix = commit.partition("-")
    return sha[:7] + (f"-{suffix}" if suffix else "")


def record_name(record: dict) -> str:
    """``<date>-<gpu>-<short commit>.json`` (SPEC §6)."""
    return f"{record['date']}-{common.slugify(record['device'])}-{short_commit(record['commit'])}.json"


def free_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/<stem>-2.json`` ... when that file exists (records are never overwritten)."""
    path = folder / name
    k = 2
    while path.exists():
        path = folder / f"{Path(name).stem}-{k}{Path(name).suffix}"
        k += 1
    return path


def merge(block: Optional[dict], network: Optional[dict]) -> dict:
    """One record from the two runs: header from the block run (the copy bandwidth is measured there)."""
    first = block or network
    record = {k: first.get(k) for k in HEADER_FIELDS}
    if block is None and network is not None:
        record["copy_bandwidth_gbps"] = network.get("copy_bandwidth_gbps")
    for key in ("device_detail", "triton", "python", "se_fused", "backends", "time"):
        record[key] = first.get(key)
    record["block"] = block["block"] if block else []
    record["network"] = network["network"] if network else []
    if network is not None:
        record["paper"] = network.get("paper", common.PAPER_ROW)
    record["runs"] = {kind: {k: run.get(k) for k in ("commit", "date", "time", "settings", "copy_bandwidth_gbps",
                                                     "skipped_impls", "skipped_variants", "load_average")}
                      for kind, run in (("block", block), ("network", network)) if run is not None}
    return record


def markdown_summary(record: dict) -> str:
    """A few Markdown tables of the record for the README's results section (measured numbers only)."""
    lines = [f"**{record['device']}**, {record['date']}, commit `{short_commit(record['commit'])}`, "
             f"torch {record['torch']}, copy bandwidth {record['copy_bandwidth_gbps']:.0f} GB/s (read + write)", ""]
    block = [r for r in record["block"] if r.get("ms") is not None and r["pass"] in ("forward", "backward")]
    if block:
        lines += ["| stage | dtype | format | residual | pass | impl | ms | GB/s | of copy | vs eager |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in block:
            speedup = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
            lines.append(f"| {r.get('stage', 'x'.join(map(str, r['shape'])))} | {r['dtype']} | {r['memory_format']} "
                         f"| {'yes' if r['residual'] else 'no'} | {r['pass']} | {r['impl']} | {r['ms']:.3f} "
                         f"| {common.format_rate(r['gbps'])} | {r['fraction_of_copy']:.0%} | {speedup} |")
        lines.append("")
    network = [r for r in record["network"] if r.get("ms") is not None]
    if network:
        lines += ["| mode | model | se | batch | dtype | format | ms | SE overhead |", "|---|---|---|---|---|---|---|---|"]
        for r in network:
            over = f"{r['overhead_vs_resnet50']:+.1%}" if r.get("overhead_vs_resnet50") is not None else "-"
            lines.append(f"| {r['mode']} | {r['model']} | {r['se']} | {r['batch']} | {r['dtype']} "
                         f"| {r['memory_format']} | {r['ms']:.1f} | {over} |")
        paper = record.get("paper", common.PAPER_ROW)
        lines += ["", f"Paper: {paper['resnet50_ms']:.0f} ms vs {paper['se_resnet50_ms']:.0f} ms, "
                      f"{paper['overhead']:+.1%} ({paper['source']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.block and not args.network:
        raise SystemExit("give --block and/or --network")
    block = json.loads(Path(args.block).read_text()) if args.block else None
    network = json.loads(Path(args.network).read_text()) if args.network else None
    if block and network:
        if block["device"] != network["device"]:
            raise SystemExit(f"the runs come from different devices: {block['device']!r} vs {network['device']!r}")
        if block["commit"] != network["commit"]:
            print(f"warning: the runs measured different commits: block {block['commit']}, network "
                  f"{network['commit']}; the record names the block run's", file=sys.stderr)
    record = merge(block, network)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = free_path(out_dir, args.name or record_name(record))
    common.write_json(record, path)
    summary = markdown_summary(record)
    print(summary)
    if args.markdown:
        Path(args.markdown).write_text(summary)
    print(f"wrote record: {path}")
    problems = record_problems(record)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
