"""The compiled ``se_fused::`` ops: loading, fake kernels and autograd.

The C++ library (``se_fused._C``, sources in ``csrc/``) defines three ops in one
``TORCH_LIBRARY`` block and implements the first two for CPU (and CUDA when built):

* ``se_fused::squeeze_excitation_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
  residual?, activation, gate) -> (out, pooled, hidden, scale)``
* ``se_fused::squeeze_excitation_backward(grad_out, x, out?, fc1_weight, fc2_weight, pooled,
  hidden, scale, activation, gate) -> (grad_x, grad_residual, grad_fc1_weight, grad_fc1_bias,
  grad_fc2_weight, grad_fc2_bias)``
* ``se_fused::squeeze_excitation(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual?,
  activation, gate) -> out``: the forward made differentiable in C++ (its autograd node calls the
  backward op without Python); what :func:`se_fused.squeeze_excitation` calls for the compiled
  backends.

This module gives them fake (meta) kernels, so ``torch.compile`` traces them,
and the forward op an autograd formula, so it is differentiable on its own too.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._once import once_differentiable
from ._validation import same_layout_as, validate_se_inputs

_LOAD_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)
except ImportError as exc:  # a source checkout that was never built
    _LOAD_ERROR = str(exc)

FORWARD_OP = "se_fused::squeeze_excitation_forward"
BACKWARD_OP = "se_fused::squeeze_excitation_backward"
DIFFERENTIABLE_OP = "se_fused::squeeze_excitation"


def extension_loaded() -> bool:
    """True when ``se_fused._C`` imported and registered its ops."""
    return _LOAD_ERROR is None


def load_error() -> str:
    """Why ``se_fused._C`` did not import (empty when it did)."""
    return _LOAD_ERROR or ""


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP, "CUDA")


def build_info() -> dict:
    """How ``se_fused._C`` was compiled: ``{"cpu_parallel": bool, "cpu_vector_isa": str, "cuda": bool}``
    (``cpu_parallel``: the CPU kernel spreads over torch's threads), or ``{}`` when it is not built."""
    return _C.build_info() if extension_loaded() else {}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved per-sample intermediates: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate):
    """Call the compiled forward op (CPU or CUDA by ``x``'s device)."""
    return torch.ops.se_fused.squeeze_excitation_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                         residual, activation, gate)


def differentiable_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate):
    """Call the differentiable op (CPU or CUDA by ``x``'s device): ``out`` alone, its backward in C++."""
    return torch.ops.se_fused.squeeze_excitation(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
                                                 activation, gate)


def backward(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale, activation, gate):
    """Call the compiled backward op; ``grad_residual`` is ``None`` unless ``out`` is given."""
    grads = torch.ops.se_fused.squeeze_excitation_backward(grad_out, x, out, fc1_weight, fc2_weight,
                                                           pooled, hidden, scale, activation, gate)
    grad_x, grad_res = grads[0], grads[1]
    return (grad_x, grad_res if out is not None else None) + tuple(grads[2:])


def parameter_meta(*params: torch.Tensor):
    """``(dtype, shape)`` of each parameter, saved by the forward so the backward can return gradients like them."""
    return [(t.dtype, t.shape) for t in params]


def like_parameters(grads, meta):
    """Each gradient in its parameter's dtype and shape (``meta`` from :func:`parameter_meta`); no op where it
    already is (the compiled backward op returns all four typed like the weights: only the biases may need a
    cast). The C++ autograd of ``se_fused::squeeze_excitation`` does the same for the biases."""
    out = []
    for grad, (dtype, shape) in zip(grads, meta):
        if grad.dtype != dtype:
            grad = grad.to(dtype)
        out.append(grad if grad.shape == shape else grad.reshape(shape))
    return out


def setup_context(ctx, inputs, output):
    """``register_autograd`` setup shared by the forward ops (C++ and Triton): save what the backward needs."""
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate = inputs
    out, pooled, hidden, scale = output
    ctx.save_for_backward(x, out if residual is not None else None, fc1_weight, fc2_weight,
                          pooled, hidden, scale)
    ctx.options = (activation, gate)
    ctx.param_meta = parameter_meta(fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.mark_non_differentiable(pooled, hidden, scale)


def backward_formula(backward_fn):
    """The ``register_autograd`` backward of a forward op whose backward op is wrapped by ``backward_fn``
    (a backend's ``backward``: ``grad_residual`` is ``None`` in the plain form)."""
    def formula(ctx, grad_out, _grad_pooled, _grad_hidden, _grad_scale):
        x, out, fc1_weight, fc2_weight, pooled, hidden, scale = ctx.saved_tensors
        with torch.no_grad():  # nothing recorded: see once_differentiable
            gx, gres, gw1, gb1, gw2, gb2 = backward_fn(same_layout_as(grad_out, x), x, out, fc1_weight,
                                                       fc2_weight, pooled, hidden, scale, *ctx.options)
            grads = (gx, *like_parameters((gw1, gb1, gw2, gb2), ctx.param_meta), gres)
        return (*once_differentiable(grads, (x, fc1_weight, fc2_weight)), None, None)
    return formula


if extension_loaded():
    @torch.library.register_fake(FORWARD_OP)
    def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate):
        # The same checks as the real kernels, so tracing (or a stray meta tensor) fails like a real call.
        validate_se_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate)
        n, c = x.shape[0], x.shape[1]
        r = fc1_weight.shape[0]
        acc = acc_dtype(x.dtype)
        return (torch.empty_like(x), x.new_empty((n, c), dtype=acc), x.new_empty((n, r), dtype=acc),
                x.new_empty((n, c), dtype=acc))

    @torch.library.register_fake(DIFFERENTIABLE_OP)
    def _differentiable_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate):
        validate_se_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate)
        return torch.empty_like(x)

    @torch.library.register_fake(BACKWARD_OP)
    def _backward_fake(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale, activation, gate):
        for name, t in (("grad_out", grad_out), ("out", out), ("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight),
                        ("pooled", pooled), ("hidden", hidden), ("scale", scale)):
            if t is not None and t.device != x.device:
                raise ValueError(f"se_fused: {name} is on {t.device} but x is on {x.device}")
        if grad_out.shape != x.shape:
            raise ValueError(f"se_fused: grad_out must have x's shape {tuple(x.shape)}; got {tuple(grad_out.shape)}")
        grad_res = torch.empty_like(x) if out is not None else x.new_empty((0,))
        r = fc1_weight.shape[0]
        return (torch.empty_like(x), grad_res, torch.empty_like(fc1_weight),
                fc1_weight.new_empty((r,)), torch.empty_like(fc2_weight),
                fc2_weight.new_empty((fc2_weight.shape[0],)))

    torch.library.register_autograd(FORWARD_OP, backward_formula(backward), setup_context=setup_context)

