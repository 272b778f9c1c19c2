"""Pass 2 of the forward: ``out = x · s`` (excite), or ``relu(x · s + residual)``.

Element-wise over a sample viewed as a matrix ``[OUTER, INNER]`` with ``INNER``
the contiguous axis: NCHW ``[C, H·W]``, channels_last ``[H·W, C]``. The scale
is per channel, i.e. per row (NCHW) or per column (NHWC). Block sizes are
autotuned (the result does not depend on them: there is no reduction).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import elementwise_autotune_configs, elementwise_launcher, sample_tile


@triton.jit(do_not_specialize=["n0"])
def excite_forward_kernel(x_ptr, scale_ptr, residual_ptr, out_ptr, n0, C, P,
                          HAS_RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr,
                          BLOCK_INNER: tl.constexpr, TILE: tl.constexpr):
    """One program: a ``[TILE // BLOCK_INNER, BLOCK_INNER]`` tile of one sample.

    ``x``/``residual``/``out (N, C, H, W)`` in one layout; ``scale (N, C)`` in
    the accumulation dtype. The product is formed in that dtype and rounded once.
    """
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    n, offsets, mask, channels, channel_mask = sample_tile(n0, C, P, CHANNELS_LAST, BLOCK_INNER, TILE)
    s = tl.load(scale_ptr + n * C + channels, mask=channel_mask, other=0.0)
    # Last use of x (pass 1 kept it in L2): let it go first.
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_dtype)
    y = x * s
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_dtype)
        y = tl.where(y < 0.0, 0.0, y)  # relu that keeps NaN, as torch.relu
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


# The same kernel choosing TILE/num_warps by timing (SE_FUSED_TRITON_AUTOTUNE=1); the key
# holds everything the best tile can depend on (tensor dtypes are added by Triton).
excite_forward_kernel_autotuned = triton.autotune(configs=elementwise_autotune_configs(),
                                                 key=["C", "P", "HAS_RESIDUAL", "CHANNELS_LAST", "BLOCK_INNER"])(excite_forward_kernel)


def launch_excite_forward(x: torch.Tensor, scale: torch.Tensor, residual: Optional[torch.Tensor],
                          out: torch.Tensor, n0: int, count: int, channels_last: bool) -> None:
    """Write ``out[n0:n0+count]``: ``x·scale`` or ``relu(x·scale + residual)``.

    ``x``, ``residual``, ``out``: ``(N, C, H, W)``, one layout; ``scale (N, C)``.
    """
    n, c, h, w = x.shape
    p = h * w
    launch, options = elementwise_launcher(excite_forward_kernel, excite_forward_kernel_autotuned, c, p,
                                           channels_last, count)
    launch(
        x, scale, x if residual is None else residual, out, n0, c, p,
        HAS_RESIDUAL=residual is not None, CHANNELS_LAST=channels_last,
        ACC_FP64=scale.dtype == torch.float64, **options)
