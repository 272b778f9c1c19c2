"""SEBlock / FusedSEBlock as modules: state dicts shared with timm and torchvision, residual form, autocast.

Outputs are compared with the suite's one rule (tests/tolerances.py): the module
under test against the float64 copy of the module it replaces, with that
module's own float32 error as the baseline.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import se_fused
from conftest import SEShape, make_se_inputs
from tolerances import assert_close_to_reference

timm_se = pytest.importorskip("timm.layers.squeeze_excite")
torchvision_ops = pytest.importorskip("torchvision.ops")

KEYS = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
# C = 256 at rd_ratio 1/16 gives timm's R = 16 (timm rounds R up to a multiple of 8,
# so C = 64 would give R = 8, not 64 // 16 = 4); odd H·W.
SHAPE = SEShape(2, 256, 16, 5, 3)
CPU_BACKENDS = [b for b in ("eager", "cpu") if b in se_fused.available_backends()]

ACT_GATES = [("relu", "sigmoid"), ("silu", "hardsigmoid")]
TIMM_LAYERS = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": "sigmoid", "hardsigmoid": "hard_sigmoid"}
TORCHVISION_LAYERS = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def _x(memory_format="nchw", residual=False, activation="relu", gate="sigmoid"):
    inputs = make_se_inputs(SHAPE, torch.float32, memory_format, "cpu", residual, activation, gate)
    return inputs.x, inputs.residual


def _compare_modules(name, module, other, x, residual=None):
    """``module(x)`` vs ``other(x)`` (``other`` the module being replaced), forward and parameter gradients.

    Reference: a float64 deep copy of ``other``; baseline: ``other`` in float32.
    """
    reference = copy.deepcopy(other).double()

    def run(m, dtype):
        xx = x.detach().to(dtype).requires_grad_()
        out = m(xx) if residual is None else m(xx, residual.to(dtype))
        g = torch.Generator().manual_seed(1)
        out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype))
        grads = {n.removeprefix("se."): p.grad for n, p in m.named_parameters()}  # _TimmWithResidual's "se."
        m.zero_grad(set_to_none=True)
        return {"out": out.detach(), "x": xx.grad, **grads}

    got, base, ref = run(module, torch.float32), run(other, torch.float32), run(reference, torch.float64)
    assert set(got) == set(ref)
    for key in ref:
        assert_close_to_reference(f"{name}: {key}", got[key], base[key], ref[key], torch.float32)


def test_state_dict_keys_match_timm_and_torchvision():
    """The same four keys, with the same shapes, in SEBlock, FusedSEBlock, timm's SEModule, torchvision's SE."""
    c, r = SHAPE.c, SHAPE.r
    modules = {
        "SEBlock": se_fused.SEBlock(c),
        "FusedSEBlock": se_fused.FusedSEBlock(c),
        "timm SEModule": timm_se.SEModule(c, rd_ratio=1 / 16),
        "torchvision SqueezeExcitation": torchvision_ops.SqueezeExcitation(c, r),
    }
    for name, m in modules.items():
        sd = m.state_dict()
        assert set(sd) == KEYS, f"{name}: {sorted(sd)}"
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        assert shapes == {"fc1.weight": (r, c, 1, 1), "fc1.bias": (r,), "fc2.weight": (c, r, 1, 1),
                          "fc2.bias": (c,)}, f"{name}: {shapes}"


def test_constructor_matches_spec():
    """``SEBlock(channels, reduction=16, activation, gate)``; ``FusedSEBlock`` adds ``backend``; R >= 1."""
    block = se_fused.FusedSEBlock(64, reduction=8, activation="silu", gate="hardsigmoid", backend="eager")
    assert block.fc1.weight.shape == (8, 64, 1, 1)
    assert (block.activation, block.gate, block.backend) == ("silu", "hardsigmoid", "eager")
    assert se_fused.SEBlock(8).fc1.weight.shape == (1, 8, 1, 1)      # 8 // 16 = 0 -> R = 1
    assert isinstance(block, se_fused.SEBlock)                        # a drop-in where SEBlock is expected
    with pytest.raises(ValueError, match="gelu"):
        se_fused.SEBlock(64, activation="gelu")
    with pytest.raises(ValueError, match="tanh"):
        se_fused.FusedSEBlock(64, gate="tanh")
    with pytest.raises(ValueError, match="fastest"):
        se_fused.FusedSEBlock(64, backend="fastest")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
def test_state_dict_round_trip_seblock_fused(backend, activation, gate):
    """SEBlock -> FusedSEBlock -> SEBlock: strict loads, bit-identical parameters, the same outputs."""
    torch.manual_seed(0)
    eager = se_fused.SEBlock(SHAPE.c, activation=activation, gate=gate)
    fused = se_fused.FusedSEBlock(SHAPE.c, activation=activation, gate=gate, backend=backend)
    fused.load_state_dict(eager.state_dict(), strict=True)
    back = se_fused.SEBlock(SHAPE.c, activation=activation, gate=gate)
    back.load_state_dict(fused.state_dict(), strict=True)
    for key, value in eager.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x, _ = _x(activation=activation, gate=gate)
    _compare_modules(f"FusedSEBlock({backend}) vs SEBlock", fused, eager, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_timm_semodule_weights(backend, activation, gate, memory_format):
    """timm's SEModule state dict loads strictly into FusedSEBlock; forward and gradients match timm's."""
    torch.manual_seed(0)
    timm_block = timm_se.SEModule(SHAPE.c, rd_ratio=1 / 16, act_layer=TIMM_LAYERS[activation],
                                  gate_layer=TIMM_LAYERS[gate])
    fused = se_fused.FusedSEBlock(SHAPE.c, activation=activation, gate=gate, backend=backend)
    fused.load_state_dict(timm_block.state_dict(), strict=True)
    x, _ = _x(memory_format, activation=activation, gate=gate)
    _compare_modules(f"FusedSEBlock({backend}) vs timm SEModule", fused, timm_block, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
def test_torchvision_squeeze_excitation_weights(backend, activation, gate):
    """torchvision's SqueezeExcitation state dict loads strictly; forward and gradients match torchvision's."""
    torch.manual_seed(0)
    tv_block = torchvision_ops.SqueezeExcitation(SHAPE.c, SHAPE.r, activation=TORCHVISION_LAYERS[activation],
                                                 scale_activation=TORCHVISION_LAYERS[gate])
    fused = se_fused.FusedSEBlock(SHAPE.c, activation=activation, gate=gate, backend=backend)
    fused.load_state_dict(tv_block.state_dict(), strict=True)
    x, _ = _x("channels_last", activation=activation, gate=gate)
    _compare_modules(f"FusedSEBlock({backend}) vs torchvision", fused, tv_block, x)


class _TimmWithResidual(nn.Module):
    """What an SE-ResNet bottleneck does after its last conv: relu(se(x) + shortcut)."""

    def __init__(self, se: nn.Module):
        super().__init__()
        self.se = se

    def forward(self, x, residual):
        return torch.relu(self.se(x) + residual)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_residual_form_matches_bottleneck_tail(backend, memory_format):
    """``block(x, residual)`` equals ``relu(se(x) + residual)`` of timm's SEModule, forward and gradients."""
    torch.manual_seed(0)
    timm_block = timm_se.SEModule(SHAPE.c, rd_ratio=1 / 16)
    fused = se_fused.FusedSEBlock(SHAPE.c, backend=backend)
    fused.load_state_dict(timm_block.state_dict(), strict=True)
    # These are timm's weights, not make_se_inputs', so choose the residual here the way
    # conftest does: se(x) + residual = ±(0.25 + U(0, 1)), half clipped by the relu and
    # none near its kink (see conftest.KINK_MARGIN for why that matters).
    x, _ = _x(memory_format)
    g = torch.Generator().manual_seed(2)
    offset = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0) * (0.25 + torch.rand(x.shape, generator=g))
    with torch.no_grad():
        residual = offset - timm_block(x)
    _compare_modules(f"FusedSEBlock({backend}, residual) vs relu(timm + residual)", fused,
                     _TimmWithResidual(timm_block), x, residual)
    seblock = se_fused.SEBlock(SHAPE.c)
    seblock.load_state_dict(timm_block.state_dict())
    _compare_modules(f"FusedSEBlock({backend}, residual) vs SEBlock(residual)", fused, seblock, x, residual)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_autocast_follows_convolution(backend, residual):
    """Under ``torch.autocast("cpu", bfloat16)`` the block behaves like a conv: bf16 output, float32 param grads.

    And its numbers are exactly those of the same call with x and the
    parameters cast to bfloat16 by hand (autocast only decides the dtype).
    """
    torch.manual_seed(0)
    block = se_fused.FusedSEBlock(SHAPE.c, backend=backend)
    conv = nn.Conv2d(SHAPE.c, SHAPE.c, 1)
    x, res = _x("channels_last", residual=residual)
    x = x.detach().requires_grad_()
    res = None if res is None else res.detach().requires_grad_()
    x_conv = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x) if res is None else block(x, res)
        conv_out = conv(x_conv)
    assert conv_out.dtype == torch.bfloat16
    assert out.dtype == conv_out.dtype
    out.float().sum().backward()
    conv_out.float().sum().backward()
    assert x.grad.dtype == x_conv.grad.dtype == torch.float32
    for name, p in block.named_parameters():
        assert p.grad.dtype == conv.weight.grad.dtype == torch.float32, name
    if res is not None:
        assert res.grad.dtype == torch.float32

    # The same computation with explicit casts, outside autocast.
    leaves = [t.detach().requires_grad_() for t in (x, block.fc1.weight, block.fc1.bias, block.fc2.weight,
                                                    block.fc2.bias)]
    res_leaf = None if res is None else res.detach().requires_grad_()
    want = se_fused.squeeze_excitation(*(t.to(torch.bfloat16) for t in leaves),
                                       None if res_leaf is None else res_leaf.to(torch.bfloat16), backend=backend)
    want.float().sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, leaves[0].grad, rtol=0, atol=0)
    for p, leaf in zip(block.parameters(), leaves[1:]):
        torch.testing.assert_close(p.grad, leaf.grad, rtol=0, atol=0)
