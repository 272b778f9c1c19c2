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
def test_compiled_graph_calls_the_fused_op():
    """With backend "cpu" the compiled graph keeps se_fused::squeeze_excitation_forward as one op.

    (Inlining it into plain ops would lose the fused kernel silently.)
    """
    torch._dynamo.reset()
    block, inputs = _block_and_inputs("cpu", True, "nchw", "relu", "sigmoid")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(block, fullgraph=True, backend=capture)(inputs.x, inputs.residual)
    assert len(graphs) == 1
    # The autograd.Function is captured as a higher-order op whose forward body is a sub-graph.
    code = "\n".join(m.code for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule))
    assert "torch.ops.se_fused.squeeze_excitation_forward" in code, code
    torch.testing.assert_close(out, block(inputs.x, inputs.residual), rtol=0, atol=0)
