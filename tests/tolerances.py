"""The one tolerance table of the test suite, and the error measure it applies to.

Rule (the one flash-attention's tests use): a backend's error against the
float64 reference may be at most twice the error of a *baseline* computed in
the same storage dtype, plus a small floor:

    error(backend) <= ERROR_FACTOR * error(baseline) + FLOOR[dtype] * max|reference|

* **Error measure**: the max-abs error ``max |actual - reference|`` over the whole
  tensor, computed in float64, everywhere (forward output and every gradient).
  It is one number per tensor, insensitive to where the tensor has tiny
  entries (a relative elementwise error is not), and the floor is scaled by the
  tensor's largest reference magnitude so that one table serves shapes whose
  values differ by orders of magnitude (a weight gradient sums ``N·H·W``
  products; ``x``'s gradient does not).
* **Baseline**: the ``"eager"`` backend (plain PyTorch ops that accumulate in
  float32, as SPEC §1 requires of every kernel) in the same dtype. For the
  ``"eager"`` backend itself the baseline is the textbook SE written with
  PyTorch ops directly in the storage dtype (``squeeze_excitation_reference``
  on the low-precision tensors, what timm's ``SEModule`` computes), so the
  eager backend is not measured against itself.
* **Floors** (fraction of ``max|reference|``), the part of the error a correct
  kernel may have even where the baseline happens to be (nearly) exact:

  - float16 / bfloat16: one unit in the last place (``finfo.eps``). Kernel and
    baseline both round a float32 result to the storage dtype once; their
    float32 values differ in the last float32 bits (summation order), so an
    element near a rounding boundary may round to the neighbouring value in one
    and not the other: at most one ulp of that element, ``<= eps·max|ref|``.
    This matters most for tiny tensors (``R = 1`` bias: one element) where the
    baseline's own error can be 0.
  - float32 / float64: ``512·eps`` of the dtype. The kernels reduce up to
    ``H·W = 3136`` products per (sample, channel) and then ``N·C`` terms of
    both signs in the MLP backward, in their own order (per thread, often one
    running sum), while the baseline uses ATen's cascade summation. A running
    sum of ``n`` random terms is off by about ``sqrt(n)·eps`` of its magnitude
    (``sqrt(3136) = 56``), and cancellation in a bias gradient (terms of both
    signs) can multiply that relative to ``max|ref|`` by a few. Measured on the
    CPU kernel: at most 134 eps (float64, x 2x7x56x56, R = 1, channels_last,
    grad of fc1), 39 eps in float32, with the baseline exact or within 8 eps;
    512 leaves 4x on that. A wrong formula (errors of order 1) or a
    float16/bfloat16 accumulation (order 1e-3..1e-2, i.e. 1e4..1e5 eps of
    float32) stays far outside.

No test loosens these numbers locally; a test that needs something else says
why next to it.
"""
from __future__ import annotations

from typing import Dict

import torch

Tensor = torch.Tensor

ERROR_FACTOR = 2.0

FLOOR: Dict[torch.dtype, float] = {
    torch.float64: 512 * torch.finfo(torch.float64).eps,   # 1.1e-13
    torch.float32: 512 * torch.finfo(torch.float32).eps,   # 6.1e-5
    torch.float16: torch.finfo(torch.float16).eps,         # 9.8e-4
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,       # 7.8e-3
}


def max_abs_error(actual: Tensor, reference: Tensor) -> float:
    """``max |actual − reference|`` in float64 (0 for empty tensors); shapes must match."""
    assert actual.shape == reference.shape, f"shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().to(torch.float64).cpu() - reference.detach().to(torch.float64).cpu()).abs().max().item()


# Whole-network comparisons (tests/test_models.py, tests/test_convert.py) run in float64 and
# compare one valid implementation with another, through a deep train-mode network whose batch
# statistics (2 images) amplify rounding differences chaotically: there the ratio of two valid
# implementations' errors varies by several-fold from tensor to tensor (measured: 3.0x on one
# bias of torchvision's efficientnet_b0, eager vs C++ CPU backend), so the op-level factor 2
# cannot serve. 8x a float64 baseline error (~1e-13 relative) still fails any real defect by
# orders of magnitude (a 1e-9 relative change of one SE weight's gradient fails it).
NETWORK_ERROR_FACTOR = 8.0


def allowed_error(baseline_error: float, reference: Tensor, dtype: torch.dtype,
                  factor: float = ERROR_FACTOR) -> float:
    """The bound ``factor·baseline_error + FLOOR[dtype]·max|reference|`` for one tensor
    (``factor`` is :data:`ERROR_FACTOR`, or :data:`NETWORK_ERROR_FACTOR` for whole networks)."""
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    return factor * baseline_error + FLOOR[dtype] * scale


def assert_close_to_reference(name: str, actual: Tensor, baseline: Tensor, reference: Tensor,
                              dtype: torch.dtype, factor: float = ERROR_FACTOR) -> None:
    """Assert ``actual`` is within :func:`allowed_error` of the float64 ``reference``.

    ``baseline`` is the same quantity from the baseline implementation (see the
    module docstring). ``dtype`` is the storage dtype of the computation, which
    picks the floor. The failure message gives both errors and the bound.
    """
    assert actual.shape == reference.shape, (
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(reference.shape)}")
    err = max_abs_error(actual, reference)
    base_err = max_abs_error(baseline, reference)
    bound = allowed_error(base_err, reference, dtype, factor)
    assert err <= bound, (
        f"{name}: max-abs error {err:.3e} vs float64 reference exceeds {bound:.3e} "
        f"(= {factor} x baseline error {base_err:.3e} + floor {FLOOR[dtype]:.1e} x max|ref| "
        f"{reference.abs().max().item():.3e}); dtype {dtype}")
