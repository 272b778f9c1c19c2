"""The read-once backward in one persistent launch (``SE_FUSED_TRITON_PATH=pipelined``).

The schedule of pipelined_forward.py: program ``b`` reduces tile ``k·programs + b``
(``ds`` partial sums of ``g'·x``, ``g' = grad_out`` masked by the ReLU output in the
residual form) and ``delay`` steps later writes the same tile's ``grad_x = g'·s + dz/P``
(and ``grad_residual = g'``) from the ``grad_out`` (and ``out``) lines still in L2.
The program that completes a group's arrivals computes its ``dv = ds · gate'(s)``,
``du = act'(hidden) · (dv W2)`` and ``dz/P = (du W1) / P``, batched over the group.
HBM traffic 3T (5T with the residual), against the two-pass backward's 5T (7T).
The weight gradients are reduced afterwards from ``dv`` and ``du`` (weight_grad.py).

Not yet run on a GPU: the default stays the two-pass path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .pipelined_forward import (OUT_ACT_GRAD, OUT_DIVIDED, _arrive, _group_linear, _reduce_tile, _release,
                                _store_group_sums, _tile_offsets, _tile_pixels, _wait_ready, schedule)


@triton.jit
def _finish_group_backward(partial_ptr, scale_ptr, hidden_ptr, dv_ptr, du_ptr, dz_ptr, w1_ptr, w2_ptr, grp,
                           N, C, R, P, row_blocks, G, ACTIVATION: tl.constexpr, GATE: tl.constexpr,
                           ACC_FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_MLP_R: tl.constexpr, BLOCK_MLP_C: tl.constexpr):
    """The group's ``dv`` (from its partial sums, added in row-block order), ``du`` and ``dz / P``."""
    n0 = grp * G
    count = tl.minimum(G, N - n0)
    _store_group_sums(partial_ptr, scale_ptr, dv_ptr, n0, count, C, P, row_blocks, True, GATE, ACC_FP64, BLOCK_G,
                      BLOCK_S)
    tl.debug_barrier()  # dv, written by every thread, is read back by every thread
    # du[n, r] = act'(hidden[n, r]) · Σ_c dv[n, c] · W2[c, r]   (W2 is (C, R): W[j=r, k=c] at c·R + r)
    _group_linear(dv_ptr, w2_ptr, 1, R, w2_ptr, hidden_ptr, 1, du_ptr, n0, count, R, C, False, OUT_ACT_GRAD,
                  ACTIVATION, GATE, ACC_FP64, BLOCK_G, BLOCK_MLP_R, BLOCK_MLP_C)
    tl.debug_barrier()
    # dz[n, c] / P = Σ_r du[n, r] · W1[r, c] / P   (W1 is (R, C): W[j=c, k=r] at r·C + c)
    _group_linear(du_ptr, w1_ptr, 1, C, w1_ptr, du_ptr, P, dz_ptr, n0, count, C, R, False, OUT_DIVIDED,
                  ACTIVATION, GATE, ACC_FP64, BLOCK_G, BLOCK_MLP_C, BLOCK_MLP_R)


@triton.jit
def _excite_tile_backward(grad_out_ptr, out_ptr, scale_ptr, dz_ptr, grad_x_ptr, grad_residual_ptr, n, rb, C, P,
                          tile_rows, HAS_OUT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``grad_x = g'·s + dz/P`` and, with ``out``, ``grad_residual = g'``; grad_out's (and out's) last use."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    p_begin, p_end = _tile_pixels(rb, tile_rows, P)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_mask = cc < C
        s = tl.load(scale_ptr + n.to(tl.int64) * C + cc, mask=c_mask, other=0.0)
        dz = tl.load(dz_ptr + n.to(tl.int64) * C + cc, mask=c_mask, other=0.0, cache_modifier=".cg")
        for p0 in range(p_begin, p_end, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            mask = (pp < p_end)[:, None] & c_mask[None, :]
            offsets = _tile_offsets(n, pp, cc, C, P, CHANNELS_LAST)
            g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_dtype)
            if HAS_OUT:
                o = tl.load(out_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first")
                g = tl.where(o <= 0.0, 0.0, g)  # the residual form's relu mask (NaN passes, as in eager)
                tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_x_ptr + offsets, (g * s[None, :] + dz[None, :]).to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "C", "R", "P", "row_blocks", "tile_rows", "G", "groups", "delay", "poll_limit"])
def pipelined_backward_kernel(grad_out_ptr, x_ptr, out_ptr, grad_x_ptr, grad_residual_ptr, w1_ptr, w2_ptr,
                              hidden_ptr, scale_ptr, dv_ptr, du_ptr, dz_ptr, partial_ptr, sync_ptr,
                              N, C, R, P, row_blocks, tile_rows, G, groups, delay, poll_limit,
                              HAS_OUT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACTIVATION: tl.constexpr,
                              GATE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                              BLOCK_MLP_R: tl.constexpr, BLOCK_MLP_C: tl.constexpr):
    """Program ``b``: pipelined_forward_kernel's step loop for the backward. ``grad_out``/``x``/``out``/
    ``grad_x``/``grad_residual (N, C, H, W)`` in one layout; ``w1 (R, C)``, ``w2 (C, R)``; ``hidden
    (N, R)``, ``scale (N, C)`` saved by the forward; ``dv``, ``dz (N, C)``, ``du (N, R)`` written, in
    the accumulation dtype; ``partial``/``sync`` as the forward's."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    steps = (N * row_blocks - pid + programs - 1) // programs
    for step in range(0, steps + delay):
        if step < steps:
            j = step * programs + pid
            n = j // row_blocks
            rb = j - n * row_blocks
            _reduce_tile(grad_out_ptr, x_ptr, out_ptr, partial_ptr, n, rb, C, P, row_blocks, tile_rows, True,
                         HAS_OUT, CHANNELS_LAST, ACC_FP64, BLOCK_C, BLOCK_P)
            if _arrive(sync_ptr, n // G, N, G, row_blocks):
                _finish_group_backward(partial_ptr, scale_ptr, hidden_ptr, dv_ptr, du_ptr, dz_ptr, w1_ptr, w2_ptr,
                                       n // G, N, C, R, P, row_blocks, G, ACTIVATION, GATE, ACC_FP64, BLOCK_S,
                                       BLOCK_G, BLOCK_MLP_R, BLOCK_MLP_C)
                _release(sync_ptr, groups, n // G)
        if step >= delay:
            j = (step - delay) * programs + pid
            n = j // row_blocks
            rb = j - n * row_blocks
            _wait_ready(sync_ptr, groups, n // G, poll_limit)
            _excite_tile_backward(grad_out_ptr, out_ptr, scale_ptr, dz_ptr, grad_x_ptr, grad_residual_ptr, n, rb,
                                  C, P, tile_rows, HAS_OUT, CHANNELS_LAST, ACC_FP64, BLOCK_C, BLOCK_P)


def launch_pipelined_backward(grad_out: torch.Tensor, x: torch.Tensor, out: Optional[torch.Tensor],
                              grad_x: torch.Tensor, grad_residual: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                              hidden: torch.Tensor, scale: torch.Tensor, dv: torch.Tensor, du: torch.Tensor,
                              dz_over_p: torch.Tensor, channels_last: bool, activation_code: int,
                              gate_code: int) -> None:
    """The backward's reductions, MLP and element-wise pass in one launch: writes ``grad_x``
    (and ``grad_residual`` with ``out``), ``dv``, ``du``, ``dz_over_p``.

    ``grad_out``/``x``/``out``/``grad_x``/``grad_residual (N, C, H, W)`` in one dense layout,
    ``w1 (R, C)``, ``w2 (C, R)`` contiguous, ``hidden``/``du (N, R)`` and ``scale``/``dv``/
    ``dz_over_p (N, C)`` contiguous in the accumulation dtype; ``N > 0``. Knobs: as the forward's
    (pipelined_forward.schedule).
    """
    n, c, h, w = x.shape
    r = w1.shape[0]
    s = schedule(x, r, dv.dtype, 3 if out is not None else 2)
    wrap_triton(pipelined_backward_kernel)[(s.programs,)](
        grad_out, x, x if out is None else out, grad_x, grad_x if out is None else grad_residual, w1, w2,
        hidden, scale, dv, du, dz_over_p, s.partial, s.sync,
        n, c, r, h * w, s.row_blocks, s.tile_rows, s.group, s.groups, s.delay, s.poll_limit,
        HAS_OUT=out is not None, CHANNELS_LAST=channels_last, ACTIVATION=activation_code, GATE=gate_code,
        ACC_FP64=dv.dtype == torch.float64, **s.blocks)
    s.check("backward")
