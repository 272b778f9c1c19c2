"""Shared cases of the se_fused test suite: shapes, dtypes, memory formats, devices/backends, inputs.

Tests ask for these by fixture name and :func:`pytest_generate_tests`
parametrizes them, so the same test file runs every available backend on
whatever machine it is on:

* ``se_device_backend`` -> ``(device, backend)``: ``("cpu", "eager")``, ``("cpu", "cpu")``,
  and with a CUDA GPU ``("cuda", "eager")``, ``("cuda", "cuda")``, ``("cuda", "triton")``.
  Only runnable cases enter the products; each one left out appears once as a
  skipped test with its reason (test_correctness.py::test_device_backend_not_run_here).
  ``("cpu", "triton")`` is always left out: under ``TRITON_INTERPRET=1`` the
  Triton kernels run on CPU tensors, but their programs run one after another
  in Python, and ``tests/test_triton.py`` covers that path on small shapes;
  repeating these products there would cost more than the rest of the suite.
* ``se_stage_shape`` / ``se_odd_shape`` -> :class:`SEShape` (SPEC §3).
* ``se_dtype`` -> float32, float16, bfloat16, float64.
* ``se_memory_format`` -> ``"nchw"``, ``"channels_last"``, ``"sliced_nchw"``, ``"sliced_nhwc"``.

Inputs come from :func:`make_se_inputs` (also the fixture ``se_inputs``);
:func:`run_se` runs one implementation forward and backward and collects every
gradient; :func:`reference_se` is the float64 ground truth, :func:`backend_se`
the public API with a named backend, :func:`plain_se` the textbook SE in the
storage dtype, and :func:`cached_run` computes references/baselines once per case.
"""
from __future__ import annotations

import os

# Before torch loads libgomp (it reads this once): OpenMP workers that spin while
# waiting make every parallel ATen op ~100x slower when the cores are shared with
# other processes (measured: 0.3 s instead of 3 ms for a 44k-element op with 2
# threads on this 2-core machine under load). Passive waiting costs microseconds
# per parallel region otherwise; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

import se_fused
from se_fused._reference import activation_fn, excitation, squeeze_excitation_reference
from se_fused.backends import backend_status

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, memory formats
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SEShape:
    """One SE problem size: ``x (n, c, h, w)``, reduced width ``r``."""
    n: int
    c: int
    r: int
    h: int
    w: int

    @property
    def id(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w}r{self.r}"


# SPEC §3, the four SE-ResNet-50 stages (R = C/16), at batch 2 to keep CPU time small.
STAGE_SHAPES = (
    SEShape(2, 256, 16, 56, 56),    # conv2_x
    SEShape(2, 512, 32, 28, 28),    # conv3_x
    SEShape(2, 1024, 64, 14, 14),   # conv4_x
    SEShape(2, 2048, 128, 7, 7),    # conv5_x
)

# SPEC §3 odd shapes: C not a multiple of 8/32, R = 1, H·W ∈ {1, 3, 49, 3136}, N = 1.
ODD_SHAPES = (
    SEShape(1, 7, 1, 3, 1),        # N = 1, C = 7, R = 1, H·W = 3
    SEShape(2, 37, 2, 7, 7),       # C = 37 (prime), H·W = 49
    SEShape(3, 37, 1, 1, 1),       # H·W = 1, R = 1, odd N
    SEShape(2, 7, 1, 56, 56),      # H·W = 3136 with tiny C
    SEShape(2, 40, 3, 5, 5),       # C a multiple of 8 but not of 32, R odd
    SEShape(1, 64, 4, 1, 3),       # C a multiple of 32 (full vectors), H·W = 3, N = 1
    SEShape(2, 33, 33, 2, 2),      # R = C (wide MLP), C = 32 + 1 (vector tail of one)
)

SE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# "sliced_*": a non-contiguous view of a larger tensor (validation must make it
# contiguous): sliced_nchw slices W of an NCHW tensor (closest layout NCHW),
# sliced_nhwc slices C of a channels_last tensor (closest layout channels_last).
SE_MEMORY_FORMATS = ("nchw", "channels_last", "sliced_nchw", "sliced_nhwc")

# ---------------------------------------------------------------------------------------------------------------
# Devices and backends
# ---------------------------------------------------------------------------------------------------------------

CUDA_PRESENT = torch.cuda.is_available() and torch.cuda.device_count() > 0
NO_GPU_REASON = "needs an NVIDIA GPU; torch.cuda.is_available() is False on this machine"
CPU_TRITON_REASON = ("Triton on CPU tensors runs only under TRITON_INTERPRET=1 (one program at a time, "
                     "in Python); tests/test_triton.py covers that path on small shapes")

ALL_DEVICE_BACKENDS = (("cpu", "eager"), ("cpu", "cpu"), ("cpu", "triton"),
                       ("cuda", "eager"), ("cuda", "cuda"), ("cuda", "triton"))


def why_not_run(device: str, backend: str) -> Optional[str]:
    """Why this suite does not run ``backend`` on ``device`` tensors here (None: it does)."""
    if device == "cuda" and not CUDA_PRESENT:
        return NO_GPU_REASON
    if device == "cpu" and backend == "triton":
        return CPU_TRITON_REASON
    status = backend_status(backend)
    if not status.usable:
        return f"backend {backend!r} not usable: {status.reason}"
    return None


# Only runnable cases enter the products (thousands of skipped items would cost
# more collection time than some tests); each case left out is reported once, as a
# skipped test with its reason, by test_correctness.py::test_device_backend_not_run_here.
SE_DEVICE_BACKENDS = tuple(pytest.param((d, b), id=f"{d}-{b}", marks=[pytest.mark.cuda] if d == "cuda" else [])
                           for d, b in ALL_DEVICE_BACKENDS if why_not_run(d, b) is None)
SKIPPED_DEVICE_BACKENDS = tuple(pytest.param((d, b), id=f"{d}-{b}",
                                             marks=[pytest.mark.cuda] if d == "cuda" else [])
                                for d, b in ALL_DEVICE_BACKENDS if why_not_run(d, b) is not None)


def pytest_runtest_logreport(report):
    """With ``SE_FUSED_FAILURES_FILE`` set, append each failed test's id to that file as it is
    reported (with pytest-xdist, in the controller, a crashed worker's test included), so that
    benchmarks/gpu_check.sh can name it even when pytest is killed before its summary."""
    path = os.environ.get("SE_FUSED_FAILURES_FILE")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # xdist: the controller writes
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{report.nodeid} ({report.when})\n")


@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc):
    """Parametrize the ``se_*`` fixture names a test asks for (unless it parametrizes them itself).

    Runs after the ``@pytest.mark.parametrize`` marks and parametrizes the
    backend last, so the backend varies fastest: consecutive tests share one
    case, and its reference and baseline come from :func:`cached_run`.
    """
    own = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if isinstance(names, str):
            names = names.split(",")
        own.update(n.strip() for n in names)
    table = {
        "se_stage_shape": (STAGE_SHAPES, [s.id for s in STAGE_SHAPES]),
        "se_odd_shape": (ODD_SHAPES, [s.id for s in ODD_SHAPES]),
        "se_dtype": (SE_DTYPES, [str(d).replace("torch.", "") for d in SE_DTYPES]),
        "se_memory_format": (SE_MEMORY_FORMATS, list(SE_MEMORY_FORMATS)),
        "se_device_backend": (SE_DEVICE_BACKENDS, None),
    }
    for name, (values, ids) in table.items():
        if name in metafunc.fixturenames and name not in own:
            metafunc.parametrize(name, values, ids=ids)


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SEInputs:
    """One SE call's tensors, all in one dtype on one device, ``x``/``residual``/``grad_out`` in one layout.

    ``residual`` is None for the plain form. ``grad_out`` is a random
    ``dL/dout`` shaped like ``x``. Weights are 4-D ``(R, C, 1, 1)`` /
    ``(C, R, 1, 1)`` as ``nn.Conv2d`` stores them. ``key`` names the case for
    :func:`cached_run` (None after :meth:`with_`, so a changed case is never
    answered from the cache). Frozen: change a case with :meth:`with_`.
    """
    x: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor
    residual: Optional[Tensor]
    grad_out: Tensor
    activation: str
    gate: str
    key: Optional[tuple] = None

    def tensors(self):
        """``(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)`` in the API's argument order."""
        return (self.x, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.residual)

    def with_(self, **changes) -> "SEInputs":
        """A copy with some fields replaced (and no cache key)."""
        return dataclasses.replace(self, key=None, **changes)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _in_layout(t: Tensor, memory_format: str) -> Tensor:
    """``t`` (contiguous NCHW) with the same values in ``memory_format``; sliced views share a larger storage."""
    if memory_format == "nchw":
        return t.contiguous()
    if memory_format == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    if memory_format == "sliced_nchw":
        big = t.new_zeros((n, c, h, w + 2))
        big[..., 1:w + 1] = t
        view = big[..., 1:w + 1]
    elif memory_format == "sliced_nhwc":
        big = t.new_zeros((n, c + 3, h, w)).contiguous(memory_format=torch.channels_last)
        big[:, 1:c + 1] = t
        view = big[:, 1:c + 1]
    else:
        raise ValueError(f"unknown memory format {memory_format!r}")
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


# Distance every kink of the math keeps from the inputs (relu at u = 0, hardsigmoid at
# v = ±3, the residual epilogue's relu at x·s + residual = 0). Kernels compute the
# pooled means and the MLP in float32 in their own summation order, so u and v
# differ from the float64 reference by ~1e-6; a value closer to a kink than that can
# land on the other side and change a whole sample's gradient (seen: a float32
# x·s + residual of 4e-7 that one kernel rounds to 0). 1e-3 is far outside that
# noise yet too small to change what the inputs look like.
KINK_MARGIN = 1e-3


def make_se_inputs(shape: SEShape, dtype: torch.dtype, memory_format: str = "nchw", device: str = "cpu",
                   residual: bool = False, activation: str = "relu", gate: str = "sigmoid",
                   seed: int = 0) -> SEInputs:
    """Deterministic inputs for one case, cached (see :func:`_make_se_inputs`)."""
    key = (shape, str(dtype), memory_format, device, residual, activation, gate, seed)
    return _cached(("inputs",) + key, lambda: _make_se_inputs(shape, dtype, memory_format, device, residual,
                                                              activation, gate, seed, key))


def _make_se_inputs(shape: SEShape, dtype: torch.dtype, memory_format: str, device: str, residual: bool,
                    activation: str, gate: str, seed: int, key: tuple) -> SEInputs:
    """Deterministic inputs for one case (the same values on every device and for every backend).

    ``x`` is ``randn`` plus a per-(sample, channel) offset, so the pooled means
    are O(1) (not ``1/sqrt(H·W)``) and the MLP sees varied inputs; the weights
    (``2/sqrt(fan_in)`` normal) put ``v`` on both sides of hardsigmoid's
    saturation. The biases are nudged and the residual chosen so that every kink
    is at least :data:`KINK_MARGIN` away (see there), judged in float64 on the
    values as rounded to ``dtype``.
    """
    g = torch.Generator().manual_seed(_seed(shape, str(dtype), residual, activation, gate, seed))
    f64 = dict(dtype=torch.float64, generator=g)
    n, c, r, h, w = shape.n, shape.c, shape.r, shape.h, shape.w

    def rounded(t: Tensor) -> Tensor:
        return t.to(dtype).to(torch.float64)

    x = rounded(torch.randn(n, c, h, w, **f64) + torch.randn(n, c, 1, 1, **f64))
    fc1_weight = rounded(torch.randn(r, c, 1, 1, **f64) * (2 / c ** 0.5))
    fc2_weight = rounded(torch.randn(c, r, 1, 1, **f64) * (2 / r ** 0.5))
    fc1_bias = torch.randn(r, **f64) * 0.5
    fc2_bias = torch.randn(c, **f64) * 0.5
    pooled = x.mean(dim=(2, 3))
    for _ in range(1000):
        fc1_bias = rounded(fc1_bias)
        hidden, _ = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, torch.zeros(c, dtype=torch.float64),
                               activation, gate)
        near = (hidden.abs() < KINK_MARGIN).any(dim=0)
        if not near.any():
            break
        fc1_bias = fc1_bias + near * 7 * KINK_MARGIN
    else:
        raise AssertionError("could not move fc1_bias away from relu's kink")
    h_act = activation_fn(hidden, activation)
    for _ in range(1000):
        fc2_bias = rounded(fc2_bias)
        v = torch.nn.functional.linear(h_act, fc2_weight.reshape(c, r), fc2_bias)
        near = ((v.abs() - 3).abs() < KINK_MARGIN).any(dim=0)
        if not near.any():
            break
        fc2_bias = fc2_bias + near * 7 * KINK_MARGIN
    else:
        raise AssertionError("could not move fc2_bias away from hardsigmoid's kinks")
    res = None
    if residual:
        # residual = -x·s + offset, |offset| >= 0.25 with random sign: half the outputs
        # are clipped by the epilogue's relu, and none is near its kink even after
        # rounding the residual to bfloat16 (error <= 2^-9·|residual| < 0.05 here).
        y = squeeze_excitation_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, None, activation, gate)
        sign = torch.where(torch.rand(n, c, h, w, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
        offset = sign * (0.25 + torch.rand(n, c, h, w, generator=g, dtype=torch.float64))
        res = rounded(offset - y)
        pre = y + res
        assert pre.numel() == 0 or pre.abs().min() >= KINK_MARGIN, "residual too close to the epilogue's relu kink"
    grad_out = torch.randn(n, c, h, w, **f64)

    def place(t: Tensor, layout: bool) -> Tensor:
        t = t.to(device=device, dtype=dtype)
        return _in_layout(t, memory_format) if layout else t.contiguous()

    return SEInputs(place(x, True), place(fc1_weight, False), place(fc1_bias, False), place(fc2_weight, False),
                    place(fc2_bias, False), None if res is None else place(res, True), place(grad_out, True),
                    activation, gate, key)


@pytest.fixture(autouse=True, scope="session")
def uninitialized_memory_is_nan():
    """In the test session ``torch.empty`` and its kin fill new memory with NaN (torch's deterministic
    mode does so while ``fill_uninitialized_memory`` is on; ``warn_only``: the ops it would refuse
    stay allowed, with a warning). A kernel that leaves an output element unwritten then fails its
    test, instead of passing on a recycled buffer that still held the right answer from an earlier
    test with the same inputs: a mutation of the pipelined Triton forward that scaled only a tile's
    first channel block passed so (2026-11-27)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def se_inputs() -> Callable[..., SEInputs]:
    """Factory: ``se_inputs(shape, dtype, memory_format, device, residual, activation, gate, seed)``."""
    return make_se_inputs


# ---------------------------------------------------------------------------------------------------------------
# Running one implementation
# ---------------------------------------------------------------------------------------------------------------

GRAD_NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual")


def run_se(fn: Callable[..., Tensor], inputs: SEInputs, grad: str = "random",
           upcast: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """Forward and backward of ``fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)``.

    Fresh leaves share the inputs' storage and strides (non-contiguous views
    stay non-contiguous). ``grad``: ``"random"`` backpropagates
    ``inputs.grad_out``; ``"sum"`` backpropagates ``out.sum()`` (an expanded,
    stride-0 gradient). ``upcast``: convert the leaves to this dtype inside the
    graph (the float64 reference), so the gradients still land on the leaves.
    Returns ``{"out": ..., "x": grad, ..., "residual": grad}`` (no residual entry
    in the plain form).
    """
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs.tensors()]
    args = [None if t is None else (t.to(upcast) if upcast is not None else t) for t in leaves]
    out = fn(*args)
    if grad == "sum":
        out.sum().backward()
    elif grad == "random":
        out.backward(inputs.grad_out.to(out.dtype))
    else:
        raise ValueError(grad)
    result = {"out": out.detach()}
    for name, leaf in zip(GRAD_NAMES, leaves):
        if leaf is not None:
            assert leaf.grad is not None, f"no gradient reached {name}"
            result[name] = leaf.grad
    return result


# A few recent cases' inputs, references and baselines: consecutive tests (one per
# backend) share them. Everything cached is read-only by convention (tests compare,
# never modify in place) and SEInputs is frozen.
_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_CACHE_SIZE = 8


def _cached(key: tuple, compute: Callable[[], object]):
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = compute()
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def cached_run(kind: str, inputs: SEInputs, grad: str = "random") -> Dict[str, Tensor]:
    """``reference_se`` (kind ``"reference"``), ``plain_se`` (``"plain"``) or the eager backend
    (``"eager"``) for ``inputs``, computed once per case. Never used for the implementation under
    test, which always runs afresh."""
    compute = {"reference": lambda: reference_se(inputs, grad), "plain": lambda: plain_se(inputs, grad),
               "eager": lambda: backend_se(inputs, "eager", grad)}[kind]
    if inputs.key is None:
        return compute()
    return _cached((kind, grad) + inputs.key, compute)


def reference_se(inputs: SEInputs, grad: str = "random") -> Dict[str, Tensor]:
    """The ground truth: :func:`squeeze_excitation_reference` under autograd on float64 copies."""
    return run_se(lambda *t: squeeze_excitation_reference(*t, inputs.activation, inputs.gate), inputs, grad,
                  upcast=torch.float64)


def backend_se(inputs: SEInputs, backend: str, grad: str = "random") -> Dict[str, Tensor]:
    """The public API :func:`se_fused.squeeze_excitation` with ``backend``."""
    return run_se(lambda *t: se_fused.squeeze_excitation(*t, activation=inputs.activation, gate=inputs.gate,
                                                         backend=backend), inputs, grad)


def plain_se(inputs: SEInputs, grad: str = "random") -> Dict[str, Tensor]:
    """The textbook SE in the storage dtype (PyTorch ops, no float32 accumulation), autograd backward."""
    return run_se(lambda *t: squeeze_excitation_reference(*t, inputs.activation, inputs.gate), inputs, grad)



