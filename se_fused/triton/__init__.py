"""The ``"triton"`` backend: the fused SE forward/backward written in Triton.

What se_fused/backends.py calls:

* :func:`availability` ``-> (usable, reason)``
* :func:`forward` ``(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate)
  -> (out, pooled, hidden, scale)``
* :func:`backward` ``(grad_out, x, out_or_None, fc1_weight, fc2_weight, pooled, hidden, scale,
  activation, gate) -> (grad_x, grad_residual_or_None, grad_fc1_weight, grad_fc1_bias,
  grad_fc2_weight, grad_fc2_bias)``

with the semantics of :func:`se_fused._reference.eager_forward` /
``eager_backward``: ``pooled (N, C)``, ``hidden (N, R)`` (pre-activation) and
``scale (N, C)`` are float32, float64 for float64 ``x`` (supported, with
float64 accumulation). The kernels run on CUDA GPUs, or on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before triton is imported).

Importing this package never fails for a missing or broken triton; it is
reported by :func:`availability` and raised by :func:`forward`/:func:`backward`.
The kernels live one per file (channel_reduce, batched_linear, excite_forward,
excite_backward, weight_grad); ops.py registers them as ``torch.library.triton_op``.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional, Tuple

import torch

_ops_module: Optional[ModuleType] = None
_load_error: Optional[str] = None


def _load() -> Optional[ModuleType]:
    """Import triton and the kernels once; remember why not."""
    global _ops_module, _load_error
    if _ops_module is None and _load_error is None:
        try:
            from . import ops
            _ops_module = ops
        except ImportError as exc:
            _load_error = f"triton is not installed or too old ({exc})"
        except Exception as exc:  # a triton whose API differs: report, do not break `import se_fused`
            _load_error = f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    return _ops_module


def availability() -> Tuple[bool, str]:
    """Whether the Triton kernels can run in this process, and why (not).

    Usable with triton importable and either a CUDA GPU present or the
    interpreter on (``TRITON_INTERPRET=1`` when triton was imported) for CPU tensors.
    """
    if _load() is None:
        return False, _load_error or "unknown error"
    import triton
    from ._common import INTERPRETED
    if INTERPRETED:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        # No device name here: asking for it initialises CUDA, and statuses are computed at import.
        return True, f"Triton {triton.__version__} kernels on the CUDA GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 was set after triton's kernels were loaded; set it before importing"
    return False, "no CUDA GPU is present (set TRITON_INTERPRET=1 before importing to run the kernels on CPU)"


def _require() -> ModuleType:
    ops = _load()
    if ops is None:
        raise RuntimeError(f"se_fused: the Triton backend is not available: {_load_error}")
    return ops


def forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate):
    """Fused SE forward: ``x (N, C, H, W)`` → ``(out, pooled (N, C), hidden (N, R), scale (N, C))``."""
    return _require().forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate)


def backward(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale, activation, gate):
    """Fused SE backward → ``(grad_x, grad_residual or None, grad_fc1_weight, grad_fc1_bias,
    grad_fc2_weight, grad_fc2_bias)``, weight gradients shaped and typed like the weights."""
    return _require().backward(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale, activation, gate)
