"""The public API contract of SPEC §2: names, signatures, backends, ``python -m se_fused``.

Tests outside the project use these names, so a rename or a changed default
fails here first.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch

import se_fused
from se_fused import _ops, backends
from conftest import CUDA_PRESENT, NO_GPU_REASON, SEShape, make_se_inputs

BACKEND_NAMES = ("cuda", "triton", "cpu", "eager")


def _params(sig):
    return [(p.name, p.default) for p in sig.parameters.values()]


def test_public_names():
    """Everything SPEC §2 names is importable from ``se_fused`` and listed in ``__all__``."""
    for name in ("squeeze_excitation", "FusedSEFunction", "SEBlock", "FusedSEBlock", "available_backends",
                 "convert_se_blocks", "models", "__version__"):
        assert hasattr(se_fused, name), name
        assert name in se_fused.__all__, name
    assert issubclass(se_fused.FusedSEFunction, torch.autograd.Function)
    assert issubclass(se_fused.SEBlock, torch.nn.Module)
    assert issubclass(se_fused.FusedSEBlock, torch.nn.Module)
    assert isinstance(se_fused.__version__, str) and se_fused.__version__


def test_squeeze_excitation_signature():
    empty = inspect.Parameter.empty
    assert _params(inspect.signature(se_fused.squeeze_excitation)) == [
        ("x", empty), ("fc1_weight", empty), ("fc1_bias", empty), ("fc2_weight", empty), ("fc2_bias", empty),
        ("residual", None), ("activation", "relu"), ("gate", "sigmoid"), ("backend", "auto")]


def test_module_signatures():
    empty = inspect.Parameter.empty
    assert _params(inspect.signature(se_fused.SEBlock.__init__)) == [
        ("self", empty), ("channels", empty), ("reduction", 16), ("activation", "relu"), ("gate", "sigmoid")]
    assert _params(inspect.signature(se_fused.FusedSEBlock.__init__)) == [
        ("self", empty), ("channels", empty), ("reduction", 16), ("activation", "relu"), ("gate", "sigmoid"),
        ("backend", "auto")]
    for cls in (se_fused.SEBlock, se_fused.FusedSEBlock):
        assert _params(inspect.signature(cls.forward)) == [("self", empty), ("x", empty), ("residual", None)]


def test_models_and_conversion_signatures():
    """``se_fused.models.resnet50()``, ``se_resnet50(se=...)``, ``convert_se_blocks(model, backend=...)``."""
    assert callable(se_fused.models.resnet50)
    se_params = inspect.signature(se_fused.models.se_resnet50).parameters
    assert se_params["se"].default == "fused"
    convert_params = list(inspect.signature(se_fused.convert_se_blocks).parameters.values())
    assert convert_params[0].name == "model"
    assert any(p.name == "backend" and p.default == "auto" for p in convert_params)


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_function_apply_positional_equals_functional(residual, memory_format, dtype):
    """``FusedSEFunction.apply`` with the SPEC's nine positional arguments is ``squeeze_excitation``:
    the same output and gradients, bit for bit (the Python and the C++ autograd over the same kernels;
    float32 biases with bfloat16 weights check that each gradient comes back in its parameter's dtype)."""
    inputs = make_se_inputs(SEShape(2, 16, 2, 3, 3), dtype, memory_format, "cpu", residual)
    results = []
    for call in (lambda *t: se_fused.FusedSEFunction.apply(*t, "relu", "sigmoid", "cpu"),
                 lambda *t: se_fused.squeeze_excitation(*t, backend="cpu")):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs.tensors()]
        leaves[2] = leaves[2].detach().float().requires_grad_()   # fc1_bias
        out = call(*leaves)
        out.backward(inputs.grad_out)
        results.append([out.detach()] + [t.grad for t in leaves if t is not None])
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert results[1][3].dtype == torch.float32   # fc1_bias's gradient


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built"))])
def test_inference_mode_and_no_grad(backend):
    """Under ``torch.inference_mode`` and ``torch.no_grad`` the block returns the same output, with no graph."""
    inputs = make_se_inputs(SEShape(2, 16, 2, 3, 3), torch.float32, "nchw", "cpu", True)
    block = se_fused.FusedSEBlock(16, reduction=8, backend=backend)
    want = block(inputs.x, inputs.residual)
    assert want.requires_grad
    with torch.no_grad():
        got = block(inputs.x, inputs.residual)
    assert not got.requires_grad and torch.equal(got, want)
    with torch.inference_mode():
        got = block(inputs.x, inputs.residual)
    assert got.is_inference() and not got.requires_grad and torch.equal(got, want)


def test_available_backends():
    """A list of known names, "eager" always; "cpu" with the extension; "cuda" only with a GPU and the kernels."""
    available = se_fused.available_backends()
    assert isinstance(available, list) and all(isinstance(b, str) for b in available)
    assert set(available) <= set(BACKEND_NAMES) and len(set(available)) == len(available)
    assert "eager" in available
    from se_fused import _ops
    assert ("cpu" in available) == _ops.extension_loaded()
    assert ("cuda" in available) == (CUDA_PRESENT and _ops.cuda_kernels_built())
    if os.environ.get("TRITON_INTERPRET") != "1" and not CUDA_PRESENT:
        assert "triton" not in available


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_PRESENT, reason=NO_GPU_REASON)
def test_gpu_machine_has_cuda_backend():
    """On a GPU machine the CUDA backend must be usable (the suite's CUDA cases would otherwise all skip)."""
    assert "cuda" in se_fused.available_backends(), backends.backend_status("cuda").reason


def test_python_m_se_fused():
    """``python -m se_fused`` prints the versions, the device and every backend's state, consistently."""
    done = subprocess.run([sys.executable, "-m", "se_fused"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert se_fused.__version__ in text
    assert torch.__version__ in text
    assert (torch.version.cuda or "none") in text
    if CUDA_PRESENT:
        assert torch.cuda.get_device_name() in text
    else:
        assert "no GPU" in text
    available = se_fused.available_backends()
    for name in BACKEND_NAMES:
        lines = [line for line in text.splitlines() if line.split()[:1] == [name]]
        assert len(lines) == 1, f"one line for backend {name!r} expected in:\n{text}"
        state = lines[0].split(maxsplit=1)[1]
        if name in available:
            assert state.startswith("usable"), lines[0]
        else:
            prefix = next((p for p in ("built, not usable", "missing") if state.startswith(p)), None)
            assert prefix is not None, lines[0]
            assert state[len(prefix):].strip(), f"no reason given: {lines[0]}"


@pytest.mark.skipif(not _ops.extension_loaded(), reason="se_fused._C is not built")
def test_cpu_kernel_threads_like_torch():
    """The CPU kernel is compiled with OpenMP whenever torch's ATen is: ``at::parallel_for`` is a header
    template, and without the flag it silently runs every sweep on one thread (as it once did)."""
    info = _ops.build_info()
    assert info["cpu_parallel"] == torch.backends.openmp.is_available(), info
    assert info["cpu_vector_isa"] in ("AVX2", "DEFAULT"), info
    assert info["cuda"] == _ops.cuda_kernels_built(), info


# ---------------------------------------------------------------------------------------------------------------
# Backend resolution
# ---------------------------------------------------------------------------------------------------------------

def _cpu_inputs():
    return make_se_inputs(SEShape(2, 16, 2, 3, 3), torch.float32, "nchw", "cpu")


def _call(inputs, backend):
    return se_fused.squeeze_excitation(*inputs.tensors(), backend=backend)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"'fastest'.*auto.*eager"):
        _call(_cpu_inputs(), "fastest")
    with pytest.raises(TypeError, match="backend must be a string"):
        _call(_cpu_inputs(), None)
    with pytest.raises(ValueError, match="fastest"):
        se_fused.FusedSEBlock(16, backend="fastest")


def test_cuda_backend_with_cpu_tensors_raises():
    """Asking for "cuda" with CPU tensors never computes elsewhere: RuntimeError saying what is missing."""
    from se_fused import _ops
    with pytest.raises(RuntimeError, match="'cuda'") as info:
        _call(_cpu_inputs(), "cuda")
    message = str(info.value)
    if not _ops.cuda_kernels_built():
        assert "pip install" in message, message      # the command to rebuild
    elif not CUDA_PRESENT:
        assert "no GPU" in message, message
    else:
        assert "cpu" in message, message              # the tensors' device
    with pytest.raises(RuntimeError, match="'cuda'"):
        se_fused.FusedSEBlock(16, backend="cuda")(_cpu_inputs().x)


def test_triton_backend_with_cpu_tensors_raises():
    """"triton" on CPU tensors runs only under TRITON_INTERPRET=1; otherwise a RuntimeError with the reason."""
    if backends.backend_status("triton").usable and backends._BACKENDS["triton"].serves(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1: the Triton backend serves CPU tensors here (tests/test_triton.py)")
    with pytest.raises(RuntimeError, match="'triton'"):
        _call(_cpu_inputs(), "triton")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_PRESENT, reason=NO_GPU_REASON)
def test_cpu_backend_with_gpu_tensors_raises():
    inputs = make_se_inputs(SEShape(2, 16, 2, 3, 3), torch.float32, "nchw", "cuda")
    with pytest.raises(RuntimeError, match=r"'cpu'.*cuda"):
        _call(inputs, "cpu")


@pytest.mark.skipif("cpu" not in se_fused.available_backends(), reason="backend 'cpu' not built")
def test_auto_on_cpu_uses_the_cpu_kernel_without_warning():
    inputs = _cpu_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _call(inputs, "auto")
    assert torch.equal(out, _call(inputs, "cpu"))


@pytest.fixture
def cpu_kernel_missing(monkeypatch):
    """Pretend the C++ extension was not built (the cached status says so); restored after the test."""
    monkeypatch.setitem(backends._status_cache, "cpu",
                        backends.BackendStatus("cpu", False, False, "pretend: se_fused._C not built"))
    monkeypatch.setattr(backends, "_warned", set())


def test_auto_falls_back_with_one_warning(cpu_kernel_missing):
    """"auto" without the CPU kernel computes with eager and warns once (naming the reason), not every call."""
    inputs = _cpu_inputs()
    with pytest.warns(RuntimeWarning, match=r"'eager'.*pretend: se_fused._C not built"):
        out = _call(inputs, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _call(inputs, "auto")
    assert torch.equal(out, again)
    assert torch.equal(out, _call(inputs, "eager"))
    assert "cpu" not in se_fused.available_backends()


def test_named_backend_missing_raises_not_falls_back(cpu_kernel_missing):
    """An explicitly named backend that is unavailable raises with the reason; it never silently uses eager."""
    with pytest.raises(RuntimeError, match=r"'cpu'.*pretend: se_fused._C not built"):
        _call(_cpu_inputs(), "cpu")
