"""Weight and bias gradients of the MLP: reductions over the whole batch.

    out[i, j]  = Σ_n A[n, i] · B'[n, j]     B' = act(B) or B
    bias[i]    = Σ_n A[n, i]

``dW2 = dvᵀ act(u)``, ``db2 = Σ_n dv`` (A = dv, B = hidden u, activated) and
``dW1 = duᵀ z``, ``db1 = Σ_n du`` (A = du, B = pooled z). Run once per backward,
after every chunk has stored its ``dv``/``du``; each program sums its outputs
over ``n`` in a fixed order, so the result is deterministic (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _common
from ._common import activation, cdiv


@triton.jit(do_not_specialize=["N"])
def weight_grad_kernel(a_ptr, b_ptr, out_ptr, bias_out_ptr, N, I, J,
                       B_ACTIVATE: tl.constexpr, ACTIVATION: tl.constexpr, ACC_FP64: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program ``(i, j)``: ``out[i-block, j-block]``; the ``j = 0`` programs also write ``bias[i-block]``.

    ``A (N, I)``, ``B (N, J)`` in the accumulation dtype; ``out (I, J)`` and
    ``bias (I)`` contiguous in any float dtype (rounded once at the end).
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = i < I
    j_mask = j < J
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=acc_dtype)
    bias_acc = tl.zeros([BLOCK_I], dtype=acc_dtype)
    # The loads of the next stages are issued while this block of samples is summed: with a plain
    # range (loads that feed no tl.dot are not pipelined) every block waited for its own loads, 32
    # round trips at batch 256, and the kernel took 45-49 us at every stage (H100 dd6c3b3).
    for n0 in tl.range(0, N, BLOCK_N, num_stages=3):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = n < N
        a = tl.load(a_ptr + n[:, None] * I + i[None, :], mask=n_mask[:, None] & i_mask[None, :],
                    other=0.0).to(acc_dtype)
        b = tl.load(b_ptr + n[:, None] * J + j[None, :], mask=n_mask[:, None] & j_mask[None, :],
                    other=0.0).to(acc_dtype)
        if B_ACTIVATE:
            b = activation(b, ACTIVATION)  # act(0) = 0 on the masked entries
        acc += tl.sum(a[:, :, None] * b[:, None, :], axis=0)
        bias_acc += tl.sum(a, axis=0)
    out_offsets = i[:, None].to(tl.int64) * J + j[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])
    tl.store(bias_out_ptr + i, bias_acc.to(bias_out_ptr.dtype.element_ty), mask=i_mask & (pid_j == 0))


def launch_weight_grad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias_out: torch.Tensor,
                       activate_b: bool, activation_code: int) -> None:
    """``out (I, J) = aᵀ act?(b)`` and ``bias_out (I) = Σ_n a`` for ``a (N, I)``, ``b (N, J)``.

    ``out`` may be shaped ``(I, J, 1, 1)`` (a 1×1 convolution's weight); it must be contiguous.
    """
    n, i = a.shape
    j = b.shape[1]
    blocks = _common.BLOCKS
    block_i, block_j = blocks.weight_grad_block_i, blocks.weight_grad_block_j
    grid = (cdiv(i, block_i), cdiv(j, block_j))
    wrap_triton(weight_grad_kernel)[grid](
        a, b, out, bias_out, n, i, j, B_ACTIVATE=activate_b, ACTIVATION=activation_code if activate_b else 0,
        ACC_FP64=a.dtype == torch.float64, BLOCK_N=blocks.weight_grad_block_n, BLOCK_I=block_i, BLOCK_J=block_j,
        num_warps=4)
