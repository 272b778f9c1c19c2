"""The read-once forward in one persistent launch (``SE_FUSED_TRITON_PATH=pipelined``).

The two-pass forward reads ``x`` twice from HBM (3T of traffic where 2T is the
minimum), so it cannot reach the Triton issue's 0.75 of copy bandwidth; in
L2-sized chunks the re-read comes from L2 but every chunk pays its own launches
(see ``_common.CHUNK_L2_FRACTION``). This kernel is the CUDA pipelined path's
schedule (csrc/cuda/pipelined.cu) in Triton: program ``b`` of ``programs``
reduces tile ``k·programs + b`` at step ``k`` (a tile: one sample's pixels
``[rb·tile_rows, ...)``, every channel) into per-channel partial sums, and
``delay`` steps later scales the same tile, whose lines are then still in L2.
A group of ``G`` samples has an arrival counter; the program that completes it
adds the group's partial sums in row-block order, runs the MLP batched over the
group and releases the group's ready flag, which the scaling steps acquire.

``delay · programs >= G · row_blocks`` makes the waits deadlock-free when every
program is resident (an induction on the tile index: every tile a scaling step
waits for has a smaller index than the tile that program reduced in the same
step). On a GPU the launch is cooperative (``launch_cooperative_grid``: the
driver refuses a grid that cannot be resident at once); the interpreter runs
programs one after another, so there it runs one program, which reduces a whole
group before it scales any of it. Results do not depend on the number of
programs, the delay or the group size (every sum runs in a fixed order); the
tile size, the load block and the programs per SM (the group MLP's blocks)
change how the sums are grouped.

Not yet run on a GPU: the default stays the two-pass path until a measurement
says where this one wins.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _common
from ._common import (activation, activation_backward, add_partials_in_order, add_product, cdiv, gate,
                      gate_backward_from_output, next_power_of_2)


@triton.jit
def _tile_offsets(n, pp, cc, C, P, CHANNELS_LAST: tl.constexpr):
    """Element offsets of pixels ``pp`` (rows) × channels ``cc`` (columns) of sample ``n``."""
    base = n.to(tl.int64) * C * P
    if CHANNELS_LAST:
        return base + pp[:, None].to(tl.int64) * C + cc[None, :]
    else:
        return base + cc[None, :].to(tl.int64) * P + pp[:, None]


@triton.jit
def _tile_pixels(rb, tile_rows, P):
    """The pixels ``[begin, end)`` of row block ``rb``."""
    p_begin = rb * tile_rows
    return p_begin, tl.minimum(P, p_begin + tile_rows)


@triton.jit
def _reduce_tile(a_ptr, b_ptr, m_ptr, partial_ptr, n, rb, C, P, row_blocks, tile_rows, HAS_B: tl.constexpr,
                 HAS_MASK: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_P: tl.constexpr):
    """``partial[n, rb, c] = Σ`` over the tile's pixels of ``a`` (zeroed where ``m <= 0`` with
    HAS_MASK: the residual form's relu), times ``b`` with HAS_B; every channel."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    p_begin, p_end = _tile_pixels(rb, tile_rows, P)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_mask = cc < C
        acc = tl.zeros([BLOCK_C], dtype=acc_dtype)
        for p0 in range(p_begin, p_end, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            mask = (pp < p_end)[:, None] & c_mask[None, :]
            offsets = _tile_offsets(n, pp, cc, C, P, CHANNELS_LAST)
            v = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
            if HAS_MASK:
                v = tl.where(tl.load(m_ptr + offsets, mask=mask, other=0.0) <= 0.0, 0.0, v)
            if HAS_B:
                v *= tl.load(b_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
            acc += tl.sum(v, axis=0)
        tl.store(partial_ptr + (n.to(tl.int64) * row_blocks + rb) * C + cc, acc, mask=c_mask)


# The epilogues of _group_linear (constexpr globals: a jit function may read no other kind).
OUT_BIAS_GATE = tl.constexpr(0)  # out = gate(Σ + bias[j])    (forward, second layer)
OUT_BIAS = tl.constexpr(1)       # out = Σ + bias[j]          (forward, first layer: the pre-activation)
OUT_ACT_GRAD = tl.constexpr(2)   # out = act'(aux[n, j]) · Σ  (backward, first layer: du, aux = hidden)
OUT_DIVIDED = tl.constexpr(3)    # out = Σ / divisor          (backward, second layer: dz / P)


@triton.jit
def _group_linear(in_ptr, w_ptr, stride_wj, stride_wk, bias_ptr, aux_ptr, divisor, out_ptr, n0, count, J, K,
                  IN_ACTIVATE: tl.constexpr, OUT: tl.constexpr, ACTIVATION: tl.constexpr, GATE: tl.constexpr,
                  ACC_FP64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[n, j] = epilogue(Σ_k act?(in[n, k]) · W[j, k])`` (``OUT``, above) for the group's
    ``count`` samples from ``n0``; ``W[j, k]`` at ``w + j·stride_wj + k·stride_wk``; ``in (N, K)``,
    ``aux``/``out (N, J)`` row-major in the accumulation dtype, ``in`` read from L2 (this program
    wrote it just before, other programs never)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    gg = tl.arange(0, BLOCK_G)
    g_mask = gg < count
    nn = (n0 + gg).to(tl.int64)
    for j0 in range(0, J, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        j_mask = jj < J
        acc = tl.zeros([BLOCK_G, BLOCK_J], dtype=acc_dtype)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < K
            a = tl.load(in_ptr + nn[:, None] * K + kk[None, :], mask=g_mask[:, None] & k_mask[None, :], other=0.0,
                        cache_modifier=".cg")
            if IN_ACTIVATE:
                a = activation(a, ACTIVATION)  # act(0) = 0 where masked
            w = tl.load(w_ptr + jj[:, None] * stride_wj + kk[None, :] * stride_wk,
                        mask=j_mask[:, None] & k_mask[None, :], other=0.0).to(acc_dtype)
            # A tl.dot in float32 (add_product): its loads are pipelined, where a broadcast product's
            # waited for their own round trip per block of K, 2 x 8 x 64 of them per group at conv5_x.
            acc = add_product(acc, a, w, ACC_FP64)
        out_mask = g_mask[:, None] & j_mask[None, :]
        if OUT == OUT_BIAS_GATE or OUT == OUT_BIAS:
            acc += tl.load(bias_ptr + jj, mask=j_mask, other=0.0).to(acc_dtype)[None, :]
        if OUT == OUT_BIAS_GATE:
            acc = gate(acc, GATE)
        if OUT == OUT_ACT_GRAD:
            acc = activation_backward(acc, tl.load(aux_ptr + nn[:, None] * J + jj[None, :], mask=out_mask, other=0.0),
                                      ACTIVATION)
        if OUT == OUT_DIVIDED:
            acc = acc / divisor
        tl.store(out_ptr + nn[:, None] * J + jj[None, :], acc, mask=out_mask)


@triton.jit
def _store_group_sums(partial_ptr, aux_ptr, out_ptr, n0, count, C, P, row_blocks, GATE_GRAD: tl.constexpr,
                      GATE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """For the group's ``count`` samples from ``n0``: the channel sums, their tiles' partial sums added
    in row-block order, stored as means (``out = Σ / P``: pooled) or, with GATE_GRAD, as the gradient
    at the gate's input (``out = Σ · gate'`` from the saved scale ``aux``: dv); ``(N, C)`` arrays."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    gg = tl.arange(0, BLOCK_G)
    g_mask = gg < count
    nn = (n0 + gg).to(tl.int64)
    for c0 in range(0, C, BLOCK_S):
        cc = c0 + tl.arange(0, BLOCK_S)
        mask = g_mask[:, None] & (cc < C)[None, :]
        total = add_partials_in_order(tl.zeros([BLOCK_G, BLOCK_S], dtype=acc_dtype), partial_ptr,
                                      nn[:, None] * row_blocks * C + cc[None, :], C, row_blocks, mask, ".cg",
                                      2)
        if GATE_GRAD:
            s = tl.load(aux_ptr + nn[:, None] * C + cc[None, :], mask=mask, other=0.0)
            total = gate_backward_from_output(total, s, GATE)
        else:
            total = total / P
        tl.store(out_ptr + nn[:, None] * C + cc[None, :], total, mask=mask)


@triton.jit
def _finish_group(partial_ptr, pooled_ptr, hidden_ptr, scale_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, grp,
                  N, C, R, P, row_blocks, G, ACTIVATION: tl.constexpr, GATE: tl.constexpr, ACC_FP64: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_MLP_R: tl.constexpr, BLOCK_MLP_C: tl.constexpr):
    """The group's pooled means (partial sums added in row-block order), hidden (pre-activation)
    and scale, batched over its samples (each weight read once per group)."""
    n0 = grp * G
    count = tl.minimum(G, N - n0)
    _store_group_sums(partial_ptr, partial_ptr, pooled_ptr, n0, count, C, P, row_blocks, False, GATE, ACC_FP64,
                      BLOCK_G, BLOCK_S)
    tl.debug_barrier()  # pooled, written by every thread, is read back by every thread
    _group_linear(pooled_ptr, w1_ptr, C, 1, b1_ptr, pooled_ptr, 1, hidden_ptr, n0, count, R, C, False, OUT_BIAS,
                  ACTIVATION, GATE, ACC_FP64, BLOCK_G, BLOCK_MLP_R, BLOCK_MLP_C)
    tl.debug_barrier()
    _group_linear(hidden_ptr, w2_ptr, R, 1, b2_ptr, hidden_ptr, 1, scale_ptr, n0, count, C, R, True, OUT_BIAS_GATE,
                  ACTIVATION, GATE, ACC_FP64, BLOCK_G, BLOCK_MLP_C, BLOCK_MLP_R)


@triton.jit
def _excite_tile(x_ptr, residual_ptr, out_ptr, scale_ptr, n, rb, C, P, tile_rows, HAS_RESIDUAL: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``out = x · s`` (or ``relu(x · s + residual)``) over the tile; x's second read, its last use."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    p_begin, p_end = _tile_pixels(rb, tile_rows, P)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_mask = cc < C
        s = tl.load(scale_ptr + n.to(tl.int64) * C + cc, mask=c_mask, other=0.0, cache_modifier=".cg")
        for p0 in range(p_begin, p_end, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            mask = (pp < p_end)[:, None] & c_mask[None, :]
            offsets = _tile_offsets(n, pp, cc, C, P, CHANNELS_LAST)
            y = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_dtype)
            y = y * s[None, :]
            if HAS_RESIDUAL:
                y += tl.load(residual_ptr + offsets, mask=mask, other=0.0,
                             eviction_policy="evict_first").to(acc_dtype)
                y = tl.where(y < 0.0, 0.0, y)  # relu that keeps NaN, as torch.relu
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _arrive(sync_ptr, grp, N, G, row_blocks):
    """Counts this program's tile of group ``grp`` (after a barrier: every thread's partial sums are
    written); true for the group's last tile, whose program then finishes the group."""
    tl.debug_barrier()
    arrived = tl.atomic_add(sync_ptr + grp, 1, sem="acq_rel", scope="gpu")
    return arrived == tl.minimum(G, N - grp * G) * row_blocks - 1


@triton.jit
def _release(sync_ptr, groups, grp):
    """Sets group ``grp``'s ready flag once every thread's results of the group are written."""
    tl.debug_barrier()
    tl.atomic_xchg(sync_ptr + groups + grp, 1, sem="release", scope="gpu")


@triton.jit
def _wait_ready(sync_ptr, groups, grp, poll_limit):
    """Waits for group ``grp``'s ready flag; after ``poll_limit`` polls gives up and sets the error
    flag ``sync[2 · groups]`` (a bug in the schedule, reported instead of a hang)."""
    ready = tl.atomic_add(sync_ptr + groups + grp, 0, sem="acquire", scope="gpu")
    polls = 0
    while (ready == 0) & (polls < poll_limit):
        ready = tl.atomic_add(sync_ptr + groups + grp, 0, sem="acquire", scope="gpu")
        polls += 1
    if ready == 0:
        tl.atomic_xchg(sync_ptr + 2 * groups, 1)


@triton.jit(do_not_specialize=["N", "C", "R", "P", "row_blocks", "tile_rows", "G", "groups", "delay", "poll_limit"])
def pipelined_forward_kernel(x_ptr, residual_ptr, out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                             pooled_ptr, hidden_ptr, scale_ptr, partial_ptr, sync_ptr,
                             N, C, R, P, row_blocks, tile_rows, G, groups, delay, poll_limit,
                             HAS_RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACTIVATION: tl.constexpr,
                             GATE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_MLP_R: tl.constexpr, BLOCK_MLP_C: tl.constexpr):
    """Program ``b``: the step loop (module docstring). ``x``/``residual``/``out (N, C, H, W)`` in one
    layout; ``w1 (R, C)``, ``w2 (C, R)``, biases, any float dtype; ``pooled``/``scale (N, C)``,
    ``hidden (N, R)``, ``partial (N, row_blocks, C)`` in the accumulation dtype; ``sync``: int32
    ``(2 · groups + 1)`` zeros (arrival counters, ready flags, and a flag set when a wait gave up
    after ``poll_limit`` polls: a bug in the schedule, reported instead of a hang)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    total = N * row_blocks
    steps = (total - pid + programs - 1) // programs
    for step in range(0, steps + delay):
        if step < steps:
            j = step * programs + pid
            n = j // row_blocks
            rb = j - n * row_blocks
            _reduce_tile(x_ptr, x_ptr, x_ptr, partial_ptr, n, rb, C, P, row_blocks, tile_rows, False, False,
                         CHANNELS_LAST, ACC_FP64, BLOCK_C, BLOCK_P)
            if _arrive(sync_ptr, n // G, N, G, row_blocks):
                _finish_group(partial_ptr, pooled_ptr, hidden_ptr, scale_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                              n // G, N, C, R, P, row_blocks, G, ACTIVATION, GATE, ACC_FP64, BLOCK_S, BLOCK_G,
                              BLOCK_MLP_R, BLOCK_MLP_C)
                _release(sync_ptr, groups, n // G)
        if step >= delay:
            j = (step - delay) * programs + pid
            n = j // row_blocks
            rb = j - n * row_blocks
            _wait_ready(sync_ptr, groups, n // G, poll_limit)
            _excite_tile(x_ptr, residual_ptr, out_ptr, scale_ptr, n, rb, C, P, tile_rows, HAS_RESIDUAL,
                         CHANNELS_LAST, ACC_FP64, BLOCK_C, BLOCK_P)


@functools.lru_cache(maxsize=None)
def _cooperative_launch_option() -> dict:
    """``{"launch_cooperative_grid": True}`` where this Triton's NVIDIA backend has the option
    (Triton 3.3 on), else ``{}``: one program per SM is then resident anyway on an otherwise idle GPU,
    without the driver's guarantee."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return {}
    return {"launch_cooperative_grid": True} if "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__ else {}


def _env_int(name: str, default: int, lo: int) -> int:
    """The integer in environment variable ``name`` (read per call), or ``default``; at least ``lo``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if value < lo:
        raise ValueError(f"se_fused: {name} must be an integer >= {lo}; got {raw!r}")
    return value


def _env_power_of_2(name: str, default: int) -> int:
    """The power of two in environment variable ``name`` (read per call), or ``default``."""
    value = _env_int(name, default, 1)
    if value & (value - 1):
        raise ValueError(f"se_fused: {name} must be a power of two; got {value}")
    return value


# A tile's channels are loaded at least this many at a time where the tile has the pixels for it:
# 256-byte rows of bf16 in channels_last. The group sums' [BLOCK_G, BLOCK_S] blocks keep this width.
MIN_BLOCK_C = 128
GROUP_SUMS_BLOCK = 128


def tile_rows_of(c: int, p: int, element_size: int, tile_bytes: int) -> Tuple[int, int]:
    """``(row_blocks, tile_rows)``: a sample's ``p`` pixels cut into row blocks of about
    ``tile_bytes`` of one array (every channel), as evenly as whole pixels allow."""
    row_blocks = cdiv(p, max(1, tile_bytes // (c * element_size)))
    return row_blocks, cdiv(p, row_blocks)


def default_block_elements(acc: torch.dtype) -> int:
    """Elements of one array per load: 8192 (16 KiB of bf16, 32 registers a thread in float32 at
    8 warps); 2048 with float64 accumulation, whose values take two registers each."""
    return 2048 if acc == torch.float64 else 8192


def tile_blocks(c: int, tile_rows: int, elements: int) -> Tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)``: a tile's load block of up to ``elements`` elements (a power of two).

    With one program of 8 warps per SM, the block is what a program has in flight per load, so
    it should be ``elements`` at every stage: pixels first, up to the tile's rows, leaving at
    least ``MIN_BLOCK_C`` channels, then channels for the rest. With channels capped at 128
    instead (until 2026-11-27) the blocks of conv3_x-conv5_x's short tiles (32, 16 and 7 pixel rows
    at 32 KiB) were 8, 4 and 2 KiB of bf16: a quarter to an eighth of conv2_x's 16 KiB.
    """
    block_p = min(next_power_of_2(tile_rows), max(1, elements // min(next_power_of_2(c), MIN_BLOCK_C)))
    return block_p, min(next_power_of_2(c), max(1, elements // block_p))


def group_mlp_blocks(r: int, fp64: bool, per_sm: int = 1) -> dict:
    """The group MLP's blocks: ``BLOCK_MLP_R`` along R and ``BLOCK_MLP_C`` along C, in both layers (the
    first's outputs and the second's reduction run along R; the first's reduction and the second's
    outputs along C). The finishing program walks (R / BLOCK_MLP_R) · (C / BLOCK_MLP_C) steps of a
    ``tl.dot`` per layer, each a pipelined load of weights from L2, on the path to the group's ready
    flag: at conv5_x (R = 128, C = 2048) 128 per layer with the default 32 × 64, 512 with the 16 × 32
    of before 2026-11-27. float32 FMAs (``input_precision="ieee"``) hold their operands' rows in
    registers: 32 × 64 takes ~245 registers (sm_90, no spills), which one program of 8 warps per SM
    has; two per SM (``SE_FUSED_TRITON_PIPELINE_PER_SM=2``) need ≤ 128, so they keep 16 × 32 (~105),
    and their results' bits differ from one program's (the sums over C run in other blocks).
    float64: 16 × 32, a broadcast product in registers. The interpreter takes 16 × 16, tl.dot's least,
    so that the tests' shapes (C ≤ 64, R ≤ 33) walk several blocks in both layers."""
    if _common.INTERPRETED and not fp64:
        return dict(BLOCK_MLP_R=_common.TL_DOT_MIN_K, BLOCK_MLP_C=_common.TL_DOT_MIN_K)
    if fp64 or per_sm > 1:
        return dict(BLOCK_MLP_R=16, BLOCK_MLP_C=32)
    return dict(BLOCK_MLP_R=min(32, max(_common.TL_DOT_MIN_K, next_power_of_2(r))), BLOCK_MLP_C=64)


def kernel_blocks(c: int, r: int, tile_rows: int, group: int, fp64: bool, per_sm: int, elements: int) -> dict:
    """The pipelined kernels' block-shape constexprs for a launch (:func:`schedule`; compile_check
    compiles the same): the tile's load block (:func:`tile_blocks`), the group sums' channels
    ``BLOCK_S`` ([BLOCK_G, BLOCK_S] partial sums per load, two loads in flight), ``BLOCK_G`` (at
    least tl.dot's 16 rows; rows past the group are masked) and the group MLP's blocks
    (:func:`group_mlp_blocks`)."""
    block_p, block_c = tile_blocks(c, tile_rows, elements)
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_S=min(next_power_of_2(c), GROUP_SUMS_BLOCK),
                BLOCK_G=max(16, next_power_of_2(group)), **group_mlp_blocks(r, fp64, per_sm))


def default_delay_extra(weight_bytes: int, tile_bytes: int, step_bytes: int, steps: int, l2_bytes: int,
                        minimum: int) -> int:
    """Steps of delay beyond the deadlock-free minimum, by default: enough that a group's MLP is done
    before the scaling steps reach its tiles, as far as the L2 allows.

    A scaling step waits for its group's ready flag, and the finishing program runs the group's MLP
    (reading ``weight_bytes`` of weights) while the other programs stream a tile of ``tile_bytes``
    per step. With one step beyond the minimum (the default until 2026-11-27) every scaling step
    that reaches an unfinished group waits for the rest of its MLP, so the MLPs of successive groups
    add up along the launch where they outlast a step: at conv5_x (1 MiB of bf16 weights, 28 KiB
    tiles) each MLP is ~37 tiles' worth of loads, at conv4_x ~8. This asks for that many steps,
    at least 1, at most ``steps`` (the launch's), and at most what keeps the tiles between their two
    reads (``step_bytes`` each step: every program's tiles of every array read) within half the L2,
    where the second read must find them, with the ``minimum`` delay: 1 / 2 / 4 / 5 steps at
    conv2_x-conv5_x on an H100 (batch 256, bf16, forward; 1 / 2 / 2 / 2 in the backward, whose tiles
    read two arrays). The waits this cannot hide remain; a faster group MLP is the cure
    (docs/cuda-notes.md, "The Triton pipelined path's load blocks")."""
    want = cdiv(weight_bytes, tile_bytes)
    return max(1, min(want, steps, (l2_bytes // 2) // max(1, step_bytes) - minimum))


def requested() -> bool:
    """Whether ``SE_FUSED_TRITON_PATH`` asks for this path (``pipelined``; default ``two_pass``)."""
    path = os.environ.get("SE_FUSED_TRITON_PATH", "two_pass").strip() or "two_pass"
    if path not in ("two_pass", "pipelined"):
        raise ValueError(f"se_fused: SE_FUSED_TRITON_PATH must be two_pass or pipelined; got {path!r}")
    return path == "pipelined"


@dataclass
class Schedule:
    """A pipelined launch's geometry and scratch (see :func:`schedule`)."""
    row_blocks: int
    tile_rows: int
    group: int
    groups: int
    programs: int
    delay: int
    poll_limit: int
    partial: torch.Tensor  # (N, row_blocks, C) in the accumulation dtype
    sync: torch.Tensor     # int32 (2 · groups + 1) zeros
    blocks: dict           # the kernels' block-shape constexprs and launch options

    def check(self, what: str) -> None:
        """Under the interpreter, raise if a wait gave up (on a GPU, reading the flag would synchronise)."""
        if _common.INTERPRETED and int(self.sync[-1]) != 0:
            raise RuntimeError(f"se_fused: the pipelined Triton {what} scaled a group that no program finished "
                               "(a bug in its schedule)")


def schedule(x: torch.Tensor, r: int, acc: torch.dtype, arrays: int) -> Schedule:
    """The tiling, group, programs and delay of a pipelined launch over ``x (N, C, H, W)`` whose tiles
    read ``arrays`` tensors like ``x``. Knobs (read per call): ``SE_FUSED_TRITON_TILE_BYTES`` (bytes
    of one array per tile, default 32 KiB), ``SE_FUSED_TRITON_PIPELINE_GROUP`` (samples per MLP
    group), ``SE_FUSED_TRITON_PIPELINE_DELAY`` (steps beyond the minimum; default
    :func:`default_delay_extra`, 1 under the interpreter),
    ``SE_FUSED_TRITON_PIPELINE_PER_SM`` (programs per SM, default 1: with 8 warps and ~16 KiB of
    loads in flight per program, one per SM bounds the reads near 16 KiB per round trip per SM,
    ~2 TB/s on an H100; a second needs the registers of both, which the cooperative launch
    checks: it refuses a grid that cannot be resident), ``SE_FUSED_TRITON_PIPELINE_PROGRAMS``
    (at most this many programs), ``SE_FUSED_TRITON_PIPELINE_BLOCK`` (elements of one array per
    load, a power of two; default :func:`default_block_elements`; see :func:`tile_blocks`)."""
    n, c, h, w = x.shape
    p = h * w
    elem = x.element_size()
    row_blocks, tile_rows = tile_rows_of(c, p, elem, _env_int("SE_FUSED_TRITON_TILE_BYTES", 32768, 1))
    # Enough samples per group that the weights read per group are at most an eighth of its slice bytes.
    default_group = min(16, max(1, math.ceil(8 * 2 * c * r * 4 / (c * p * elem * arrays))))
    group = min(n, _env_int("SE_FUSED_TRITON_PIPELINE_GROUP", default_group, 1))
    groups = cdiv(n, group)
    total = n * row_blocks
    per_sm = _env_int("SE_FUSED_TRITON_PIPELINE_PER_SM", 1, 1)
    if _common.INTERPRETED:
        programs = 1  # the interpreter runs programs in turn: a wait on a later program would never end
    else:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        programs = torch.cuda.get_device_properties(index).multi_processor_count * per_sm  # co-resident
    programs = min(programs, total, _env_int("SE_FUSED_TRITON_PIPELINE_PROGRAMS", total, 1))
    minimum_delay = cdiv(group * row_blocks, programs)
    if _common.INTERPRETED:
        default_extra = 1
    else:
        tile_bytes = tile_rows * c * elem
        # The weights' bytes taken in x's dtype, as a module's parameters are.
        default_extra = default_delay_extra(2 * c * r * elem, tile_bytes, programs * tile_bytes * arrays,
                                            cdiv(total, programs), _common._l2_bytes(index), minimum_delay)
    blocks = dict(kernel_blocks(c, r, tile_rows, group, acc == torch.float64, per_sm,
                                _env_power_of_2("SE_FUSED_TRITON_PIPELINE_BLOCK", default_block_elements(acc))),
                  num_warps=8, **({} if _common.INTERPRETED else _cooperative_launch_option()))
    return Schedule(
        row_blocks=row_blocks, tile_rows=tile_rows, group=group, groups=groups, programs=programs,
        delay=minimum_delay + _env_int("SE_FUSED_TRITON_PIPELINE_DELAY", default_extra, 0),
        # The interpreter runs one program: a group not ready at its first poll never will be. On a
        # GPU 2^22 polls (each an L2 round trip and two barriers) are seconds; a real wait is µs.
        poll_limit=1 if _common.INTERPRETED else 1 << 22,
        partial=x.new_empty((n * row_blocks * c,), dtype=acc),
        sync=torch.zeros((2 * groups + 1,), dtype=torch.int32, device=x.device), blocks=blocks)


def launch_pipelined_forward(x: torch.Tensor, residual: Optional[torch.Tensor], out: torch.Tensor,
                             w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                             pooled: torch.Tensor, hidden: torch.Tensor, scale: torch.Tensor, channels_last: bool,
                             activation_code: int, gate_code: int) -> None:
    """The whole forward in one launch: writes ``out``, ``pooled``, ``hidden``, ``scale``.

    ``x``/``residual``/``out (N, C, H, W)`` in one layout (NCHW or channels_last,
    dense), ``w1 (R, C)`` and ``w2 (C, R)`` contiguous, ``pooled``/``scale (N, C)``
    and ``hidden (N, R)`` contiguous in the accumulation dtype; ``N > 0``. Knobs:
    :func:`schedule`.
    """
    n, c, h, w = x.shape
    r = w1.shape[0]
    s = schedule(x, r, pooled.dtype, 1)
    wrap_triton(pipelined_forward_kernel)[(s.programs,)](
        x, x if residual is None else residual, out, w1, b1, w2, b2, pooled, hidden, scale, s.partial, s.sync,
        n, c, r, h * w, s.row_blocks, s.tile_rows, s.group, s.groups, s.delay, s.poll_limit,
        HAS_RESIDUAL=residual is not None, CHANNELS_LAST=channels_last, ACTIVATION=activation_code,
        GATE=gate_code, ACC_FP64=pooled.dtype == torch.float64, **s.blocks)
    s.check("forward")
