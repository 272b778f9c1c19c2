"""Input checks shared by every backend (SPEC §2: clear errors, never a crash).

:func:`validate_se_inputs` is the one place that decides whether a call is
well formed and brings the tensors into a layout every kernel can read in
place: ``x`` contiguous as NCHW or channels_last (whichever its strides are
closer to), the residual in the same layout as ``x``, the parameters
contiguous.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._reference import ACTIVATIONS, GATES

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_channels_last(x: Tensor) -> bool:
    """True when ``x (N, C, H, W)`` is stored channels_last (NHWC) rather than NCHW.

    A tensor that is both (``C == 1`` or ``H·W == 1``) counts as NCHW; the two
    orders are the same bytes then.
    """
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def canonical_layout(x: Tensor) -> Tensor:
    """``x`` unchanged when it is NCHW- or NHWC-contiguous, else a copy in the closer of the two."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    # Channel stride smallest -> the data is nearer NHWC order.
    if x.dim() == 4 and x.stride(1) < min(x.stride(2), x.stride(3)):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def same_layout_as(t: Tensor, like: Tensor) -> Tensor:
    """``t`` made contiguous in ``like``'s layout (a no-op when it already is)."""
    if is_channels_last(like):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"se_fused: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"se_fused: {name} must be float16, bfloat16, float32 or float64; got {_describe(t)}")


def validate_options(activation: str, gate: str) -> None:
    """Raise ``ValueError`` unless ``activation`` and ``gate`` are supported names."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"se_fused: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate not in GATES:
        raise ValueError(f"se_fused: gate must be one of {GATES}, got {gate!r}")


def validate_se_inputs(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                       residual: Optional[Tensor], activation: str, gate: str
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Check one SE call and return its tensors in a layout the kernels read in place.

    ``x (N, C, H, W)``; ``fc1_weight (R, C)`` or ``(R, C, 1, 1)``; ``fc1_bias (R)``;
    ``fc2_weight (C, R)`` or ``(C, R, 1, 1)``; ``fc2_bias (C)``; ``residual`` None
    or shaped like ``x`` with ``x``'s dtype. All on one device.

    Raises ``TypeError`` for non-tensors and non-float dtypes, ``ValueError`` for
    shapes, devices and option names; each message names the offending tensor's
    shape, dtype and device.
    """
    validate_options(activation, gate)
    named = [("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
             ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)]
    if residual is not None:
        named.append(("residual", residual))
    for name, t in named:
        _check_float(name, t)
    for name, t in named[1:]:
        if t.device != x.device:
            raise ValueError(f"se_fused: {name} is on {t.device} but x is on {x.device}; "
                             f"all tensors must be on one device")
    if x.dim() != 4:
        raise ValueError(f"se_fused: x must be 4-D (N, C, H, W); got {_describe(x)}")
    c = x.shape[1]
    if c == 0:
        raise ValueError(f"se_fused: x must have at least one channel; got {_describe(x)}")
    if fc1_weight.dim() not in (2, 4) or (fc1_weight.dim() == 4 and tuple(fc1_weight.shape[2:]) != (1, 1)):
        raise ValueError(f"se_fused: fc1_weight must be (R, C) or (R, C, 1, 1); got {_describe(fc1_weight)}")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"se_fused: x must have H·W >= 1 (the mean over no pixels is undefined); got {_describe(x)}")
    r = fc1_weight.shape[0]
    if r == 0 or fc1_weight.shape[1] != c:
        raise ValueError(f"se_fused: fc1_weight must be (R, C={c}[, 1, 1]) with R >= 1 for x of "
                         f"{_describe(x)}; got {_describe(fc1_weight)}")
    if tuple(fc1_bias.shape) != (r,):
        raise ValueError(f"se_fused: fc1_bias must be (R={r},); got {_describe(fc1_bias)}")
    expected_w2 = (c, r) if fc2_weight.dim() == 2 else (c, r, 1, 1)
    if tuple(fc2_weight.shape) != expected_w2:
        raise ValueError(f"se_fused: fc2_weight must be (C={c}, R={r}) or (C, R, 1, 1); got {_describe(fc2_weight)}")
    if tuple(fc2_bias.shape) != (c,):
        raise ValueError(f"se_fused: fc2_bias must be (C={c},); got {_describe(fc2_bias)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"se_fused: residual must have x's shape {tuple(x.shape)}; got {_describe(residual)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"se_fused: residual must have x's dtype {x.dtype}; got {_describe(residual)}")
    x = canonical_layout(x)
    if residual is not None:
        residual = same_layout_as(residual, x)
    return (x, fc1_weight.contiguous(), fc1_bias.contiguous(), fc2_weight.contiguous(), fc2_bias.contiguous(),
            residual)
