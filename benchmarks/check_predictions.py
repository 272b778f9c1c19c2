"""Compare a profile record with the predictions written before a GPU measured the changes.

    python benchmarks/check_predictions.py benchmarks/results/<...>-profile.json
    python benchmarks/check_predictions.py PROFILE [--predictions benchmarks/predictions.json]

``predictions.json`` holds each prediction of docs/cuda-notes.md that a
``profile_block.py`` record can answer: the row (variant label, stage, pass),
the metric (the row's ``device_ms``, ``host_ms`` or ``wall_ms`` (the one to use where kernels
run at once on several streams: ``device_ms`` adds their durations), or ``kernel_us``: the
per-call microseconds of the kernels whose names contain one of the listed
substrings, from the row's top kernels) and the bound (``max``, or
``max_ratio`` times the same metric of another variant's row). Prints one line
per prediction: the bound, what the record measured, and ``hit``, ``MISS``,
``absent`` (the record has no such row: the profile ran without the variant,
e.g. a settled one it profiles only with ``--all-variants``) or ``no data``
(the row failed or says why it was not run, or its top list does not name the
kernels). A miss is a finding to reason about (docs/cuda-notes.md says what
each would mean), not a failed run: the exit status is 0 unless an input is
malformed (2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

DEFAULT_PREDICTIONS = Path(__file__).resolve().parent / "predictions.json"
METRICS = ("device_ms", "host_ms", "wall_ms", "kernel_us")
Row = Dict[str, object]


def load_predictions(path: Path) -> List[dict]:
    """The predictions of ``path``, each checked for the fields :func:`check` reads (ValueError if not)."""
    entries = json.loads(path.read_text())["predictions"]
    ids = set()
    for p in entries:
        missing = {"id", "source", "impl", "stage", "pass", "metric"} - set(p)
        if missing:
            raise ValueError(f"prediction {p.get('id', p)} lacks {sorted(missing)}")
        if p["id"] in ids:
            raise ValueError(f"prediction id {p['id']} appears twice")
        ids.add(p["id"])
        if p["metric"] not in METRICS:
            raise ValueError(f"prediction {p['id']}: metric must be one of {METRICS}, not {p['metric']!r}")
        if p["metric"] == "kernel_us" and not p.get("kernels"):
            raise ValueError(f"prediction {p['id']}: kernel_us needs a list of kernel name substrings")
        if ("max" in p) == ("max_ratio" in p) or ("max_ratio" in p) != ("relative_to" in p):
            raise ValueError(f"prediction {p['id']}: give either max, or max_ratio with relative_to")
    return entries


def metric(row: Row, prediction: dict) -> Optional[float]:
    """The prediction's metric in ``row``; None where the record cannot say (a failed row, none of
    the kernels in its top list, or device time from a profile that recorded no kernel). A missing
    row is :func:`check`'s 'absent'."""
    if row.get("error"):
        return None
    if prediction["metric"] == "device_ms" and not row.get("launches"):
        return None  # 0 ms of kernels would read as a hit
    if prediction["metric"] == "kernel_us":
        listed = [k for k in row.get("top", []) if any(s in k["name"] for s in prediction["kernels"])]
        return sum(k["us_per_call"] for k in listed) if listed else None
    value = row.get(prediction["metric"])
    return None if value is None or math.isnan(value) else float(value)


def check(prediction: dict, rows: Dict[Tuple[str, str, str], Row]) -> Tuple[str, str, str]:
    """``(bound, measured, verdict)`` of one prediction against the record's rows."""
    key = (prediction["impl"], prediction["stage"], prediction["pass"])
    other_key = (prediction.get("relative_to"), prediction["stage"], prediction["pass"])
    unit = "us" if prediction["metric"] == "kernel_us" else "ms"
    bound = (f"<= {prediction['max']:g} {unit}" if "max" in prediction
             else f"<= {prediction['max_ratio']:g} x {prediction['relative_to']}")
    if key not in rows or ("relative_to" in prediction and other_key not in rows):
        return bound, "-", "absent"
    measured = metric(rows[key], prediction)
    if "max" in prediction:
        if measured is None:
            return bound, "-", "no data"
        return bound, f"{measured:.4g} {unit}", "hit" if measured <= prediction["max"] else "MISS"
    other = metric(rows[other_key], prediction)
    if measured is None or other is None or other <= 0:
        return bound, "-", "no data"
    ratio = measured / other
    return bound, f"{ratio:.3f} x ({measured:.4g} / {other:.4g} {unit})", \
        "hit" if ratio <= prediction["max_ratio"] else "MISS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="a profile_block.py record (profile.json)")
    parser.add_argument("--predictions", type=Path, default=DEFAULT_PREDICTIONS)
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.profile.read_text())
        predictions = load_predictions(args.predictions)
        rows = {(r["impl"], r["stage"], r["pass"]): r for r in record["rows"]}
    except (OSError, ValueError, KeyError) as exc:
        print(f"check_predictions: {exc}", file=sys.stderr)
        return 2
    env = record.get("env", {})
    print(f"predictions of {args.predictions.name} against {args.profile.name}: {env.get('device', '?')}, "
          f"commit {env.get('commit', '?')}, batch {record.get('batch')}, {record.get('dtype')}, "
          f"{record.get('memory_format')}")
    results = [(p, *check(p, rows)) for p in predictions]
    width = max(len(p["id"]) for p in predictions)
    for p, bound, measured, verdict in results:
        print(f"  {p['id']:{width}s}  {verdict:7s}  {bound:32s}  measured {measured}")
    counts = {v: sum(1 for r in results if r[3] == v) for v in ("hit", "MISS", "no data", "absent")}
    print("check_predictions: " + ", ".join(f"{n} {v}" for v, n in counts.items())
          + " (the docs/cuda-notes.md sections named in predictions.json say what each miss means)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
