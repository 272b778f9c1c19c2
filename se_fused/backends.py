"""Backends: which implementation computes an SE call, and whether it can.

Every backend offers the same two functions (the signatures of
:func:`se_fused._reference.eager_forward` / ``eager_backward``):

* ``forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate)
  -> (out, pooled, hidden, scale)``
* ``backward(grad_out, x, out_or_None, fc1_weight, fc2_weight, pooled, hidden, scale,
  activation, gate) -> (grad_x, grad_residual_or_None, grad_fc1_weight, grad_fc1_bias,
  grad_fc2_weight, grad_fc2_bias)``

``"auto"`` picks the fastest usable backend for the tensor's device; an
explicitly named backend that cannot run raises, it never falls back to
another device.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _ops
from ._reference import eager_backward, eager_forward

REBUILD_HINT = ("rebuild with: pip install --no-build-isolation -e .  "
                "(CUDA needs nvcc and a CUDA build of torch; see README 'Building for a GPU')")

BACKEND_NAMES = ("cuda", "triton", "cpu", "eager")


@dataclass(frozen=True)
class BackendStatus:
    """What ``python -m se_fused`` prints for one backend."""
    name: str
    built: bool
    usable: bool
    reason: str


@dataclass(frozen=True)
class Backend:
    """One implementation of the SE forward/backward pair (see module docstring)."""
    name: str
    forward: Callable
    backward: Callable
    serves: Callable[[torch.device], bool]
    status: Callable[[], BackendStatus]
    # ``differentiable(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate) -> out``
    # with its own autograd (the compiled backends: in C++); None: use FusedSEFunction.
    differentiable: Optional[Callable] = None


def _cuda_device_present() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _status_eager() -> BackendStatus:
    return BackendStatus("eager", True, True, "plain PyTorch ops, every device")


def _status_cpu() -> BackendStatus:
    if not _ops.extension_loaded():
        return BackendStatus("cpu", False, False, f"extension se_fused._C not built ({_ops.load_error()}); "
                             + REBUILD_HINT)
    info = _ops.build_info()
    if not info["cpu_parallel"] and torch.backends.openmp.is_available():
        return BackendStatus("cpu", True, True, "C++ CPU kernel, single-threaded: compiled without OpenMP while "
                             "torch uses it; " + REBUILD_HINT)
    return BackendStatus("cpu", True, True, f"C++ CPU kernel ({info['cpu_vector_isa']} vectors, "
                         f"{'threaded' if info['cpu_parallel'] else 'one thread'})")


def _status_cuda() -> BackendStatus:
    if not _ops.extension_loaded():
        return BackendStatus("cuda", False, False, f"extension se_fused._C not built ({_ops.load_error()}); "
                             + REBUILD_HINT)
    if not _ops.cuda_kernels_built():
        return BackendStatus("cuda", False, False, "se_fused._C was built without CUDA sources; " + REBUILD_HINT)
    if not _cuda_device_present():
        return BackendStatus("cuda", True, False, "CUDA kernels built, but no GPU is present")
    # No device name here: asking for it initialises CUDA, and statuses are computed at import.
    return BackendStatus("cuda", True, True, "CUDA kernels; a GPU is present")


_triton = None


def _triton_module():
    """``se_fused.triton``, imported once.

    Cached in a global so that calls traced by ``torch.compile`` read a module
    attribute instead of calling ``importlib`` (which Dynamo refuses to trace).
    """
    global _triton
    if _triton is None:
        _triton = importlib.import_module("se_fused.triton")
    return _triton


def _status_triton() -> BackendStatus:
    try:
        module = _triton_module()
    except Exception as exc:  # noqa: BLE001  (triton missing, broken, or the kernels not present)
        return BackendStatus("triton", False, False, f"cannot import the Triton kernels: {exc}")
    usable, reason = module.availability()
    return BackendStatus("triton", True, usable, reason)


def _triton_forward(*args):
    return _triton_module().forward(*args)


def _triton_backward(*args):
    return _triton_module().backward(*args)


def _triton_serves(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


_BACKENDS: Dict[str, Backend] = {
    "eager": Backend("eager", eager_forward, eager_backward, lambda d: True, _status_eager),
    "cpu": Backend("cpu", _ops.forward, _ops.backward, lambda d: d.type == "cpu", _status_cpu,
                   _ops.differentiable_forward),
    "cuda": Backend("cuda", _ops.forward, _ops.backward, lambda d: d.type == "cuda", _status_cuda,
                    _ops.differentiable_forward),
    "triton": Backend("triton", _triton_forward, _triton_backward, _triton_serves, _status_triton),
}

# Fastest first, per device type; "eager" always closes the list.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "eager"), "cpu": ("cpu", "eager")}

_status_cache: Dict[str, BackendStatus] = {}
_warned: set = set()


def backend_status(name: str) -> BackendStatus:
    """Built/usable state of backend ``name`` (cached: it cannot change within a process)."""
    if name not in _status_cache:
        _status_cache[name] = _BACKENDS[name].status()
    return _status_cache[name]


def available_backends() -> List[str]:
    """Names of the backends usable in this process, fastest first, e.g. ``["cuda", "triton", "eager"]``.

    ``"triton"`` counts on a CPU-only machine only under ``TRITON_INTERPRET=1``.
    """
    return [n for n in BACKEND_NAMES if backend_status(n).usable]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that computes a call named ``name`` on tensors on ``device``.

    ``"auto"`` takes the first usable backend of ``_AUTO_ORDER`` for the device
    (warning once when it has to fall back to a slower one). A named backend
    must be usable and serve ``device``, else ``RuntimeError`` says why.
    """
    if not isinstance(name, str):
        raise TypeError(f"se_fused: backend must be a string, got {type(name).__name__}")
    if name == "auto":
        order = _AUTO_ORDER.get(device.type, ("eager",))
        for candidate in order:
            if backend_status(candidate).usable and _BACKENDS[candidate].serves(device):
                if candidate != order[0] and (device.type, candidate) not in _warned:
                    _warned.add((device.type, candidate))
                    warnings.warn(f"se_fused: backend 'auto' on {device.type} uses '{candidate}' because "
                                  f"'{order[0]}' is unavailable: {backend_status(order[0]).reason}",
                                  RuntimeWarning, stacklevel=3)
                return _BACKENDS[candidate]
        return _BACKENDS["eager"]
    if name not in _BACKENDS:
        raise ValueError(f"se_fused: unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
    backend = _BACKENDS[name]
    status = backend_status(name)
    if not status.usable:
        raise RuntimeError(f"se_fused: backend {name!r} is not available: {status.reason}")
    if not backend.serves(device):
        raise RuntimeError(f"se_fused: backend {name!r} cannot compute on tensors on {device}; "
                           f"move the tensors or choose another backend (available: {available_backends()})")
    return backend


def all_statuses() -> Tuple[BackendStatus, ...]:
    """Status of every backend, in :data:`BACKEND_NAMES` order."""
    return tuple(backend_status(n) for n in BACKEND_NAMES)


def reset_status_cache(name: Optional[str] = None) -> None:
    """Compute the statuses again (tests that toggle ``TRITON_INTERPRET`` use this).

    The cache is refilled at once rather than left empty, so that no status is
    first computed inside a region ``torch.compile`` traces.
    """
    for n in (BACKEND_NAMES if name is None else (name,)):
        _status_cache.pop(n, None)
        backend_status(n)


# Statuses are computed now, at import, not on a first call: a first call inside torch.compile would
# fill the cache (and import se_fused.triton) inside the traced region, which Dynamo treats as a side
# effect (an aliasing error in the autograd.Function subgraph, and a guard that recompiles later).
# None of them initialises CUDA (torch.cuda.is_available() does not).
for _name in BACKEND_NAMES:
    backend_status(_name)
