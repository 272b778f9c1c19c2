"""``nn.Module`` forms: :class:`SEBlock` (eager reference) and :class:`FusedSEBlock` (drop-in)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._reference import squeeze_excitation_reference
from ._validation import validate_options
from .backends import BACKEND_NAMES
from .function import squeeze_excitation

Tensor = torch.Tensor


def reduced_channels(channels: int, reduction: int) -> int:
    """Width ``R`` of the excitation MLP: ``channels // reduction``, at least 1."""
    if channels < 1 or reduction < 1:
        raise ValueError(f"se_fused: channels and reduction must be >= 1, got {channels} and {reduction}")
    return max(1, channels // reduction)


class SEBlock(nn.Module):
    """Squeeze-and-Excitation in plain PyTorch ops (the eager reference).

    Parameters are stored as timm's ``SEModule`` / torchvision's
    ``SqueezeExcitation`` store them: ``fc1`` = ``Conv2d(C, R, 1)``, ``fc2`` =
    ``Conv2d(R, C, 1)``, so state dicts move between all of them.

    ``forward(x (N, C, H, W), residual=None) -> (N, C, H, W)``: ``x·s``, or
    ``relu(x·s + residual)`` when a residual is given.
    """

    def __init__(self, channels: int, reduction: int = 16, activation: str = "relu", gate: str = "sigmoid"):
        super().__init__()
        validate_options(activation, gate)
        self.channels = channels
        self.reduction = reduction
        self.activation = activation
        self.gate = gate
        rd = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, rd, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(rd, channels, kernel_size=1, bias=True)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return squeeze_excitation_reference(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                            residual, self.activation, self.gate)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, reduction={self.reduction}, activation={self.activation!r}, "
                f"gate={self.gate!r}")


class FusedSEBlock(SEBlock):
    """Drop-in :class:`SEBlock` whose forward and backward are the fused kernels.

    Same constructor (plus ``backend``) and the same state-dict keys
    (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``).
    ``forward(x (N, C, H, W), residual=None) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 16, activation: str = "relu", gate: str = "sigmoid",
                 backend: str = "auto"):
        super().__init__(channels, reduction, activation, gate)
        if backend not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"se_fused: unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
        self.backend = backend  # availability is checked per call, on the input's device

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return squeeze_excitation(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                  residual, self.activation, self.gate, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
