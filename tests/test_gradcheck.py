"""torch.autograd.gradcheck in float64: the backward of every CPU backend is the derivative of its forward.

This checks the hand-written backwards (the eager backend's explicit formulas
and the C++ kernel) against finite differences of their own forward, which is
independent of the reference comparison in test_correctness.py.

Kinks: relu (u = 0), hardsigmoid (v = ±3) and the residual epilogue's relu
(x·s + residual = 0) are not differentiable, and a finite difference across one
disagrees with the one-sided analytic derivative. conftest.make_se_inputs keeps
every such quantity at least KINK_MARGIN = 1e-3 away (0.25 for the epilogue),
while gradcheck perturbs each input by eps = 1e-6, which moves u, v and
x·s + residual by at most ~1e-5: no perturbation crosses a kink, so the
checks are exact-derivative checks, not flaky ones.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import se_fused
from conftest import SEShape, make_se_inputs

# Small shapes (gradcheck perturbs every input element): C not a multiple of 8,
# R = 1 and R > 1, H·W = 1 and > 1, N = 1 and 2.
GRADCHECK_SHAPES = (SEShape(2, 6, 2, 3, 2), SEShape(1, 5, 1, 1, 1), SEShape(2, 9, 3, 2, 2))
ACT_GATES = [("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "sigmoid"), ("silu", "hardsigmoid")]

CPU_BACKENDS = [pytest.param(b, marks=[] if b in se_fused.available_backends() else
                             [pytest.mark.skip(reason=f"backend {b!r} not available")]) for b in ("eager", "cpu")]


def _leaves(inputs):
    return [None if t is None else t.detach().requires_grad_() for t in inputs.tensors()]


# (shape, memory format) pairs; with H·W = 1 channels_last is the same bytes as NCHW.
SHAPE_FORMATS = [(s, f) for s in GRADCHECK_SHAPES for f in ("nchw", "channels_last")
                 if f == "nchw" or s.h * s.w > 1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,memory_format", SHAPE_FORMATS, ids=[f"{s.id}-{f}" for s, f in SHAPE_FORMATS])
def test_gradcheck_public_api(shape, memory_format, residual, activation, gate, backend):
    """``se_fused.squeeze_excitation``: gradients of x, both weights, both biases, residual (through the C++
    autograd of ``se_fused::squeeze_excitation`` for "cpu", through FusedSEFunction for "eager")."""
    inputs = make_se_inputs(shape, torch.float64, memory_format, "cpu", residual, activation, gate)
    leaves = _leaves(inputs)
    args = [t for t in leaves if t is not None]

    def fn(*tensors):
        x, w1, b1, w2, b2 = tensors[:5]
        res = tensors[5] if residual else None
        return se_fused.squeeze_excitation(x, w1, b1, w2, b2, res, activation, gate, backend)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="se_fused._C not built")
@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_gradcheck_function_with_cpu_kernel(memory_format, residual, activation, gate):
    """``FusedSEFunction.apply`` with backend "cpu": the Python autograd path over the same kernels
    (``squeeze_excitation`` takes the C++ one, checked above)."""
    inputs = make_se_inputs(GRADCHECK_SHAPES[2], torch.float64, memory_format, "cpu", residual, activation, gate)
    leaves = _leaves(inputs)
    args = [t for t in leaves if t is not None]

    def fn(*tensors):
        res = tensors[5] if residual else None
        return se_fused.FusedSEFunction.apply(*tensors[:5], res, activation, gate, "cpu")

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="se_fused._C not built")
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "sliced_nhwc"])
@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradcheck_registered_op(residual, activation, gate, memory_format):
    """The op ``se_fused::squeeze_excitation_forward`` on its own (its register_autograd formula).

    ``torch.compile`` differentiates this op through that formula rather than
    through FusedSEFunction, so it gets its own check; a strided x must be
    handled by the op's C++ checks, not only by the Python validation.
    """
    inputs = make_se_inputs(GRADCHECK_SHAPES[0], torch.float64, memory_format, "cpu", residual, activation, gate)
    args = [t for t in _leaves(inputs) if t is not None]

    def fn(*tensors):
        x, w1, b1, w2, b2 = tensors[:5]
        res = tensors[5] if residual else None
        return torch.ops.se_fused.squeeze_excitation_forward(x, w1, b1, w2, b2, res, activation, gate)[0]

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_detects_a_wrong_backward(backend, monkeypatch):
    """The check above can fail: with grad_x off by a tiny factor, gradcheck must reject it (the backend's
    backward skewed in Python, so the call goes through FusedSEFunction)."""
    from se_fused import backends

    real = backends._BACKENDS[backend]

    def skewed_backward(*args):
        grads = real.backward(*args)
        return (grads[0] * (1 + 1e-3),) + tuple(grads[1:])

    monkeypatch.setitem(backends._BACKENDS, backend, backends.Backend(
        real.name, real.forward, skewed_backward, real.serves, real.status))
    inputs = make_se_inputs(GRADCHECK_SHAPES[0], torch.float64, "nchw", "cpu", False, "silu", "sigmoid")
    args = [t for t in _leaves(inputs) if t is not None]
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda *t: se_fused.squeeze_excitation(*t, None, "silu", "sigmoid", backend),
                                 args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="se_fused._C not built")
def test_gradcheck_detects_a_wrong_backward_op():
    """The C++ autograd path can fail too: with the backward op's grad_x off by a tiny factor (a Python
    kernel put in front of it at AutogradCPU for this test), gradcheck of ``squeeze_excitation`` must reject it."""
    backward_op = torch.ops.se_fused.squeeze_excitation_backward.default

    def skewed(*args):
        with torch._C._AutoDispatchBelowAutograd():
            grads = backward_op(*args)
        return (grads[0] * (1 + 1e-3),) + tuple(grads[1:])

    inputs = make_se_inputs(GRADCHECK_SHAPES[0], torch.float64, "nchw", "cpu", False, "silu", "sigmoid")
    args = [t for t in _leaves(inputs) if t is not None]
    check = lambda: torch.autograd.gradcheck(  # noqa: E731
        lambda *t: se_fused.squeeze_excitation(*t, None, "silu", "sigmoid", "cpu"), args, eps=1e-6, atol=1e-7,
        rtol=1e-5)
    lib = torch.library.Library("se_fused", "IMPL")
    try:
        lib.impl("squeeze_excitation_backward", skewed, "AutogradCPU")
        with pytest.raises(GradcheckError):
            check()
    finally:
        lib._destroy()
    assert check()   # the real kernel again


# Double backward: the fused paths are differentiable once (their backward reads intermediates the forward saved
# without a graph, se_fused/_once.py), so a second differentiation must raise, never give second derivatives
# without the SE terms.
DOUBLE_BACKWARD_PATHS = [
    pytest.param("squeeze_excitation", "eager", id="function-eager"),
    pytest.param("squeeze_excitation", "cpu", id="op-cpu", marks=pytest.mark.skipif(
        "cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")),
    pytest.param("FusedSEFunction", "cpu", id="function-cpu", marks=pytest.mark.skipif(
        "cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")),
    pytest.param("forward_op", "cpu", id="forward-op-cpu", marks=pytest.mark.skipif(
        "cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")),
]


@pytest.mark.parametrize("entry,backend", DOUBLE_BACKWARD_PATHS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_double_backward_raises(entry, backend, residual):
    """With create_graph=True the first gradients come out (equal to the plain backward's); differentiating them
    again, towards x or towards the weights (a gradient penalty's ``.backward()``), raises a clear error."""
    inputs = make_se_inputs(GRADCHECK_SHAPES[0], torch.float64, "nchw", "cpu", residual, "silu", "sigmoid")
    leaves = _leaves(inputs)
    x, w1 = leaves[0], leaves[1]

    def run():
        if entry == "FusedSEFunction":
            return se_fused.FusedSEFunction.apply(*leaves, "silu", "sigmoid", backend)
        if entry == "forward_op":  # its register_autograd formula
            return torch.ops.se_fused.squeeze_excitation_forward(*leaves, "silu", "sigmoid")[0]
        return se_fused.squeeze_excitation(*leaves, activation="silu", gate="sigmoid", backend=backend)

    want = torch.autograd.grad(run(), [x, w1], inputs.grad_out)
    got = torch.autograd.grad(run(), [x, w1], inputs.grad_out, create_graph=True)
    for g, w in zip(got, want):
        assert g.requires_grad and torch.equal(g.detach(), w)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(got[0].sum(), x)
    penalty = sum((g ** 2).sum() for g in torch.autograd.grad(run(), [x], inputs.grad_out, create_graph=True))
    with pytest.raises(RuntimeError, match="differentiable once"):
        penalty.backward()


def test_reference_block_has_second_derivatives():
    """What the error above points to: SEBlock (plain ops) passes gradgradcheck."""
    inputs = make_se_inputs(GRADCHECK_SHAPES[0], torch.float64, "nchw", "cpu", False, "silu", "sigmoid")
    args = [t for t in _leaves(inputs) if t is not None]
    from se_fused._reference import squeeze_excitation_reference

    assert torch.autograd.gradgradcheck(lambda *t: squeeze_excitation_reference(*t, None, "silu", "sigmoid"), args,
                                        eps=1e-6, atol=1e-7, rtol=1e-5)
