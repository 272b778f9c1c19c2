"""Pass 2 of the backward: ``dx = g · s + dz / P`` and, in the residual form, ``dresidual = g``
with ``g = grad_out · [out > 0]`` (else ``g = grad_out``).

The same tiling as excite_forward.py (a sample as ``[OUTER, INNER]``, ``INNER``
contiguous); autotuned block sizes, no reduction.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import elementwise_autotune_configs, elementwise_launcher, sample_tile


@triton.jit(do_not_specialize=["n0"])
def excite_backward_kernel(grad_out_ptr, out_ptr, scale_ptr, dz_ptr, grad_x_ptr, grad_residual_ptr, n0, C, P,
                           HAS_OUT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr,
                           BLOCK_INNER: tl.constexpr, TILE: tl.constexpr):
    """One program: a ``[TILE // BLOCK_INNER, BLOCK_INNER]`` tile of one sample.

    ``grad_out``/``out``/``grad_x``/``grad_residual (N, C, H, W)`` in one layout;
    ``scale``/``dz (N, C)`` in the accumulation dtype.
    """
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    n, offsets, mask, channels, channel_mask = sample_tile(n0, C, P, CHANNELS_LAST, BLOCK_INNER, TILE)
    s = tl.load(scale_ptr + n * C + channels, mask=channel_mask, other=0.0)
    dz_over_p = tl.load(dz_ptr + n * C + channels, mask=channel_mask, other=0.0) / P
    # Last use of grad_out and out (pass 1 kept them in L2).
    g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_dtype)
    if HAS_OUT:
        o = tl.load(out_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first")
        g = tl.where(o <= 0.0, 0.0, g)  # the residual form's relu mask (NaN passes, as masked_fill(out <= 0))
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)
    grad_x = g * s + dz_over_p
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


# The same kernel choosing TILE/num_warps by timing (SE_FUSED_TRITON_AUTOTUNE=1); the key
# holds everything the best tile can depend on (tensor dtypes are added by Triton).
excite_backward_kernel_autotuned = triton.autotune(configs=elementwise_autotune_configs(),
                                                  key=["C", "P", "HAS_OUT", "CHANNELS_LAST", "BLOCK_INNER"])(excite_backward_kernel)


def launch_excite_backward(grad_out: torch.Tensor, out: Optional[torch.Tensor], scale: torch.Tensor,
                           dz: torch.Tensor, grad_x: torch.Tensor, grad_residual: torch.Tensor,
                           n0: int, count: int, channels_last: bool) -> None:
    """Write ``grad_x[n0:n0+count]`` (and ``grad_residual[n0:n0+count]`` when ``out`` is given).

    ``grad_out``, ``out``, ``grad_x``, ``grad_residual``: ``(N, C, H, W)`` in one layout
    (``grad_residual`` is an unused placeholder without ``out``); ``scale``, ``dz (N, C)``.
    """
    n, c, h, w = grad_out.shape
    p = h * w
    launch, options = elementwise_launcher(excite_backward_kernel, excite_backward_kernel_autotuned, c, p,
                                           channels_last, count)
    launch(
        grad_out, grad_out if out is None else out, scale, dz, grad_x, grad_residual, n0, c, p,
        HAS_OUT=out is not None, CHANNELS_LAST=channels_last,
        ACC_FP64=scale.dtype == torch.float64, **options)
