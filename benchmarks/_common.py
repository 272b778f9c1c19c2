"""Shared pieces of the benchmarks (SPEC §3–§6).

* what was measured on: :func:`describe_environment` (device, versions, commit),
* the limit: :func:`bytes_min` (SPEC §4) and :func:`measure_copy_bandwidth`,
* timing: :func:`gpu_median_ms` (``triton.testing.do_bench`` medians, L2
  cleared between calls) and :func:`interleaved_median_ms` (CPU through
  ``torch.utils.benchmark``, GPU through CUDA events; the candidates take turns
  round by round so slow drift of the machine hits all of them alike),
* :func:`rotation_count`: how many input sets to cycle through so repeated
  calls do not find their data in the cache,
* output: :func:`print_table`, :func:`write_json`, :func:`pyplot`, :func:`progress`.

The scripts in this folder import it as ``_common`` (Python puts the script's
folder first on ``sys.path``).
"""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "out"  # git-ignored; committed records go to benchmarks/results/

# SPEC §3: SE-ResNet-50 stages at 224x224 input: name -> (C, H=W). R = C / 16.
STAGES: Dict[str, tuple] = {
    "conv2_x": (256, 56),
    "conv3_x": (512, 28),
    "conv4_x": (1024, 14),
    "conv5_x": (2048, 7),
}
SE_REDUCTION = 16

# SPEC §5: Hu et al., Squeeze-and-Excitation Networks, one forward+backward pass
# of a 256-image minibatch on 8 Titan X GPUs.
PAPER_ROW = {
    "source": "Hu et al., Squeeze-and-Excitation Networks (8 Titan X, batch 256, forward+backward)",
    "resnet50_ms": 190.0,
    "se_resnet50_ms": 209.0,
    "overhead": 209.0 / 190.0 - 1.0,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format,
                  "contiguous": torch.contiguous_format}

# SPEC §4, in units of T = N*C*H*W*element_size: the fewest bytes one pass must move.
_BYTES_MIN_FACTOR = {
    ("forward", False): 2,    # read x, write y
    ("forward", True): 3,     # read x, residual; write o
    ("backward", False): 3,   # read g, x; write dx
    ("backward", True): 5,    # read g, o, x; write dx, dresidual
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of SPEC §6)."""
    return str(dtype).replace("torch.", "")


def memory_format_name(memory_format: torch.memory_format) -> str:
    """``torch.channels_last`` -> ``"channels_last"``, ``torch.contiguous_format`` -> ``"nchw"``."""
    return "channels_last" if memory_format == torch.channels_last else "nchw"


def parse_list(text: str, allowed: Iterable[str], what: str) -> List[str]:
    """Split ``"a,b"`` into names, each checked against ``allowed`` (``SystemExit`` with the choices otherwise)."""
    allowed = list(allowed)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"unknown {what} {bad or text!r}; choose from {allowed}")
    return names


def parse_stages(text: str) -> List[str]:
    """``"all"``, ``"conv2_x,conv5_x"`` or ``"2,5"`` -> stage names of :data:`STAGES`."""
    if text == "all":
        return list(STAGES)
    names = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        name = f"conv{token}_x" if token.isdigit() else token
        if name not in STAGES:
            raise SystemExit(f"unknown shape {token!r}; choose from {list(STAGES)}, their numbers 2-5, or 'all'")
        names.append(name)
    return names


def pass_factor(pass_name: str, residual: bool) -> int:
    """SPEC §4 traffic of ``pass_name`` in units of ``T``; ``"forward+backward"`` is the sum of the two."""
    if pass_name == "forward+backward":
        return _BYTES_MIN_FACTOR[("forward", residual)] + _BYTES_MIN_FACTOR[("backward", residual)]
    return _BYTES_MIN_FACTOR[(pass_name, residual)]


def bytes_min(pass_name: str, residual: bool, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Fewest bytes one SE pass must move (SPEC §4).

    ``shape = (N, C, H, W)``; ``T = N·C·H·W·element_size``; forward 2T,
    forward with residual 3T, backward 3T, backward with residual 5T,
    ``"forward+backward"`` the sum.
    """
    n, c, h, w = shape
    element_size = torch.empty((), dtype=dtype).element_size()
    return pass_factor(pass_name, residual) * n * c * h * w * element_size


# ----------------------------------------------------------------------------- environment

# The CUDA backend's per-call knobs the scripts set (tune_cluster.py, exercise_kernels.py): each
# script's set_knobs unsets every one it does not name, so that no setting leaks from one case to the
# next. One list, so that a knob added to the C++ is added here once.
CUDA_KNOBS = tuple(f"SE_FUSED_CUDA_{name}" for name in (
    "PATH", "PLAN", "CLUSTERS", "CLUSTER_BUFFERS", "PIPELINE_GROUP", "PIPELINE_BLOCKS", "PIPELINE_DELAY",
    "PIPELINE_MLP", "PIPELINE_TRACE", "TILE_BYTES", "MLP", "MLP_SPLIT", "MLP_ROW_TILES", "NCHW_SUMS",
    "WGRAD_TILES", "CHUNK_BYTES", "CHUNK_STREAMS", "CACHE_HINTS", "CHUNK_SCALE_BLOCKS"))


def failure_message(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 200 characters), with its type where it is not a
    RuntimeError (a Triton compile error, a refused knob's ValueError): how the scripts report a case
    that failed without ending the run."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else repr(exc)
    return first if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {first}"


def set_knobs(names, prefix: str = "SE_FUSED_CUDA_", **values) -> None:
    """Set a backend's knobs: each environment variable of ``names`` (``prefix`` + name: the CUDA
    backend's by default, ``SE_FUSED_TRITON_`` for Triton's) from ``values``, keyed by its name
    without the prefix in lower case (``path="two_pass"`` sets ``SE_FUSED_CUDA_PATH``), and every
    one not given unset (:func:`set_env`)."""
    settings = {f"{prefix}{key.upper()}": value for key, value in values.items()}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"unknown knobs {unknown}; known: {list(names)}")
    for name in names:
        set_env(name, settings.get(name))


def set_env(name: str, value) -> None:
    """Set the environment variable ``name`` to ``str(value)``, or unset it for a falsy ``value`` (None, "",
    0): how the scripts switch the backends' per-call settings (SE_FUSED_CUDA_PATH, ..._PLAN, ...)."""
    if value:
        os.environ[name] = str(value)
    else:
        os.environ.pop(name, None)


def git_commit() -> str:
    """``git rev-parse HEAD`` of this checkout, with ``-dirty`` when tracked files differ from it.

    ``SE_FUSED_COMMIT`` overrides it: a copy of the tree without its ``.git``
    (the GPU machine's) is told the commit by the caller.
    """
    if os.environ.get("SE_FUSED_COMMIT"):
        return os.environ["SE_FUSED_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        dirty = ""
    return sha + ("-dirty" if dirty else "")


def backend_states() -> Dict[str, tuple]:
    """``{backend: (usable, reason)}`` for every se_fused backend.

    Asked one backend at a time, so a backend whose module fails to import or
    answer (a work-in-progress Triton module, say) is reported as unusable
    with the error instead of taking the whole benchmark down.
    """
    from se_fused.backends import BACKEND_NAMES, backend_status
    states = {}
    for name in BACKEND_NAMES:
        try:
            status = backend_status(name)
            states[name] = (bool(status.usable), status.reason)
        except Exception as exc:  # noqa: BLE001
            states[name] = (False, f"status check failed: {format_error(exc)}")
    return states


def usable_backends() -> List[str]:
    """Names of the usable se_fused backends, in se_fused's order (see :func:`backend_states`)."""
    return [name for name, (usable, _) in backend_states().items() if usable]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is present, else ``cpu``; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch")
    return torch.device(name)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """SPEC §6 ``device``: the GPU's name, or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    return slugify(device_name(device))


def slugify(text: str) -> str:
    """Lower-case, drop a leading vendor name, everything else not alphanumeric -> ``-``."""
    text = re.sub(r"^(nvidia|amd)\s+", "", text.strip(), flags=re.IGNORECASE).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "device"


def describe_environment(device: torch.device) -> dict:
    """The header fields of a SPEC §6 record plus details that explain the numbers.

    Keys: ``device``, ``device_detail``, ``torch``, ``cuda``, ``triton``,
    ``python``, ``se_fused``, ``backends``, ``threads``, ``load_average``
    (other work on the machine skews CPU timings), ``commit``, ``date``, ``time``.
    """
    import se_fused

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        detail = (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2**30:.0f} GiB, L2 {l2_cache_bytes(device) / 2**20:.0f} MiB")
    else:
        detail = f"{_cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    now = datetime.datetime.now()
    return {
        "device": device_name(device),
        "device_detail": detail,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "se_fused": se_fused.__version__,
        "backends": usable_backends(),
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "commit": git_commit(),
        "date": now.strftime("%Y-%m-%d"),
        "time": now.strftime("%H:%M:%S"),
    }


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory() -> str:
    """Stop glibc's malloc from handing freed memory back to the OS, for the rest of this process.

    By default glibc serves large blocks with fresh mappings and trims the top
    of its heap when enough is free. A benchmark loop frees every full-size
    tensor at the end of each call, so the next call's tensors are fresh pages
    again: a page fault per 4 KiB on first touch (about 1.8 us each on the
    2-core EPYC VM, against 0.02 ms to refill a resident 3 MB block), in a
    pattern that changes with the order of frees and moved single rows of the
    eager and fused timings by up to 2x from run to run. A training step keeps
    many tensors alive and does not free the heap top after every layer.
    Raising the two thresholds (mmap: glibc's maximum of 32 MiB) keeps freed
    memory in the process for every variant alike. Returns what was done, for
    the run's record.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "default (mallopt refused)"
    return "glibc keeps freed memory (mmap threshold 32 MiB, no trim)"


def load_average() -> Optional[float]:
    """The 1-minute load average of the machine (``None`` where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def warn_if_busy(threads: int) -> None:
    """Say so when other work occupies the CPU: timings of a busy CPU wander by tens of percent."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load is not None and load > max(0.5, cores - threads) + 0.5:
        print(f"warning: load average {load:.1f} on {cores} cores before the run; other processes are "
              f"running, so CPU timings will be noisy", file=sys.stderr)


def l2_cache_bytes(device: torch.device) -> int:
    """Last-level cache size: the GPU's L2, or the CPU's largest cache from sysfs (50 MB / 32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])
    return max(sizes) if sizes else 32 * 2**20


def rotation_count(bytes_per_set: int, device: torch.device, rotate_bytes: Optional[int] = None,
                   max_sets: int = 16) -> int:
    """How many input sets to cycle through so that one call's data is evicted before it is used again.

    Enough sets to cover ``rotate_bytes`` (default: twice the last-level
    cache), at least 1, at most ``max_sets``.
    """
    if rotate_bytes is None:
        rotate_bytes = 2 * l2_cache_bytes(device)
    if bytes_per_set <= 0 or rotate_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(rotate_bytes / bytes_per_set)))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_alive(device: Optional[torch.device] = None) -> bool:
    """Whether CUDA still works in this process (``device``: the one a script runs on; always True
    for a CPU): a kernel that traps ends the process's CUDA context, and every later call fails with
    it, so a script that catches one failure checks this before it goes on (tune_cluster.py,
    profile_block.py)."""
    if device is not None and device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device or "cuda").add_(1).item()
        return True
    except RuntimeError:  # torch.AcceleratorError is one
        return False


def free_memory(device: torch.device) -> None:
    """Return cached GPU memory between configurations so one config's pool does not starve the next."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def format_error(exc: BaseException) -> str:
    """One line naming the exception and where it came from (for JSON rows and the table)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{where}: {message}"[:500]


# ----------------------------------------------------------------------------- timing

def gpu_median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Dict[str, float]:
    """``triton.testing.do_bench`` of ``fn``: median and quartiles in ms.

    do_bench clears the L2 (writes a 256 MB buffer) before every timed call and
    times each call with its own CUDA events. Call ``fn`` a few times before
    this (compilation, autotuning) or do_bench's first estimate is wrong.
    Falls back to CUDA events with the same L2 clearing when Triton is missing.
    Returns ``{"ms": median, "ms_q25": ..., "ms_q75": ...}``.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q25, q50, q75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return {"ms": float(q50), "ms_q25": float(q25), "ms_q75": float(q75)}
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    deadline = time.perf_counter() + (warmup_ms + rep_ms) / 1e3
    for i in range(10_000):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
        if i >= 10 and time.perf_counter() > deadline:
            break
    q = statistics.quantiles(times, n=4)
    return {"ms": statistics.median(times), "ms_q25": q[0], "ms_q75": q[2]}


def _time_round_ms(fn: Callable[[], object], number: int, device: torch.device, threads: int) -> float:
    """Mean ms of ``number`` back-to-back calls of ``fn`` (one round)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / number
    from torch.utils.benchmark import Timer
    measurement = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).timeit(number)
    return measurement.mean * 1e3


def interleaved_median_ms(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int,
                          min_round_ms: float = 0.0, number: Optional[int] = None,
                          threads: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Time several candidates in turns (A B C, B C A, ...) and take each one's median over ``rounds``.

    Every round times each candidate once: ``number`` calls (or as many as
    fill ``min_round_ms``, estimated from one call) on the CPU through
    ``torch.utils.benchmark.Timer`` with ``threads`` threads, on a GPU between
    two CUDA events. The starting candidate rotates each round, so none always
    runs right after the same neighbour. Warm the candidates up before this.
    Returns ``{name: {"ms": median, "ms_q25": ..., "ms_q75": ..., "rounds": n, "number": calls}}``.
    """
    threads = threads or torch.get_num_threads()
    names = list(fns)
    numbers = {}
    for name in names:
        if number is not None:
            numbers[name] = number
        else:
            estimate = max(_time_round_ms(fns[name], 1, device, threads), 1e-3)
            numbers[name] = max(1, math.ceil(min_round_ms / estimate))
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            samples[name].append(_time_round_ms(fns[name], numbers[name], device, threads))
    result = {}
    for name in names:
        values = samples[name]
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = {"ms": statistics.median(values), "ms_q25": q[0], "ms_q75": q[2],
                        "rounds": len(values), "number": numbers[name]}
    return result


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, quick: bool = False,
                           threads: Optional[int] = None) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus bytes written (SPEC §4).

    GPU: a device-to-device ``dst.copy_(src)`` of ``nbytes`` (default 1 GiB,
    well past the L2), median of ``do_bench``. CPU: the same copy in memory
    (default 256 MiB, past the last-level cache) through
    ``torch.utils.benchmark``, median of several rounds.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 256 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src).fill_(0)  # touch every page before timing
    copy = lambda: dst.copy_(src)  # noqa: E731
    copy()
    if device.type == "cuda":
        ms = gpu_median_ms(copy, warmup_ms=10 if quick else 25, rep_ms=50 if quick else 200)["ms"]
    else:
        ms = interleaved_median_ms({"copy": copy}, device, rounds=3 if quick else 7, number=2 if quick else 4,
                                   threads=threads)["copy"]["ms"]
    del src, dst
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- output

def progress(total: int, desc: str, enabled: bool = True):
    """A progress bar on stderr: tqdm when installed, else a one-line fallback.

    The returned object has ``update(n=1)``, ``set_postfix_str(text)``,
    ``write(text)`` and ``close()``.
    """
    if not enabled:
        return _PlainProgress(total, desc, stream=None)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc, stream=sys.stderr)

    class _Tqdm(tqdm):
        def write(self, text):  # noqa: D401 - tqdm.write is a classmethod; keep the bar intact
            tqdm.write(text, file=sys.stderr)

    return _Tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


class _PlainProgress:
    """Fallback progress bar: ``desc [k/n] postfix`` rewritten in place."""

    def __init__(self, total: int, desc: str, stream):
        self.total, self.desc, self.stream, self.count, self.postfix = total, desc, stream, 0, ""
        self._draw()

    def _draw(self):
        if self.stream is not None:
            self.stream.write(f"\r{self.desc} [{self.count}/{self.total}] {self.postfix[:60]:60s}")
            self.stream.flush()

    def update(self, n: int = 1):
        self.count += n
        self._draw()

    def set_postfix_str(self, text: str):
        self.postfix = text
        self._draw()

    def write(self, text: str):
        if self.stream is not None:
            self.stream.write("\n" + text + "\n")
        else:
            print(text, file=sys.stderr)

    def close(self):
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def format_rate(value: Optional[float]) -> Optional[str]:
    """GB/s with three significant digits or more (CPU rows are single digits, GPU rows thousands)."""
    if value is None:
        return None
    return f"{value:.0f}" if value >= 100 else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def print_table(columns: Sequence[tuple], rows: Sequence[dict], file=None) -> None:
    """Print ``rows`` as an aligned text table.

    ``columns``: ``(header, key_or_function, format)``; a function gets the row
    and returns the value; ``None`` values print as ``-``.
    """
    file = file or sys.stdout
    cells = []
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = key(row) if callable(key) else row.get(key)
            line.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        cells.append(line)
    headers = [c[0] for c in columns]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for line in cells:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)), file=file)


def default_stem(kind: str, device: torch.device) -> str:
    """File stem of one benchmark run: ``<kind>-<device>-<YYYYmmdd-HHMMSS>``."""
    return f"{kind}-{device_slug(device)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def output_paths(out_dir: Path, json_name: Optional[str], kind: str, device: torch.device):
    """``(json_path, png_path)`` in ``out_dir`` (created); ``json_name`` overrides the default stem."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(json_name).stem if json_name else default_stem(kind, device)
    return out_dir / f"{stem}.json", out_dir / f"{stem}.png"


def write_json(record: dict, path: Path) -> Path:
    """Write ``record`` as indented JSON (no NaN: non-finite floats become ``null``)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = Path(path)
    path.write_text(json.dumps(clean(record), indent=1, allow_nan=False) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or ``None`` when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def announce_outputs(paths: Dict[str, Optional[Path]]) -> None:
    """Print the written files as ``wrote <kind>: <path>`` lines (the GPU check script greps these)."""
    for kind, path in paths.items():
        if path is not None:
            print(f"wrote {kind}: {path}")


# ----------------------------------------------------------------------------- the start of a run

def run_device(args) -> Tuple[torch.device, bool]:
    """The device of ``--device`` and whether it is a GPU; on the CPU, ``--threads`` threads."""
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    return device, gpu


def open_run(kind: str, device: torch.device, args, label: str, names, skipped: Dict[str, str],
             quick_copy: bool):
    """The common start of a benchmark run: warn when the CPU is busy, describe the environment,
    choose the output files, print the banner and measure the copy bandwidth.

    ``kind`` is "block" or "network"; ``label``/``names`` say what is measured ("impls"/"variants").
    Returns ``(env, json_path, png_path, copy_gbps)``.
    """
    allocator = "default"
    if device.type != "cuda":
        warn_if_busy(args.threads)
        if not args.glibc_trim:
            allocator = keep_freed_cpu_memory()
    env = describe_environment(device)
    env["cpu_allocator"] = allocator
    json_path, png_path = output_paths(Path(args.out), args.json_name, kind, device)
    print(f"{'SE block' if kind == 'block' else kind} benchmark on {env['device_detail']}")
    print(f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, se_fused {env['se_fused']}, "
          f"commit {env['commit']}")
    print(f"{label}: {', '.join(names)}" + "".join(f"; {k} skipped: {v}" for k, v in skipped.items()))
    if device.type != "cuda":
        print(f"CPU allocator: {allocator}")
    print("measuring copy bandwidth ...", flush=True)
    copy_gbps = measure_copy_bandwidth(device, quick=quick_copy, threads=args.threads)
    return env, json_path, png_path, copy_gbps
