"""One-call conversion of existing models: every supported SE module becomes a :class:`FusedSEBlock`.

Recognised (by exact class, or a subclass that keeps the base class's forward):

* ``se_fused.SEBlock``
* timm ``SEModule`` / ``SqueezeExcite`` (``timm.layers.squeeze_excite``: ``fc1``, ``bn``, ``act``, ``fc2``, ``gate``)
* timm's EfficientNet/MobileNet ``SqueezeExcite`` (``timm.models._efficientnet_blocks``:
  ``conv_reduce``, ``act1``, ``conv_expand``, ``gate``)
* torchvision ``SqueezeExcitation`` (``torchvision.ops.misc``: ``avgpool``, ``fc1``, ``fc2``,
  ``activation``, ``scale_activation``)

A module converts when its squeeze is a plain mean, its activation is ReLU or
SiLU, its gate is sigmoid or hard-sigmoid, its two FCs are 1×1 convolutions with
bias and there is nothing in between (no inner norm). Anything else (timm's
``add_maxpool``, an inner BatchNorm, ReLU6/GELU/...) is left as it is and named
in one warning.

The converted module *shares* the source's ``Conv2d`` modules (same
``Parameter`` objects), so weights, device, dtype, ``requires_grad``, optimizer
state and the state-dict keys all stay as they were. The squeeze width ``R``
comes from those weights: torchvision and timm's EfficientNet compute it from the
block's input channels, not from ``C / 16``.

timm and torchvision are optional: their classes are looked up only in
modules that are already imported (a model that contains them has imported
them), so conversion never imports either library.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .backends import BACKEND_NAMES
from .modules import FusedSEBlock, SEBlock, reduced_channels

logger = logging.getLogger(__name__)

__all__ = ["convert_se_blocks", "to_fused_se_block", "FusedSqueezeExcite", "UnsupportedSEModule"]


class UnsupportedSEModule(ValueError):
    """An SE module whose variant the fused kernels do not compute (the message says why)."""


class FusedSqueezeExcite(FusedSEBlock):
    """:class:`FusedSEBlock` that keeps timm's EfficientNet ``SqueezeExcite`` parameter names.

    Its 1×1 convolutions are registered as ``conv_reduce`` / ``conv_expand`` (so
    checkpoints of the unconverted model load into the converted one and back);
    ``fc1`` / ``fc2`` are read-only aliases of them.
    """

    @property
    def fc1(self) -> nn.Conv2d:
        return self.conv_reduce

    @property
    def fc2(self) -> nn.Conv2d:
        return self.conv_expand


# --- recognising the source modules ----------------------------------------------------------------

def _imported_class(module_name: str, class_name: str) -> Optional[type]:
    """``module_name.class_name`` when that module is already imported, else ``None`` (never imports)."""
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _classes(*qualified: str) -> Tuple[type, ...]:
    found = (_imported_class(*q.rsplit(".", 1)) for q in qualified)
    return tuple(dict.fromkeys(c for c in found if c is not None))


def _activation_name(module: nn.Module) -> Optional[str]:
    """``"relu"`` / ``"silu"`` for the activation modules that compute exactly that, else ``None``."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.SiLU or kind in _classes("timm.layers.activations.Swish", "timm.layers.activations_me.SwishMe"):
        return "silu"
    return None


def _gate_name(module: nn.Module) -> Optional[str]:
    """``"sigmoid"`` / ``"hardsigmoid"`` for the gate modules that compute exactly that
    (timm's ``HardSigmoid`` is ``relu6(x + 3) / 6``, the same function), else ``None``."""
    kind = type(module)
    if kind is nn.Sigmoid or kind in _classes("timm.layers.activations.Sigmoid"):
        return "sigmoid"
    if kind is nn.Hardsigmoid or kind in _classes("timm.layers.activations.HardSigmoid",
                                                  "timm.layers.activations_me.HardSigmoidMe"):
        return "hardsigmoid"
    return None


def _check_fc_pair(fc1: nn.Module, fc2: nn.Module) -> Tuple[int, int]:
    """``(C, R)`` of a reduce/expand pair of plain 1×1 convolutions with bias; raises otherwise."""
    for name, conv in (("reduce", fc1), ("expand", fc2)):
        if type(conv) is not nn.Conv2d:
            raise UnsupportedSEModule(f"{name} FC is {type(conv).__name__}, not a plain Conv2d")
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
            raise UnsupportedSEModule(f"{name} FC is not a 1x1, stride-1, unpadded, ungrouped convolution")
        if conv.bias is None:
            raise UnsupportedSEModule(f"{name} FC has no bias")
    channels, rd = fc1.in_channels, fc1.out_channels
    if (fc2.in_channels, fc2.out_channels) != (rd, channels):
        raise UnsupportedSEModule(f"FC shapes do not chain: {channels}->{rd} then "
                                  f"{fc2.in_channels}->{fc2.out_channels}")
    return channels, rd


def _options(act: nn.Module, gate: nn.Module) -> Tuple[str, str]:
    activation, gate_name = _activation_name(act), _gate_name(gate)
    if activation is None:
        raise UnsupportedSEModule(f"activation {type(act).__name__} (supported: ReLU, SiLU)")
    if gate_name is None:
        raise UnsupportedSEModule(f"gate {type(gate).__name__} (supported: Sigmoid, Hardsigmoid)")
    return activation, gate_name


# Each source kind: (its parts) -> (fc1, fc2, activation, gate); raises UnsupportedSEModule.
def _parts_se_block(m) -> Tuple[nn.Module, nn.Module, str, str]:
    return m.fc1, m.fc2, m.activation, m.gate


def _parts_timm_se_module(m) -> Tuple[nn.Module, nn.Module, str, str]:
    if getattr(m, "add_maxpool", False):
        raise UnsupportedSEModule("add_maxpool=True (squeeze mixes in a max pool)")
    if type(m.bn) is not nn.Identity:
        raise UnsupportedSEModule(f"inner norm {type(m.bn).__name__} between the FCs")
    return (m.fc1, m.fc2) + _options(m.act, m.gate)


def _parts_timm_squeeze_excite(m) -> Tuple[nn.Module, nn.Module, str, str]:
    return (m.conv_reduce, m.conv_expand) + _options(m.act1, m.gate)


def _parts_torchvision(m) -> Tuple[nn.Module, nn.Module, str, str]:
    pool = m.avgpool
    if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
        raise UnsupportedSEModule(f"squeeze {pool!r} is not a global average pool")
    return (m.fc1, m.fc2) + _options(m.activation, m.scale_activation)


def _source_kinds() -> List[Tuple[type, Callable, type]]:
    """(source class, parts function, fused class) for every recognised class that is imported."""
    kinds = [(SEBlock, _parts_se_block, FusedSEBlock)]
    for cls in _classes("timm.layers.squeeze_excite.SEModule"):
        kinds.append((cls, _parts_timm_se_module, FusedSEBlock))
    for cls in _classes("timm.models._efficientnet_blocks.SqueezeExcite"):
        kinds.append((cls, _parts_timm_squeeze_excite, FusedSqueezeExcite))
    for cls in _classes("torchvision.ops.misc.SqueezeExcitation"):
        kinds.append((cls, _parts_torchvision, FusedSEBlock))
    return kinds


def _match(module: nn.Module, kinds) -> Optional[Tuple[type, Callable, type]]:
    """The kind of ``module``: its class or a base whose forward it does not override."""
    if isinstance(module, FusedSEBlock):
        return None  # already fused
    for cls, parts, fused_cls in kinds:
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                return (cls, None, fused_cls)  # a subclass with its own math: not ours to replace
            return cls, parts, fused_cls
    return None


def _build(module: nn.Module, parts: Callable, fused_cls: type, backend: str) -> FusedSEBlock:
    fc1, fc2, activation, gate = parts(module)
    channels, rd = _check_fc_pair(fc1, fc2)
    # Construct at the smallest width (R = 1), then install the source's own convolutions.
    fused = fused_cls(channels, reduction=channels, activation=activation, gate=gate, backend=backend)
    if fused_cls is FusedSqueezeExcite:
        del fused.fc1, fused.fc2  # drop the registered fc1/fc2; the properties alias the new names
        fused.conv_reduce, fused.conv_expand = fc1, fc2
    else:
        fused.fc1, fused.fc2 = fc1, fc2
    exact = channels // rd
    fused.reduction = exact if reduced_channels(channels, exact) == rd else channels / rd
    fused.train(module.training)
    return fused


def to_fused_se_block(module: nn.Module, backend: str = "auto") -> FusedSEBlock:
    """The :class:`FusedSEBlock` equivalent of one SE module, sharing its parameters.

    ``module``: any class listed in this module's docstring. Raises
    :class:`UnsupportedSEModule` (a ``ValueError``) naming what does not fit, or
    ``TypeError`` for a module that is not a recognised SE class.
    """
    kind = _match(module, _source_kinds())
    if kind is None:
        raise TypeError(f"se_fused: {type(module).__name__} is not a recognised SE module")
    cls, parts, fused_cls = kind
    if parts is None:
        raise UnsupportedSEModule(f"{type(module).__name__} overrides {cls.__name__}.forward")
    return _build(module, parts, fused_cls, backend)


def convert_se_blocks(model: nn.Module, backend: str = "auto", fuse_residual: bool = False) -> int:
    """Replace every supported SE module inside ``model`` by a :class:`FusedSEBlock`, in place.

    Returns how many modules were replaced (a module reachable under several
    names counts once and is replaced everywhere by the same fused module).
    Unsupported SE variants stay as they are; one ``UserWarning`` lists their
    names and why. ``model`` itself is never replaced (use
    :func:`to_fused_se_block` for a bare SE module).

    ``fuse_residual=True`` also rewrites timm ``Bottleneck`` / ``BasicBlock``
    blocks whose SE output goes straight into ``relu(· + shortcut)`` (no
    drop-path, ReLU as the block's last activation): their class is switched
    to a subclass (``FusedResidualBottleneck`` / ``FusedResidualBasicBlock``) whose
    forward calls ``se(x, shortcut)``, so the scale, the residual add and the
    ReLU happen in the SE kernel. Parameters and state-dict keys do not change.

    Hooks registered on a replaced module are not carried over to its fused
    replacement.
    """
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"se_fused: unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
    kinds = _source_kinds()
    replaced: Dict[int, FusedSEBlock] = {}
    unsupported: Dict[int, str] = {}
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
                continue
            kind = _match(child, kinds)
            if kind is None or id(child) in unsupported:
                continue
            cls, parts, fused_cls = kind
            try:
                if parts is None:
                    raise UnsupportedSEModule(f"{type(child).__name__} overrides {cls.__name__}.forward")
                fused = _build(child, parts, fused_cls, backend)
            except UnsupportedSEModule as exc:
                unsupported[id(child)] = f"{names.get(id(child), child_name)} ({type(child).__name__}: {exc})"
                continue
            replaced[id(child)] = fused
            setattr(parent, child_name, fused)
    if _match(model, kinds) is not None:
        unsupported[id(model)] = "<the model itself> (cannot be replaced in place; use to_fused_se_block)"
    if unsupported:
        warnings.warn("se_fused.convert_se_blocks: left these SE modules unconverted: "
                      + "; ".join(unsupported.values()), UserWarning, stacklevel=2)
    fused_blocks = _fuse_residual_blocks(model) if fuse_residual else 0
    logger.info("convert_se_blocks: replaced %d SE modules, %d left unconverted, %d residual tails fused",
                len(replaced), len(unsupported), fused_blocks)
    return len(replaced)


# --- fuse_residual: timm ResNet blocks --------------------------------------------------------------
#
# The subclasses are made on first use (timm is optional) and published as attributes of this
# module under their own names, so pickling a converted model works; the module-level __getattr__
# re-creates them when an unpickling process asks for them first.

def _bottleneck_forward(self, x):
    """timm ``Bottleneck.forward`` with ``relu(se(x) + shortcut)`` as one fused SE call."""
    shortcut = x if self.downsample is None else self.downsample(x)
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    x = self.bn3(self.conv3(x))
    return self.se(x, shortcut)


def _basic_block_forward(self, x):
    """timm ``BasicBlock.forward`` with ``relu(se(x) + shortcut)`` as one fused SE call."""
    shortcut = x if self.downsample is None else self.downsample(x)
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    x = self.bn2(self.conv2(x))
    return self.se(x, shortcut)


# fused class name -> (timm module, base class, forward, name of the block's final activation)
_RESIDUAL_BLOCKS = {
    "FusedResidualBottleneck": ("timm.models.resnet", "Bottleneck", _bottleneck_forward, "act3"),
    "FusedResidualBasicBlock": ("timm.models.resnet", "BasicBlock", _basic_block_forward, "act2"),
}


def _residual_class(name: str) -> type:
    cls = globals().get(name)
    if cls is None:
        module_name, base_name, forward, _ = _RESIDUAL_BLOCKS[name]
        base = getattr(importlib.import_module(module_name), base_name)
        cls = type(name, (base,), {"forward": forward, "__module__": __name__,
                                   "__doc__": f"timm {base_name} whose SE computes relu(x*s + shortcut) fused."})
        globals()[name] = cls
    return cls


def __getattr__(name: str):
    if name in _RESIDUAL_BLOCKS:
        return _residual_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fuse_residual_blocks(model: nn.Module) -> int:
    """Switch the class of each fusable timm block; returns how many were switched."""
    count = 0
    for name, (module_name, base_name, _, final_act) in _RESIDUAL_BLOCKS.items():
        base = _imported_class(module_name, base_name)
        if base is None:
            continue
        for block in model.modules():
            if (type(block) is base and isinstance(block.se, FusedSEBlock) and block.drop_path is None
                    and type(getattr(block, final_act)) is nn.ReLU):
                block.__class__ = _residual_class(name)
                count += 1
    return count
