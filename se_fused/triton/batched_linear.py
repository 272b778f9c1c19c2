"""The SE block's small MLP, forward and backward, batched across the samples of a chunk.

One kernel computes, for a block of samples ``n`` and outputs ``j``,

    a[n, k]   = backward_factor( (Σ_{s < a_splits} a_part[s, n, k]) / a_divisor (+ a_bias[k]), aux[n, k] )
    out[n, j] = epilogue( Σ_k act?(a[n, k]) · W[j, k]  (+ bias[j]) )

and optionally stores ``a`` (before the activation) for later use. The four MLP
steps of SPEC §1 are instances of it (see ops.py):

    forward  fc1: a = pooled = Σ partial sums / P,          W = W1,   out = partial hidden
    forward  fc2: a = hidden = Σ partial hidden + b1, act,   W = W2,   out = gate(· + b2) = scale
    backward fc2: a = dv = ds · gate'(scale),                W = W2ᵀ,  out = partial (dv W2)
    backward fc1: a = du = (Σ partial dv W2) · act'(hidden),  W = W1ᵀ,  out = dz

``W`` is read through strides, so ``W1``/``W2`` serve transposed without a copy.
The reduction over ``k`` may be split over programs (``k_per_split``); then the
outputs are partial sums ``(k_splits, N, J)`` that the next step adds in a
fixed order (deterministic, no atomics), and bias/epilogue are left to it.
Weights are read once per block of ``BLOCK_N`` samples, not once per sample.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (activation, activation_backward, add_partials_in_order, add_product, cdiv, gate,
                      gate_backward_from_output, linear_tile)

FACTOR_NONE = 0
FACTOR_GATE_GRAD = 1  # a · gate'(v) from the saved scale s = gate(v) (a select for hardsigmoid)
FACTOR_ACTIVATION_GRAD = 2  # a · act'(u) from the saved pre-activation u (a select for relu)


# Counts and sizes are not specialised (only the weight strides decide vectorised loads).
@triton.jit(do_not_specialize=["a_splits", "a_divisor", "n0", "count", "N", "J", "K", "k_per_split"])
def batched_linear_kernel(a_part_ptr, a_splits, a_divisor, a_bias_ptr, aux_ptr, a_store_ptr,
                          w_ptr, stride_wj, stride_wk, bias_ptr, out_ptr,
                          n0, count, N, J, K, k_per_split,
                          A_BIAS: tl.constexpr, A_FACTOR: tl.constexpr, A_STORE: tl.constexpr,
                          A_ACTIVATE: tl.constexpr, OUT_BIAS: tl.constexpr, OUT_GATE: tl.constexpr,
                          ACTIVATION: tl.constexpr, GATE: tl.constexpr, ACC_FP64: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program ``(i, j, s)``: samples ``n0 + i·BLOCK_N ..``, outputs ``j·BLOCK_J ..``, k split ``s``.

    ``a_part (a_splits, N, K)``, ``aux``/``a_store (N, K)``, ``a_bias (K)``,
    ``W[j, k]`` at ``w_ptr + j·stride_wj + k·stride_wk``, ``bias (J)``,
    ``out (k_splits, N, J)``; all small tensors in the accumulation dtype
    except ``W`` and the biases (any float dtype, converted on load).
    """
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < count
    n = (rows + n0).to(tl.int64)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < J
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=acc_dtype)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        # The weights first: their loads do not wait for the partial sums' adds (issued after
        # them, they waited a round trip of their own per piece). Masked k have a finite a and
        # W = 0, so they add nothing.
        w = tl.load(w_ptr + j[:, None] * stride_wj + k[None, :] * stride_wk,
                    mask=j_mask[:, None] & k_mask[None, :], other=0.0).to(acc_dtype)
        nk_mask = row_mask[:, None] & k_mask[None, :]
        nk = n[:, None] * K + k[None, :]
        # Prologue: the input vector, summed from its partials in a fixed order.
        a = add_partials_in_order(tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_dtype), a_part_ptr, nk, N * K, a_splits,
                                  nk_mask, "", 4)
        a = a / a_divisor
        if A_BIAS:
            a += tl.load(a_bias_ptr + k, mask=k_mask, other=0.0).to(acc_dtype)[None, :]
        if A_FACTOR == 1:
            s_saved = tl.load(aux_ptr + nk, mask=nk_mask, other=0.0).to(acc_dtype)
            a = gate_backward_from_output(a, s_saved, GATE)
        if A_FACTOR == 2:
            u_saved = tl.load(aux_ptr + nk, mask=nk_mask, other=0.0).to(acc_dtype)
            a = activation_backward(a, u_saved, ACTIVATION)
        if A_STORE:
            # Every j-block computes the same a; the first one stores it.
            tl.store(a_store_ptr + nk, a, mask=nk_mask & (pid_j == 0))
        if A_ACTIVATE:
            a = activation(a, ACTIVATION)
        acc = add_product(acc, a, w, ACC_FP64)

    if OUT_BIAS:
        acc += tl.load(bias_ptr + j, mask=j_mask, other=0.0).to(acc_dtype)[None, :]
    if OUT_GATE:
        acc = gate(acc, GATE)
    out_offsets = (pid_k.to(tl.int64) * N + n[:, None]) * J + j[None, :]
    tl.store(out_ptr + out_offsets, acc, mask=row_mask[:, None] & j_mask[None, :])


def launch_batched_linear(a_part: torch.Tensor, a_divisor: int, weight: torch.Tensor, weight_transposed: bool,
                          out: torch.Tensor, n0: int, count: int, activation_code: int, gate_code: int, *,
                          a_bias: Optional[torch.Tensor] = None, a_factor: int = FACTOR_NONE,
                          aux: Optional[torch.Tensor] = None, a_store: Optional[torch.Tensor] = None,
                          a_activate: bool = False, bias: Optional[torch.Tensor] = None,
                          out_gate: bool = False) -> None:
    """One MLP step for samples ``n0 .. n0+count-1`` (see the module docstring).

    ``a_part (a_splits, N, K)``; ``weight (J, K)`` contiguous, or ``(K, J)`` with
    ``weight_transposed``; ``out`` is either ``(N, J)`` (the whole sum, with the
    optional ``bias`` and gate) or ``(k_splits, N, J)`` with ``k_splits =``
    :func:`linear_tile` ``(K, J, float64 out).k_splits`` (partial sums over pieces of ``K``).
    ``aux``/``a_store (N, K)``; ``a_bias (K)``; ``bias (J)``.
    """
    a_splits, n, k = a_part.shape
    j = weight.shape[0] if not weight_transposed else weight.shape[1]
    fp64 = out.dtype == torch.float64
    tile = linear_tile(k, j, fp64, split=out.dim() == 3)
    k_splits = out.shape[0] if out.dim() == 3 else 1
    if k_splits != tile.k_splits:
        raise ValueError(f"out has {k_splits} k-splits; expected {tile.k_splits} for K={k}")
    if out.dim() == 3 and (bias is not None or out_gate):
        raise ValueError("a split reduction cannot apply the output bias or gate")
    stride_wj, stride_wk = (1, j) if weight_transposed else (k, 1)
    grid = (cdiv(count, tile.block_n), cdiv(j, tile.block_j), k_splits)
    # Unused pointer arguments get a read-only input (never dereferenced: the constexpr flags remove them).
    wrap_triton(batched_linear_kernel)[grid](
        a_part, a_splits, a_divisor, a_part if a_bias is None else a_bias, a_part if aux is None else aux,
        a_part if a_store is None else a_store, weight, stride_wj, stride_wk, weight if bias is None else bias, out,
        n0, count, n, j, k, tile.k_per_split,
        A_BIAS=a_bias is not None, A_FACTOR=a_factor, A_STORE=a_store is not None, A_ACTIVATE=a_activate,
        OUT_BIAS=bias is not None, OUT_GATE=out_gate,
        # Options a step does not use are passed as 0, so that they do not multiply the compiled variants.
        ACTIVATION=activation_code if (a_activate or a_factor == FACTOR_ACTIVATION_GRAD) else 0,
        GATE=gate_code if (out_gate or a_factor == FACTOR_GATE_GRAD) else 0,
        ACC_FP64=fp64, BLOCK_N=tile.block_n, BLOCK_J=tile.block_j, BLOCK_K=tile.block_k, num_warps=4)
