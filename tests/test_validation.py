"""The bad-input table of SPEC §2, empty batches, and NaN/Inf propagation.

Every malformed call must raise ValueError/TypeError (RuntimeError for a backend
that cannot run) whose message names the offending tensor's shape, dtype or
device — through the public API on every backend, and through the compiled op
``torch.ops.se_fused.squeeze_excitation_forward`` called directly (its C++
checks), never a crash and never an answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import pytest
import torch

import se_fused
from se_fused import _ops
from se_fused._reference import squeeze_excitation_reference
from conftest import ALL_DEVICE_BACKENDS, CUDA_PRESENT, NO_GPU_REASON, SEShape, make_se_inputs, why_not_run

# Every backend runnable here, plus "auto", on each device present.
API_CASES = [pytest.param((d, b), id=f"{d}-{b}", marks=[pytest.mark.cuda] if d == "cuda" else [])
             for d, b in ALL_DEVICE_BACKENDS + (("cpu", "auto"), ("cuda", "auto"))
             if (b == "auto" and (d == "cpu" or CUDA_PRESENT)) or (b != "auto" and why_not_run(d, b) is None)]
OP_DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not _ops.extension_loaded(), reason="se_fused._C not built")),
              pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                  not (CUDA_PRESENT and _ops.cuda_kernels_built()), reason=NO_GPU_REASON + " or CUDA kernels not built")])]

N, C, R, H, W = 2, 8, 2, 3, 3


def valid_args(device: str) -> Dict[str, object]:
    """A well-formed call: x (2, 8, 3, 3) float32, R = 2, no residual, relu/sigmoid."""
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(N, C, H, W, generator=g).to(device),
                fc1_weight=torch.randn(R, C, 1, 1, generator=g).to(device),
                fc1_bias=torch.randn(R, generator=g).to(device),
                fc2_weight=torch.randn(C, R, 1, 1, generator=g).to(device),
                fc2_bias=torch.randn(C, generator=g).to(device),
                residual=None, activation="relu", gate="sigmoid")


@dataclass(frozen=True)
class BadInput:
    """One row of the table: how to break a valid call, the exception, and what its message must contain."""
    name: str
    change: Callable[[Dict[str, object]], Dict[str, object]]
    error: type
    message: str          # regex; matches the Python checks' "(8, 3, 3)/torch.int32" and C++'s "[8, 3, 3]/Int"


def _set(**changes):
    return lambda a: {**a, **changes}


def _with(name: str, make: Callable[[Dict[str, object]], object]):
    return lambda a: {**a, name: make(a)}


BAD_INPUTS = [
    BadInput("x_3d", _with("x", lambda a: a["x"][0]), ValueError, r"x.*8, 3, 3"),
    BadInput("x_5d", _with("x", lambda a: a["x"][None]), ValueError, r"x.*1, 2, 8, 3, 3"),
    BadInput("x_int32", _with("x", lambda a: a["x"].to(torch.int32)), TypeError, r"x.*(int32|Int\b)"),
    BadInput("x_int64", _with("x", lambda a: a["x"].to(torch.int64)), TypeError, r"x.*(int64|Long)"),
    BadInput("x_bool", _with("x", lambda a: a["x"] > 0), TypeError, r"x.*(bool|Bool)"),
    BadInput("x_complex", _with("x", lambda a: a["x"].to(torch.complex64)), TypeError,
             r"x.*(complex64|ComplexFloat)"),
    BadInput("x_no_channels", _with("x", lambda a: a["x"][:, :0]), ValueError, r"2, 0, 3, 3"),
    BadInput("x_no_pixels", _with("x", lambda a: a["x"][:, :, :0]), ValueError, r"2, 8, 0, 3"),
    BadInput("fc1_weight_int", _with("fc1_weight", lambda a: a["fc1_weight"].to(torch.int64)), TypeError,
             r"fc1_weight.*(int64|Long)"),
    BadInput("fc2_bias_int", _with("fc2_bias", lambda a: a["fc2_bias"].to(torch.int32)), TypeError,
             r"fc2_bias.*(int32|Int\b)"),
    BadInput("fc1_weight_wrong_c", _with("fc1_weight", lambda a: a["fc1_weight"].new_ones(R, C + 1, 1, 1)),
             ValueError, r"fc1_weight.*2, 9, 1, 1"),
    BadInput("fc1_weight_3x3_kernel", _with("fc1_weight", lambda a: a["fc1_weight"].new_ones(R, C, 3, 3)),
             ValueError, r"fc1_weight.*2, 8, 3, 3"),
    BadInput("fc1_weight_3d", _with("fc1_weight", lambda a: a["fc1_weight"].reshape(R, C, 1)), ValueError,
             r"fc1_weight.*2, 8, 1"),
    BadInput("fc1_weight_r0", lambda a: {**a, "fc1_weight": a["fc1_weight"][:0], "fc1_bias": a["fc1_bias"][:0],
                                         "fc2_weight": a["fc2_weight"][:, :0]}, ValueError, r"fc1_weight.*0, 8, 1, 1"),
    BadInput("fc1_bias_wrong_r", _with("fc1_bias", lambda a: a["fc1_bias"].new_ones(R + 1)), ValueError,
             r"fc1_bias.*\b3\b"),
    BadInput("fc2_weight_wrong_r", _with("fc2_weight", lambda a: a["fc2_weight"].new_ones(C, R + 1, 1, 1)),
             ValueError, r"fc2_weight.*8, 3, 1, 1"),
    BadInput("fc2_weight_wrong_c", _with("fc2_weight", lambda a: a["fc2_weight"].new_ones(C + 1, R, 1, 1)),
             ValueError, r"fc2_weight.*9, 2, 1, 1"),
    BadInput("fc2_weight_transposed", _with("fc2_weight", lambda a: a["fc2_weight"].new_ones(R, C, 1, 1)),
             ValueError, r"fc2_weight.*2, 8, 1, 1"),
    BadInput("fc2_bias_wrong_c", _with("fc2_bias", lambda a: a["fc2_bias"].new_ones(C - 1)), ValueError,
             r"fc2_bias.*\b7\b"),
    BadInput("residual_wrong_shape", _with("residual", lambda a: a["x"].new_ones(N, C, H, W + 1)), ValueError,
             r"residual.*2, 8, 3, 4"),
    BadInput("residual_wrong_batch", _with("residual", lambda a: a["x"][:1].clone()), ValueError,
             r"residual.*1, 8, 3, 3"),
    BadInput("residual_float64", _with("residual", lambda a: a["x"].to(torch.float64)), TypeError,
             r"residual.*(float64|Double)"),
    BadInput("residual_int", _with("residual", lambda a: a["x"].to(torch.int32)), TypeError,
             r"residual.*(int32|Int\b)"),
    BadInput("activation_unknown", _set(activation="gelu"), ValueError, r"gelu"),
    BadInput("activation_case", _set(activation="ReLU"), ValueError, r"ReLU"),
    BadInput("gate_unknown", _set(gate="tanh"), ValueError, r"tanh"),
    BadInput("fc1_weight_on_meta", _with("fc1_weight", lambda a: a["fc1_weight"].to("meta")), ValueError,
             r"fc1_weight.*meta"),
    BadInput("residual_on_meta", _with("residual", lambda a: a["x"].to("meta")), ValueError, r"residual.*meta"),
    BadInput("x_on_meta", _with("x", lambda a: a["x"].to("meta")), ValueError, r"meta"),
]
# With a GPU: the real thing, a weight on the CPU while x is on the GPU.
CROSS_DEVICE = BadInput("fc2_bias_on_cpu", _with("fc2_bias", lambda a: a["fc2_bias"].cpu()), ValueError,
                        r"fc2_bias.*cpu")


def _call_api(args, backend):
    return se_fused.squeeze_excitation(args["x"], args["fc1_weight"], args["fc1_bias"], args["fc2_weight"],
                                       args["fc2_bias"], args["residual"], args["activation"], args["gate"],
                                       backend)


def _call_op(args):
    return torch.ops.se_fused.squeeze_excitation_forward(args["x"], args["fc1_weight"], args["fc1_bias"],
                                                         args["fc2_weight"], args["fc2_bias"], args["residual"],
                                                         args["activation"], args["gate"])


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
@pytest.mark.parametrize("device_backend", API_CASES)
def test_bad_input_public_api(device_backend, bad, request):
    """``se_fused.squeeze_excitation`` rejects the bad input with a message naming what is wrong."""
    device, backend = device_backend
    args = bad.change(valid_args(device))
    with pytest.raises(bad.error, match=re.compile(bad.message, re.S)):
        _call_api(args, backend)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_bad_input_registered_op(device, bad, request):
    """The compiled op called directly (no Python validation in front) rejects the bad input too."""
    args = bad.change(valid_args(device))
    with pytest.raises(bad.error, match=re.compile(bad.message, re.S)):
        _call_op(args)


@pytest.mark.parametrize("not_a_tensor", [[1.0], 3.0, None], ids=["list", "float", "None"])
@pytest.mark.parametrize("device_backend", API_CASES)
def test_x_not_a_tensor(device_backend, not_a_tensor, request):
    """x that is not a tensor: TypeError naming its type (not an AttributeError from inside)."""
    device, backend = device_backend
    args = {**valid_args(device), "x": not_a_tensor}
    with pytest.raises(TypeError, match=rf"x.*{type(not_a_tensor).__name__}"):
        _call_api(args, backend)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_meta_tensors_through_backends_that_serve_them(backend):
    """All inputs on "meta": "auto"/"eager" (which serve every device) give a meta output of the right shape."""
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in valid_args("cpu").items()}
    out = _call_api(args, backend)
    assert out.device.type == "meta" and out.shape == (N, C, H, W)


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")
def test_meta_tensors_with_cpu_backend():
    """All inputs on "meta" with backend "cpu": RuntimeError naming the device, nothing computed elsewhere."""
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in valid_args("cpu").items()}
    with pytest.raises(RuntimeError) as info:
        _call_api(args, "cpu")
    assert "meta" in str(info.value) and "'cpu'" in str(info.value), str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_PRESENT, reason=NO_GPU_REASON)
@pytest.mark.parametrize("backend", ["auto", "eager", "cuda", "triton"])
def test_tensors_on_cpu_and_gpu(backend):
    """x on the GPU with a parameter on the CPU: ValueError naming both devices, for every backend."""
    if backend != "auto" and why_not_run("cuda", backend) is not None:
        pytest.skip(why_not_run("cuda", backend))
    args = CROSS_DEVICE.change(valid_args("cuda"))
    with pytest.raises(ValueError, match=r"fc2_bias.*cpu.*cuda"):
        _call_api(args, backend)
    if _ops.cuda_kernels_built():
        with pytest.raises(ValueError, match=r"fc2_bias.*cpu"):
            _call_op(args)


@pytest.mark.parametrize("device_backend", API_CASES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_empty_batch(device_backend, residual, memory_format):
    """N = 0: an empty output of shape (0, C, H, W), an empty grad of x and zero weight gradients."""
    device, backend = device_backend
    inputs = make_se_inputs(SEShape(0, C, R, H, W), torch.float32, memory_format, device, residual)
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs.tensors()]
    out = se_fused.squeeze_excitation(*leaves, backend=backend)
    assert out.shape == (0, C, H, W) and out.dtype == torch.float32 and out.device == inputs.x.device
    out.sum().backward()
    x, w1, b1, w2, b2, res = leaves
    assert x.grad.shape == (0, C, H, W)
    for p in (w1, b1, w2, b2):
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    if residual:
        assert res.grad.shape == (0, C, H, W)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_empty_batch_registered_ops(device, residual):
    """N = 0 through the forward and backward ops directly: empty tensors, zero weight gradients."""
    inputs = make_se_inputs(SEShape(0, C, R, H, W), torch.float32, "nchw", device, residual)
    out, pooled, hidden, scale = torch.ops.se_fused.squeeze_excitation_forward(
        *inputs.tensors(), inputs.activation, inputs.gate)
    assert out.shape == (0, C, H, W) and pooled.shape == (0, C) and hidden.shape == (0, R) and scale.shape == (0, C)
    grads = torch.ops.se_fused.squeeze_excitation_backward(
        inputs.grad_out, inputs.x, out if residual else None, inputs.fc1_weight, inputs.fc2_weight, pooled, hidden,
        scale, inputs.activation, inputs.gate)
    assert grads[0].shape == (0, C, H, W)
    for g, p in zip(grads[2:], (inputs.fc1_weight, inputs.fc1_bias, inputs.fc2_weight, inputs.fc2_bias)):
        assert g.shape == p.shape and not g.any()


# ---------------------------------------------------------------------------------------------------------------
# NaN / Inf: propagate as PyTorch's own ops do (SPEC §2)
# ---------------------------------------------------------------------------------------------------------------

ACT_GATES = [("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "sigmoid"), ("silu", "hardsigmoid")]
NONFINITE_SHAPE = SEShape(3, 8, 2, 3, 3)


def _with_nonfinite(inputs):
    """x with a NaN in sample 0, +Inf in sample 1, -Inf in sample 2 (sample 2 also has a finite twin channel)."""
    x = inputs.x.detach().clone()
    x[0, 3, 1, 1] = float("nan")
    x[1, 5, 0, 2] = float("inf")
    x[2, 1, 2, 0] = float("-inf")
    return inputs.with_(x=x)


def _assert_same_nonfinite(name, got, want):
    """Same NaN positions, same ±Inf positions, finite values close (float32 / bfloat16 rounding)."""
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: NaN at {got.isnan().sum().item()} positions, PyTorch gives {want.isnan().sum().item()}")
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf()), (
        f"{name}: Inf positions differ from PyTorch's")
    finite = want.isfinite()
    # The fused path accumulates in float32 where the plain ops round to the storage dtype in between.
    tol = dict(rtol=2e-2, atol=2e-2) if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[finite], want[finite], **tol)


def _nonfinite_case(device_backend, dtype, memory_format, residual, activation, gate):
    device, backend = device_backend
    inputs = _with_nonfinite(make_se_inputs(NONFINITE_SHAPE, dtype, memory_format, device, residual, activation,
                                            gate))
    results = {}
    for impl in ("plain", backend):
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs.tensors()]
        if impl == "plain":
            out = squeeze_excitation_reference(*leaves, activation, gate)
        else:
            out = se_fused.squeeze_excitation(*leaves, activation=activation, gate=gate, backend=backend)
        out.backward(inputs.grad_out)
        results[impl] = (out.detach(), leaves[0].grad)
    return results["plain"], results[backend]


@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_nonfinite_forward(se_device_backend, dtype, memory_format, residual, activation, gate):
    """NaN/±Inf in x: the output has NaN/Inf exactly where the textbook SE in PyTorch ops has them."""
    want, got = _nonfinite_case(se_device_backend, dtype, memory_format, residual, activation, gate)
    _assert_same_nonfinite("out", got[0], want[0])


@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_nonfinite_backward(se_device_backend, residual, activation, gate, request):
    """NaN/±Inf in x: grad of x has NaN/Inf where autograd through PyTorch's ops has them."""
    want, got = _nonfinite_case(se_device_backend, torch.float32, "nchw", residual, activation, gate)
    _assert_same_nonfinite("grad of x", got[1], want[1])
