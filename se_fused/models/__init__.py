"""Whole networks: :func:`resnet50` (baseline) and :func:`se_resnet50` (fused or eager SE)."""
from .resnet import Bottleneck, ResNet, resnet50, se_resnet50

__all__ = ["Bottleneck", "ResNet", "resnet50", "se_resnet50"]
