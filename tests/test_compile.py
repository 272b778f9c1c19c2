"""torch.compile(fullgraph=True) of FusedSEBlock: no graph break, forward and backward equal to eager mode.

Compiling costs tens of seconds on a 2-core CPU, so this file keeps to a few
cases: the fused C++ op (backend "cpu") in the residual form on a channels_last
input, and the plain-ops backend ("eager") in the plain form.
"""
from __future__ import annotations

import pytest
import torch

import se_fused
from conftest import SEShape, make_se_inputs

SHAPE = SEShape(2, 40, 3, 5, 5)

CASES = [
    pytest.param("cpu", True, "channels_last", "relu", "sigmoid", id="cpu-residual-channels_last",
                 marks=[] if "cpu" in se_fused.available_backends()
                 else [pytest.mark.skip(reason="backend 'cpu' not built")]),
    pytest.param("eager", False, "nchw", "silu", "hardsigmoid", id="eager-plain-nchw"),
]


def _block_and_inputs(backend, residual, memory_format, activation, gate):
    inputs = make_se_inputs(SHAPE, torch.float32, memory_format, "cpu", residual, activation, gate)
    block = se_fused.FusedSEBlock(SHAPE.c, reduction=SHAPE.c // SHAPE.r, activation=activation, gate=gate,
                                  backend=backend)
    assert block.fc1.weight.shape == inputs.fc1_weight.shape
    with torch.no_grad():
        for param, value in zip(block.parameters(), (inputs.fc1_weight, inputs.fc1_bias, inputs.fc2_weight,
                                                     inputs.fc2_bias)):
            param.copy_(value)
    return block, inputs


def _forward_backward(module, inputs):
    x = inputs.x.detach().requires_grad_()
    res = None if inputs.residual is None else inputs.residual.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x) if res is None else module(x, res)
    out.backward(inputs.grad_out)
    # A compiled module names its parameters "_orig_mod.fc1.weight" etc.
    grads = {"x": x.grad, **{name.removeprefix("_orig_mod."): p.grad for name, p in module.named_parameters()}}
    if res is not None:
        grads["residual"] = res.grad
    return out.detach(), grads


@pytest.mark.parametrize("backend,residual,memory_format,activation,gate", CASES)
def test_compiled_block_matches_eager_mode(backend, residual, memory_format, activation, gate):
    """Forward and every gradient of the compiled block equal the uncompiled block's."""
    torch._dynamo.reset()
    block, inputs = _block_and_inputs(backend, residual, memory_format, activation, gate)
    want_out, want_grads = _forward_backward(block, inputs)
    compiled = torch.compile(block, fullgraph=True)   # fullgraph: a graph break raises
    got_out, got_grads = _forward_backward(compiled, inputs)
    if backend == "cpu":
        # The compiled graph calls the same C++ op on the same tensors: same bits.
        tolerance = dict(rtol=0, atol=0)
    else:
        # Inductor fuses the plain ops and may reorder float32 sums: float32 rounding only.
        tolerance = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_out, want_out, **tolerance)
    assert got_out.is_contiguous(memory_format=torch.channels_last) == (memory_format == "channels_last")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")
def test_compiled_graphs_call_the_fused_ops():
    """With backend "cpu" the compiled graphs keep the fused ops whole.

    Dynamo's graph calls the differentiable op se_fused::squeeze_excitation;
    AOTAutograd, tracing through its C++ autograd, puts the forward op in the
    forward graph and the backward op in the backward graph. (Inlining them into
    plain ops would lose the fused kernels silently.)
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    block, inputs = _block_and_inputs("cpu", True, "nchw", "relu", "sigmoid")
    code = {"dynamo": [], "forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            code[kind].append(gm.code)
            return make_boxed_func(gm.forward)
        return compiler

    def capture(gm, example_inputs):
        code["dynamo"].append(gm.code)
        return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))(gm, example_inputs)

    x = inputs.x.detach().requires_grad_()
    res = inputs.residual.detach().requires_grad_()
    out = torch.compile(block, fullgraph=True, backend=capture)(x, res)
    out.backward(inputs.grad_out)
    assert [len(v) for v in code.values()] == [1, 1, 1], code
    assert "torch.ops.se_fused.squeeze_excitation(" in code["dynamo"][0], code["dynamo"][0]
    assert "torch.ops.se_fused.squeeze_excitation_forward" in code["forward"][0], code["forward"][0]
    assert "torch.ops.se_fused.squeeze_excitation_backward" in code["backward"][0], code["backward"][0]
    want_out, want_grads = _forward_backward(block, inputs)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for name, got in (("x", x.grad), ("residual", res.grad)):
        torch.testing.assert_close(got, want_grads[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
