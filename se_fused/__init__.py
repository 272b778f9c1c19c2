"""se_fused: the Squeeze-and-Excitation block as one fused kernel with its own backward.

Public API (SPEC §2): :func:`squeeze_excitation`, :class:`FusedSEFunction`,
:class:`SEBlock`, :class:`FusedSEBlock`, :func:`convert_se_blocks`,
:func:`available_backends`, and :mod:`se_fused.models`.
"""
from ._version import __version__
from .backends import available_backends
from .function import FusedSEFunction, squeeze_excitation
from .modules import FusedSEBlock, SEBlock

__all__ = ["__version__", "available_backends", "FusedSEFunction", "squeeze_excitation", "SEBlock",
           "FusedSEBlock", "convert_se_blocks", "models"]


def __getattr__(name):
    # models and convert import timm/torchvision-aware code lazily, keeping `import se_fused` light.
    if name == "models":
        import importlib
        return importlib.import_module(".models", __name__)
    if name == "convert_se_blocks":
        from .convert import convert_se_blocks
        return convert_se_blocks
    raise AttributeError(f"module 'se_fused' has no attribute {name!r}")
