"""Differentiable once: the fused SE backwards have no derivative of their own.

Every fused backward (the C++ and Triton kernels, and the eager backend's
explicit formulas) computes from pooled means, pre-activations and scales that
the forward saved without a graph. Differentiating such a backward again
(``create_graph=True``: a gradient penalty, Hessian-vector products) would
silently leave out their dependence on x and the weights. So under
``create_graph`` the gradients come out through a node that raises when they
are differentiated; the C++ op does the same in
``csrc/squeeze_excitation_autograd.cpp`` (``NotTwiceDifferentiable``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

DOUBLE_BACKWARD_MESSAGE = ("se_fused: the fused SE block is differentiable once: its backward has no derivative, "
                           "so a double backward (create_graph=True, e.g. a gradient penalty) cannot go through it; "
                           "se_fused.SEBlock (plain PyTorch ops) can")


class _NotTwiceDifferentiable(torch.autograd.Function):
    """``apply(n, *grads, *depends_on)``: the ``n`` gradients unchanged, behind a node that raises when they are
    differentiated. ``depends_on`` (x and the weights) are inputs too, so a second backward towards them reaches
    the node."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.view_as(t) if t is not None else None for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def once_differentiable(grads: Sequence[Optional[torch.Tensor]], depends_on: Sequence[Optional[torch.Tensor]]
                        ) -> Tuple[Optional[torch.Tensor], ...]:
    """``grads`` as they are, or, when the backward is being recorded (``create_graph=True``), behind a node
    that raises :data:`DOUBLE_BACKWARD_MESSAGE` if they are differentiated."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    return _NotTwiceDifferentiable.apply(len(grads), *grads, *depends_on)
