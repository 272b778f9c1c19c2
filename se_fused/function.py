"""The differentiable fused SE op: :class:`FusedSEFunction` and :func:`squeeze_excitation` (which calls the
compiled backends through their C++-differentiable op instead)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ._once import once_differentiable
from ._ops import like_parameters, parameter_meta
from ._validation import same_layout_as, validate_se_inputs
from .backends import resolve_backend

Tensor = torch.Tensor


class FusedSEFunction(torch.autograd.Function):
    """Fused Squeeze-and-Excitation with its own backward (SPEC §1).

    ``FusedSEFunction.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
    activation, gate, backend)`` with ``x (N, C, H, W)``, ``fc1_weight (R, C[, 1, 1])``,
    ``fc1_bias (R)``, ``fc2_weight (C, R[, 1, 1])``, ``fc2_bias (C)``, ``residual``
    ``None`` or shaped like ``x``. Returns ``x·s`` or ``relu(x·s + residual)``,
    ``(N, C, H, W)`` in ``x``'s memory format.

    Saves for the backward only ``x``, the weights, the per-sample pooled means,
    pre-activations and scales (``N×C``, ``N×R``, ``N×C``, float32) and, in the
    residual form, the output (its sign is the ReLU mask).
    """

    @staticmethod
    def forward(ctx, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                residual: Optional[Tensor] = None, activation: str = "relu", gate: str = "sigmoid",
                backend: str = "auto") -> Tensor:
        return _forward(ctx, *validate_se_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
                                                 activation, gate), activation, gate, backend)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, out, w1, w2, pooled, hidden, scale = ctx.saved_tensors
        with _autocast_off(x.device.type), torch.no_grad():  # nothing recorded: see once_differentiable
            grad_x, grad_res, gw1, gb1, gw2, gb2 = ctx.impl.backward(
                same_layout_as(grad_out, x), x, out, w1, w2, pooled, hidden, scale, *ctx.options)
        param_grads = like_parameters((gw1, gb1, gw2, gb2), ctx.param_meta)
        grads = once_differentiable((grad_x, *param_grads, grad_res), (x, w1, w2))
        return (*grads, None, None, None)


class _ValidatedFusedSEFunction(FusedSEFunction):
    """:class:`FusedSEFunction` for the tensors :func:`validate_se_inputs` returned (what
    :func:`squeeze_excitation` passes): the same forward and backward without validating twice."""

    @staticmethod
    def forward(ctx, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                residual: Optional[Tensor], activation: str, gate: str, backend: str) -> Tensor:
        return _forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate, backend)


def _forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, residual: Optional[Tensor],
             activation: str, gate: str, backend: str) -> Tensor:
    """The forward of :class:`FusedSEFunction` on validated tensors (the weights keep their shapes, so the
    gradients come back shaped like the parameters)."""
    impl = resolve_backend(backend, x.device)
    # Autocast must not re-type the backend's float32 MLP; inputs were cast by the caller.
    with _autocast_off(x.device.type):
        out, pooled, hidden, scale = impl.forward(x, w1, b1, w2, b2, residual, activation, gate)
    ctx.save_for_backward(x, out if residual is not None else None, w1, w2, pooled, hidden, scale)
    ctx.impl = impl
    ctx.options = (activation, gate)
    ctx.param_meta = parameter_meta(w1, b1, w2, b2)
    return out


def _autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (a no-op when it is off, or for devices autocast does
    not know). Entering ``torch.autocast`` costs microseconds per call, so it is skipped when there is nothing to
    turn off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def autocast_inputs(x: Tensor, *tensors: Optional[Tensor]):
    """Cast ``x`` and ``tensors`` to the autocast dtype when autocast is on for ``x``'s device.

    The SE block follows what a convolution does under ``torch.autocast``: its
    input and parameters are computed in the low-precision dtype (the casts are
    recorded by autograd, so float32 parameters still get float32 gradients).
    """
    if not isinstance(x, torch.Tensor):
        return (x,) + tensors  # validation reports the TypeError
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): nothing to cast
        enabled = False
    if not enabled:
        return (x,) + tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x,) + tensors)


def squeeze_excitation(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                       residual: Optional[Tensor] = None, activation: str = "relu", gate: str = "sigmoid",
                       backend: str = "auto") -> Tensor:
    """Fused SE block, differentiable, usable under ``torch.compile``.

    ``x (N, C, H, W)`` → ``x · gate(W2 act(W1 mean_hw(x) + b1) + b2)``, or
    ``relu(that + residual)`` when ``residual (N, C, H, W)`` is given.
    ``fc1_weight (R, C[, 1, 1])``, ``fc1_bias (R)``, ``fc2_weight (C, R[, 1, 1])``,
    ``fc2_bias (C)``; ``activation`` ∈ {relu, silu}; ``gate`` ∈ {sigmoid,
    hardsigmoid}; ``backend`` ∈ {auto, cuda, triton, cpu, eager}.

    The compiled backends (cpu, cuda) run as the op ``se_fused::squeeze_excitation``,
    whose autograd is C++; triton and eager run as :class:`FusedSEFunction`. Both
    compute the same kernels and save the same tensors.
    """
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = autocast_inputs(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    x, w1, b1, w2, b2, residual = validate_se_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
                                                     activation, gate)
    impl = resolve_backend(backend, x.device)
    if impl.differentiable is not None:
        # The compiled backends: one op whose autograd node is C++, so the backward runs without Python
        # (on the CPU ~55-140 us less per forward+backward than FusedSEFunction; see
        # csrc/squeeze_excitation_autograd.cpp).
        return impl.differentiable(x, w1, b1, w2, b2, residual, activation, gate)
    return _ValidatedFusedSEFunction.apply(x, w1, b1, w2, b2, residual, activation, gate, impl.name)
