"""torch.library.opcheck on the three registered ops, with all of its default tests.

opcheck's defaults are ``test_schema`` (the schema's aliasing/mutation claims
hold), ``test_autograd_registration`` (autograd is registered the supported
way), ``test_faketensor`` (the fake kernel's shapes, dtypes and strides match
the real kernel's) and ``test_aot_dispatch_dynamic`` (the op traces with
dynamic shapes under AOTAutograd, forward and backward). Together they are what
``torch.compile(fullgraph=True)`` relies on.
"""
from __future__ import annotations

import pytest
import torch

from conftest import CUDA_PRESENT, NO_GPU_REASON, SEShape, make_se_inputs
from se_fused import _ops

pytestmark = pytest.mark.skipif(not _ops.extension_loaded(), reason="se_fused._C not built")

# The CPU kernels everywhere; the CUDA kernels where a GPU is present (the fake kernel
# must describe both: same shapes, dtypes and strides).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not (CUDA_PRESENT and _ops.cuda_kernels_built()), reason=NO_GPU_REASON + " or CUDA kernels not built")])]

FORWARD = torch.ops.se_fused.squeeze_excitation_forward.default
BACKWARD = torch.ops.se_fused.squeeze_excitation_backward.default
DIFFERENTIABLE = torch.ops.se_fused.squeeze_excitation.default

SHAPE = SEShape(2, 37, 3, 5, 3)   # C not a multiple of 8, H·W = 15

# (dtype, memory format, residual, activation, gate): NCHW, channels_last, strided views,
# the residual form, float32/bfloat16 (and float16/float64 once each).
SAMPLES = [
    (torch.float32, "nchw", False, "relu", "sigmoid"),
    (torch.float32, "channels_last", False, "silu", "hardsigmoid"),
    (torch.float32, "nchw", True, "relu", "sigmoid"),
    (torch.float32, "channels_last", True, "silu", "sigmoid"),
    (torch.bfloat16, "nchw", False, "relu", "hardsigmoid"),
    (torch.bfloat16, "channels_last", True, "relu", "sigmoid"),
    (torch.float16, "channels_last", False, "silu", "sigmoid"),
    (torch.float64, "nchw", True, "silu", "hardsigmoid"),
    (torch.float32, "sliced_nchw", True, "relu", "sigmoid"),
    (torch.float32, "sliced_nhwc", False, "relu", "sigmoid"),
]
SAMPLE_IDS = [f"{str(d).replace('torch.', '')}-{f}-{'residual' if r else 'plain'}-{a}-{g}"
              for d, f, r, a, g in SAMPLES]


def _forward_args(dtype, memory_format, residual, activation, gate, requires_grad: bool, device: str = "cpu"):
    inputs = make_se_inputs(SHAPE, dtype, memory_format, device, residual, activation, gate)
    # detach(): fresh tensors over the same storage and strides (strided views stay strided).
    tensors = [None if t is None else t.detach() for t in inputs.tensors()]
    if requires_grad:
        tensors = [None if t is None else t.requires_grad_() for t in tensors]
    return inputs, (*tensors, activation, gate)


# The ops taking the forward's arguments: the forward op, and the same made differentiable in C++.
FORWARD_LIKE = [pytest.param(FORWARD, id="forward"), pytest.param(DIFFERENTIABLE, id="differentiable")]


@pytest.mark.parametrize("dtype,memory_format,residual,activation,gate", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", FORWARD_LIKE)
def test_opcheck_forward(op, device, dtype, memory_format, residual, activation, gate, requires_grad):
    """``se_fused::squeeze_excitation_forward`` and ``se_fused::squeeze_excitation``: all default opcheck tests."""
    _, args = _forward_args(dtype, memory_format, residual, activation, gate, requires_grad, device)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype,memory_format,residual,activation,gate", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device, dtype, memory_format, residual, activation, gate):
    """``se_fused::squeeze_excitation_backward`` with the forward's saved tensors: all default opcheck tests.

    The backward op is not itself differentiable (no double backward), so its
    inputs do not require grad.
    """
    inputs, args = _forward_args(dtype, memory_format, residual, activation, gate, False, device)
    x, w1, b1, w2, b2, res = args[:6]
    out, pooled, hidden, scale = FORWARD(*args)
    torch.library.opcheck(BACKWARD, (inputs.grad_out, x, out if residual else None, w1, w2, pooled, hidden, scale,
                                     activation, gate))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_with_expanded_grad(device):
    """The backward op given a stride-0 (expanded) gradient, as ``out.sum().backward()`` produces."""
    _, args = _forward_args(torch.float32, "channels_last", True, "relu", "sigmoid", False, device)
    x, w1, b1, w2, b2, res = args[:6]
    out, pooled, hidden, scale = FORWARD(*args)
    grad_out = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
    torch.library.opcheck(BACKWARD, (grad_out, x, out, w1, w2, pooled, hidden, scale, "relu", "sigmoid"))
