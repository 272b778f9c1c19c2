"""Pass 1 of both directions: per-channel sums over ``H·W`` (the squeeze, and the
backward's ``ds``), as partial sums over pixel ranges.

forward  (MODE 0): ``partial[s, n, c] = Σ_{p in split s} x[n, c, p]``
backward (MODE 1): ``partial[s, n, c] = Σ_{p in split s} g[n, c, p] · x[n, c, p]``
backward, residual form (MODE 2): the same with ``g = grad_out · [out > 0]``.

The consumer (batched_linear.py) adds the ``splits`` partials in a fixed order,
so the result is deterministic without atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import ReduceConfig, cdiv

MODE_SUM_X = 0
MODE_SUM_G_X = 1
MODE_SUM_MASKED_G_X = 2


# Sample/split counts are not specialised (divisible by 16, equal to 1): that only multiplies the
# compiled variants; C and P are, since they are the strides that decide vectorised loads.
@triton.jit(do_not_specialize=["n0", "N", "p_per_split", "n_splits", "c_blocks"])
def channel_reduce_kernel(x_ptr, g_ptr, o_ptr, partial_ptr, n0, N, C, P, p_per_split, n_splits, c_blocks,
                          MODE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: ``BLOCK_C`` channels × one pixel split of one sample.

    ``x``/``g``/``o`` are ``(N, C, H, W)`` NCHW- or NHWC-contiguous (``CHANNELS_LAST``);
    ``partial`` is ``(n_splits, N, C)`` in the accumulation dtype.
    """
    pid = tl.program_id(0)
    # Program order follows memory order, so neighbouring programs read neighbouring bytes.
    if CHANNELS_LAST:  # (n, p, c): channel blocks fastest, then pixel splits
        c_block = pid % c_blocks
        split = (pid // c_blocks) % n_splits
        n_local = pid // (c_blocks * n_splits)
    else:  # (n, c, p): pixel splits fastest, then channel blocks
        split = pid % n_splits
        c_block = (pid // n_splits) % c_blocks
        n_local = pid // (n_splits * c_blocks)
    n = (n_local + n0).to(tl.int64)
    sample = n * C * P  # 64-bit: the batch may exceed 2^31 elements

    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p_start = split * p_per_split
    p_end = tl.minimum(p_start + p_per_split, P)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_dtype)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < p_end)[None, :]
        if CHANNELS_LAST:
            offsets = sample + p[None, :].to(tl.int64) * C + c[:, None]
        else:
            offsets = sample + c[:, None].to(tl.int64) * P + p[None, :]
        if MODE == 0:
            # The forward's pass 2 reads x again: ask L2 to keep it.
            v = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last").to(acc_dtype)
        else:
            # The backward's pass 2 reads g (and out) again, not x.
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last").to(acc_dtype)
            if MODE == 2:
                o = tl.load(o_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last")
                g = tl.where(o <= 0.0, 0.0, g)
            xv = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_dtype)
            v = g * xv
        acc += v
    total = tl.sum(acc, axis=1)
    tl.store(partial_ptr + (split.to(tl.int64) * N + n) * C + c, total, mask=c_mask)


def launch_channel_reduce(x: torch.Tensor, g: Optional[torch.Tensor], o: Optional[torch.Tensor],
                          partial: torch.Tensor, n0: int, count: int, cfg: ReduceConfig,
                          channels_last: bool) -> None:
    """Fill ``partial[:, n0:n0+count, :]`` (``(cfg.splits, N, C)``) for samples ``n0 .. n0+count-1``.

    ``g is None``: sums of ``x``; else sums of ``g·x``, with ``g`` masked by
    ``o > 0`` when ``o`` (the residual form's output) is given. ``x``, ``g``,
    ``o``: ``(N, C, H, W)`` in one layout (``channels_last`` says which).
    """
    n, c, h, w = x.shape
    mode = MODE_SUM_X if g is None else (MODE_SUM_G_X if o is None else MODE_SUM_MASKED_G_X)
    c_blocks = cdiv(c, cfg.block_c)
    grid = (count * c_blocks * cfg.splits,)
    # Unused pointers get x (never dereferenced: MODE removes those loads at compile time).
    wrap_triton(channel_reduce_kernel)[grid](
        x, x if g is None else g, x if o is None else o, partial, n0, n, c, h * w, cfg.p_per_split,
        cfg.splits, c_blocks, MODE=mode, CHANNELS_LAST=channels_last,
        ACC_FP64=partial.dtype == torch.float64, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, num_warps=4)
