"""The math of the Squeeze-and-Excitation block in plain PyTorch ops.

This module is the single source of truth for what every backend computes
(SPEC §1). Tests take autograd through :func:`squeeze_excitation_reference` in
float64 as the ground truth; the ``"eager"`` backend reuses the same pieces and
adds the explicit backward formulas of SPEC §1 (which the tests check against
autograd, so they are not their own reference).

Shapes: ``x (N, C, H, W)``, ``fc1_weight (R, C[, 1, 1])``, ``fc1_bias (R)``,
``fc2_weight (C, R[, 1, 1])``, ``fc2_bias (C)``; the per-sample intermediates
are ``pooled (N, C)``, ``hidden (N, R)`` (pre-activation) and ``scale (N, C)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS = ("relu", "silu")
GATES = ("sigmoid", "hardsigmoid")


def activation_fn(u: Tensor, activation: str) -> Tensor:
    """``act(u)`` for ``activation`` in :data:`ACTIVATIONS`."""
    if activation == "relu":
        return F.relu(u)
    if activation == "silu":
        return F.silu(u)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def gate_fn(v: Tensor, gate: str) -> Tensor:
    """``gate(v)`` for ``gate`` in :data:`GATES`."""
    if gate == "sigmoid":
        return torch.sigmoid(v)
    if gate == "hardsigmoid":
        # Not F.hardsigmoid: its backward multiplies by 1/6 rounded to float32, which would make the
        # float64 ground truth itself off by 3e-8.
        return (v + 3).clamp(0, 6) / 6
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def activation_backward(grad: Tensor, u: Tensor, activation: str) -> Tensor:
    """``grad · act'(u)``: relu selects ``grad`` where ``u > 0`` (so an Inf/NaN gradient
    is dropped where the unit is off, as PyTorch's relu backward does); silu multiplies
    by ``σ(u)(1 + u(1 − σ(u)))``."""
    if activation == "relu":
        return torch.where(u > 0, grad, torch.zeros_like(grad))
    sig = torch.sigmoid(u)
    return grad * (sig * (1 + u * (1 - sig)))


def gate_backward_from_output(grad: Tensor, s: Tensor, gate: str) -> Tensor:
    """``grad · gate'(v)`` written in terms of the gate's output ``s = gate(v)``.

    sigmoid: ``grad · s(1 − s)``; hardsigmoid: ``grad / 6`` selected where
    ``−3 < v < 3``, which is exactly where ``0 < s < 1`` (so the backward needs
    only the saved scale), and 0 elsewhere even for an infinite ``grad``.
    """
    if gate == "sigmoid":
        return grad * (s * (1 - s))
    return torch.where((s > 0) & (s < 1), grad / 6.0, torch.zeros_like(grad))


def excitation(pooled: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
               fc2_bias: Tensor, activation: str, gate: str) -> Tuple[Tensor, Tensor]:
    """FC → act → FC → gate on the pooled vectors.

    ``pooled (N, C)`` → ``(hidden (N, R) pre-activation, scale (N, C))``.
    """
    r, c = fc1_weight.shape[0], fc1_weight.shape[1]
    hidden = F.linear(pooled, fc1_weight.reshape(r, c), fc1_bias)
    scale = gate_fn(F.linear(activation_fn(hidden, activation), fc2_weight.reshape(c, r), fc2_bias), gate)
    return hidden, scale


def squeeze_excitation_reference(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
                                 fc2_bias: Tensor, residual: Optional[Tensor] = None,
                                 activation: str = "relu", gate: str = "sigmoid") -> Tensor:
    """SE block as plain differentiable PyTorch ops (the ground truth).

    ``x (N, C, H, W)`` → ``y (N, C, H, W)``; with ``residual`` (same shape)
    returns ``relu(x·s + residual)``.
    """
    pooled = x.mean(dim=(2, 3))
    _, scale = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    y = x * scale[:, :, None, None].to(x.dtype)
    if residual is not None:
        y = F.relu(y + residual)
    return y


def eager_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                  residual: Optional[Tensor], activation: str, gate: str
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of the ``"eager"`` backend, with the same outputs as the fused ops.

    Returns ``(out (N, C, H, W), pooled (N, C), hidden (N, R), scale (N, C))``;
    the three small tensors are float32 (float64 for float64 input), as the
    kernels save them for the backward.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = x.to(acc).mean(dim=(2, 3))
    hidden, scale = excitation(pooled, fc1_weight.to(acc), fc1_bias.to(acc), fc2_weight.to(acc),
                               fc2_bias.to(acc), activation, gate)
    out = (x.to(acc) * scale[:, :, None, None])
    if residual is not None:
        out = F.relu(out + residual.to(acc))
    return out.to(x.dtype), pooled, hidden, scale


def eager_backward(grad_out: Tensor, x: Tensor, out: Optional[Tensor], fc1_weight: Tensor, fc2_weight: Tensor,
                   pooled: Tensor, hidden: Tensor, scale: Tensor, activation: str, gate: str
                   ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Backward of SPEC §1 written out in plain ops (the ``"eager"`` backend).

    ``out`` is the forward output in the residual form (its sign is the ReLU
    mask) and ``None`` otherwise. Returns ``(grad_x, grad_residual or None,
    grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias)``, each
    weight gradient shaped and typed like its parameter.
    """
    acc = pooled.dtype
    g = grad_out.to(acc)
    if out is not None:
        g = torch.where(out <= 0, torch.zeros_like(g), g)  # keeps x's memory format, unlike masked_fill
    p = x.shape[2] * x.shape[3]
    r, c = fc1_weight.shape[0], fc1_weight.shape[1]
    w1 = fc1_weight.reshape(r, c).to(acc)
    w2 = fc2_weight.reshape(c, r).to(acc)
    ds = (g * x.to(acc)).sum(dim=(2, 3))
    dv = gate_backward_from_output(ds, scale, gate)
    h = activation_fn(hidden, activation)
    grad_w2 = dv.t() @ h
    grad_b2 = dv.sum(0)
    du = activation_backward(dv @ w2, hidden, activation)
    grad_w1 = du.t() @ pooled
    grad_b1 = du.sum(0)
    dz = du @ w1
    grad_x = (g * scale[:, :, None, None] + (dz / p)[:, :, None, None]).to(x.dtype)
    grad_res = g.to(x.dtype) if out is not None else None
    return (grad_x, grad_res, grad_w1.reshape(fc1_weight.shape).to(fc1_weight.dtype), grad_b1.to(fc1_weight.dtype),
            grad_w2.reshape(fc2_weight.shape).to(fc2_weight.dtype), grad_b2.to(fc2_weight.dtype))
