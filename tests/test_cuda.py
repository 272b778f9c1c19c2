"""The hand-written CUDA kernels, path by path (GPU only; skipped without one).

tests/test_correctness.py runs the ``"cuda"`` backend with its automatic path
choice over the whole shape/dtype/layout product. This file forces each path
(``SE_FUSED_CUDA_PATH=cluster|two_pass|pipelined``), each cluster geometry
(``SE_FUSED_CUDA_PLAN=M,G``: M CTAs per sample, G samples per cluster; the
persistent clusters capped with ``SE_FUSED_CUDA_CLUSTERS`` and their chunk buffers
with ``SE_FUSED_CUDA_CLUSTER_BUFFERS``), the two-pass path over the
batch in chunks (``SE_FUSED_CUDA_CHUNK_BYTES``), the pipelined path's schedule
(``SE_FUSED_CUDA_PIPELINE_BLOCKS|GROUP|DELAY``, ``SE_FUSED_CUDA_TILE_BYTES``),
each excitation MLP (``SE_FUSED_CUDA_MLP=auto|kernels|aten|tiled``), its splits of C and row
tiles per block (``SE_FUSED_CUDA_MLP_SPLIT``, ``SE_FUSED_CUDA_MLP_ROW_TILES``), the NCHW
channel sums of whole rows through shared memory or a warp per row
(``SE_FUSED_CUDA_NCHW_SUMS=staged|warp``), and
checks what only a GPU run can show: tensors past 2^31 elements, bitwise
determinism, CUDA-graph capture, agreement with the CPU kernel.
"""
from __future__ import annotations

import os

import pytest
import torch

import se_fused
from conftest import CUDA_PRESENT, NO_GPU_REASON, SEShape, backend_se, make_se_inputs, reference_se, run_se
from tolerances import assert_close_to_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_PRESENT, reason=NO_GPU_REASON)]


def _cluster_capable() -> bool:
    return CUDA_PRESENT and torch.cuda.get_device_capability()[0] >= 9


needs_sm90 = pytest.mark.skipif(not _cluster_capable(), reason="thread-block clusters need sm_90 (Hopper) or newer")


@pytest.fixture
def cuda_path(monkeypatch):
    """Set the CUDA path (and optionally the cluster geometry) for one test."""
    def choose(path: str, plan: str = "") -> None:
        monkeypatch.setenv("SE_FUSED_CUDA_PATH", path)
        if plan:
            monkeypatch.setenv("SE_FUSED_CUDA_PLAN", plan)
        else:
            monkeypatch.delenv("SE_FUSED_CUDA_PLAN", raising=False)
    return choose


def check_against_reference(inputs, grad: str = "random") -> None:
    """CUDA backend vs the float64 reference, baseline the eager backend in the same dtype."""
    dtype = inputs.x.dtype
    reference = reference_se(inputs, grad)
    got = backend_se(inputs, "cuda", grad)
    baseline = backend_se(inputs, "eager", grad)
    for name, ref in reference.items():
        assert_close_to_reference(f"cuda {os.environ.get('SE_FUSED_CUDA_PATH')}/"
                                  f"{os.environ.get('SE_FUSED_CUDA_PLAN', 'auto')}: {name}",
                                  got[name], baseline[name], ref, dtype)


# Shapes every path can take: the four stages at a batch that leaves the last
# cluster group partly empty (5 = 4 + 1), and cluster-friendly odd shapes
# (C*H*W a multiple of 8 elements).
CLUSTER_SHAPES = (
    SEShape(5, 256, 16, 56, 56),
    SEShape(5, 512, 32, 28, 28),
    SEShape(5, 1024, 64, 14, 14),
    SEShape(5, 2048, 128, 7, 7),
    SEShape(3, 64, 1, 1, 3),     # R = 1, H*W = 3
    SEShape(1, 40, 3, 5, 5),     # C = 40, N = 1
    SEShape(2, 8, 1, 1, 1),      # H*W = 1
    # C = 36: in 16-bit dtypes not a multiple of the 8-element vector, so the channels_last
    # reduction and epilogue take their element-wise forms; in float32 the vector forms.
    SEShape(3, 36, 3, 4, 4),
)
ODD_SHAPES = (
    SEShape(1, 7, 1, 3, 1),
    SEShape(2, 37, 2, 7, 7),
    SEShape(3, 37, 1, 1, 1),
    SEShape(2, 7, 1, 56, 56),
    SEShape(2, 33, 33, 2, 2),
    # The MLP kernels' tiling: 9 sample groups of 8 (the last partial), 3 splits of C (256 each, the
    # last partial), R past one warp of columns, and 3 batches of 32 samples in the weight gradients.
    SEShape(70, 600, 40, 5, 5),
)
VARIANTS = [(False, "relu", "sigmoid"), (True, "relu", "sigmoid"), (False, "silu", "hardsigmoid"),
            (True, "silu", "hardsigmoid")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_sm90
@pytest.mark.parametrize("shape", CLUSTER_SHAPES, ids=[s.id for s in CLUSTER_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual,activation,gate", VARIANTS, ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS])
def test_cluster_path(cuda_path, shape, dtype, memory_format, residual, activation, gate):
    if dtype == torch.float32 and shape.c * shape.h * shape.w * 4 * 2 > 16 * 227 * 1024:
        pytest.skip("the backward keeps g and x of a sample on chip: 6.3 MB at float32 56x56 exceeds a "
                    "16-CTA cluster's shared memory; the two-pass path serves it (test_two_pass_path)")
    cuda_path("cluster")
    check_against_reference(make_se_inputs(shape, dtype, memory_format, "cuda", residual, activation, gate))


@pytest.mark.parametrize("shape", CLUSTER_SHAPES + ODD_SHAPES, ids=[s.id for s in CLUSTER_SHAPES + ODD_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual,activation,gate", VARIANTS, ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS])
def test_two_pass_path(cuda_path, shape, dtype, memory_format, residual, activation, gate):
    cuda_path("two_pass")
    check_against_reference(make_se_inputs(shape, dtype, memory_format, "cuda", residual, activation, gate))


@pytest.mark.parametrize("shape", CLUSTER_SHAPES + ODD_SHAPES, ids=[s.id for s in CLUSTER_SHAPES + ODD_SHAPES])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual,activation,gate", VARIANTS, ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS])
def test_two_pass_path_with_aten_mlp(cuda_path, monkeypatch, shape, memory_format, residual, activation, gate):
    """SE_FUSED_CUDA_MLP=aten: the two-pass path with the excitation MLP and weight gradients in ATen ops
    (the fallback for float64, and the comparison point for the MLP kernels test_two_pass_path runs)."""
    cuda_path("two_pass")
    monkeypatch.setenv("SE_FUSED_CUDA_MLP", "aten")
    check_against_reference(make_se_inputs(shape, torch.float32, memory_format, "cuda", residual, activation,
                                           gate))


def _pipelined_runs(shape: SEShape, dtype: torch.dtype, memory_format: str) -> bool:
    """Whether the pipelined path takes this call (plan_pipelined): whole 16-byte vectors along the rows."""
    vector = 16 // torch.empty((), dtype=dtype).element_size()
    if memory_format == "channels_last":
        return shape.c % vector == 0
    return shape.c * shape.h * shape.w % vector == 0


@pytest.mark.parametrize("shape", CLUSTER_SHAPES + ODD_SHAPES, ids=[s.id for s in CLUSTER_SHAPES + ODD_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual,activation,gate", VARIANTS, ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS])
def test_pipelined_path(cuda_path, shape, dtype, memory_format, residual, activation, gate):
    """The pipelined path against the reference; where its vectors do not fit the shape, a clear refusal."""
    cuda_path("pipelined")
    inputs = make_se_inputs(shape, dtype, memory_format, "cuda", residual, activation, gate)
    if not _pipelined_runs(shape, dtype, memory_format):
        with pytest.raises(RuntimeError, match="pipelined path cannot run this call"):
            backend_se(inputs, "cuda")
        return
    check_against_reference(inputs)


# The pipelined schedule under its knobs, each with the reference's results and the same bits as
# without it (a sample's sums and MLP run in the same order whichever CTA runs them, whatever the
# group): 1 or 3 CTAs (each walks many tiles, the delay grows to cover a group), groups of 2, 3 and
# 16 samples (partial last groups; 16 > N for the first shape), a longer delay; with the default
# tiles and with 1024-byte ones (NHWC: many row blocks of partial sums per sample). Not a group of 1:
# that is the first shape's default group (make_pipeline_plan: ceil(8 * weight bytes / slice bytes)),
# so its bits would be compared with themselves.
PIPELINE_KNOBS = [("SE_FUSED_CUDA_PIPELINE_BLOCKS", "1"), ("SE_FUSED_CUDA_PIPELINE_BLOCKS", "3"),
                  ("SE_FUSED_CUDA_PIPELINE_GROUP", "2"), ("SE_FUSED_CUDA_PIPELINE_GROUP", "3"),
                  ("SE_FUSED_CUDA_PIPELINE_GROUP", "16"), ("SE_FUSED_CUDA_PIPELINE_DELAY", "7")]
PIPELINE_SHAPES = (SEShape(7, 64, 4, 12, 12), SEShape(70, 600, 40, 5, 5))


@pytest.mark.parametrize("name,value", PIPELINE_KNOBS,
                         ids=[f"{n.rsplit('_', 1)[-1].lower()}={v}" for n, v in PIPELINE_KNOBS])
@pytest.mark.parametrize("shape", PIPELINE_SHAPES, ids=[s.id for s in PIPELINE_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("tile_bytes", ["", "1024"], ids=["tiles-default", "tiles-1024"])
def test_pipelined_schedule(cuda_path, monkeypatch, name, value, shape, dtype, memory_format, tile_bytes):
    cuda_path("pipelined")
    if tile_bytes:
        monkeypatch.setenv("SE_FUSED_CUDA_TILE_BYTES", tile_bytes)
    inputs = make_se_inputs(shape, dtype, memory_format, "cuda", True, "silu", "sigmoid")
    check_knob_keeps_bits(monkeypatch, inputs, name, value)


# SE_FUSED_CUDA_PIPELINE_TRACE: the per-step timeline benchmarks/pipeline_trace.py reads. The trace
# leaves the bits alone; the file (the backward's: each traced launch rewrites it) holds every CTA's
# steps, each point where its step has one and in order, and one MLP per group.
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_pipelined_trace(cuda_path, monkeypatch, tmp_path, memory_format):
    import re
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import pipeline_trace

    cuda_path("pipelined")
    monkeypatch.setenv("SE_FUSED_CUDA_PIPELINE_BLOCKS", "5")  # several steps per CTA and a partial last one
    inputs = make_se_inputs(SEShape(7, 64, 4, 12, 12), torch.bfloat16, memory_format, "cuda", True, "silu", "sigmoid")
    path = tmp_path / "trace.csv"
    check_knob_keeps_bits(monkeypatch, inputs, "SE_FUSED_CUDA_PIPELINE_TRACE", str(path))
    trace = pipeline_trace.read_trace(path)
    plan = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", trace.plan)}
    assert "backward" in trace.plan and plan["N"] == 7 and plan["blocks"] == 5
    total = plan["N"] * plan["tiles"]
    for cta in range(plan["blocks"]):
        rows = sorted((r for r in trace.rows if r["cta"] == cta), key=lambda r: r["step"])
        steps = (total - cta + plan["blocks"] - 1) // plan["blocks"]
        assert [r["step"] for r in rows] == list(range(steps + plan["delay"])), cta
        for r in rows:
            assert (r["reduced"] > 0) == (r["step"] < steps) and (r["ready"] > 0) == (r["step"] >= plan["delay"]), r
            points = [r[p] for p in pipeline_trace.POINTS if r[p] > 0]
            assert points == sorted(points) and r["start"] == points[0], r
    groups = -(-plan["N"] // plan["G"])
    assert sum(1 for r in trace.rows if r["finished"]) == groups


# The group MLP of the pipelined path is staged (weights streamed through shared memory)
# wherever C is a multiple of 4; SE_FUSED_CUDA_PIPELINE_MLP=direct runs the cluster path's
# layer functions instead (the default where C is not, e.g. C = 7 and 33 above).
@pytest.mark.parametrize("shape", PIPELINE_SHAPES + (SEShape(5, 2048, 128, 7, 7), SEShape(3, 40, 2, 5, 5)),
                         ids=[s.id for s in PIPELINE_SHAPES + (SEShape(5, 2048, 128, 7, 7), SEShape(3, 40, 2, 5, 5))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_pipelined_direct_mlp(cuda_path, monkeypatch, shape, dtype, memory_format, residual):
    cuda_path("pipelined")
    monkeypatch.setenv("SE_FUSED_CUDA_PIPELINE_MLP", "direct")
    check_against_reference(make_se_inputs(shape, dtype, memory_format, "cuda", residual, "relu", "hardsigmoid"))


# The staged MLP's edges: R > 256 (the hidden layer in two passes of rows), R = 1024 (column blocks
# of 4 channels), R = 1025 (no block fits: the direct MLP by default).
STAGED_EDGE_SHAPES = (SEShape(3, 64, 300, 2, 2), SEShape(2, 8, 1024, 3, 3), SEShape(2, 8, 1025, 3, 3))


@pytest.mark.parametrize("shape", STAGED_EDGE_SHAPES, ids=[s.id for s in STAGED_EDGE_SHAPES])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_pipelined_staged_mlp_edges(cuda_path, shape, memory_format):
    cuda_path("pipelined")
    check_against_reference(make_se_inputs(shape, torch.float32, memory_format, "cuda", True, "silu", "sigmoid"))


def test_pipelined_staged_mlp_refuses_unaligned_channels(cuda_path, monkeypatch):
    cuda_path("pipelined")
    monkeypatch.setenv("SE_FUSED_CUDA_PIPELINE_MLP", "staged")
    inputs = make_se_inputs(SEShape(2, 7, 1, 56, 56), torch.bfloat16, "nchw", "cuda")
    with pytest.raises(RuntimeError, match="staged MLP needs C a multiple of 4"):
        backend_se(inputs, "cuda")


# SE_FUSED_CUDA_MLP_SPLIT: the MLP products over C split every k channels instead of 256, so a
# block walks several staged pieces of C (and the next product adds fewer splits): C = 600 in
# one split or two (the last partial), conv5_x's C = 2048 in four, two or one.
MLP_SPLIT_SHAPES = (SEShape(70, 600, 40, 5, 5), SEShape(5, 2048, 128, 7, 7))


@pytest.mark.parametrize("shape", MLP_SPLIT_SHAPES, ids=[s.id for s in MLP_SPLIT_SHAPES])
@pytest.mark.parametrize("split", [512, 1024, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual,activation,gate", VARIANTS[1:3], ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS[1:3]])
def test_two_pass_mlp_split(cuda_path, monkeypatch, shape, split, dtype, residual, activation, gate):
    if split == 2048 and shape.c <= 1024:
        pytest.skip("one split of C, as at 1024")
    cuda_path("two_pass")
    monkeypatch.setenv("SE_FUSED_CUDA_MLP", "kernels")  # the split applies to the rows and columns kernels
    monkeypatch.setenv("SE_FUSED_CUDA_MLP_SPLIT", str(split))
    check_against_reference(make_se_inputs(shape, dtype, "channels_last", "cuda", residual, activation, gate))


# SE_FUSED_CUDA_MLP_ROW_TILES: the forward's rows kernels (fc1, fc2) take several tiles of rows
# per block. One staged piece (fc1 at a split of 256, fc2 at R <= 128) is staged once for all
# of them; several pieces (fc1 at a split of 1024 with C > 256, fc2 at R = 300 > 128) are
# staged again for each tile. 3 and 5 tiles leave a partial last block at every shape here.
ROW_TILE_SHAPES = (SEShape(70, 600, 40, 5, 5), SEShape(5, 2048, 128, 7, 7), SEShape(3, 1024, 300, 2, 2))


@pytest.mark.parametrize("shape", ROW_TILE_SHAPES, ids=[s.id for s in ROW_TILE_SHAPES])
@pytest.mark.parametrize("row_tiles", [3, 5])
@pytest.mark.parametrize("split", [256, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_pass_mlp_row_tiles_keep_bits(cuda_path, monkeypatch, shape, row_tiles, split, dtype):
    cuda_path("two_pass")
    monkeypatch.setenv("SE_FUSED_CUDA_MLP", "kernels")
    monkeypatch.setenv("SE_FUSED_CUDA_MLP_SPLIT", str(split))
    inputs = make_se_inputs(shape, dtype, "channels_last", "cuda", True, "silu", "sigmoid")
    check_knob_keeps_bits(monkeypatch, inputs, "SE_FUSED_CUDA_MLP_ROW_TILES", str(row_tiles))


# SE_FUSED_CUDA_MLP=tiled: the MLP's four products in the tiled kernel (tiles of 32 or 64 samples
# by 64 outputs, k staged 32 at a time) and their split sums added once. The shapes: conv5_x's
# (16 splits of C, 32 column tiles of fc2), C = 600 (10 splits, the last partial; 70 samples: a
# partial last sample tile), R = 300 (five column tiles of fc1; the products over R walk ten
# pieces of k, the last partial), and the odd ones (C = 7 and R = 1: one partial piece; C = 37:
# two splits; H*W = 1).
TILED_MLP_SHAPES = (SEShape(5, 2048, 128, 7, 7), SEShape(70, 600, 40, 5, 5), SEShape(3, 1024, 300, 2, 2),
                    SEShape(1, 7, 1, 3, 1), SEShape(2, 37, 2, 7, 7), SEShape(3, 37, 1, 1, 1),
                    SEShape(2, 33, 33, 2, 2))


@pytest.mark.parametrize("shape", TILED_MLP_SHAPES, ids=[s.id for s in TILED_MLP_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,activation,gate", VARIANTS, ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS])
def test_two_pass_tiled_mlp(cuda_path, monkeypatch, shape, dtype, residual, activation, gate):
    cuda_path("two_pass")
    monkeypatch.setenv("SE_FUSED_CUDA_MLP", "tiled")
    check_against_reference(make_se_inputs(shape, dtype, "channels_last", "cuda", residual, activation, gate))


# SE_FUSED_CUDA_MLP unset (auto): the tiled kernel where C*R >= 32768 and N >= 32, else the rows and
# columns kernels. The two give other bits at these shapes (other splits of C, another order), so
# each case's bits equal those of the choice forced and would differ from the other's. Both sides
# of each bound: C*R at 32768 and 16384 (N = 32), and N at 32 and 31 (C*R = 65536).
AUTO_MLP_CASES = [(SEShape(32, 1024, 32, 2, 2), "tiled"), (SEShape(32, 512, 32, 2, 2), "kernels"),
                  (SEShape(32, 1024, 64, 3, 3), "tiled"), (SEShape(31, 1024, 64, 3, 3), "kernels")]


@pytest.mark.parametrize("shape,chosen", AUTO_MLP_CASES, ids=[f"{s.id}-{c}" for s, c in AUTO_MLP_CASES])
def test_two_pass_auto_mlp_choice(cuda_path, monkeypatch, shape, chosen):
    cuda_path("two_pass")
    inputs = make_se_inputs(shape, torch.bfloat16, "channels_last", "cuda", True, "silu", "sigmoid")
    check_knob_keeps_bits(monkeypatch, inputs, "SE_FUSED_CUDA_MLP", chosen)
    other = "kernels" if chosen == "tiled" else "tiled"
    monkeypatch.setenv("SE_FUSED_CUDA_MLP", other)
    forced_other = backend_se(inputs, "cuda")
    monkeypatch.delenv("SE_FUSED_CUDA_MLP")
    auto = backend_se(inputs, "cuda")
    assert any(not torch.equal(auto[key], t) for key, t in forced_other.items()), \
        f"auto and SE_FUSED_CUDA_MLP={other} gave the same bits: the test cannot tell the two apart here"


# SE_FUSED_CUDA_WGRAD_TILES=wide: the weight gradients in tiles kThreads columns wide, as up to
# 2026-11-27 (the default fits the tile to the gradient's columns: test_two_pass_path covers it,
# with row groups of 1, 2, 4 and 8 across its shapes). Other splits of the batch, so other bits.
WIDE_WGRAD_SHAPES = (SEShape(70, 600, 40, 5, 5), SEShape(5, 2048, 128, 7, 7), SEShape(40, 70, 300, 2, 2))


@pytest.mark.parametrize("shape", WIDE_WGRAD_SHAPES, ids=[s.id for s in WIDE_WGRAD_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual,activation,gate", VARIANTS[1:3], ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS[1:3]])
def test_two_pass_wide_weight_gradient_tiles(cuda_path, monkeypatch, shape, dtype, residual, activation, gate):
    cuda_path("two_pass")
    monkeypatch.setenv("SE_FUSED_CUDA_WGRAD_TILES", "wide")
    check_against_reference(make_se_inputs(shape, dtype, "channels_last", "cuda", residual, activation, gate))


# NCHW channel sums where H*W is not a whole number of 16-byte vectors: spans of whole rows
# staged through shared memory (the default, SE_FUSED_CUDA_NCHW_SUMS unset or "staged") or a warp
# per row ("warp"); 49 and 196 pixels: conv5_x and conv4_x; C*H*W odd; one pixel per row; the
# residual form's masked sums in the backward.
STAGED_SUM_SHAPES = (SEShape(5, 2048, 128, 7, 7), SEShape(5, 1024, 64, 14, 14), SEShape(2, 37, 2, 7, 7),
                     SEShape(3, 37, 1, 1, 1), SEShape(70, 600, 40, 5, 5))


@pytest.mark.parametrize("shape", STAGED_SUM_SHAPES, ids=[s.id for s in STAGED_SUM_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("residual,activation,gate", VARIANTS[:2], ids=[f"{r}-{a}-{g}" for r, a, g in VARIANTS[:2]])
@pytest.mark.parametrize("sums", [None, "warp"], ids=["staged", "warp"])
def test_two_pass_nchw_row_sums(cuda_path, monkeypatch, shape, dtype, residual, activation, gate, sums):
    if sums == "warp" and (shape.h * shape.w) % (16 // dtype.itemsize) == 0:
        pytest.skip("H*W is a whole number of 16-byte vectors: the vector kernel serves, the knob is not read")
    cuda_path("two_pass")
    if sums is not None:
        monkeypatch.setenv("SE_FUSED_CUDA_NCHW_SUMS", sums)
    check_against_reference(make_se_inputs(shape, dtype, "nchw", "cuda", residual, activation, gate))


def off_boundary(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts one element past a 16-byte boundary."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = buffer[1:].view(t.shape)
    shifted.copy_(t)
    assert shifted.data_ptr() % 16 != 0
    return shifted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_two_pass_nchw_staged_sums_ignore_alignment(cuda_path, dtype, residual):
    """The staged NCHW sums give the same bits for tensors that start off a 16-byte boundary (their
    terms staged an element at a time) as for aligned ones (16-byte loads). A chunk of a chunked call
    starts n0·C·H·W elements into the batch, off a boundary where C·H·W is not a multiple of the
    vector (37·7·7 here), and must give the whole batch's bits (test_two_pass_path_in_chunks): until
    2026-11-27 such chunks took the warp kernel, whose order of sums differs."""
    cuda_path("two_pass")
    inputs = make_se_inputs(SEShape(3, 37, 2, 7, 7), dtype, "nchw", "cuda", residual, "silu", "sigmoid")
    aligned = backend_se(inputs, "cuda")
    shifted = backend_se(inputs.with_(x=off_boundary(inputs.x), grad_out=off_boundary(inputs.grad_out),
                                      residual=None if inputs.residual is None else off_boundary(inputs.residual)),
                         "cuda")
    for key, t in aligned.items():
        assert torch.equal(shifted[key], t), f"{key} depends on the inputs' alignment"


# Geometries that exercise each exchange: M > 1 (a sample split across CTAs,
# per-channel sums combined over distributed shared memory) and G > 1 (the MLP
# batched over samples, a padded last group when N % G != 0).
PLANS = ["1,1", "1,4", "2,1", "2,8", "4,2", "8,1", "16,1"]


@needs_sm90
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cluster_geometries(cuda_path, plan, memory_format, residual):
    cuda_path("cluster", plan)
    shape = SEShape(7, 128, 8, 14, 14)  # fits every plan above in float32; 7 samples pad every G > 1
    check_against_reference(make_se_inputs(shape, torch.float32, memory_format, "cuda", residual, "silu",
                                           "sigmoid"))


# The clusters are persistent: each walks the groups of G samples, loading the next
# group's chunks while it finishes this one (two buffers) or after it (one), in the
# forward and the backward kernel. Capped at 1 to 3 clusters, every cluster walks several
# groups on these small batches, padded last groups (G > 1) included.
PERSISTENT_CASES = [("1,1", 1, 2, torch.float32, SEShape(5, 64, 4, 6, 6)),
                    ("1,1", 2, 1, torch.float32, SEShape(5, 64, 4, 6, 6)),
                    ("2,1", 2, 2, torch.bfloat16, SEShape(7, 64, 4, 6, 6)),
                    ("1,4", 1, 2, torch.float32, SEShape(9, 64, 4, 6, 6)),
                    ("1,4", 1, 1, torch.bfloat16, SEShape(9, 64, 4, 6, 6)),
                    ("4,2", 2, 2, torch.bfloat16, SEShape(11, 128, 8, 14, 14)),
                    ("4,2", 3, 1, torch.float16, SEShape(11, 128, 8, 14, 14))]


@needs_sm90
@pytest.mark.parametrize("plan,clusters,buffers,dtype,shape", PERSISTENT_CASES,
                         ids=[f"{p}-{c}clusters-{b}buffers-{d}-{s.id}" for p, c, b, d, s in PERSISTENT_CASES])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_persistent_clusters(cuda_path, monkeypatch, plan, clusters, buffers, dtype, shape, memory_format,
                             residual):
    """Clusters that each walk several groups give the reference's results, and the same bits as
    one cluster per group (every group's arithmetic is the same, whichever cluster runs it)."""
    cuda_path("cluster", plan)
    monkeypatch.setenv("SE_FUSED_CUDA_CLUSTER_BUFFERS", str(buffers))
    inputs = make_se_inputs(shape, dtype, memory_format, "cuda", residual, "relu", "sigmoid")
    check_knob_keeps_bits(monkeypatch, inputs, "SE_FUSED_CUDA_CLUSTERS", str(clusters))


def check_knob_keeps_bits(monkeypatch, inputs, name: str, value: str) -> None:
    """With the environment variable ``name=value`` the CUDA backend gives the reference's results,
    and the same bits as without it."""
    monkeypatch.setenv(name, value)
    check_against_reference(inputs)
    with_knob = backend_se(inputs, "cuda")
    monkeypatch.delenv(name)
    without = backend_se(inputs, "cuda")
    for key, t in without.items():
        assert torch.equal(with_knob[key], t), f"{key} differs between {name}={value} and {name} unset"


@pytest.mark.parametrize("path,name,value,message", [
    ("cluster", "SE_FUSED_CUDA_CLUSTERS", "0", "SE_FUSED_CUDA_CLUSTERS must be a positive integer"),
    ("cluster", "SE_FUSED_CUDA_CLUSTER_BUFFERS", "3", "SE_FUSED_CUDA_CLUSTER_BUFFERS must be 1 or 2"),
    ("two_pass", "SE_FUSED_CUDA_CHUNK_BYTES", "half", "SE_FUSED_CUDA_CHUNK_BYTES must be a number of bytes, 'l2' or 'auto'"),
    ("two_pass", "SE_FUSED_CUDA_CHUNK_STREAMS", "2", "SE_FUSED_CUDA_CHUNK_STREAMS must be 3 or 1"),
    ("two_pass", "SE_FUSED_CUDA_CACHE_HINTS", "always", "SE_FUSED_CUDA_CACHE_HINTS must be chunks, all or off"),
    ("two_pass", "SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS", "33", r"SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS must be an integer in \[1, 32\]"),
    ("pipelined", "SE_FUSED_CUDA_PIPELINE_GROUP", "17", r"PIPELINE_GROUP must be an integer in \[1, 16\]"),
    ("pipelined", "SE_FUSED_CUDA_TILE_BYTES", "512", "SE_FUSED_CUDA_TILE_BYTES must be a number of bytes >= 1024"),
    ("pipelined", "SE_FUSED_CUDA_PIPELINE_BLOCKS", "0", "PIPELINE_BLOCKS must be a positive integer"),
    ("pipelined", "SE_FUSED_CUDA_PIPELINE_DELAY", "-1", r"PIPELINE_DELAY must be an integer in \[0, 2\^20\]"),
    ("pipelined", "SE_FUSED_CUDA_PIPELINE_MLP", "cublas", "PIPELINE_MLP must be staged or direct"),
    ("two_pass", "SE_FUSED_CUDA_MLP_SPLIT", "128", r"SE_FUSED_CUDA_MLP_SPLIT must be a multiple of 256 in \[256, 2\^20\]"),
    ("two_pass", "SE_FUSED_CUDA_MLP_SPLIT", "300", r"SE_FUSED_CUDA_MLP_SPLIT must be a multiple of 256 in \[256, 2\^20\]"),
    ("two_pass", "SE_FUSED_CUDA_MLP_SPLIT", "many", r"SE_FUSED_CUDA_MLP_SPLIT must be a multiple of 256 in \[256, 2\^20\]"),
    ("two_pass", "SE_FUSED_CUDA_MLP_ROW_TILES", "0", r"SE_FUSED_CUDA_MLP_ROW_TILES must be an integer in \[1, 65536\]"),
    ("two_pass", "SE_FUSED_CUDA_NCHW_SUMS", "tiled", "SE_FUSED_CUDA_NCHW_SUMS must be staged or warp"),
    ("two_pass", "SE_FUSED_CUDA_MLP", "cublas", "SE_FUSED_CUDA_MLP must be auto, kernels, aten or tiled"),
    ("two_pass", "SE_FUSED_CUDA_WGRAD_TILES", "narrow", "SE_FUSED_CUDA_WGRAD_TILES must be fit or wide")])
def test_path_knobs_refuse_bad_values(cuda_path, monkeypatch, path, name, value, message):
    if path == "cluster" and not _cluster_capable():
        pytest.skip("thread-block clusters need sm_90")
    cuda_path(path)
    monkeypatch.setenv(name, value)
    # The two-pass path's knobs are all read at the op's start (check_two_pass_knobs). The MLP_SPLIT=300
    # case crashed the process on an H100 at 72c11ba and 0aa21ab (csrc/cuda/squeeze_excitation_cuda.cu);
    # the two-pass shape is 7x7, whose float32 NCHW rows are not whole 16-byte vectors.
    shape = SEShape(2, 64, 4, 7, 7) if path == "two_pass" else SEShape(2, 64, 4, 6, 6)
    with pytest.raises(ValueError, match=message):
        backend_se(make_se_inputs(shape, torch.float32, "nchw", "cuda"), "cuda")


# The two-pass path over the batch in chunks (SE_FUSED_CUDA_CHUNK_BYTES): one sample per
# chunk (a budget of 1 byte) and chunks of several samples with a partial last one.
CHUNK_SHAPES = (SEShape(5, 256, 16, 7, 7), SEShape(70, 600, 40, 5, 5), SEShape(3, 37, 2, 7, 7))


@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=[s.id for s in CHUNK_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("samples_per_chunk", [1, 2])
@pytest.mark.parametrize("streams", ["3", "1"], ids=["three-streams", "one-stream"])
def test_two_pass_path_in_chunks(cuda_path, monkeypatch, shape, dtype, memory_format, residual, samples_per_chunk,
                                 streams):
    """Chunks of the batch give the reference's results, and the same bits as one chunk (each sample's
    sums, MLP and scale do not depend on the samples beside it; the weight gradients run over the
    whole batch either way), with the chunks as a pipeline on three streams (SE_FUSED_CUDA_CHUNK_STREAMS=3,
    the default) or every kernel in order on one stream (1). These shapes have under 64 pixels, so
    the channels_last sums are never split over pixels; where they are
    (test_channels_last_sums_split_over_pixels), the split count follows the chunk's sample count and
    the bits may differ from one chunk's."""
    cuda_path("two_pass")
    monkeypatch.setenv("SE_FUSED_CUDA_CHUNK_STREAMS", streams)
    inputs = make_se_inputs(shape, dtype, memory_format, "cuda", residual, "silu", "sigmoid")
    # The forward re-reads x (C*H*W elements per sample) and the backward 2 or 3 such tensors: a budget
    # of samples_per_chunk forward samples gives the forward that many and the backward fewer (at least 1).
    sample_bytes = inputs.x[0].numel() * inputs.x.element_size()
    check_knob_keeps_bits(monkeypatch, inputs, "SE_FUSED_CUDA_CHUNK_BYTES", str(samples_per_chunk * sample_bytes))


def test_two_pass_auto_chunks(cuda_path, monkeypatch):
    """SE_FUSED_CUDA_CHUNK_BYTES=auto takes chunks of 12 MiB where the batch's re-read bytes exceed
    64 MiB (the same bits as that budget given in bytes) and the whole batch below (the same bits as
    no budget). Each sample counts 512 KiB forward (x) and 1 MiB backward (grad_out and x): 136
    samples are 68 and 136 MiB (both passes chunked), 60 samples 30 and 60 MiB (neither). Chunks of
    24 (forward) or 12 (backward) samples split the channels_last sums' pixels otherwise than the
    whole batch does (nhwc_sum_splits), so a wrong choice shows in the bits (checked too)."""
    cuda_path("two_pass")

    def se(*tensors):
        return se_fused.squeeze_excitation(*tensors, backend="cuda")

    for n, chunked_above in ((136, True), (60, False)):
        inputs = make_se_inputs(SEShape(n, 256, 16, 32, 32), torch.bfloat16, "channels_last", "cuda")
        results = {}
        for budget in ("auto", str(12 << 20), None):
            if budget is None:
                monkeypatch.delenv("SE_FUSED_CUDA_CHUNK_BYTES", raising=False)
            else:
                monkeypatch.setenv("SE_FUSED_CUDA_CHUNK_BYTES", budget)
            results[budget] = run_se(se, inputs)
        chunked, whole = results[str(12 << 20)], results[None]
        assert any(not torch.equal(chunked[key], whole[key]) for key in chunked), \
            f"N={n}: 12 MiB chunks and the whole batch give the same bits; the test cannot tell them apart"
        expected = chunked if chunked_above else whole
        for key, t in expected.items():
            assert torch.equal(results["auto"][key], t), f"N={n}: {key} differs from the expected chunks"


# 8x8: the NCHW sums a warp per row of vectors; 7x7: the staged NCHW sums (49 pixels are not whole
# 16-byte vectors). Both take the 16-byte channels_last sums and scale kernels.
HINT_SHAPES = (SEShape(6, 64, 8, 8, 8), SEShape(6, 64, 8, 7, 7))


@pytest.mark.parametrize("shape", HINT_SHAPES, ids=[s.id for s in HINT_SHAPES])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name,value,chunked", [("SE_FUSED_CUDA_CACHE_HINTS", "off", True),
                                                ("SE_FUSED_CUDA_CACHE_HINTS", "all", False),
                                                ("SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS", "1", True),
                                                ("SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS", "32", True)],
                         ids=["hints-off-chunked", "hints-all-whole-batch", "scale-blocks-1", "scale-blocks-32"])
def test_two_pass_memory_access_knobs_keep_bits(cuda_path, monkeypatch, shape, memory_format, residual, name, value,
                                                chunked):
    """How the two-pass kernels access memory changes no value: a chunked call (with L2 eviction hints
    by default) gives the same bits without them (SE_FUSED_CUDA_CACHE_HINTS=off), a whole-batch call
    (no hints by default) the same bits with them (all), and the overlapped chunks' scale pass the
    same bits on a grid of 1 or 32 blocks per SM (SE_FUSED_CUDA_CHUNK_SCALE_BLOCKS; 2 by default);
    all give the reference's results."""
    cuda_path("two_pass")
    inputs = make_se_inputs(shape, torch.bfloat16, memory_format, "cuda", residual, "relu", "sigmoid")
    if chunked:  # two samples of the forward's re-read per chunk: three chunks, on three streams
        monkeypatch.setenv("SE_FUSED_CUDA_CHUNK_BYTES", str(2 * inputs.x[0].numel() * inputs.x.element_size()))
    check_knob_keeps_bits(monkeypatch, inputs, name, value)


# Small batches in channels_last: fewer than 256 (sample, channel tile) blocks, so the channel sums
# split the pixels over blocks and add the splits in a second kernel (nhwc_sum_splits). The second
# shape's C = 42 is not a multiple of the 16-byte vector: the scalar NHWC kernel.
SPLIT_SUM_SHAPES = (SEShape(1, 256, 16, 56, 56), SEShape(3, 42, 6, 17, 19), SEShape(2, 1024, 64, 14, 14))


@pytest.mark.parametrize("shape", SPLIT_SUM_SHAPES, ids=[s.id for s in SPLIT_SUM_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_channels_last_sums_split_over_pixels(cuda_path, shape, dtype, residual):
    """The two-pass path's channels_last sums with the pixels split over blocks: the reference's
    forward and gradients, and the same bits run to run."""
    cuda_path("two_pass")
    inputs = make_se_inputs(shape, dtype, "channels_last", "cuda", residual, "relu", "sigmoid")
    check_against_reference(inputs)
    first, second = backend_se(inputs, "cuda"), backend_se(inputs, "cuda")
    for key, t in first.items():
        assert torch.equal(second[key], t), key


@needs_sm90
def test_forced_cluster_path_refuses_unaligned_shapes(cuda_path):
    cuda_path("cluster")
    inputs = make_se_inputs(SEShape(2, 37, 2, 7, 7), torch.bfloat16, "nchw", "cuda")
    with pytest.raises(RuntimeError, match="cluster path cannot run"):
        backend_se(inputs, "cuda")


@pytest.mark.parametrize("path", ["auto", "cluster", "two_pass", "pipelined"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_more_than_2_pow_31_elements(cuda_path, path, memory_format):
    """Samples whose elements sit past index 2^31 get the same answer as a float64 reference of them alone."""
    if path == "cluster" and not _cluster_capable():
        pytest.skip("thread-block clusters need sm_90")
    free, _ = torch.cuda.mem_get_info()
    c, r, h, w = 2048, 128, 7, 7
    n = (2 ** 31) // (c * h * w) + 4  # the last 3 samples start past element 2^31
    if free < 6 * n * c * h * w * 2:
        pytest.skip(f"needs ~{6 * n * c * h * w * 2 / 2**30:.0f} GiB of free GPU memory")
    cuda_path(path)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
    w1 = torch.randn(r, c, 1, 1, device="cuda") * 0.05
    b1 = torch.randn(r, device="cuda") * 0.1
    w2 = torch.randn(c, r, 1, 1, device="cuda") * 0.1
    b2 = torch.randn(c, device="cuda") * 0.1
    assert x.numel() > 2 ** 31
    xg = x.detach().requires_grad_()
    out = se_fused.squeeze_excitation(xg, w1, b1, w2, b2, backend="cuda")
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, xg, grad_out)
    tail = slice(n - 3, n)  # entirely past element 2^31
    assert (n - 3) * c * h * w > 2 ** 31
    x_tail = x[tail].double().requires_grad_()
    ref = se_fused._reference.squeeze_excitation_reference(x_tail, w1.double(), b1.double(), w2.double(),
                                                          b2.double())
    (ref_grad,) = torch.autograd.grad(ref, x_tail, grad_out[tail].double())
    # bfloat16 storage: one rounding of a float32 result, |error| <= 2^-8 of the value (+ tiny).
    assert torch.allclose(out[tail].double(), ref, rtol=2 ** -7, atol=1e-3)
    assert torch.allclose(grad_x[tail].double(), ref_grad, rtol=2 ** -7, atol=1e-3)
    del x, xg, out, grad_out, grad_x
    torch.cuda.empty_cache()


@pytest.mark.parametrize("path", ["cluster", "two_pass", "two_pass+tiled_mlp", "pipelined"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_bitwise_deterministic(cuda_path, monkeypatch, path, memory_format):
    if path == "cluster" and not _cluster_capable():
        pytest.skip("thread-block clusters need sm_90")
    if path == "two_pass+tiled_mlp":
        monkeypatch.setenv("SE_FUSED_CUDA_MLP", "tiled")
    cuda_path(path.split("+")[0])
    inputs = make_se_inputs(SEShape(16, 512, 32, 28, 28), torch.bfloat16, memory_format, "cuda", residual=True)
    first = backend_se(inputs, "cuda")
    for _ in range(3):
        again = backend_se(inputs, "cuda")
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs between identical runs ({path})"


@pytest.mark.parametrize("path", ["cluster", "two_pass", "two_pass+chunks", "pipelined"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cuda_graph_capture(cuda_path, monkeypatch, path, residual):
    """Forward and backward captured in one CUDA graph replay to the eager result on new data.
    two_pass+chunks: the batch in chunks of two samples (forward) and one (backward), whose sums run
    on a side stream (run_chunks): the capture must take the fork and the joins."""
    if path == "cluster" and not _cluster_capable():
        pytest.skip("thread-block clusters need sm_90")
    cuda_path(path.split("+")[0])
    shape = (8, 256, 28, 28)
    if path == "two_pass+chunks":
        monkeypatch.setenv("SE_FUSED_CUDA_CHUNK_BYTES", str(2 * 256 * 28 * 28 * 4))
    torch.manual_seed(0)
    block = se_fused.FusedSEBlock(256, backend="cuda").cuda()
    static_x = torch.randn(shape, device="cuda", requires_grad=True)
    static_res = torch.randn(shape, device="cuda", requires_grad=True) if residual else None
    static_g = torch.randn(shape, device="cuda")

    def step():
        out = block(static_x, static_res)
        out.backward(static_g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
            block.zero_grad(set_to_none=False)
            static_x.grad = None
            if static_res is not None:
                static_res.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    new_x, new_g = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    new_res = torch.randn(shape, device="cuda") if residual else None
    with torch.no_grad():
        static_x.copy_(new_x)
        static_g.copy_(new_g)
        if residual:
            static_res.copy_(new_res)
    for p in block.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()

    x = new_x.clone().requires_grad_()
    res = new_res.clone().requires_grad_() if residual else None
    eager_params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    out = se_fused.squeeze_excitation(x, *eager_params, residual=res, backend="cuda")
    out.backward(new_g)
    assert torch.equal(static_out, out)
    assert torch.equal(static_x.grad, x.grad)
    if residual:
        assert torch.equal(static_res.grad, res.grad)
    for p, q in zip(block.parameters(), eager_params):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("path", ["auto", "two_pass", "pipelined"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cuda_matches_cpu_kernel(cuda_path, path, memory_format, residual):
    """The CUDA and the C++ CPU kernel agree: the CUDA error is within 2x the CPU kernel's (+ floor)."""
    if "cpu" not in se_fused.available_backends():
        pytest.skip("the C++ CPU kernel is not built")
    cuda_path(path)
    shape = SEShape(4, 512, 32, 28, 28)
    cpu_inputs = make_se_inputs(shape, torch.float32, memory_format, "cpu", residual, "relu", "sigmoid")
    cuda_inputs = make_se_inputs(shape, torch.float32, memory_format, "cuda", residual, "relu", "sigmoid")
    reference = reference_se(cpu_inputs)
    on_cpu = backend_se(cpu_inputs, "cpu")
    on_cuda = backend_se(cuda_inputs, "cuda")
    for name, ref in reference.items():
        assert_close_to_reference(f"cuda vs cpu kernel: {name}", on_cuda[name].cpu(), on_cpu[name], ref,
                                  torch.float32)
