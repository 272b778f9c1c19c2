"""The Triton SE ops, registered with ``torch.library.triton_op`` so that
``torch.compile`` sees the kernels inside them, with the same outputs, fake
behaviour and autograd formula as the compiled ``se_fused::`` ops (_ops.py).

* ``se_fused::triton_squeeze_excitation_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
  residual?, activation, gate) -> (out, pooled, hidden, scale)``
* ``se_fused::triton_squeeze_excitation_backward(grad_out, x, out?, fc1_weight, fc2_weight, pooled,
  hidden, scale, activation, gate) -> (grad_x, grad_residual, grad_fc1_weight, grad_fc1_bias,
  grad_fc2_weight, grad_fc2_bias)``; ``grad_residual`` is empty (shape ``[0]``) without ``out``.

Both run the two-pass path over the batch (with ``SE_FUSED_TRITON_PATH=pipelined``, eager calls
run the read-once path of pipelined_forward.py / pipelined_backward.py instead), in one chunk
unless a budget is set
(see :func:`se_fused.triton._common.samples_per_chunk`): per chunk, pass 1
reduces over ``H·W`` (channel_reduce.py), the MLP runs batched over the chunk's
samples (batched_linear.py), and pass 2 re-reads the chunk (from L2 when the
chunks are sized for it) to write the output (excite_forward.py /
excite_backward.py). The weight gradients are reduced over the whole batch at
the end (weight_grad.py).

The backend's entry points (:func:`forward`, :func:`backward`) call the ops'
functions (:func:`run_forward`, :func:`run_backward`) directly in eager mode and
the registered ops while anything traces (:func:`runs_without_dispatcher`).
"""
import contextlib
from typing import Optional, Tuple

import torch
try:
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # pragma: no cover - every torch this project supports has it
    set_wrap_triton_enabled = None
from torch.library import triton_op
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .._ops import acc_dtype, backward_formula, setup_context
from .._validation import canonical_layout, is_channels_last, same_layout_as, validate_options
from . import _common
from ._common import ACTIVATION_CODES, GATE_CODES, linear_tile, reduce_config
from .batched_linear import FACTOR_ACTIVATION_GRAD, FACTOR_GATE_GRAD, launch_batched_linear
from .channel_reduce import launch_channel_reduce
from .excite_backward import launch_excite_backward
from .excite_forward import launch_excite_forward
from .pipelined_backward import launch_pipelined_backward
from .pipelined_forward import launch_pipelined_forward, requested as pipelined_requested
from .weight_grad import launch_weight_grad

Tensor = torch.Tensor

FORWARD_OP = "se_fused::triton_squeeze_excitation_forward"
BACKWARD_OP = "se_fused::triton_squeeze_excitation_backward"


def _tracing() -> bool:
    """Whether torch.compile/export traces or a TorchDispatchMode (fake tensors, make_fx) is active:
    then the registered ops must be seen, and only the two-pass kernels run (their launches are
    the ones torch.compile knows)."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def _check_call(x: Tensor, activation: str, gate: str) -> None:
    """What the ops check themselves (the backend callers validated everything else already)."""
    validate_options(activation, gate)
    if x.device.type == "cpu" and not _common.INTERPRETED:
        raise RuntimeError("se_fused: the Triton kernels got CPU tensors but were not loaded under "
                           "TRITON_INTERPRET=1 (set it before importing triton to run them on CPU)")


def run_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                residual: Optional[Tensor], activation: str, gate: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SE forward: ``x (N, C, H, W)`` → ``(out (N, C, H, W), pooled (N, C), hidden (N, R), scale (N, C))``.

    ``out`` is ``x·s`` or ``relu(x·s + residual)`` in ``x``'s layout and dtype;
    ``pooled``, ``hidden`` (pre-activation) and ``scale`` are float32 (float64 for
    float64 ``x``). Weights ``(R, C[, 1, 1])``/``(C, R[, 1, 1])``, any float dtype.
    """
    _check_call(x, activation, gate)
    x = canonical_layout(x)
    channels_last = is_channels_last(x)
    n, c, h, w = x.shape
    p = h * w
    r = fc1_weight.shape[0]
    acc = acc_dtype(x.dtype)
    w1 = fc1_weight.contiguous().reshape(r, c)
    w2 = fc2_weight.contiguous().reshape(c, r)
    b1 = fc1_bias.contiguous()
    b2 = fc2_bias.contiguous()
    if residual is not None:
        residual = same_layout_as(residual, x)
    out = torch.empty_like(x)
    pooled = x.new_empty((n, c), dtype=acc)
    hidden = x.new_empty((n, r), dtype=acc)
    scale = x.new_empty((n, c), dtype=acc)
    if n == 0:
        return out, pooled, hidden, scale

    act_code, gate_code = ACTIVATION_CODES[activation], GATE_CODES[gate]
    # SE_FUSED_TRITON_PATH=pipelined: read once, in one launch (pipelined_forward.py); eager calls only.
    if pipelined_requested() and not _tracing():
        launch_pipelined_forward(x, residual, out, w1, b1, w2, b2, pooled, hidden, scale, channels_last, act_code,
                                 gate_code)
        return out, pooled, hidden, scale
    cfg = reduce_config(c, p, channels_last)
    channel_sums = x.new_empty((cfg.splits, n, c), dtype=acc)
    hidden_partial = x.new_empty((linear_tile(c, r, acc == torch.float64).k_splits, n, r), dtype=acc)
    chunk = _common.samples_per_chunk(n, c * p * x.element_size(), x.device)
    for n0 in range(0, n, chunk):
        count = min(chunk, n - n0)
        launch_channel_reduce(x, None, None, channel_sums, n0, count, cfg, channels_last)
        # pooled = Σ sums / P;  hidden_partial = pooled · W1ᵀ (split over C)
        launch_batched_linear(channel_sums, p, w1, False, hidden_partial, n0, count, act_code, gate_code,
                              a_store=pooled)
        # hidden = Σ hidden_partial + b1;  scale = gate(act(hidden) · W2ᵀ + b2)
        launch_batched_linear(hidden_partial, 1, w2, False, scale, n0, count, act_code, gate_code,
                              a_bias=b1, a_store=hidden, a_activate=True, bias=b2, out_gate=True)
        launch_excite_forward(x, scale, residual, out, n0, count, channels_last)
    return out, pooled, hidden, scale


def _two_pass_backward(grad_out: Tensor, x: Tensor, out: Optional[Tensor], w1: Tensor, w2: Tensor, hidden: Tensor,
                       scale: Tensor, grad_x: Tensor, grad_residual: Tensor, dv: Tensor, du: Tensor,
                       channels_last: bool, act_code: int, gate_code: int) -> None:
    """The two-pass backward over the batch in chunks: writes ``grad_x`` (and ``grad_residual``),
    ``dv (N, C)`` and ``du (N, R)`` (shapes and dtypes as :func:`run_backward`'s)."""
    n, c, h, w = x.shape
    p = h * w
    r = w1.shape[0]
    acc = dv.dtype
    cfg = reduce_config(c, p, channels_last)
    ds_partial = x.new_empty((cfg.splits, n, c), dtype=acc)
    dh_partial = x.new_empty((linear_tile(c, r, acc == torch.float64).k_splits, n, r), dtype=acc)
    dz = x.new_empty((n, c), dtype=acc)
    reread = 2 if out is not None else 1  # pass 2 reads grad_out (and out) again, not x
    chunk = _common.samples_per_chunk(n, reread * c * p * x.element_size(), x.device)
    for n0 in range(0, n, chunk):
        count = min(chunk, n - n0)
        launch_channel_reduce(x, grad_out, out, ds_partial, n0, count, cfg, channels_last)
        # dv = ds · gate'(s);  dh_partial = dv · W2 (split over C)
        launch_batched_linear(ds_partial, 1, w2, True, dh_partial, n0, count, act_code, gate_code,
                              a_factor=FACTOR_GATE_GRAD, aux=scale, a_store=dv)
        # du = (Σ dh_partial) · act'(u);  dz = du · W1
        launch_batched_linear(dh_partial, 1, w1, True, dz, n0, count, act_code, gate_code,
                              a_factor=FACTOR_ACTIVATION_GRAD, aux=hidden, a_store=du)
        launch_excite_backward(grad_out, out, scale, dz, grad_x, grad_residual, n0, count, channels_last)


def run_backward(grad_out: Tensor, x: Tensor, out: Optional[Tensor], fc1_weight: Tensor, fc2_weight: Tensor,
                 pooled: Tensor, hidden: Tensor, scale: Tensor, activation: str, gate: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE backward (SPEC §1) from the forward's saved tensors.

    ``grad_out``, ``x``, ``out`` (the residual form's output, else None):
    ``(N, C, H, W)``; ``pooled``, ``scale (N, C)``, ``hidden (N, R)`` as the
    forward returned them. Returns ``grad_x`` (``x``'s layout and dtype),
    ``grad_residual`` (like ``x``; empty ``(0,)`` without ``out``), and the
    weight gradients shaped and typed like the weights (bias gradients typed
    like their weight).
    """
    _check_call(x, activation, gate)
    x = canonical_layout(x)
    channels_last = is_channels_last(x)
    # An expanded or otherwise strided gradient (y.sum().backward()) is made dense in x's layout.
    grad_out = same_layout_as(grad_out, x)
    if out is not None:
        out = same_layout_as(out, x)
    n, c, h, w = x.shape
    r = fc1_weight.shape[0]
    acc = pooled.dtype
    w1 = fc1_weight.contiguous().reshape(r, c)
    w2 = fc2_weight.contiguous().reshape(c, r)
    pooled, hidden, scale = pooled.contiguous(), hidden.contiguous(), scale.contiguous()
    grad_x = torch.empty_like(x)
    grad_residual = torch.empty_like(x) if out is not None else x.new_empty((0,))
    # Weight gradients shaped and typed like the weights (bias gradients typed like their weight).
    grad_w1 = torch.empty_like(fc1_weight, memory_format=torch.contiguous_format)
    grad_b1 = fc1_weight.new_empty((r,))
    grad_w2 = torch.empty_like(fc2_weight, memory_format=torch.contiguous_format)
    grad_b2 = fc2_weight.new_empty((c,))
    if n == 0:  # no samples: the sums over the batch are zero
        return (grad_x, grad_residual, torch.zeros_like(grad_w1), torch.zeros_like(grad_b1),
                torch.zeros_like(grad_w2), torch.zeros_like(grad_b2))

    act_code, gate_code = ACTIVATION_CODES[activation], GATE_CODES[gate]
    dv = x.new_empty((n, c), dtype=acc)
    du = x.new_empty((n, r), dtype=acc)
    if pipelined_requested() and not _tracing():  # see run_forward
        launch_pipelined_backward(grad_out, x, out, grad_x, grad_residual, w1, w2, hidden, scale, dv, du,
                                  x.new_empty((n, c), dtype=acc), channels_last, act_code, gate_code)
    else:
        _two_pass_backward(grad_out, x, out, w1, w2, hidden, scale, grad_x, grad_residual, dv, du, channels_last,
                           act_code, gate_code)
    # dW2 = dvᵀ act(u), db2 = Σ dv;  dW1 = duᵀ z, db1 = Σ du
    launch_weight_grad(dv, hidden, grad_w2, grad_b2, True, act_code)
    launch_weight_grad(du, pooled, grad_w1, grad_b1, False, act_code)
    return grad_x, grad_residual, grad_w1, grad_b1, grad_w2, grad_b2


# The registered ops: what torch.compile traces into, and what code outside se_fused may call.
squeeze_excitation_forward = triton_op(FORWARD_OP, mutates_args=())(run_forward)
squeeze_excitation_backward = triton_op(BACKWARD_OP, mutates_args=())(run_backward)


# Parameters are Tensors with no dispatch behaviour of their own: the GPU run at dd6c3b3 took the
# ops' route for every module call because the weights are Parameters.
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def runs_without_dispatcher(*tensors: Optional[Tensor]) -> bool:
    """Whether an eager call may run the kernels directly instead of through the registered op.

    The op's Python layers (dispatcher, custom-op wrappers, output aliasing check, autograd
    wrapper) cost host time on every call, and the Triton backend is host-bound at conv4_x/conv5_x
    (benchmarks/results/*-cca1da2-gpu_check.log: 0.26-0.49 ms host against 0.15-0.26 ms device per
    forward). Direct calls are the same function on the same tensors, so the same bits. Not while
    torch.compile/export traces (they must see the op), not under a TorchDispatchMode (fake tensors,
    make_fx), not for tensor subclasses other than ``nn.Parameter`` (the weights of every module).
    """
    if _tracing():
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


def direct_launches():
    """Context in which ``wrap_triton(kernel)[grid](...)`` launches the kernel itself.

    Left on, every launch goes through the ``triton_kernel_wrapper_mutation`` higher-order op
    (pytree walks, ``inspect.signature``, the HOP's dispatch): at a482069 (H100) that was
    1.0-3.3 ms of host time per Triton forward or forward+backward, 4-10 launches, against 0.15-1.1 ms
    of device time (the profile's Python rows: ``call_HOP``, ``tree_iter``). The registered ops run
    their function the same way in eager mode (``triton_op``'s backend sets the same switch), so the
    direct route launches the same kernels with the same arguments. Where a torch version lacks
    the switch, the launches keep the HOP (slower, same results).
    """
    return contextlib.nullcontext() if set_wrap_triton_enabled is None else set_wrap_triton_enabled(False)


def forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate):
    """Backend entry point (se_fused/backends.py): the kernels, through the registered forward op
    unless :func:`runs_without_dispatcher`."""
    if runs_without_dispatcher(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
        with direct_launches():
            return run_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate)
    return torch.ops.se_fused.triton_squeeze_excitation_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                                residual, activation, gate)


def backward(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale, activation, gate):
    """Backend entry point: the kernels, through the registered backward op unless
    :func:`runs_without_dispatcher`; ``grad_residual`` is ``None`` unless ``out`` is given."""
    args = (grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale)
    if runs_without_dispatcher(*args):
        with direct_launches():
            grads = run_backward(*args, activation, gate)
    else:
        grads = torch.ops.se_fused.triton_squeeze_excitation_backward(*args, activation, gate)
    return (grads[0], grads[1] if out is not None else None) + tuple(grads[2:])


squeeze_excitation_forward.register_autograd(backward_formula(backward), setup_context=setup_context)
