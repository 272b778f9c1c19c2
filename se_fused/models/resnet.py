"""ResNet-50 and SE-ResNet-50 (Hu et al.), with the SE block fused into one kernel.

The architecture is the one of the SE paper and of torchvision/timm
(ResNet "v1.5": the stride sits in the 3×3 convolution). Module names follow
torchvision's ``resnet50`` and timm's ``seresnet50`` (``conv1``, ``bn1``,
``layer1.0.conv1`` ..., ``layerK.I.se.fc1.weight``, ``fc``), so their state dicts
load with ``strict=True`` and give the same outputs.

In an SE bottleneck the SE block sits after ``bn3`` and before the residual
add; the block's tail ``relu(se(x) + shortcut)`` is one call of the SE module
in its residual form, ``se(x, shortcut)``, which the fused kernel computes in
one pass (scale, add and ReLU together).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type

import torch
from torch import nn

from ..backends import BACKEND_NAMES
from ..modules import FusedSEBlock, SEBlock

Tensor = torch.Tensor

# The SE paper's reduction ratio r; timm's seresnet50 uses the same widths (C/16, all multiples of 8).
SE_REDUCTION = 16
SE_IMPLEMENTATIONS = ("fused", "eager")
RESNET50_BLOCKS = (3, 4, 6, 3)


def make_se_block(channels: int, se: Optional[str], backend: str = "auto",
                  reduction: int = SE_REDUCTION) -> Optional[SEBlock]:
    """The SE module of one bottleneck: ``None``, :class:`SEBlock` (``"eager"``) or
    :class:`FusedSEBlock` (``"fused"``, computed by ``backend``)."""
    if se is None:
        return None
    if se == "fused":
        return FusedSEBlock(channels, reduction, backend=backend)
    if se == "eager":
        return SEBlock(channels, reduction)
    raise ValueError(f"se_fused: se must be one of {SE_IMPLEMENTATIONS} or None, got {se!r}")


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1 → 3×3 with the stride → 1×1 ×4), optionally with SE.

    ``forward(x (N, inplanes, H, W)) -> (N, 4·planes, H/stride, W/stride)``:
    ``relu(bn3(conv3(...)) + shortcut)``, or with SE ``se(bn3(conv3(...)), shortcut)``
    = ``relu(x·s + shortcut)``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 se: Optional[str] = None, backend: str = "auto"):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = make_se_block(outplanes, se, backend)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is None:
            return self.relu(out + shortcut)
        return self.se(out, shortcut)  # relu(out·s + shortcut), fused in one kernel for FusedSEBlock

    def zero_init_last(self) -> None:
        """Zero ``bn3``'s scale so the block starts as (nearly) the identity (Goyal et al.)."""
        nn.init.zeros_(self.bn3.weight)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks, optionally SE-ResNet.

    ``forward(x (N, 3, H, W)) -> logits (N, num_classes)``. A channels_last
    input stays channels_last through every layer (convolutions, batch norms and
    the SE kernels all keep the layout).

    Args:
        blocks: bottlenecks per stage, ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: width of the final linear layer.
        se: ``None`` (plain ResNet), ``"fused"`` or ``"eager"``.
        backend: backend of the fused SE blocks (``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"``, ``"eager"``).
        zero_init_last: zero each block's last BN scale (timm's default; torchvision's
            ``zero_init_residual``); off by default, as in the SE paper and torchvision.
    """

    def __init__(self, blocks: Sequence[int] = RESNET50_BLOCKS, num_classes: int = 1000, se: Optional[str] = None,
                 backend: str = "auto", zero_init_last: bool = False, block: Type[Bottleneck] = Bottleneck):
        super().__init__()
        if se is not None and se not in SE_IMPLEMENTATIONS:
            raise ValueError(f"se_fused: se must be one of {SE_IMPLEMENTATIONS} or None, got {se!r}")
        if backend not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"se_fused: unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
        self.se = se
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, blocks[0], 1, se, backend)
        self.layer2 = self._make_stage(block, 128, blocks[1], 2, se, backend)
        self.layer3 = self._make_stage(block, 256, blocks[2], 2, se, backend)
        self.layer4 = self._make_stage(block, 512, blocks[3], 2, se, backend)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_last)

    def _make_stage(self, block: Type[Bottleneck], planes: int, count: int, stride: int, se: Optional[str],
                    backend: str) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, se, backend)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, se, backend) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_last: bool) -> None:
        # He init for every convolution (the SE 1x1 convolutions included, as timm does); BN at (1, 0).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    module.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W) -> (N, 2048, H/32, W/32)`` feature map before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def resnet50(num_classes: int = 1000, zero_init_last: bool = False) -> ResNet:
    """Plain ResNet-50 (25,557,032 parameters at 1000 classes); state dict = torchvision's ``resnet50``."""
    return ResNet(RESNET50_BLOCKS, num_classes=num_classes, se=None, zero_init_last=zero_init_last)


def se_resnet50(se: str = "fused", num_classes: int = 1000, zero_init_last: bool = False,
                backend: str = "auto") -> ResNet:
    """SE-ResNet-50 of the SE paper (r = 16; 28,088,024 parameters at 1000 classes).

    ``se="fused"``: every bottleneck's tail ``relu(x·s + shortcut)`` is one
    :class:`~se_fused.FusedSEBlock` call computed by ``backend``; ``se="eager"``:
    the same with :class:`~se_fused.SEBlock` (plain PyTorch ops). The state dict
    is timm's ``seresnet50``'s.
    """
    if se not in SE_IMPLEMENTATIONS:
        raise ValueError(f"se_fused: se must be one of {SE_IMPLEMENTATIONS}, got {se!r}")
    return ResNet(RESNET50_BLOCKS, num_classes=num_classes, se=se, backend=backend, zero_init_last=zero_init_last)
