"""Smoke tests of the benchmarks (issue 6): they run on CPU in --quick mode and write sound records.

The benchmarks run as a user runs them (a subprocess, into a temporary
folder); the assertions are on the JSON they write, never on timings: every
expected row is there, the SPEC §6 fields are present, the byte counts are
SPEC §4's (recomputed here from the table, not from the benchmark's code),
the derived numbers (GB/s, fraction of copy, speedup, SE overhead) agree
with the measured ms, the fused CPU kernel agrees with eager, and the models
have the parameter counts of SPEC §2.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import se_fused

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"

# SPEC §3 stage shapes and SPEC §4 minimum traffic in units of T, written out here independently.
STAGE_SHAPES = {"conv2_x": (256, 56, 56), "conv3_x": (512, 28, 28), "conv4_x": (1024, 14, 14),
                "conv5_x": (2048, 7, 7)}
TRAFFIC_T = {("forward", False): 2, ("forward", True): 3, ("backward", False): 3, ("backward", True): 5,
             ("forward+backward", False): 5, ("forward+backward", True): 8}
SPEC_BLOCK_FIELDS = {"pass", "impl", "residual", "shape", "dtype", "memory_format", "ms", "bytes_min", "gbps",
                     "fraction_of_copy"}
SPEC_NETWORK_FIELDS = {"model", "se", "mode", "batch", "dtype", "memory_format", "ms", "overhead_vs_resnet50"}
RESNET50_PARAMS, SE_RESNET50_PARAMS = 25_557_032, 28_088_024  # SPEC §2

needs_cpu_kernel = pytest.mark.skipif("cpu" not in se_fused.available_backends(),
                                      reason="the C++ CPU kernel (se_fused._C) is not built")


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` on the CPU with ``args``; the progress bar is off."""
    cmd = [sys.executable, str(BENCH / script), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})


def written(stdout: str, kind: str) -> Path:
    """The path a benchmark announced with ``wrote <kind>: <path>``."""
    match = re.search(rf"^wrote {kind}: (.+)$", stdout, flags=re.MULTILINE)
    assert match, f"no 'wrote {kind}:' line in the output:\n{stdout[-3000:]}"
    return Path(match.group(1).strip())


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def check_header(record: dict) -> None:
    assert record["device"] == "cpu"
    assert record["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", record["commit"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"])
    assert record["copy_bandwidth_gbps"] > 0


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("block")
    proc = run_script("bench_block.py", "--quick", "--device", "cpu", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(written(proc.stdout, "json").read_text())


@pytest.fixture(scope="module")
def network_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("network")
    proc = run_script("bench_network.py", "--quick", "--device", "cpu", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(written(proc.stdout, "json").read_text())


@needs_cpu_kernel
def test_block_quick_rows(block_run):
    proc, record = block_run
    check_header(record)
    rows = record["block"]
    batch = record["settings"]["batch"]
    # --quick on CPU: every stage, NCHW, float32, with and without residual, cpu and eager, three passes.
    expected = {(stage, residual, p, impl) for stage in STAGE_SHAPES for residual in (False, True)
                for p in ("forward", "backward", "forward+backward") for impl in ("cpu", "eager")}
    got = [(r["stage"], r["residual"], r["pass"], r["impl"]) for r in rows]
    assert sorted(got) == sorted(expected)
    for r in rows:
        assert SPEC_BLOCK_FIELDS <= set(r), r
        assert "error" not in r, r
        c, h, w = STAGE_SHAPES[r["stage"]]
        assert r["shape"] == [batch, c, h, w]
        assert r["dtype"] == "float32" and r["memory_format"] == "nchw"
        assert r["bytes_min"] == TRAFFIC_T[(r["pass"], r["residual"])] * batch * c * h * w * 4
        assert r["ms"] > 0 and r["ms_q25"] <= r["ms"] <= r["ms_q75"]
        assert close(r["gbps"], r["bytes_min"] / (r["ms"] * 1e-3) / 1e9)
        assert close(r["fraction_of_copy"], r["gbps"] / record["copy_bandwidth_gbps"])


@needs_cpu_kernel
def test_block_quick_speedups_and_agreement(block_run):
    proc, record = block_run
    rows = record["block"]
    eager = {(r["stage"], r["residual"], r["pass"]): r["ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        expected = eager[(r["stage"], r["residual"], r["pass"])] / r["ms"]
        assert close(r["speedup_vs_eager"], expected)
        if r["impl"] == "cpu" and r["pass"] in ("forward", "backward"):
            # float32 kernel vs float32 eager: different summation order only.
            assert 0 <= r["rel_diff_vs_eager"] < 1e-5, r
    # The cpu-vs-eager summary the foundation issue asks for is printed.
    assert "cpu vs eager, measured side by side in this run" in proc.stdout
    assert re.search(r"foundation requirement .*: (met|NOT met)", proc.stdout)
    png = written(proc.stdout, "png")
    assert png.exists() and png.stat().st_size > 1000


@needs_cpu_kernel
def test_network_quick_rows(network_run):
    proc, record = network_run
    check_header(record)
    rows = record["network"]
    assert {(r["se"], r["mode"]) for r in rows} == {(v, m) for v in ("none", "eager", "fused-cpu")
                                                   for m in ("train", "inference")}
    assert len(rows) == 6
    base = {r["mode"]: r["ms"] for r in rows if r["se"] == "none"}
    for r in rows:
        assert SPEC_NETWORK_FIELDS <= set(r), r
        assert "error" not in r, r
        assert r["batch"] == 2 and r["image_size"] == 112  # what --quick on CPU states
        assert r["dtype"] == "float32" and r["memory_format"] == "nchw"
        assert r["ms"] > 0
        assert close(r["overhead_vs_resnet50"], r["ms"] / base[r["mode"]] - 1)
        assert r["model"] == ("resnet50" if r["se"] == "none" else "se_resnet50")
        assert r["params"] == (RESNET50_PARAMS if r["se"] == "none" else SE_RESNET50_PARAMS)
    assert record["paper"]["resnet50_ms"] == 190 and record["paper"]["se_resnet50_ms"] == 209
    assert "paper (" in proc.stdout and "+10.0%" in proc.stdout
    assert written(proc.stdout, "png").exists()


@needs_cpu_kernel
def test_make_record_merges_both_runs(block_run, network_run, tmp_path):
    block_json = written(block_run[0].stdout, "json")
    network_json = written(network_run[0].stdout, "json")
    proc = run_script("make_record.py", "--block", str(block_json), "--network", str(network_json),
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = written(proc.stdout, "record")
    assert path.parent == tmp_path
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-[0-9a-f]{7}(-dirty)?\.json", path.name)
    record = json.loads(path.read_text())
    check_header(record)
    assert record["block"] == block_run[1]["block"]
    assert record["network"] == network_run[1]["network"]
    # A second merge of the same runs gets a new name instead of overwriting.
    again = run_script("make_record.py", "--block", str(block_json), "--network", str(network_json),
                       "--out", str(tmp_path))
    assert written(again.stdout, "record") != path and path.exists()


def test_failing_impl_is_recorded_and_fails_the_run(tmp_path):
    """An impl that cannot run (CUDA on a CPU machine) gets error rows, the others still run, exit status 1."""
    proc = run_script("bench_block.py", "--device", "cpu", "--impls", "eager,cuda", "--shapes", "conv5_x",
                      "--residual", "no", "--passes", "forward", "--rounds", "2", "--min-round-ms", "1",
                      "--no-progress", "--no-plot", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(written(proc.stdout, "json").read_text())["block"]}
    assert rows["eager"]["ms"] > 0 and "error" not in rows["eager"]
    assert rows["cuda"]["ms"] is None and "cuda" in rows["cuda"]["error"]
    assert "FAILED cuda forward" in proc.stderr


def test_bytes_min_matches_spec_example():
    """SPEC §6's example row: forward of 256x256x56x56 bfloat16 moves 822,083,584 bytes at least."""
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    assert _common.bytes_min("forward", False, (256, 256, 56, 56), torch.bfloat16) == 822_083_584
    assert _common.bytes_min("backward", True, (2, 3, 4, 5), torch.float32) == 5 * 2 * 3 * 4 * 5 * 4
    assert _common.slugify("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"


@needs_cpu_kernel
def test_profile_rows(tmp_path):
    """profile_block.py on the CPU: a row per (stage, pass, impl) with wall, host and profiled times."""
    proc = run_script("profile_block.py", "--device", "cpu", "--batch", "2", "--stages", "conv5_x", "--calls", "3",
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(written(proc.stdout, "json").read_text())
    assert record["batch"] == 2 and record["dtype"] == "bfloat16" and record["memory_format"] == "channels_last"
    rows = {(r["pass"], r["impl"]): r for r in record["rows"]}
    assert set(rows) == {(p, i) for p in ("forward", "forward+backward") for i in ("cpu", "eager")}
    for row in rows.values():
        assert row["shape"] == [2, 2048, 7, 7]
        assert row["wall_ms"] > 0 and row["host_ms"] > 0 and row["device_ms"] > 0 and row["launches"] >= 1
        assert row["top"] and all(k["us_per_call"] >= 0 for k in row["top"])
    # The fused forward is one op, named as registered.
    assert any("se_fused::squeeze_excitation_forward" in k["name"] for k in rows[("forward", "cpu")]["top"])


@needs_cpu_kernel
def test_profile_max_seconds_and_rows_written_per_variant(tmp_path, monkeypatch):
    """--max-seconds: a variant that would start after it gets rows that say so, with no times; the JSON
    is rewritten after each variant (so a run stopped from outside keeps the finished variants)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_block

    measured = profile_block.profile_variant
    writes = []

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return measured(*args, **kwargs)

    def counted(data, path):
        writes.append([r["impl"] for r in data["rows"]])
        return written_json(data, path)

    written_json = profile_block.common.write_json
    monkeypatch.setattr(profile_block, "profile_variant", slow)
    monkeypatch.setattr(profile_block.common, "write_json", counted)
    assert profile_block.main(["--device", "cpu", "--batch", "2", "--stages", "conv5_x", "--calls", "2",
                               "--passes", "forward", "--max-seconds", "0.1", "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "profile.json").read_text())["rows"]}
    assert rows["cpu"]["device_ms"] > 0 and "error" not in rows["cpu"]
    assert rows["eager"]["error"] == "not run: --max-seconds 0.1" and rows["eager"]["device_ms"] is None
    assert writes[0] == ["cpu"] and writes[-1] == ["cpu", "eager"], writes


@needs_cpu_kernel
def test_profile_keeps_the_other_rows_when_a_variant_fails(tmp_path, monkeypatch, capsys):
    """A variant that raises (on a GPU: a kernel not yet run there, or a context a trap ended) gets a
    row with its error and no times; the other variants' rows are still measured and written."""
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_block

    measured = profile_block.profile_variant

    def failing_eager(label, *args, **kwargs):
        if label == "eager":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return measured(label, *args, **kwargs)

    monkeypatch.setattr(profile_block, "profile_variant", failing_eager)
    assert profile_block.main(["--device", "cpu", "--batch", "2", "--stages", "conv5_x", "--calls", "2",
                               "--passes", "forward", "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "profile.json").read_text())["rows"]}
    assert set(rows) == {"cpu", "eager"}
    assert rows["cpu"]["device_ms"] > 0 and "error" not in rows["cpu"]
    assert rows["eager"]["error"] == "CUDA error: an illegal memory access was encountered"
    assert rows["eager"]["device_ms"] is None  # NaN in the table, null in the JSON
    assert "eager conv5_x forward failed" in capsys.readouterr().err


@needs_cpu_kernel
def test_profile_stops_after_a_lost_context(tmp_path, monkeypatch):
    """Where a failed row leaves the CUDA context lost (a kernel that trapped), the rows after it are not
    run but say why, the JSON is still written, and the exit status is 1 (gpu_check's summary shows the
    step failed, not 'ok' over a table of errors). Rehearsed on the CPU with the context check faked."""
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_block

    calls = []

    def trapping(label, *args, **kwargs):
        calls.append(label)
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(profile_block, "profile_variant", trapping)
    monkeypatch.setattr(profile_block.common, "context_alive", lambda device=None: False)
    assert profile_block.main(["--device", "cpu", "--batch", "2", "--stages", "conv5_x", "--calls", "2",
                               "--out", str(tmp_path)]) == 1
    rows = {(r["impl"], r["pass"]): r for r in json.loads((tmp_path / "profile.json").read_text())["rows"]}
    assert calls == ["cpu"]  # nothing ran after the first failure
    assert rows[("cpu", "forward")]["error"] == "CUDA error: unspecified launch failure"
    lost = "not run: the CUDA context is lost (cpu conv5_x forward failed)"
    assert rows[("cpu", "forward+backward")]["error"] == lost and rows[("eager", "forward")]["error"] == lost


@needs_cpu_kernel
def test_profile_variants_flag_selects_rows(tmp_path):
    """--variants profiles only the labels named (gpu_check's ncu step: cuda/pipelined alone), and an
    unknown label is refused with the choices."""
    proc = run_script("profile_block.py", "--device", "cpu", "--batch", "2", "--stages", "conv5_x", "--calls", "2",
                      "--passes", "forward", "--variants", "eager", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(written(proc.stdout, "json").read_text())
    assert [r["impl"] for r in record["rows"]] == ["eager"]
    proc = run_script("profile_block.py", "--device", "cpu", "--variants", "cuda/nonesuch", "--out", str(tmp_path))
    assert proc.returncode != 0 and "unknown variant" in proc.stderr


def test_gpu_check_script_parses():
    """benchmarks/gpu_check.sh, which only a GPU machine runs in full, is valid bash (its
    rehearsal, ``--dry-run``, takes minutes and is run by hand before a GPU session)."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_check_only_selects_steps():
    """GPU_CHECK_ONLY (gpu_check.sh's ``selected``) lets the named steps and the setup steps run, and no
    other; unset, every step but the ON_REQUEST ones."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    selected = re.search(r"^selected\(\) \{\n.*?^\}\n", script, re.S | re.M).group(0)
    checks = {"racecheck": 0, "build": 0, "usable": 0, "tests": 1, "race": 1, "bench-nchw": 0}
    for step, expected in checks.items():
        result = subprocess.run(["bash", "-c", selected + f'selected {step}'], capture_output=True, text=True,
                                env={**os.environ, "GPU_CHECK_ONLY": "memcheck racecheck bench-nchw"})
        assert result.returncode == expected, (step, result.stderr)
    unset = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_ONLY", "GPU_CHECK_SKIP")}
    assert subprocess.run(["bash", "-c", selected + "selected tests"], env=unset).returncode == 0
    # The ON_REQUEST steps run only when GPU_CHECK_ONLY names them.
    on_request = re.search(r"^ON_REQUEST=.*\n", script, re.M).group(0)
    assert " trace-pipelined " in on_request
    for env, step, expected in (({}, "trace-pipelined", 1), ({}, "tune", 0),
                                (dict(GPU_CHECK_ONLY="trace-pipelined"), "trace-pipelined", 0)):
        result = subprocess.run(["bash", "-c", on_request + selected + f"selected {step}"], env={**unset, **env})
        assert result.returncode == expected, (env, step)
    # chosen_out: a step the caller left out (the record is then skipped without failing the run).
    chosen_out = re.search(r"^chosen_out\(\) \{.*?\}\n", script, re.S | re.M).group(0)
    for env, step, expected in ((dict(GPU_CHECK_SKIP="bench-net record"), "bench-net", 0),
                                (dict(GPU_CHECK_SKIP="bench-net record"), "bench-block", 1),
                                (dict(GPU_CHECK_ONLY="racecheck"), "record", 0), ({}, "record", 1)):
        result = subprocess.run(["bash", "-c", selected + chosen_out + f"chosen_out {step}"], env={**unset, **env})
        assert result.returncode == expected, (env, step)


def test_gpu_check_build_key_follows_the_sources(tmp_path):
    """gpu_check.sh skips the build when its stamp holds the sources' key: the key must change with any
    file under csrc/ (a new one too) and the build settings, and only with them."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    build_key = re.search(r"^build_key\(\) \{\n.*?^\}\n", script, re.S | re.M).group(0)
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "csrc/ops.cpp", "csrc/cuda/kernel.cu", "README.md"):
        (tmp_path / name).write_text(name)

    def key(arch="9.0"):
        result = subprocess.run(["bash", "-c", build_key + "build_key"], cwd=tmp_path, capture_output=True, text=True,
                                env={**os.environ, "PY": sys.executable, "ARCH": arch})
        assert result.returncode == 0 and len(result.stdout.strip()) == 64, result.stderr
        return result.stdout.strip()

    first = key()
    assert key() == first
    (tmp_path / "README.md").write_text("changed")
    assert key() == first, "a file the build does not read changed the key"
    keys = {first}
    for change in ("csrc/cuda/kernel.cu", "csrc/cuda/new.cuh", "setup.py"):
        (tmp_path / change).write_text("changed")
        keys.add(key())
    keys.add(key(arch="9.0a"))
    assert len(keys) == 5, "a source or the architecture changed and the key did not"


def test_failures_file_names_failed_tests(tmp_path, monkeypatch):
    """tests/conftest.py appends each failed report's id to SE_FUSED_FAILURES_FILE (gpu_check.sh lists
    them after a tests step), once: in an xdist worker it leaves the writing to the controller."""
    from types import SimpleNamespace
    from conftest import pytest_runtest_logreport
    path = tmp_path / "failures.txt"
    monkeypatch.setenv("SE_FUSED_FAILURES_FILE", str(path))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytest_runtest_logreport(SimpleNamespace(failed=False, nodeid="tests/a.py::passed", when="call"))
    pytest_runtest_logreport(SimpleNamespace(failed=True, nodeid="tests/a.py::crashed[x]", when="???"))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    pytest_runtest_logreport(SimpleNamespace(failed=True, nodeid="tests/a.py::in_worker", when="call"))
    assert path.read_text().splitlines() == ["tests/a.py::crashed[x] (???)"]


def test_pipeline_trace_summary(tmp_path, monkeypatch):
    """pipeline_trace.py's phases from a trace as the kernels write it (two CTAs, delay 1): CTA 1 runs
    the MLP at step 0 (6 us) and starts step 1 late; CTA 0 waits for it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import pipeline_trace
    us = 1000
    rows = [  # cta, step, start, reduced, finished, ready, scaled (ns; 0: no such point)
        (0, 0, 1 * us, 3 * us, 0, 0, 0),
        (1, 0, 1 * us, 4 * us, 10 * us, 0, 0),
        (0, 1, 3 * us, 5 * us, 0, 10 * us, 12 * us),
        (1, 1, 10 * us, 12 * us, 0, 12 * us, 14 * us),
        (0, 2, 12 * us, 0, 0, 13 * us, 15 * us),
    ]
    path = tmp_path / "trace.csv"
    path.write_text("# se_fused pipelined forward N=2 C=8 R=2 HW=4 G=1 tiles=1 blocks=2 delay=1 mlp_block=8\n"
                    "cta,step,start,reduced,finished,ready,scaled\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    trace = pipeline_trace.read_trace(path)
    assert trace.plan.startswith("se_fused pipelined forward N=2")
    got = pipeline_trace.phases(trace)
    assert got.reduce == [2.0, 3.0, 2.0, 2.0]
    assert got.mlp == [6.0]
    assert got.wait == [5.0, 0.0, 1.0]  # CTA 0 waits from its reduction (5) to the flag (10)
    assert got.scale == [2.0, 2.0, 2.0]
    assert pipeline_trace.span_us(trace) == 14.0
    # Step 1's median start is 6.5 us: CTA 1, which ran the MLP, began it 3.5 us after.
    assert pipeline_trace.finisher_lateness(trace) == [3.5]
    text = pipeline_trace.summarize(trace)
    assert "mlp" in text and "3.5 us" in text


def test_tune_cluster_stage_shares(monkeypatch):
    """tune_cluster.py gives each stage an equal share of a table's time, cumulatively (what a stage leaves
    goes to the next), so the last stage's share ends at the table's deadline."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tune_cluster
    ends = [tune_cluster.stage_deadline(100.0, 140.0, i, 4) for i in range(4)]
    assert ends == [110.0, 120.0, 130.0, 140.0]


def test_cuda_knobs_are_read_by_the_cuda_sources(monkeypatch):
    """_common.CUDA_KNOBS (the knobs the scripts set and reset) are the names the CUDA sources read: a
    misspelt one cannot silently leave the backend at its default, and a knob added to the C++ but not
    to the list cannot leak from one case of a script into the next. SE_FUSED_CUDA_VERBOSE only prints
    (gpu_check sets it for the whole run)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    sources = "".join(path.read_text() for path in sorted((REPO / "csrc" / "cuda").iterdir()))
    missing = [name for name in _common.CUDA_KNOBS if f'"{name}"' not in sources]
    assert not missing, missing
    read = set(re.findall(r'"(SE_FUSED_CUDA_[A-Z0-9_]+)"', sources)) - {"SE_FUSED_CUDA_VERBOSE"}
    assert read and not read - set(_common.CUDA_KNOBS), sorted(read - set(_common.CUDA_KNOBS))


def test_exercise_kernels_stops_at_max_seconds(monkeypatch):
    """exercise_kernels.py (what compute-sanitizer runs): every path on a shape before the next shape, and
    --max-seconds stops it before a case with exit status 3 (gpu_check's PARTIAL); the CPU rehearsal of the
    whole quick run passes."""
    monkeypatch.syspath_prepend(str(BENCH))
    import exercise_kernels
    runs = exercise_kernels.case_order(quick=True)
    first = runs[:len(exercise_kernels.CASES)]
    assert [case for case, *_ in first] == exercise_kernels.CASES and len({shape for _, shape, *_ in first}) == 1
    command = [sys.executable, str(BENCH / "exercise_kernels.py"), "--cpu-dry-run", "--quick"]
    stopped = subprocess.run(command + ["--max-seconds", "0"], capture_output=True, text=True)
    assert stopped.returncode == 3 and "stopped at --max-seconds 0 before case 1 of" in stopped.stdout, stopped
    whole = subprocess.run(command, capture_output=True, text=True)
    assert whole.returncode == 0 and f"{len(runs)} cases on cpu, 0 mismatches" in whole.stdout, whole


def test_predictions_file_names_rows_the_profile_writes(monkeypatch):
    """benchmarks/predictions.json is well formed, and each prediction names a row profile_block.py writes
    on a GPU with both backends (a variant label, a stage shape, a pass), so none stays 'absent' by a
    typo. The rows of settled variants (--all-variants) read 'absent' after gpu_check's default profile;
    the set of those is pinned here, so that a prediction moved out of the default rows is seen."""
    monkeypatch.syspath_prepend(str(BENCH))
    import check_predictions
    import profile_block
    monkeypatch.setattr(profile_block.common, "usable_backends", lambda: ["cuda", "triton"])
    gpu = torch.device("cuda")
    default = {label for label, _, _ in profile_block.variants(gpu)}
    everything = {label for label, _, _ in profile_block.variants(gpu, everything=True)}
    assert {"cuda", "triton", "triton/pipelined", "cuda/chunks-12m"} <= default < everything, default
    predictions = check_predictions.load_predictions(BENCH / "predictions.json")
    outside_default = set()
    for p in predictions:
        named = {p["impl"], p.get("relative_to", "cuda")}
        assert named <= everything, p["id"]
        assert p["stage"] in STAGE_SHAPES and p["pass"] in ("forward", "backward", "forward+backward"), p["id"]
        if not named <= default:
            outside_default.add(p["id"])
    assert outside_default == {"cuda-tiled-conv5-products", "cuda-tiled-conv5-split-sums", "cuda-tiled-conv5-device",
                               "cuda-tiled-conv4-mlp", "cuda-tiled-conv5-fwdbwd-products", "cuda-pipelined-conv4",
                               "cuda-pipelined-conv5", "cuda-auto-mlp-conv5", "cuda-auto-mlp-conv3"}, outside_default


def test_check_predictions_verdicts(tmp_path):
    """check_predictions.py: hit and MISS against an absolute bound and a ratio, 'no data' for a row that
    failed, does not list the kernels, or has device time without a kernel recorded, 'absent' where the
    record lacks the row or the row it is relative to; a malformed predictions file exits 2."""
    row = dict(stage="conv5_x", **{"pass": "forward"})
    record = {"batch": 256, "dtype": "bfloat16", "memory_format": "channels_last", "env": {"device": "test"}, "rows": [
        {**row, "impl": "a", "device_ms": 0.1, "host_ms": 0.2, "launches": 3,
         "top": [{"name": "void k1<float>", "per_call": 1, "us_per_call": 5.0},
                 {"name": "k2", "per_call": 2, "us_per_call": 7.0}]},
        {**row, "impl": "b", "device_ms": 0.3, "host_ms": 0.2, "launches": 1, "top": []},
        {**row, "impl": "no-kernels", "device_ms": 0.0, "host_ms": 0.2, "launches": 0, "top": []},
        {**row, "impl": "failed", "device_ms": None, "host_ms": None, "top": [], "error": "trap"}]}
    cases = {  # id -> (prediction fields, verdict)
        "kernels-hit": ({"metric": "kernel_us", "kernels": ["k1", "k2"], "max": 12}, "hit"),
        "kernels-miss": ({"metric": "kernel_us", "kernels": ["k1", "k2"], "max": 11.9}, "MISS"),
        "device-hit": ({"metric": "device_ms", "max": 0.1}, "hit"),
        "host-miss": ({"metric": "host_ms", "max": 0.15}, "MISS"),
        "ratio-hit": ({"metric": "device_ms", "relative_to": "b", "max_ratio": 0.34}, "hit"),
        "ratio-miss": ({"metric": "device_ms", "relative_to": "b", "max_ratio": 0.33}, "MISS"),
        "unlisted-kernel": ({"metric": "kernel_us", "kernels": ["k3"], "max": 1}, "no data"),
        "failed-row": ({"impl": "failed", "metric": "device_ms", "max": 1}, "no data"),
        "no-kernels": ({"impl": "no-kernels", "metric": "device_ms", "max": 1}, "no data"),
        "absent-row": ({"stage": "conv4_x", "metric": "device_ms", "max": 1}, "absent"),
        "absent-other": ({"metric": "device_ms", "relative_to": "c", "max_ratio": 1}, "absent"),
    }
    predictions = {"predictions": [{"id": name, "source": "test", "impl": "a", **row, **fields}
                                   for name, (fields, _) in cases.items()]}
    (tmp_path / "profile.json").write_text(json.dumps(record))
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    proc = run_script("check_predictions.py", str(tmp_path / "profile.json"), "--predictions",
                      str(tmp_path / "predictions.json"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    verdicts = {line.split()[0]: line.split()[1] + (" data" if line.split()[1] == "no" else "")
                for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert verdicts == {name: verdict for name, (_, verdict) in cases.items()}, proc.stdout
    predictions["predictions"][0]["max_ratio"] = 1.0  # both bounds: refused
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    proc = run_script("check_predictions.py", str(tmp_path / "profile.json"), "--predictions",
                      str(tmp_path / "predictions.json"), timeout=60)
    assert proc.returncode == 2 and "either max, or max_ratio" in proc.stderr
