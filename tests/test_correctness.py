"""Every available backend against the float64 reference: forward and every gradient.

The reference is :func:`se_fused._reference.squeeze_excitation_reference` under
autograd on float64 copies of the inputs (conftest.reference_se); the bound is
the one table of tests/tolerances.py (2x the baseline's error in the same dtype
plus a floor). Devices/backends, shapes, dtypes and memory formats come from
conftest, so this file runs the CUDA and Triton backends on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch

import se_fused
from se_fused._reference import excitation, gate_fn
from se_fused._validation import validate_se_inputs
from se_fused.backends import resolve_backend
from conftest import (ODD_SHAPES, SKIPPED_DEVICE_BACKENDS, STAGE_SHAPES, SEShape, backend_se, cached_run,
                      make_se_inputs, why_not_run)
from tolerances import assert_close_to_reference

ACT_GATES = [("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "sigmoid"), ("silu", "hardsigmoid")]


def _expected_channels_last(memory_format: str) -> bool:
    return memory_format in ("channels_last", "sliced_nhwc")


def check_backend(inputs, backend: str, grad: str = "random", request=None) -> None:
    """Forward and all gradients of ``backend`` within tolerance of the float64 reference.

    The baseline is the ``"eager"`` backend, or for ``"eager"`` itself the
    textbook SE in the storage dtype (tests/tolerances.py explains why).
    Reference and baseline are computed once per case (conftest.cached_run);
    the backend under test runs afresh.
    """
    dtype = inputs.x.dtype
    reference = cached_run("reference", inputs, grad)
    got = backend_se(inputs, backend, grad)
    baseline = cached_run("plain" if backend == "eager" else "eager", inputs, grad)
    assert set(got) == set(reference)
    for name, ref in reference.items():
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype}, expected {dtype}"
        assert got[name].device == inputs.x.device
        assert_close_to_reference(f"backend {backend!r}: {name if name == 'out' else 'grad of ' + name}",
                                  got[name], baseline[name], ref, dtype)


def _layout_checks(inputs, backend: str, memory_format: str) -> None:
    """Output and the gradients of x/residual come back in x's (closest) memory format (SPEC §2).

    The gradients are caught by tensor hooks, i.e. as the backend returns them:
    a leaf's ``.grad`` would show AccumulateGrad's layout instead.
    """
    x = inputs.x.detach().requires_grad_()
    res = None if inputs.residual is None else inputs.residual.detach().requires_grad_()
    raw_grads = {}
    x.register_hook(lambda g: raw_grads.__setitem__("grad of x", g))
    if res is not None:
        res.register_hook(lambda g: raw_grads.__setitem__("grad of residual", g))
    out = se_fused.squeeze_excitation(x, inputs.fc1_weight, inputs.fc1_bias, inputs.fc2_weight, inputs.fc2_bias,
                                      res, inputs.activation, inputs.gate, backend)
    out.backward(inputs.grad_out)
    assert len(raw_grads) == (2 if res is not None else 1)
    for name, t in [("out", out)] + sorted(raw_grads.items()):
        channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        assert min(t.shape[1], t.shape[2] * t.shape[3]) > 1  # else both layouts are the same bytes
        assert channels_last == _expected_channels_last(memory_format), (
            f"{name} has strides {t.stride()} for x in {memory_format}")


@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_odd_shapes(se_device_backend, se_odd_shape, se_dtype, se_memory_format, residual, activation, gate,
                    se_inputs, request):
    """The full product on SPEC §3's odd shapes (C = 7/33/37/40, R = 1, H·W ∈ {1, 3, 49, 3136}, N = 1)."""
    device, backend = se_device_backend
    inputs = se_inputs(se_odd_shape, se_dtype, se_memory_format, device, residual, activation, gate)
    check_backend(inputs, backend, request=request)


# On the stage shapes the whole product would cost ~4x this file's budget on a
# 2-core CPU; dtype x memory format is kept complete (that is where kernels
# branch), and three (residual, activation, gate) variants cover the SE-ResNet
# tail, the plain block and the other activation/gate pair. The odd shapes above
# run every combination.
STAGE_VARIANTS = [(False, "relu", "sigmoid"), (True, "relu", "sigmoid"), (True, "silu", "hardsigmoid")]


@pytest.mark.parametrize("residual,activation,gate", STAGE_VARIANTS,
                         ids=[f"{'residual' if r else 'plain'}-{a}-{g}" for r, a, g in STAGE_VARIANTS])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "sliced_nhwc"])
def test_stage_shapes(se_device_backend, se_stage_shape, se_dtype, memory_format, residual, activation, gate,
                      se_inputs, request):
    """SE-ResNet-50's four stage shapes (SPEC §3) at batch 2."""
    device, backend = se_device_backend
    inputs = se_inputs(se_stage_shape, se_dtype, memory_format, device, residual, activation, gate)
    check_backend(inputs, backend, request=request)


INTERMEDIATE_SHAPES = list(ODD_SHAPES) + [STAGE_SHAPES[0], STAGE_SHAPES[3]]
INTERMEDIATE_ACT_GATES = [("relu", "sigmoid"), ("silu", "hardsigmoid")]


def _intermediates_reference(inputs):
    """float64 ``(pooled (N, C), hidden (N, R) pre-activation, scale (N, C))`` from the reference math."""
    f64 = [t.detach().to(torch.float64) for t in inputs.tensors()[:5]]
    pooled = f64[0].mean(dim=(2, 3))
    hidden, scale = excitation(pooled, *f64[1:], inputs.activation, inputs.gate)
    return pooled, hidden, scale


def _intermediates_plain(inputs):
    """The same three in the storage dtype with plain PyTorch ops (the baseline for the eager backend)."""
    x, w1, b1, w2, b2 = (t.detach() for t in inputs.tensors()[:5])
    pooled = x.mean(dim=(2, 3))
    hidden, scale = excitation(pooled, w1, b1, w2, b2, inputs.activation, inputs.gate)
    return pooled, hidden, scale


@pytest.mark.parametrize("activation,gate", INTERMEDIATE_ACT_GATES,
                         ids=[f"{a}-{g}" for a, g in INTERMEDIATE_ACT_GATES])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", INTERMEDIATE_SHAPES, ids=[s.id for s in INTERMEDIATE_SHAPES])
def test_saved_intermediates(se_device_backend, shape, se_dtype, memory_format, activation, gate, se_inputs):
    """The forward's saved pooled means, pre-activations and scales: float32 (float64 for float64 x), accurate.

    SPEC §1 requires float32 accumulation whatever the storage dtype. The
    output of a bfloat16 call cannot show a pooled mean rounded to bfloat16 (the
    error stays under one bfloat16 ulp of the output), but the saved float32
    intermediates can: they are held to the float32 floor, with the eager
    backend (or for eager itself the plain ops in the storage dtype) as baseline.
    """
    device, backend = se_device_backend
    inputs = se_inputs(shape, se_dtype, memory_format, device, False, activation, gate)
    x, w1, b1, w2, b2, res = validate_se_inputs(*inputs.tensors(), activation, gate)
    _, *got = resolve_backend(backend, x.device).forward(x, w1, b1, w2, b2, res, activation, gate)
    if backend == "eager":
        baseline = _intermediates_plain(inputs)
    else:
        _, *baseline = resolve_backend("eager", x.device).forward(x, w1, b1, w2, b2, res, activation, gate)
    acc = torch.float64 if se_dtype == torch.float64 else torch.float32
    for name, g, b, ref in zip(("pooled", "hidden", "scale"), got, baseline, _intermediates_reference(inputs)):
        assert g.dtype == acc and g.device == x.device, f"{name}: {g.dtype} on {g.device}"
        assert g.is_contiguous(), f"{name}: strides {g.stride()}"
        assert_close_to_reference(f"backend {backend!r}: saved {name}", g, b, ref, acc)


SUM_SHAPES = [ODD_SHAPES[1], STAGE_SHAPES[3]]


@pytest.mark.parametrize("shape", SUM_SHAPES, ids=[s.id for s in SUM_SHAPES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_backward_through_sum(se_device_backend, shape, se_dtype, memory_format, residual, se_inputs):
    """``out.sum().backward()``: the incoming gradient is an expanded, stride-0 tensor.

    A kernel that assumes a contiguous gradient reads garbage here without an
    error (KERNEL-NOTES), so this runs on every backend and dtype.
    """
    device, backend = se_device_backend
    inputs = se_inputs(shape, se_dtype, memory_format, device, residual, "silu", "sigmoid")
    check_backend(inputs, backend, grad="sum")


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "sliced_nchw", "sliced_nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_output_layout_follows_x(se_device_backend, memory_format, residual, se_inputs, request):
    """Output and gradients of x/residual are in x's memory format (the closer one for a strided x)."""
    device, backend = se_device_backend
    inputs = se_inputs(ODD_SHAPES[4], torch.float32, memory_format, device, residual)
    _layout_checks(inputs, backend, memory_format)


@pytest.mark.parametrize("x_format,grad_format", [("channels_last", "nchw"), ("nchw", "channels_last")])
def test_grad_out_in_other_layout(se_device_backend, x_format, grad_format, se_inputs):
    """A gradient arriving in the other memory format than x is read by its strides, not its bytes."""
    device, backend = se_device_backend
    inputs = se_inputs(ODD_SHAPES[4], torch.float32, x_format, device, True, "relu", "hardsigmoid")
    grad_out = (inputs.grad_out.contiguous(memory_format=torch.channels_last) if grad_format != "nchw"
                else inputs.grad_out.contiguous())
    check_backend(inputs.with_(grad_out=grad_out), backend)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_two_dimensional_weights(se_device_backend, residual, se_inputs):
    """``fc1_weight (R, C)`` / ``fc2_weight (C, R)`` (nn.Linear style) give the 4-D results, grads shaped 2-D."""
    device, backend = se_device_backend
    inputs = se_inputs(ODD_SHAPES[1], torch.float32, "channels_last", device, residual, "silu", "hardsigmoid")
    four_d = backend_se(inputs, backend)
    r, c = inputs.fc1_weight.shape[:2]
    two_d = backend_se(inputs.with_(fc1_weight=inputs.fc1_weight.reshape(r, c),
                                    fc2_weight=inputs.fc2_weight.reshape(c, r)), backend)
    assert two_d["fc1_weight"].shape == (r, c) and two_d["fc2_weight"].shape == (c, r)
    for name, t in four_d.items():
        # Same numbers in the same order: the result must not depend on how the weight is shaped.
        torch.testing.assert_close(two_d[name].reshape(t.shape), t, rtol=0, atol=0, msg=name)


def _cpu_backend_or_skip():
    if "cpu" not in se_fused.available_backends():
        pytest.skip("backend 'cpu' not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpu_backend_is_deterministic(dtype, memory_format, residual, se_inputs):
    """Backend "cpu": the same inputs give bitwise the same output and gradients (run twice, all threads)."""
    _cpu_backend_or_skip()
    inputs = se_inputs(STAGE_SHAPES[0], dtype, memory_format, "cpu", residual)
    first = backend_se(inputs, "cpu")
    second = backend_se(inputs, "cpu")
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


@pytest.mark.parametrize("shape", [STAGE_SHAPES[0], STAGE_SHAPES[3], SEShape(5, 37, 3, 7, 7)], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpu_backend_independent_of_thread_count(shape, memory_format, residual, se_inputs):
    """Backend "cpu": 1, 2 and 3 threads give bitwise the same output and gradients (every sum is cut into
    fixed blocks reduced in a fixed order, whoever computes them)."""
    _cpu_backend_or_skip()
    if not se_fused._ops.build_info().get("cpu_parallel"):
        pytest.skip("the CPU kernel was built without threads: every thread count runs the same serial code")
    inputs = se_inputs(shape, torch.float32, memory_format, "cpu", residual)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = backend_se(inputs, "cpu")
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for name in results[1]:
            assert torch.equal(results[1][name], results[n][name]), f"{name}: {n} threads differ from 1"


# The CPU kernel's two cache settings (csrc/cpu/squeeze_excitation_cpu.cpp,
# kCacheBudgetBytes), read per call: at the test shapes the defaults take one
# chunk and plain stores, so these force the other paths.
CPU_CACHE_SETTINGS = {"streamed-outputs": {"SE_FUSED_CPU_STREAM_BYTES": "0"},
                      "one-sample-chunks": {"SE_FUSED_CPU_CHUNK_BYTES": "1"}}


@pytest.mark.parametrize("setting", list(CPU_CACHE_SETTINGS))
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpu_backend_cache_paths(setting, se_odd_shape, se_dtype, memory_format, residual, se_inputs, monkeypatch,
                                 request):
    """Backend "cpu" with streaming stores for every output, or one sample per chunk, on the odd shapes
    (rows shorter than a cache line, rows with partial lines at both ends, N = 1-3)."""
    _cpu_backend_or_skip()
    for name, value in CPU_CACHE_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)
    check_backend(se_inputs(se_odd_shape, se_dtype, memory_format, "cpu", residual), "cpu", request=request)


@pytest.mark.parametrize("name", ["SE_FUSED_CPU_STREAM_BYTES", "SE_FUSED_CPU_CHUNK_BYTES"])
@pytest.mark.parametrize("value", ["8MB", "abc", "-1"])
def test_cpu_cache_settings_refuse_non_byte_counts(name, value, monkeypatch):
    """A cache setting that is not a non-negative integer is refused by name, not read as some number."""
    _cpu_backend_or_skip()
    monkeypatch.setenv(name, value)
    inputs = make_se_inputs(SEShape(2, 8, 2, 3, 3), torch.float32, "nchw", "cpu")
    with pytest.raises(ValueError, match=f"{name} must be a number of bytes >= 0"):
        backend_se(inputs, "cpu")


# H·W = 9: float32 rows of one to two vectors, so the flat NCHW sweep (cpu::stream_rows) blends in most vectors.
@pytest.mark.parametrize("shape", [STAGE_SHAPES[0], STAGE_SHAPES[3], SEShape(3, 37, 3, 7, 7), SEShape(3, 37, 3, 3, 3)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpu_streaming_changes_no_value(shape, dtype, memory_format, residual, se_inputs, monkeypatch):
    """Backend "cpu": streaming stores change where bytes go, never a value: bitwise the same results."""
    _cpu_backend_or_skip()
    inputs = se_inputs(shape, dtype, memory_format, "cpu", residual)
    results = {}
    for threshold in ("0", str(1 << 60)):
        monkeypatch.setenv("SE_FUSED_CPU_STREAM_BYTES", threshold)
        results[threshold] = backend_se(inputs, "cpu")
    streamed, plain = results.values()
    for name in plain:
        assert torch.equal(streamed[name], plain[name]), f"{name} differs when the outputs are streamed"


@pytest.mark.parametrize("shape", [STAGE_SHAPES[3], SEShape(3, 37, 3, 7, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpu_weights_in_place_or_copied_agree(shape, dtype, memory_format, residual, se_inputs):
    """Backend "cpu" with 16-bit x: the MLP reads parameters stored in x's dtype in place (widened as loaded) and
    converts parameters of another dtype to float32 first. Given float32 parameters holding the same values, the
    two paths compute the same sums in the same order: bitwise the same output and input gradients, and the
    same parameter gradients once the float32 ones are rounded to x's dtype."""
    _cpu_backend_or_skip()
    inputs = se_inputs(shape, dtype, memory_format, "cpu", residual)
    params = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    in_place = backend_se(inputs, "cpu")
    copied = backend_se(inputs.with_(**{name: getattr(inputs, name).float() for name in params}), "cpu")
    for name, value in in_place.items():
        other = copied[name]
        if name in params:
            assert other.dtype == torch.float32, name
            other = other.to(dtype)
        assert torch.equal(value, other), f"{name} differs between parameters read in place and copied"


def test_backends_under_test_include_eager_and_cpu():
    """The product above is not silently empty: eager and cpu are usable on every machine this suite runs on."""
    available = se_fused.available_backends()
    assert "eager" in available and "cpu" in available, available


@pytest.mark.parametrize("device_backend", SKIPPED_DEVICE_BACKENDS)
def test_device_backend_not_run_here(device_backend):
    """One skipped item per (device, backend) the products above leave out on this machine, with the reason."""
    pytest.skip(why_not_run(*device_backend))
