"""What the Triton kernels share: the SE math as ``@triton.jit`` helpers, option codes,
and the launch heuristics (block shapes, batch chunking).

The math mirrors :mod:`se_fused._reference` (the single source of truth); the
tests compare every kernel against that module in float64. Everything here is
valid for triton 3.6 (the GPU machine) and 3.8 (the CPU interpreter).

Determinism: the kernels that reduce (channel sums, the MLP, the weight
gradients) use block shapes chosen here from the problem shape alone, never by
timing, so their summation order and therefore their bits are reproducible
across runs and processes. Only the element-wise kernels may be autotuned
(``SE_FUSED_TRITON_AUTOTUNE=1``), which cannot change their results.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

# Decided when the kernels are decorated: @triton.jit reads TRITON_INTERPRET then,
# so this is the mode the kernels of this process run in.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACTIVATION_CODES = {"relu": 0, "silu": 1}
GATE_CODES = {"sigmoid": 0, "hardsigmoid": 1}

# Batch chunking (two-pass path). By default the whole batch is one chunk: one MLP
# over the batch, pass 2 re-reading from HBM. Chunks sized to half of L2 (so that pass
# 2 re-reads from L2; the default until the H200 profile at 3c2a7b3) cost more in
# per-chunk MLP launches than they saved: forward device time 1.18 / 0.47 / 0.26 /
# 0.21 ms in chunks against 0.41 / 0.22 / 0.14 / 0.17 ms in one chunk at conv2_x-conv5_x
# (batch 256, bf16, channels_last), and 56 / 28 / 16 / 8 launches against 4
# (benchmarks/results/2026-11-26-h200-3c2a7b3-gpu_check.log).
CHUNK_L2_FRACTION = 0.5
# The L2 budget when the device reports no L2 size (half of an H100's 50 MB).
DEFAULT_CHUNK_BYTES = 25 << 20
# SE_FUSED_TRITON_CHUNK_BYTES: a budget of re-read bytes per chunk (an int; 0 or less,
# or unset: the whole batch), or "l2" for CHUNK_L2_FRACTION of the device's L2. Tests
# set it to force one-sample chunks on small tensors.
CHUNK_BYTES_OVERRIDE: Optional[Union[int, str]] = None
_chunk_env = os.environ.get("SE_FUSED_TRITON_CHUNK_BYTES", "").strip()
if _chunk_env:
    CHUNK_BYTES_OVERRIDE = _chunk_env if _chunk_env == "l2" else int(_chunk_env)
# SE_FUSED_TRITON_AUTOTUNE=1: the element-wise kernels pick their tile by timing
# (see elementwise_autotune_configs); never under the interpreter.
AUTOTUNE: bool = os.environ.get("SE_FUSED_TRITON_AUTOTUNE", "0") == "1" and not INTERPRETED


# The smallest reduction length (K) tl.dot compiles for on NVIDIA GPUs.
TL_DOT_MIN_K = 16


@dataclass(frozen=True)
class BlockSizes:
    """Block shapes of the kernels whose results depend on them (the reductions).

    Chosen from the problem shape only, never by timing, so results are
    bitwise reproducible. ``reduce_tile``: elements of one channel-reduction
    tile, at most ``reduce_block_inner`` of them along the contiguous axis;
    ``reduce_elements_per_program``: a sample's ``H·W`` is split over
    programs until each sums about this many elements; ``linear_*``: the MLP
    kernel's samples × outputs × reduction tile (outputs and reduction capped at
    ``linear_fp64_block`` in float64, whose product is a broadcast in registers, not a
    ``tl.dot``); ``linear_k_per_split``: the MLP's long reduction (over C) is split over
    programs in pieces this long (a multiple of ``linear_block_k``);
    ``weight_grad_*``: batch × rows × columns tile of the weight-gradient kernel.
    """
    reduce_tile: int
    reduce_block_inner: int
    reduce_elements_per_program: int
    linear_block_n: int
    linear_block_j: int
    linear_block_k: int
    linear_k_per_split: int
    linear_fp64_block: int
    weight_grad_block_n: int
    weight_grad_block_i: int
    weight_grad_block_j: int

    def __post_init__(self):
        # tl.dot on NVIDIA GPUs needs a reduction of at least 16; the interpreter does
        # not check it, so without this a CPU run accepts blocks a GPU refuses to compile.
        for name in ("linear_block_k", "linear_fp64_block"):
            if getattr(self, name) < TL_DOT_MIN_K:
                raise ValueError(f"{name} must be at least {TL_DOT_MIN_K} (tl.dot's smallest "
                                 f"reduction on a GPU), got {getattr(self, name)}")
        if self.linear_k_per_split % self.linear_block_k or self.linear_k_per_split % self.linear_fp64_block:
            raise ValueError(f"linear_k_per_split ({self.linear_k_per_split}) must be a multiple of "
                             f"linear_block_k and linear_fp64_block")


# GPU: ~16 elements per thread per tile at 4 warps; enough programs per chunk to fill 132 SMs.
# 128 along the contiguous axis wastes little on SE-ResNet's H·W (3136 = 24.5·128, 784 = 6.1·128).
# The MLP: pieces of 128 of the reduction (16 until 2026-11-27: see batched_linear.py); sm_90,
# bf16 weights: at most 88 registers and no spills with Triton 3.6 and 3.8 (64 outputs spill
# 16 bytes in one variant under 3.6 at pieces of 64).
GPU_BLOCKS = BlockSizes(reduce_tile=2048, reduce_block_inner=128, reduce_elements_per_program=16384,
                        linear_block_n=16, linear_block_j=32, linear_block_k=128, linear_k_per_split=256,
                        linear_fp64_block=16, weight_grad_block_n=8, weight_grad_block_i=32, weight_grad_block_j=32)
# Interpreter: its cost is per program and per operation, hardly per element, so the
# tiles are large and the programs few (the kernels' code is the same).
INTERPRETER_BLOCKS = BlockSizes(reduce_tile=8192, reduce_block_inner=256, reduce_elements_per_program=1 << 20,
                                linear_block_n=32, linear_block_j=64, linear_block_k=64, linear_k_per_split=256,
                                linear_fp64_block=64,
                                weight_grad_block_n=64, weight_grad_block_i=64, weight_grad_block_j=64)
# Read at every launch (tests swap it to run the GPU shapes in the interpreter).
BLOCKS: BlockSizes = INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS
REDUCE_MAX_SPLITS = 64


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side launch arithmetic (``triton.cdiv`` costs microseconds per call)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)`` (Triton block shapes must be powers of two).

    ``int(n)``: under ``torch.compile`` a shape may be symbolic; a block shape specialises it.
    """
    return 1 << max(0, (max(1, int(n)) - 1).bit_length())


# ---------------------------------------------------------------------------
# Math, in the accumulation dtype (float32 or float64), as in _reference.py.
# Clamps are written with tl.where so that NaN propagates as in PyTorch.
# ---------------------------------------------------------------------------

@triton.jit
def sigmoid(v):
    """``1 / (1 + exp(-v))``."""
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def activation(u, ACTIVATION: tl.constexpr):
    """``act(u)``: 0 = relu, 1 = silu."""
    if ACTIVATION == 0:
        return tl.where(u < 0.0, 0.0, u)
    else:
        return u * sigmoid(u)


@triton.jit
def activation_backward(grad, u, ACTIVATION: tl.constexpr):
    """``grad · act'(u)``: relu selects ``grad`` where ``u > 0`` (an Inf/NaN ``grad`` is dropped
    where the unit is off, as PyTorch's relu backward does); silu multiplies by ``σ(u)(1 + u(1 − σ(u)))``."""
    if ACTIVATION == 0:
        return tl.where(u > 0.0, grad, 0.0)
    else:
        sig = sigmoid(u)
        return grad * (sig * (1.0 + u * (1.0 - sig)))


@triton.jit
def gate(v, GATE: tl.constexpr):
    """``gate(v)``: 0 = sigmoid, 1 = hardsigmoid ``= min(max(v + 3, 0), 6) / 6``."""
    if GATE == 0:
        return sigmoid(v)
    else:
        t = v + 3.0
        t = tl.where(t < 0.0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        return t / 6.0


@triton.jit
def gate_backward_from_output(grad, s, GATE: tl.constexpr):
    """``grad · gate'(v)`` from ``s = gate(v)``: sigmoid ``grad · s(1 − s)``; hardsigmoid ``grad / 6``
    selected where ``0 < s < 1`` (exactly where ``−3 < v < 3``), 0 elsewhere even for an infinite ``grad``."""
    if GATE == 0:
        return grad * (s * (1.0 - s))
    else:
        return tl.where((s > 0.0) & (s < 1.0), grad / 6.0, 0.0)


@triton.jit
def add_product(acc, a, w, ACC_FP64: tl.constexpr):
    """``acc + a · wᵀ`` for ``a [M, K]``, ``w [J, K]`` (the MLP's products): float32 FMAs as a
    ``tl.dot`` with ``input_precision="ieee"`` (not TF32; register-tiled, and its loads pipelined by
    the kernel's stages), float64 as a broadcast product reduced over K (tl.dot has no float64)."""
    if ACC_FP64:
        return acc + tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    else:
        return acc + tl.dot(a, tl.trans(w), input_precision="ieee")


@triton.jit
def _load_partial(ptr, offsets, stride, s, count, mask, CACHE: tl.constexpr):
    """``ptr[offsets + s·stride]`` where ``s < count`` and ``mask``, else ``-0.0`` (which adds nothing)."""
    return tl.load(ptr + offsets + tl.cast(s, tl.int64) * stride, mask=mask & (s < count), other=-0.0,
                   cache_modifier=CACHE)


@triton.jit
def add_partials_in_order(acc, ptr, offsets, stride, count, mask, CACHE: tl.constexpr, IN_FLIGHT: tl.constexpr):
    """``acc + Σ_{s < count} ptr[offsets + s·stride]``, added in the order ``s = 0, 1, ...`` (the
    bits do not depend on anything else), ``IN_FLIGHT`` (2 or 4) partials loaded before any of
    them is added.

    In a loop of one load and one add per partial every iteration waits for its load before
    the next load is issued: one L2 round trip per partial (8 per k block of the MLP's second
    step at conv5_x, up to 49 per group in the pipelined kernels' channel sums). Loads past
    ``count`` give ``-0.0``, and ``x + (-0.0)`` is ``x`` bit for bit (also for ``x = -0.0``), so
    the padding changes no result. ``CACHE``: the loads' cache modifier (``".cg"`` for sums
    other programs of the same launch wrote: L1 is not coherent). The pipelined kernels take 2:
    with 4 ptxas compiled their forward to 80 registers and 16-24 bytes of spills (103 and none
    with 2; sm_90, Triton 3.8).
    """
    for s0 in range(0, count, IN_FLIGHT):
        p0 = _load_partial(ptr, offsets, stride, s0, count, mask, CACHE)
        p1 = _load_partial(ptr, offsets, stride, s0 + 1, count, mask, CACHE)
        if IN_FLIGHT == 4:
            p2 = _load_partial(ptr, offsets, stride, s0 + 2, count, mask, CACHE)
            p3 = _load_partial(ptr, offsets, stride, s0 + 3, count, mask, CACHE)
        acc += p0.to(acc.dtype)
        acc += p1.to(acc.dtype)
        if IN_FLIGHT == 4:
            acc += p2.to(acc.dtype)
            acc += p3.to(acc.dtype)
    return acc


# ---------------------------------------------------------------------------
# Launch heuristics
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReduceConfig:
    """Block shape of a channel reduction (see channel_reduce.py).

    Each program sums ``block_c`` channels over ``p_per_split`` pixels of one
    sample; ``splits`` programs cover a sample's ``H·W`` and write partial sums
    that the MLP kernel adds in a fixed order.
    """
    block_c: int
    block_p: int
    splits: int
    p_per_split: int


def reduce_config(c: int, p: int, channels_last: bool) -> ReduceConfig:
    """Block shape for summing ``(C=c, H·W=p)`` per channel; depends on the shape only.

    NCHW: a tile is ``block_c`` channel rows of up to ``reduce_block_inner`` contiguous pixels.
    NHWC: a tile is up to ``reduce_block_inner`` contiguous channels for ``block_p`` pixel rows.
    A sample's pixels are split across programs until each has about
    ``BLOCKS.reduce_elements_per_program`` elements, so a chunk has enough
    programs to fill the GPU.
    """
    return _reduce_config(int(c), int(p), bool(channels_last), BLOCKS)


@functools.lru_cache(maxsize=None)
def _reduce_config(c: int, p: int, channels_last: bool, blocks: BlockSizes) -> ReduceConfig:
    if channels_last:
        block_c = min(next_power_of_2(c), blocks.reduce_block_inner)
        block_p = min(max(1, blocks.reduce_tile // block_c), next_power_of_2(p))
    else:
        block_p = min(next_power_of_2(p), blocks.reduce_block_inner)
        block_c = min(max(1, blocks.reduce_tile // block_p), next_power_of_2(c))
    tiles_p = cdiv(p, block_p)
    wanted = round(block_c * p / blocks.reduce_elements_per_program)
    splits = max(1, min(wanted, tiles_p, REDUCE_MAX_SPLITS))
    tiles_per_split = cdiv(tiles_p, splits)
    splits = cdiv(tiles_p, tiles_per_split)  # no empty split
    return ReduceConfig(block_c, block_p, splits, tiles_per_split * block_p)


class LinearTile(NamedTuple):
    """One MLP step's program shape: ``block_n`` samples × ``block_j`` outputs, the reduction in
    pieces of ``block_k``, split over ``k_splits`` programs of ``k_per_split`` elements each."""
    block_n: int
    block_j: int
    block_k: int
    k_per_split: int
    k_splits: int


def linear_tile(k: int, j: int, fp64: bool, split: bool = True) -> LinearTile:
    """The program shape of an MLP step reducing ``k`` elements into ``j`` outputs (per sample),
    the reduction split over programs unless ``split`` is False (a step that applies the output's
    bias and gate needs the whole sum).

    From the shape and the block sizes only (the bits depend on ``block_k`` and ``k_per_split``);
    ``SE_FUSED_TRITON_MLP_TILE=n,j,k,split`` replaces the float32 block sizes, for tuning (read per
    call).
    """
    override = os.environ.get("SE_FUSED_TRITON_MLP_TILE", "").strip() or None
    return _linear_tile(int(k), int(j), bool(fp64), bool(split), override, BLOCKS)


@functools.lru_cache(maxsize=None)
def _linear_tile(k: int, j: int, fp64: bool, split: bool, override: Optional[str], blocks: BlockSizes
                 ) -> LinearTile:
    block_n, block_j, block_k = blocks.linear_block_n, blocks.linear_block_j, blocks.linear_block_k
    k_per_split = blocks.linear_k_per_split
    if override is not None and not fp64:
        block_n, block_j, block_k, k_per_split = _parse_mlp_tile(override)
    if fp64:
        block_j, block_k = min(block_j, blocks.linear_fp64_block), min(block_k, blocks.linear_fp64_block)
    # No larger than the problem (a power of two, at least tl.dot's 16): a piece past the end is masked work.
    block_j = min(block_j, max(TL_DOT_MIN_K, next_power_of_2(j)))
    block_k = min(block_k, max(TL_DOT_MIN_K, next_power_of_2(k)))
    k_splits = cdiv(k, k_per_split) if split else 1
    k_per_split = cdiv(cdiv(k, k_splits), block_k) * block_k
    return LinearTile(block_n, block_j, block_k, k_per_split, k_splits)


def _parse_mlp_tile(text: str) -> Tuple[int, int, int, int]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    # tl.dot's operands on a GPU: at least 16 along the reduction, powers of two; whole pieces per split.
    if (len(sizes) != 4 or any(v < 1 or v & (v - 1) for v in sizes[:3]) or sizes[2] < TL_DOT_MIN_K
            or sizes[3] % sizes[2]):
        raise ValueError(f"se_fused: SE_FUSED_TRITON_MLP_TILE must be n,j,k,split (n, j, k powers of two, k at "
                         f"least {TL_DOT_MIN_K}, split a multiple of k); got {text!r}")
    return sizes


@functools.lru_cache(maxsize=None)
def _l2_bytes(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "L2_cache_size", 0) or 0)


def samples_per_chunk(n: int, reread_bytes_per_sample: int, device: torch.device) -> int:
    """Samples processed together by the two-pass path (at least 1, at most ``n``).

    The whole batch unless :data:`CHUNK_BYTES_OVERRIDE` sets a budget of
    ``reread_bytes_per_sample`` (the bytes of one sample that pass 2 reads again:
    x in the forward; grad_out, and the saved output in the residual form, in
    the backward) per chunk; ``"l2"``: :data:`CHUNK_L2_FRACTION` of the
    device's L2, so that pass 2 finds a chunk there.
    """
    budget = CHUNK_BYTES_OVERRIDE
    if budget is None or (isinstance(budget, int) and budget <= 0):
        return max(1, n)
    if budget == "l2":
        budget = DEFAULT_CHUNK_BYTES
        if device.type == "cuda" and not INTERPRETED and torch.cuda.is_available():
            index = device.index if device.index is not None else torch.cuda.current_device()
            budget = int(_l2_bytes(index) * CHUNK_L2_FRACTION) or DEFAULT_CHUNK_BYTES
    return max(1, min(n, int(budget) // max(1, reread_bytes_per_sample)))


@triton.jit
def sample_tile(n0, C, P, CHANNELS_LAST: tl.constexpr, BLOCK_INNER: tl.constexpr, TILE: tl.constexpr):
    """This program's ``[TILE // BLOCK_INNER, BLOCK_INNER]`` tile of one sample, the sample seen as
    ``[OUTER, INNER]`` with ``INNER`` contiguous (NCHW ``[C, H·W]``, channels_last ``[H·W, C]``).

    Returns ``(n, offsets, mask, channels, channel_mask)``: the sample (int64), the tile's element
    offsets and mask, and each element's channel and mask shaped to broadcast against the tile
    (``[1, BLOCK_INNER]`` for channels_last, ``[BLOCK_OUTER, 1]`` for NCHW), for per-channel loads.
    """
    BLOCK_OUTER: tl.constexpr = TILE // BLOCK_INNER  # TILE, BLOCK_INNER: powers of two
    if CHANNELS_LAST:
        outer_size = P
        inner_size = C
    else:
        outer_size = C
        inner_size = P
    inner_blocks = tl.cdiv(inner_size, BLOCK_INNER)
    outer_blocks = tl.cdiv(outer_size, BLOCK_OUTER)
    pid = tl.program_id(0)
    inner_block = pid % inner_blocks
    outer_block = (pid // inner_blocks) % outer_blocks
    n = (pid // (inner_blocks * outer_blocks) + n0).to(tl.int64)
    outer = outer_block * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)
    inner = inner_block * BLOCK_INNER + tl.arange(0, BLOCK_INNER)
    outer_mask = outer < outer_size
    inner_mask = inner < inner_size
    mask = outer_mask[:, None] & inner_mask[None, :]
    offsets = n * C * P + outer[:, None].to(tl.int64) * inner_size + inner[None, :]
    if CHANNELS_LAST:
        channels = inner[None, :]
        channel_mask = inner_mask[None, :]
    else:
        channels = outer[:, None]
        channel_mask = outer_mask[:, None]
    return n, offsets, mask, channels, channel_mask


def elementwise_config(c: int, p: int) -> Tuple[int, int]:
    """``(TILE, num_warps)`` of the element-wise kernels (excite forward/backward) without autotuning.

    ``TILE`` elements per program, split into ``TILE // BLOCK_INNER`` rows of the
    contiguous axis. On an H100 a program of 4096 elements at 8 warps moves 8–16 KB
    per tensor with two 16-byte loads per thread in flight; a chunk of ~25 MB then
    has thousands of programs. The interpreter's cost is per program: one large tile.
    """
    if INTERPRETED:
        return 8192, 4
    return 4096, 8


def elementwise_launcher(kernel, autotuned_kernel, c: int, p: int, channels_last: bool, count: int):
    """The launch of an element-wise kernel over ``count`` samples tiled by :func:`sample_tile`.

    Returns ``(launch, options)``: ``launch(*args, **constexprs)`` is the kernel (autotuned with
    ``SE_FUSED_TRITON_AUTOTUNE=1``, else with the shape's tile) over its grid, and ``options``
    holds ``BLOCK_INNER`` (and ``TILE``/``num_warps`` when not autotuned) for the call.
    """
    from torch.library import wrap_triton

    block_inner = elementwise_inner_block(c, p, channels_last)
    outer_size, inner_size = (p, c) if channels_last else (c, p)

    def grid(meta):
        return (count * cdiv(outer_size, meta["TILE"] // block_inner) * cdiv(inner_size, block_inner),)

    if AUTOTUNE:
        return wrap_triton(autotuned_kernel)[grid], dict(BLOCK_INNER=block_inner)
    tile, warps = elementwise_config(c, p)
    return wrap_triton(kernel)[grid], dict(BLOCK_INNER=block_inner, TILE=tile, num_warps=warps)


def elementwise_autotune_configs():
    """Autotune candidates of the element-wise kernels (used with ``SE_FUSED_TRITON_AUTOTUNE=1``).

    Off by default: tuning times every candidate on the first call of each
    shape, which costs seconds in a test run of many small shapes. Whether it
    beats :func:`elementwise_config` on an H100 is for the benchmark to say.
    The result never depends on the configuration (there is no reduction).
    """
    return [triton.Config({"TILE": tile}, num_warps=warps)
            for tile, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))]


def elementwise_inner_block(c: int, p: int, channels_last: bool) -> int:
    """Block along the contiguous axis (``H·W`` for NCHW, ``C`` for NHWC) of an element-wise tile.

    At most 256 (every ``TILE`` is at least 2048, so a tile has at least 8 rows).
    """
    return min(next_power_of_2(c if channels_last else p), 256)
