"""The Triton backend (se_fused/triton/) against the float64 reference.

Runs in one of two modes, decided when triton is imported:

* ``TRITON_INTERPRET=1`` (CI, no GPU): the kernels run in Triton's interpreter on
  CPU tensors. The interpreter costs ~10 ms per kernel launch and more per
  program, so the shapes are SPEC §3's small odd shapes.
* a CUDA GPU without the interpreter: the same tests on CUDA tensors, plus the
  SE-ResNet-50 stage shapes, a tensor of more than 2^31 elements, and the
  ``torch.compile`` / ``opcheck`` tests of the ``triton_op`` registration
  (which cannot run under the interpreter, see there).

Neither: every test is skipped with the reason.

The bound is the suite's one table (tests/tolerances.py): the Triton result's
max-abs error against the float64 reference may be at most twice the error of
the ``"eager"`` backend in the same dtype plus a floor. Inputs come from
conftest.make_se_inputs (kinks of relu/hardsigmoid kept away from the data).
"""
from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch

import se_fused
import se_fused.triton as se_triton
from conftest import (CUDA_PRESENT, ODD_SHAPES, STAGE_SHAPES, SEShape, backend_se, make_se_inputs,
                      reference_se, run_se)
from se_fused._reference import eager_backward, eager_forward, excitation
from tolerances import FLOOR, assert_close_to_reference

Tensor = torch.Tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if CUDA_PRESENT else None)


def _skip_reason():
    if DEVICE is None:
        return ("the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 exported before triton is imported "
                "to run them on CPU tensors; this machine has neither")
    usable, why = se_triton.availability()
    return None if usable else f"Triton backend not usable: {why}"


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU with Triton compiling natively "
                                                       "(TRITON_INTERPRET unset)")

ACT_GATES = [("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "sigmoid"), ("silu", "hardsigmoid")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["float32", "float16", "bfloat16", "float64"]
# The interpreter runs the odd shapes in every dtype. A GPU adds SE-ResNet-50's stage shapes
# (batch 2) in every dtype and runs the odd shapes in float32 and bfloat16 only: each (shape, dtype,
# option) compiles its own kernels (~1000 compilations for the full product, ~700 so), and
# float16/float64 on the odd shapes are the interpreter's part.
SHAPE_DTYPES = [(shape, dtype) for shape in ODD_SHAPES for dtype in DTYPES
                if DEVICE != "cuda" or dtype in (torch.float32, torch.bfloat16)]
if DEVICE == "cuda":
    SHAPE_DTYPES += [(shape, dtype) for shape in STAGE_SHAPES for dtype in DTYPES]


def check_against_reference(inputs, grad: str = "random") -> Dict[str, Tensor]:
    """Public API with backend "triton": forward and every gradient within the suite's bound.

    Returns the Triton results (``{"out": ..., "x": grad, ...}``).
    """
    dtype = inputs.x.dtype
    reference = reference_se(inputs, grad)
    got = backend_se(inputs, "triton", grad)
    baseline = backend_se(inputs, "eager", grad)
    assert set(got) == set(reference)
    for name, ref in reference.items():
        assert got[name].dtype == dtype and got[name].device == inputs.x.device, name
        label = "out" if name == "out" else f"grad of {name}"
        assert_close_to_reference(f"triton: {label}", got[name], baseline[name], ref, dtype)
    return got


# The activation and gate are computed in the accumulation dtype whatever x's dtype, so
# the dtype product runs two complementary (activation, gate) pairs and
# test_activation_gate_product crosses all four with the layouts and the residual form.
DTYPE_ACT_GATES = [("relu", "sigmoid"), ("silu", "hardsigmoid")]


@pytest.mark.parametrize("activation,gate", DTYPE_ACT_GATES, ids=[f"{a}-{g}" for a, g in DTYPE_ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,dtype", SHAPE_DTYPES,
                         ids=[f"{s.id}-{str(d).replace('torch.', '')}" for s, d in SHAPE_DTYPES])
def test_matches_reference(shape, dtype, memory_format, residual, activation, gate):
    """Forward and every gradient on SPEC §3's odd shapes (C = 7/33/37/40/64, R = 1, H·W ∈ {1, 3, 49, 3136},
    N = 1; on a GPU also the stage shapes), the dtypes, both layouts, plain and residual form."""
    inputs = make_se_inputs(shape, dtype, memory_format, DEVICE, residual, activation, gate)
    got = check_against_reference(inputs)
    n, c, h, w = inputs.x.shape
    if memory_format == "channels_last" and min(c, h * w) > 1:
        assert got["out"].is_contiguous(memory_format=torch.channels_last), "out left x's layout"
        assert got["x"].is_contiguous(memory_format=torch.channels_last), "grad of x left x's layout"


ACT_GATE_SHAPES = (ODD_SHAPES[1], ODD_SHAPES[6])  # H·W = 49 with C = 37; R = C = 33


@pytest.mark.parametrize("activation,gate", ACT_GATES, ids=[f"{a}-{g}" for a, g in ACT_GATES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", ACT_GATE_SHAPES, ids=[s.id for s in ACT_GATE_SHAPES])
def test_activation_gate_product(shape, dtype, memory_format, residual, activation, gate):
    """All four (activation, gate) pairs in both layouts and both forms; float64 checks the formulas to
    ~1e-15 (an error in a derivative cannot hide behind float32 rounding there)."""
    inputs = make_se_inputs(shape, dtype, memory_format, DEVICE, residual, activation, gate)
    check_against_reference(inputs)


# The pipelined path (SE_FUSED_TRITON_PATH=pipelined: pipelined_forward.py and pipelined_backward.py).
# The interpreter runs it as one program (programs run in turn there), which reduces a whole group
# before scaling any of it; a GPU runs one program per SM, each waiting on groups the others finish.
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,dtype", SHAPE_DTYPES,
                         ids=[f"{s.id}-{str(d).replace('torch.', '')}" for s, d in SHAPE_DTYPES])
def test_pipelined_path(shape, dtype, memory_format, residual, monkeypatch):
    """Forward and every gradient, both passes pipelined (the backward from the pipelined forward's
    pooled, hidden and scale), an (activation, gate) pair per shape, all four over the shapes."""
    monkeypatch.setenv("SE_FUSED_TRITON_PATH", "pipelined")
    activation, gate = ACT_GATES[(ODD_SHAPES + STAGE_SHAPES).index(shape) % len(ACT_GATES)]
    check_against_reference(make_se_inputs(shape, dtype, memory_format, DEVICE, residual, activation, gate))


# Each knob keeps the reference's results and the default's bits (a sample's sums and MLP run in the
# same order whatever the group, the delay or the programs), except the tile size, which changes the
# row blocks whose partial sums are added (1-byte tiles: one pixel per tile), the load block,
# which changes how a tile's pixels are grouped (16 elements: 3 channel blocks of 16 of C = 40, each
# over 25 blocks of one pixel; 256: one of 64 channels over 7 blocks of 4 pixels, the last of 1), and
# two programs per SM, which take the group MLP's smaller blocks (group_mlp_blocks: the registers
# of two programs), so its sums over C run in blocks of 32 instead of 64.
PIPELINE_KNOBS = [("SE_FUSED_TRITON_PIPELINE_GROUP", "1"), ("SE_FUSED_TRITON_PIPELINE_GROUP", "3"),
                  ("SE_FUSED_TRITON_PIPELINE_GROUP", "16"), ("SE_FUSED_TRITON_PIPELINE_DELAY", "4"),
                  ("SE_FUSED_TRITON_PIPELINE_PROGRAMS", "2"), ("SE_FUSED_TRITON_PIPELINE_PER_SM", "2"),
                  ("SE_FUSED_TRITON_TILE_BYTES", "1"), ("SE_FUSED_TRITON_PIPELINE_BLOCK", "16"),
                  ("SE_FUSED_TRITON_PIPELINE_BLOCK", "256")]
BITS_CHANGING_KNOBS = ("SE_FUSED_TRITON_TILE_BYTES", "SE_FUSED_TRITON_PIPELINE_BLOCK",
                       "SE_FUSED_TRITON_PIPELINE_PER_SM")
# Knobs the interpreter cannot honour: it runs one program (programs run in turn, so a wait on a later
# one would never end) and the group MLP's interpreter blocks whatever the programs per SM; there the
# run with the knob would be the default run again.
GPU_ONLY_KNOBS = ("SE_FUSED_TRITON_PIPELINE_PROGRAMS", "SE_FUSED_TRITON_PIPELINE_PER_SM")


@pytest.mark.parametrize("name,value", PIPELINE_KNOBS, ids=[f"{n[16:].lower()}={v}" for n, v in PIPELINE_KNOBS])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_pipelined_path_knobs(name, value, memory_format, monkeypatch):
    if INTERPRETED and name in GPU_ONLY_KNOBS:
        pytest.skip(f"{name} changes nothing under the interpreter (GPU_ONLY_KNOBS)")
    monkeypatch.setenv("SE_FUSED_TRITON_PATH", "pipelined")
    inputs = make_se_inputs(SEShape(5, 40, 3, 5, 5), torch.float32, memory_format, DEVICE, True, "silu", "sigmoid")
    default = backend_se(inputs, "triton")
    monkeypatch.setenv(name, value)
    got = check_against_reference(inputs)
    if name not in BITS_CHANGING_KNOBS:
        for key, t in default.items():
            assert torch.equal(got[key], t), f"{key} differs with {name}={value}"


@pytest.mark.parametrize("c,p,element_size", [(256, 3136, 2), (512, 784, 2), (1024, 196, 2), (2048, 49, 2),
                                               (2048, 49, 4), (64, 3136, 2), (7, 3, 2)])
def test_pipelined_load_blocks(c, p, element_size):
    """A tile's load block (what one program per SM has in flight) is the whole 8192 elements at every
    SE-ResNet stage (conv5_x's 7-pixel tiles: 8 x 1024, not the 8 x 128 of a fixed 128 channels) unless
    the tile is smaller, keeps at least 128 channels (256-byte rows of bf16 in channels_last) where C
    has them, and is a power of two on each side (Triton's block shapes)."""
    from se_fused.triton import pipelined_forward as pf
    np2 = se_triton._common.next_power_of_2
    _, tile_rows = pf.tile_rows_of(c, p, element_size, 32768)
    block_p, block_c = pf.tile_blocks(c, tile_rows, 8192)
    assert block_p & (block_p - 1) == 0 and block_c & (block_c - 1) == 0
    assert block_p * block_c == min(8192, np2(c) * np2(tile_rows)), (block_p, block_c)
    assert block_p <= np2(tile_rows) and min(np2(c), pf.MIN_BLOCK_C) <= block_c <= np2(c), (block_p, block_c)


@pytest.mark.parametrize("c,r,p,group,arrays,expected", [
    (256, 16, 3136, 1, 1, 1), (512, 32, 784, 2, 1, 2), (1024, 64, 196, 11, 1, 4), (2048, 128, 49, 16, 1, 5),
    (1024, 64, 196, 6, 2, 2), (2048, 128, 49, 16, 2, 2)])
def test_pipelined_default_delay(c, r, p, group, arrays, expected):
    """The default delay beyond the minimum at SE-ResNet's stages on an H100 (132 programs, 50 MiB of L2,
    batch 256, bf16, the default groups): the group MLP's weight bytes over a tile's, capped so that the
    whole delay's tiles fill at most half the L2; and its bounds: at least 1, at most the launch's steps."""
    from se_fused.triton import pipelined_forward as pf
    cdiv = se_triton._common.cdiv
    row_blocks, tile_rows = pf.tile_rows_of(c, p, 2, 32768)
    tile = tile_rows * c * 2
    steps, minimum = cdiv(256 * row_blocks, 132), cdiv(group * row_blocks, 132)
    extra = pf.default_delay_extra(2 * c * r * 2, tile, 132 * tile * arrays, steps, 50 << 20, minimum)
    assert extra == expected
    assert extra == 1 or (minimum + extra) * 132 * tile * arrays <= 25 << 20
    assert pf.default_delay_extra(1, tile, tile, steps, 50 << 20, 1) == 1
    assert pf.default_delay_extra(1 << 30, tile, 1, 7, 50 << 20, 1) == 7
    assert pf.default_delay_extra(1 << 30, tile, 1 << 30, 7, 50 << 20, 1) == 1


@pytest.mark.parametrize("name,value,message", [
    ("SE_FUSED_TRITON_PATH", "cluster", "SE_FUSED_TRITON_PATH must be two_pass or pipelined"),
    ("SE_FUSED_TRITON_PIPELINE_GROUP", "0", "SE_FUSED_TRITON_PIPELINE_GROUP must be an integer >= 1"),
    ("SE_FUSED_TRITON_PIPELINE_PER_SM", "0", "SE_FUSED_TRITON_PIPELINE_PER_SM must be an integer >= 1"),
    ("SE_FUSED_TRITON_TILE_BYTES", "many", "SE_FUSED_TRITON_TILE_BYTES must be an integer >= 1"),
    ("SE_FUSED_TRITON_PIPELINE_BLOCK", "3000", "SE_FUSED_TRITON_PIPELINE_BLOCK must be a power of two")])
def test_pipelined_path_refuses_bad_knobs(name, value, message, monkeypatch):
    monkeypatch.setenv("SE_FUSED_TRITON_PATH", "pipelined")
    monkeypatch.setenv(name, value)
    inputs = make_se_inputs(ODD_SHAPES[0], torch.float32, "nchw", DEVICE)
    with pytest.raises(ValueError, match=message):
        backend_se(inputs, "triton")


@pytest.mark.parametrize("memory_format", ["sliced_nchw", "sliced_nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_strided_input(memory_format, residual):
    """A non-contiguous x (a slice of a larger tensor) is brought to a dense layout, never read wrongly."""
    inputs = make_se_inputs(ODD_SHAPES[1], torch.float32, memory_format, DEVICE, residual, "silu", "hardsigmoid")
    check_against_reference(inputs)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_backward_through_sum(dtype, memory_format, residual):
    """``out.sum().backward()`` hands the backward an expanded, stride-0 gradient (KERNEL-NOTES)."""
    inputs = make_se_inputs(ODD_SHAPES[1], dtype, memory_format, DEVICE, residual, "silu", "sigmoid")
    check_against_reference(inputs, grad="sum")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_non_contiguous_grad_out(residual):
    """A gradient that is a strided view (every other column of a wider tensor) is read by its strides."""
    inputs = make_se_inputs(ODD_SHAPES[4], torch.float32, "channels_last", DEVICE, residual, "relu", "sigmoid")
    n, c, h, w = inputs.grad_out.shape
    wide = torch.zeros(n, c, h, 2 * w, dtype=inputs.grad_out.dtype, device=DEVICE)
    wide[..., ::2] = inputs.grad_out
    inputs = inputs.with_(grad_out=wide[..., ::2])
    assert not inputs.grad_out.is_contiguous()
    check_against_reference(inputs)


def _backend_interface_run(inputs, residual_form: bool):
    """Forward + backward through the backend interface (what FusedSEFunction calls) of triton and eager."""
    args = inputs.tensors()[:5] + (inputs.residual, inputs.activation, inputs.gate)
    results = {}
    for name, module_forward, module_backward in (("triton", se_triton.forward, se_triton.backward),
                                                  ("eager", eager_forward, eager_backward)):
        out, pooled, hidden, scale = module_forward(*args)
        grads = module_backward(inputs.grad_out, inputs.x, out if residual_form else None, inputs.fc1_weight,
                                inputs.fc2_weight, pooled, hidden, scale, inputs.activation, inputs.gate)
        results[name] = (out, pooled, hidden, scale) + tuple(grads)
    return results


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_saved_intermediates(dtype, residual):
    """``pooled``, ``hidden`` (pre-activation) and ``scale``: float32 (float64 for float64 x), shaped
    (N, C)/(N, R)/(N, C), close to the float64 values; weight/bias gradients typed like the weights."""
    shape = ODD_SHAPES[1]
    inputs = make_se_inputs(shape, dtype, "channels_last", DEVICE, residual, "silu", "hardsigmoid")
    results = _backend_interface_run(inputs, residual)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x64 = inputs.x.to(torch.float64)
    pooled64 = x64.mean(dim=(2, 3))
    hidden64, scale64 = excitation(pooled64, *(t.to(torch.float64) for t in inputs.tensors()[1:5]),
                                   inputs.activation, inputs.gate)
    expected_shapes = [(shape.n, shape.c), (shape.n, shape.r), (shape.n, shape.c)]
    for index, name, ref in ((1, "pooled", pooled64), (2, "hidden", hidden64), (3, "scale", scale64)):
        got, base = results["triton"][index], results["eager"][index]
        assert got.dtype == acc and tuple(got.shape) == expected_shapes[index - 1], (name, got.dtype, got.shape)
        # These are computed in the accumulation dtype, so its floor applies.
        assert_close_to_reference(f"triton: {name}", got, base, ref, acc)
    grad_residual = results["triton"][5]
    assert (grad_residual is not None) == residual
    for index, like in ((6, inputs.fc1_weight), (8, inputs.fc2_weight)):
        weight_grad, bias_grad = results["triton"][index], results["triton"][index + 1]
        assert weight_grad.shape == like.shape and weight_grad.dtype == like.dtype
        assert bias_grad.shape == (like.shape[0],) and bias_grad.dtype == like.dtype


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_float32_weights_with_bfloat16_x(residual):
    """Parameters may keep another float dtype than x (no autocast): gradients come back in theirs."""
    inputs = make_se_inputs(ODD_SHAPES[4], torch.bfloat16, "channels_last", DEVICE, residual, "relu", "sigmoid")
    inputs = inputs.with_(**{name: getattr(inputs, name).to(torch.float32)
                             for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")})
    results = _backend_interface_run(inputs, residual)
    reference = reference_se(inputs)
    triton_out, eager_out = results["triton"], results["eager"]
    assert_close_to_reference("triton: out", triton_out[0], eager_out[0], reference["out"], torch.bfloat16)
    assert_close_to_reference("triton: grad of x", triton_out[4], eager_out[4], reference["x"], torch.bfloat16)
    for index, name in ((6, "fc1_weight"), (7, "fc1_bias"), (8, "fc2_weight"), (9, "fc2_bias")):
        assert triton_out[index].dtype == torch.float32, name
        # The weight gradients are float32 sums of bfloat16 products: float32's floor.
        assert_close_to_reference(f"triton: grad of {name}", triton_out[index].reshape(reference[name].shape),
                                  eager_out[index].reshape(reference[name].shape), reference[name], torch.float32)


# Block shapes far smaller than any real configuration: a sample's H·W is split over
# several programs (partial sums), the MLP's C-reduction over several programs
# (K splits), and every chunk holds one sample, all on shapes the interpreter runs quickly.
TINY_BLOCKS = dict(reduce_tile=256, reduce_block_inner=32, reduce_elements_per_program=128, linear_block_n=2,
                   linear_block_j=8, linear_block_k=16, linear_k_per_split=16, linear_fp64_block=16,
                   weight_grad_block_n=2, weight_grad_block_i=8, weight_grad_block_j=8)



def test_block_sizes_refuse_a_reduction_too_short_for_tl_dot():
    """A GPU refuses tl.dot over fewer than 16 elements and the interpreter does not: the block
    shapes check it themselves, so a CPU run cannot accept what a GPU would not compile."""
    from se_fused.triton import _common
    with pytest.raises(ValueError, match="linear_block_k must be at least 16"):
        _common.BlockSizes(**{**TINY_BLOCKS, "linear_block_k": 8})

# Per block set, a shape on which it splits the MLP's C-reduction (C > linear_k_per_split).
SPLIT_CASES = {"tiny": SEShape(3, 40, 5, 9, 7), "gpu": SEShape(2, 260, 17, 3, 3)}


@pytest.fixture(params=sorted(SPLIT_CASES))
def split_case(request, monkeypatch):
    """``(block set name, shape)``: runs a test with TINY_BLOCKS, and with the GPU's block shapes
    (in the interpreter too, so that CI runs the reductions exactly as a GPU would order them)."""
    from se_fused.triton import _common
    blocks = _common.BlockSizes(**TINY_BLOCKS) if request.param == "tiny" else _common.GPU_BLOCKS
    monkeypatch.setattr(_common, "BLOCKS", blocks)
    return request.param, SPLIT_CASES[request.param]


# float32 only: the split and chunk logic does not depend on the dtype (test_matches_reference covers
# the dtypes), and each case costs seconds in the interpreter.
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_split_reductions_and_chunks(split_case, memory_format, residual, monkeypatch):
    """Partial sums over H·W splits and C splits, and a batch in one-sample chunks, give the reference's
    results; and chunking does not change a single bit (every sample's arithmetic is the same)."""
    from se_fused.triton import _common
    blocks_name, shape = split_case
    inputs = make_se_inputs(shape, torch.float32, memory_format, DEVICE, residual, "silu", "sigmoid")
    assert _common.linear_tile(shape.c, shape.r, False).k_splits > 1, "the MLP's split reduction is not exercised"
    if blocks_name == "tiny":
        cfg = _common.reduce_config(shape.c, shape.h * shape.w, memory_format == "channels_last")
        assert cfg.splits > 1, "the H·W split of the channel sums is not exercised"
    whole_batch = check_against_reference(inputs)
    monkeypatch.setattr(_common, "CHUNK_BYTES_OVERRIDE", 1)
    assert _common.samples_per_chunk(shape.n, 1000, inputs.x.device) == 1
    chunked = backend_se(inputs, "triton")
    for name, t in whole_batch.items():
        assert torch.equal(chunked[name], t), f"{name} changed when the batch was processed in chunks"


# SE_FUSED_TRITON_MLP_TILE (the tune step's triton-mlp rows): each tile sums over C in pieces of its own
# length, so the bits may change; the reference's results may not. "2,8,16,16": three splits of the 40
# channels, and fc2 (the whole sum over R = 20) in two pieces of 16.
@pytest.mark.parametrize("tile", ["2,8,16,16", "64,256,256,256"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_mlp_tile_knob(tile, memory_format, monkeypatch):
    from se_fused.triton import _common
    monkeypatch.setenv("SE_FUSED_TRITON_MLP_TILE", tile)
    k = int(tile.split(",")[2])
    # Capped by the problem: 40 channels reduce in 64-long pieces at most, R = 20 outputs fit 32.
    assert _common.linear_tile(40, 20, False) == ((2, 8, 16, 16, 3) if k == 16 else (64, 32, 64, 64, 1))
    assert _common.linear_tile(20, 40, False, split=False) == ((2, 8, 16, 32, 1) if k == 16 else (64, 64, 32, 32, 1))
    assert _common.linear_tile(40, 20, True) == _common._linear_tile(40, 20, True, True, None, _common.BLOCKS), \
        "float64 took the float32 tile"
    check_against_reference(make_se_inputs(SEShape(5, 40, 20, 3, 3), torch.float32, memory_format, DEVICE, True,
                                           "silu", "sigmoid"))


@pytest.mark.parametrize("value", ["16,64,128", "16,48,128,256", "16,64,8,256", "16,64,128,192", "a,b,c,d"])
def test_mlp_tile_knob_refuses_bad_values(value, monkeypatch):
    monkeypatch.setenv("SE_FUSED_TRITON_MLP_TILE", value)
    with pytest.raises(ValueError, match="SE_FUSED_TRITON_MLP_TILE must be n,j,k,split"):
        backend_se(make_se_inputs(ODD_SHAPES[0], torch.float32, "nchw", DEVICE), "triton")


def test_float64_with_the_gpu_blocks(monkeypatch):
    """float64 with the GPU's block sizes, as a GPU orders it: the MLP in pieces of 16 (its own cap),
    the sums over C split every 256 channels."""
    from se_fused.triton import _common
    monkeypatch.setattr(_common, "BLOCKS", _common.GPU_BLOCKS)
    shape = SPLIT_CASES["gpu"]
    assert _common.linear_tile(shape.c, shape.r, True) == (16, 16, 16, 144, 2)  # 260 channels: 144 + 116
    check_against_reference(make_se_inputs(shape, torch.float64, "channels_last", DEVICE, True, "silu", "hardsigmoid"))


def test_mlp_tiles_at_the_stages():
    """The GPU's MLP tiles at SE-ResNet's stages (C, R): the reductions over C in pieces of 128, split
    every 256 channels; the whole sums over R (16 at conv2_x, 128 at conv5_x) in pieces of at most 128;
    float64 in pieces of 16 (its product is a broadcast in registers)."""
    from se_fused.triton import _common
    tile = functools.partial(_common._linear_tile, override=None, blocks=_common.GPU_BLOCKS)
    assert [tile(c, r, False, True) for c, r in ((256, 16), (2048, 128))] == [(16, 16, 128, 256, 1),
                                                                                (16, 32, 128, 256, 8)]
    assert [tile(r, c, False, False) for c, r in ((256, 16), (2048, 128))] == [(16, 32, 16, 16, 1),
                                                                                 (16, 32, 128, 128, 1)]
    assert tile(2048, 128, True, True) == (16, 16, 16, 256, 8)
    assert tile(256, 2048, False, False) == (16, 32, 128, 256, 1)  # R = 256: two pieces, one program


def test_chunk_budget(monkeypatch):
    """The batch is one chunk unless a budget is set: bytes (at least one sample per chunk), or "l2"
    (half of the device's L2; off a GPU, half of an H100's)."""
    from se_fused.triton import _common
    device = torch.device("cpu")
    monkeypatch.setattr(_common, "CHUNK_BYTES_OVERRIDE", None)
    assert _common.samples_per_chunk(256, 10 << 20, device) == 256
    monkeypatch.setattr(_common, "CHUNK_BYTES_OVERRIDE", 0)
    assert _common.samples_per_chunk(256, 10 << 20, device) == 256
    monkeypatch.setattr(_common, "CHUNK_BYTES_OVERRIDE", 30 << 20)
    assert _common.samples_per_chunk(256, 10 << 20, device) == 3
    assert _common.samples_per_chunk(256, 100 << 20, device) == 1
    monkeypatch.setattr(_common, "CHUNK_BYTES_OVERRIDE", "l2")
    assert _common.samples_per_chunk(256, 1 << 20, device) == _common.DEFAULT_CHUNK_BYTES // (1 << 20)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_deterministic(dtype, memory_format, residual):
    """The same inputs give bitwise the same output and gradients (no atomics, fixed summation order).
    On a GPU that is the question of the order of the programs' sums; under the interpreter programs
    run in turn, so there it catches results that depend on uninitialised memory (torch.empty)."""
    shape = STAGE_SHAPES[1] if DEVICE == "cuda" else ODD_SHAPES[3]
    inputs = make_se_inputs(shape, dtype, memory_format, DEVICE, residual, "relu", "sigmoid")
    first = backend_se(inputs, "triton")
    second = backend_se(inputs, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


GRADCHECK_CASES = [  # (shape, memory format, residual, activation, gate, fast_mode)
    # Every Jacobian entry (seconds per case in the interpreter: tiny shapes) ...
    (SEShape(1, 5, 2, 2, 2), "channels_last", True, "silu", "hardsigmoid", False),
    (SEShape(1, 5, 1, 1, 3), "nchw", False, "relu", "sigmoid", False),
] + [  # ... and random projections of it (fast mode) for every activation, gate and form.
    (SEShape(2, 9, 3, 2, 2), layout, residual, activation, gate, True)
    for (activation, gate), (residual, layout) in itertools.product(
        ACT_GATES, ((False, "nchw"), (True, "channels_last")))
]


@pytest.mark.parametrize("shape,memory_format,residual,activation,gate,fast_mode", GRADCHECK_CASES,
                         ids=[f"{c[0].id}-{c[1]}-{'residual' if c[2] else 'plain'}-{c[3]}-{c[4]}"
                              f"{'-fast' if c[5] else ''}" for c in GRADCHECK_CASES])
def test_gradcheck(shape, memory_format, residual, activation, gate, fast_mode):
    """float64 finite differences of the Triton forward against the Triton backward (independent of the
    reference). make_se_inputs keeps the kinks 1e-3 away, far beyond gradcheck's eps = 1e-6 (see
    tests/test_gradcheck.py)."""
    inputs = make_se_inputs(shape, torch.float64, memory_format, DEVICE, residual, activation, gate)
    leaves = [t.detach().requires_grad_() for t in inputs.tensors() if t is not None]

    def fn(*tensors):
        res = tensors[5] if residual else None
        return se_fused.squeeze_excitation(*tensors[:5], res, activation, gate, "triton")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_empty_batch(residual):
    """N = 0: empty output and input gradients, zero weight gradients (SPEC §2)."""
    inputs = make_se_inputs(SEShape(1, 13, 3, 4, 5), torch.float32, "nchw", DEVICE, residual)
    inputs = inputs.with_(**{name: getattr(inputs, name)[:0] for name in ("x", "residual", "grad_out")
                             if getattr(inputs, name) is not None})
    got = backend_se(inputs, "triton")
    assert got["out"].shape == (0, 13, 4, 5) and got["x"].shape == (0, 13, 4, 5)
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        assert torch.count_nonzero(got[name]) == 0, name


def test_nan_propagates_like_eager():
    """A NaN in one sample makes that sample's output NaN where PyTorch's ops do, and no other sample's."""
    inputs = make_se_inputs(ODD_SHAPES[1], torch.float32, "nchw", DEVICE, True, "relu", "hardsigmoid")
    x = inputs.x.clone()
    x[1, 3, 0, 2] = float("nan")
    inputs = inputs.with_(x=x)
    args = inputs.tensors() + (inputs.activation, inputs.gate)
    got = se_fused.squeeze_excitation(*args, backend="triton")
    expected = se_fused.squeeze_excitation(*args, backend="eager")
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert not torch.isnan(got[0]).any()
    torch.testing.assert_close(got[0], expected[0])


def test_available_and_listed():
    """The backend reports itself usable, and se_fused lists it."""
    usable, reason = se_triton.availability()
    assert usable and reason
    assert ("interpreter" in reason) == INTERPRETED
    assert "triton" in se_fused.available_backends()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Kernels compiled for the GPU refuse CPU tensors with a clear error (never a crash)."""
    from se_fused.triton import _common
    monkeypatch.setattr(_common, "INTERPRETED", False)
    inputs = make_se_inputs(ODD_SHAPES[0], torch.float32, "nchw", "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        se_triton.forward(*inputs.tensors(), "relu", "sigmoid")


def test_unknown_option_is_a_value_error():
    """Called directly (not through the validated public API), the ops still name a bad option."""
    inputs = make_se_inputs(ODD_SHAPES[0], torch.float32, "nchw", DEVICE)
    with pytest.raises(ValueError, match="gelu"):
        se_triton.forward(*inputs.tensors(), "gelu", "sigmoid")


def test_kernels_compile_for_hopper():
    """The interpreter never runs Triton's compiler, so CI compiles every kernel's constexpr branches for
    sm_90 here (ptxas ships with triton; no GPU needed), in a subprocess without TRITON_INTERPRET."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-m", "se_fused.triton.compile_check", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=900)
    log = (run.stdout + run.stderr).strip()
    if run.returncode == 2:
        pytest.skip(log.splitlines()[-1] if log else "compile_check cannot run here")
    assert run.returncode == 0, log[-6000:]
    assert " 0 failed" in log.splitlines()[-1], log[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# The torch.library registration
# ---------------------------------------------------------------------------------------------------------------

INTERPRETER_COMPILE_REASON = (
    "torch.compile and opcheck's test_faketensor/test_aot_dispatch_dynamic trace a triton_op's body, which "
    "under TRITON_INTERPRET=1 enters the kernel with fake tensors and fails ('Attempted to access the data "
    "pointer on an invalid python storage', KERNEL-NOTES); this runs on a GPU only")


def _op_args(residual: bool, requires_grad: bool):
    inputs = make_se_inputs(ODD_SHAPES[1], torch.float32, "channels_last", DEVICE, residual, "silu", "sigmoid")
    tensors = [None if t is None else t.detach().requires_grad_(requires_grad) for t in inputs.tensors()]
    return inputs, tuple(tensors) + ("silu", "sigmoid")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck_schema_and_autograd_registration(residual):
    """The ops' schemas and autograd registration are sound (the parts of opcheck the interpreter runs)."""
    se_triton._load()
    _, args = _op_args(residual, True)
    torch.library.opcheck(torch.ops.se_fused.triton_squeeze_excitation_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_eager_calls_run_the_kernels_without_the_dispatcher(residual, monkeypatch):
    """Eager forward + backward through the public API call the kernels directly (not through the
    registered ops: their Python layers cost host time per call), with the bits of the ops' route,
    and launch them without the wrap_triton higher-order op (1-3 ms of host time per call at a482069)."""
    from torch._library.triton import is_wrap_triton_enabled
    from se_fused.triton import ops
    inputs = make_se_inputs(ODD_SHAPES[1], torch.float32, "channels_last", DEVICE, residual, "silu", "sigmoid")
    calls = []
    for name in ("run_forward", "run_backward"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    # Under the interpreter wrap_triton returns the kernel itself, so the HOP is never reached here;
    # what the test can see is the switch that decides it on a GPU, at each launch.
    through_hop = []
    for name in [n for n in dir(ops) if n.startswith("launch_")]:
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name, **k: (
            through_hop.append(_n) if is_wrap_triton_enabled() else None) or _f(*a, **k))
    direct = backend_se(inputs, "triton")
    assert calls == ["run_forward", "run_backward"]
    # A module's weights are Parameters: the same route.
    module = se_fused.FusedSEBlock(inputs.x.shape[1], 2, activation=inputs.activation, gate=inputs.gate,
                                   backend="triton").to(inputs.x.device)
    module(inputs.x.detach().requires_grad_()).sum().backward()
    assert calls == ["run_forward", "run_backward"] * 2
    assert through_hop == [], f"eager launches with the wrap_triton HOP on: {through_hop}"
    args = inputs.tensors() + (inputs.activation, inputs.gate)
    out, pooled, hidden, scale = torch.ops.se_fused.triton_squeeze_excitation_forward(*args)
    grads = torch.ops.se_fused.triton_squeeze_excitation_backward(
        inputs.grad_out, inputs.x, out if residual else None, inputs.fc1_weight, inputs.fc2_weight, pooled, hidden,
        scale, inputs.activation, inputs.gate)
    assert calls == ["run_forward", "run_backward"] * 2, "the registered ops call the functions bound at registration"
    through_ops = dict(zip(("out", "x", "residual", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
                           (out, grads[0], grads[1]) + tuple(grads[2:])))
    for name, t in direct.items():
        torch.testing.assert_close(t, through_ops[name].reshape(t.shape), rtol=0, atol=0, msg=name)


def test_traced_calls_keep_the_registered_ops():
    """Under a TorchDispatchMode (fake tensors, make_fx) or for tensor subclasses the kernels are reached
    through the ops, so tracers record them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from se_fused.triton import ops

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    class Subclass(Tensor):
        pass

    inputs = make_se_inputs(ODD_SHAPES[1], torch.float32, "nchw", DEVICE)
    tensors = inputs.tensors()
    assert ops.runs_without_dispatcher(*tensors)
    assert not ops.runs_without_dispatcher(tensors[0].as_subclass(Subclass), *tensors[1:])
    with Recording() as mode:
        assert not ops.runs_without_dispatcher(*tensors)
        se_triton.forward(*tensors, "relu", "sigmoid")
    assert "se_fused.triton_squeeze_excitation_forward.default" in mode.ops, mode.ops


@pytest.mark.skipif(INTERPRETED, reason=INTERPRETER_COMPILE_REASON)
@GPU_ONLY
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck_full(residual):
    """All of opcheck (schema, autograd registration, fake tensors, AOT dispatch) on both ops."""
    se_triton._load()
    inputs, args = _op_args(residual, True)
    torch.library.opcheck(torch.ops.se_fused.triton_squeeze_excitation_forward.default, args)
    out, pooled, hidden, scale = torch.ops.se_fused.triton_squeeze_excitation_forward(
        *(a.detach() if isinstance(a, Tensor) else a for a in args))
    backward_args = (inputs.grad_out, inputs.x, out if residual else None, inputs.fc1_weight, inputs.fc2_weight,
                     pooled, hidden, scale, "silu", "sigmoid")
    torch.library.opcheck(torch.ops.se_fused.triton_squeeze_excitation_backward.default, backward_args)


@pytest.mark.skipif(INTERPRETED, reason=INTERPRETER_COMPILE_REASON)
@GPU_ONLY
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_torch_compile_sees_the_kernels(residual):
    """``torch.compile(fullgraph=True)`` of the public API with backend "triton": no graph break, the
    generated code launches the Triton kernels itself (the op is not opaque), same results as eager."""
    from torch._inductor.utils import run_and_get_code

    inputs = make_se_inputs(STAGE_SHAPES[3], torch.bfloat16, "channels_last", DEVICE, residual, "relu", "sigmoid")

    def se(*tensors):
        return se_fused.squeeze_excitation(*tensors, activation="relu", gate="sigmoid", backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(se, fullgraph=True)
    eager = run_se(se, inputs)
    result, code = run_and_get_code(lambda: run_se(compiled, inputs))
    generated = "\n".join(code)
    for kernel in ("channel_reduce_kernel", "batched_linear_kernel", "excite_forward_kernel"):
        assert kernel in generated, f"{kernel} not in the compiled code: the op was not traced into"
    for name, t in eager.items():
        # The compiled graph launches the same kernels with the same block shapes: the same bits.
        torch.testing.assert_close(result[name], t, rtol=0, atol=0, msg=name)


@GPU_ONLY
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_autotuned_elementwise_kernels_give_the_same_bits(memory_format, residual, monkeypatch):
    """SE_FUSED_TRITON_AUTOTUNE=1 (tile chosen by timing; needs a GPU to time) changes no result:
    the tuned kernels are element-wise, the reductions keep their shape-only blocks."""
    from se_fused.triton import _common
    inputs = make_se_inputs(STAGE_SHAPES[2], torch.bfloat16, memory_format, DEVICE, residual, "relu", "sigmoid")
    default = backend_se(inputs, "triton")
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    tuned = backend_se(inputs, "triton")
    for name, t in default.items():
        assert torch.equal(tuned[name], t), name


@GPU_ONLY
def test_more_than_two_to_the_31_elements():
    """x of 2,149,580,800 elements (> 2^31): the last sample, whose offsets pass 2^31, matches eager on it alone."""
    n, c, h, w, r = 2, 1024, 1024, 1025, 4
    assert n * c * h * w > 2 ** 31
    # At most ~6.5 x's size at once (x, grad_out and grad_x; one sample's eager float32 temporaries, each
    # x's size, and its bfloat16 grad_x): skipped, with the reason, where another test holds the memory
    # (gpu_check runs the tests in 12 processes).
    x_bytes = n * c * h * w * 2
    torch.cuda.empty_cache()  # this process's cached blocks count as free for the test
    if torch.cuda.mem_get_info()[0] < 7 * x_bytes:
        pytest.skip(f"needs ~{7 * x_bytes / 2**30:.0f} GiB of free GPU memory")
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
    # fc1's bias in [0.5, 1.5): hidden ~ b1 (|W1 pooled| ~ 1e-3), so every hidden unit is active and
    # every weight gradient carries the channel sums (with all units inactive they would be zero).
    weights = (torch.randn(r, c, 1, 1, device="cuda") * c ** -0.5, torch.rand(r, device="cuda") + 0.5,
               torch.randn(c, r, 1, 1, device="cuda") * r ** -0.5, torch.randn(c, device="cuda"))
    out, pooled, hidden, scale = se_triton.forward(x, *weights, None, "relu", "sigmoid")
    expected = eager_forward(x[1:], *weights, None, "relu", "sigmoid")
    # The channel means directly: the scale hardly depends on them (|W1 pooled| ~ 1e-3 beside b1 ~ 1).
    # float32 means of ~1e6 terms, summed in another order than eager's: ~1e-9 apart.
    torch.testing.assert_close(pooled[1:], expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scale[1:], expected[3], rtol=1e-5, atol=1e-6)
    # The same float32 scale rounded once: at most one bfloat16 ulp apart.
    torch.testing.assert_close(out[1:], expected[0], rtol=2 ** -7, atol=0)
    del expected, out
    grad_out = torch.randn_like(x)
    grads = se_triton.backward(grad_out, x, None, weights[0], weights[2], pooled, hidden, scale, "relu", "sigmoid")
    per_sample = []  # each sample's weight and bias gradients (eager_backward's last four)
    for i in range(n):
        sample = eager_backward(grad_out[i:i + 1], x[i:i + 1], None, weights[0], weights[2], pooled[i:i + 1],
                                hidden[i:i + 1], scale[i:i + 1], "relu", "sigmoid")
        if i == 1:
            torch.testing.assert_close(grads[0][1:], sample[0], rtol=2 ** -7, atol=FLOOR[torch.bfloat16])
        per_sample.append(sample[2:])
        del sample
    # The channel sums ds reach grad_x only as dz/P (~2.5e-4 at P = 1,049,600), below grad_x's
    # bfloat16 resolution, so the bound above cannot see them; the weight and bias gradients carry
    # them (ds ~ sqrt(P)). They sum over both samples: eager's per-sample gradients added. ds is a
    # float32 sum of ~1e6 terms in another order than eager's, so single elements may differ much
    # where a channel's terms cancel: the bound is on each gradient's relative error as a whole
    # (zero sums for the sample past 2^31 gave 0.28-0.76 in a small interpreted rehearsal).
    names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    for name, got, first, second in zip(names, grads[2:], *per_sample):
        reference = (first + second).double()
        error = ((got.double() - reference).norm() / reference.norm()).item()
        assert error < 1e-3, f"grad {name}: relative error {error:.2e}"
    del x, grad_out, grads
    torch.cuda.empty_cache()  # the cached blocks back to the driver, for the other test processes
