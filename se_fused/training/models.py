"""The networks ``python -m se_fused.train --arch NAME`` builds.

* ``se_resnet50`` / ``resnet50``: :func:`se_fused.models.se_resnet50` / :func:`~se_fused.models.resnet50`,
  the paper's networks.
* ``se_resnet_tiny`` / ``resnet_tiny``: :class:`TinyResNet`, the same
  bottleneck blocks (:class:`se_fused.models.Bottleneck`, with the fused SE
  block in its residual form) at a width and depth that train in milliseconds
  per step on a CPU, for tests and smoke runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..models import Bottleneck, resnet50, se_resnet50

Tensor = torch.Tensor

ARCHITECTURES = ("se_resnet50", "resnet50", "se_resnet_tiny", "resnet_tiny")


def has_se(arch: str) -> bool:
    """Whether networks of ``arch`` contain SE blocks."""
    return arch.startswith("se_")


class TinyResNet(nn.Module):
    """A small (SE-)ResNet of :class:`se_fused.models.Bottleneck` blocks, for tests and CPU smoke runs.

    Stem: 3×3 convolution (3 → ``stem_width``, stride 1), BN, ReLU; then one
    stage per entry of ``stage_planes`` (one bottleneck each; the first keeps
    the resolution, the others halve it), global average pooling and a linear
    classifier. With the defaults (16; 8, 16) the SE blocks see 32 and 64
    channels (reduced widths 2 and 4 at the paper's r = 16).
    ``forward(x (N, 3, H, W)) -> logits (N, num_classes)``.
    """

    def __init__(self, num_classes: int, se: Optional[str], backend: str = "auto", stem_width: int = 16,
                 stage_planes: Sequence[int] = (8, 16)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, kernel_size=3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        blocks = []
        inplanes = stem_width
        for position, planes in enumerate(stage_planes):
            stride = 1 if position == 0 else 2
            outplanes = planes * Bottleneck.expansion
            downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(outplanes))
            blocks.append(Bottleneck(inplanes, planes, stride, downsample, se=se, backend=backend))
            inplanes = outplanes
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():  # the initialisation of se_fused.models.ResNet
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build_model(arch: str, num_classes: int, se: str = "fused", se_backend: str = "auto",
                zero_init_last: bool = False) -> nn.Module:
    """The network ``arch`` (one of :data:`ARCHITECTURES`); ``se``/``se_backend`` apply to SE networks."""
    if arch == "se_resnet50":
        return se_resnet50(se=se, num_classes=num_classes, zero_init_last=zero_init_last, backend=se_backend)
    if arch == "resnet50":
        return resnet50(num_classes=num_classes, zero_init_last=zero_init_last)
    if arch in ("se_resnet_tiny", "resnet_tiny"):
        model = TinyResNet(num_classes, se if has_se(arch) else None, se_backend)
        if zero_init_last:
            for module in model.modules():
                if isinstance(module, Bottleneck):
                    module.zero_init_last()
        return model
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
