"""Build se_fused and its extension se_fused._C (CPU kernels, plus CUDA kernels when possible).

CUDA sources are compiled when torch is a CUDA build and nvcc is found, never
decided by whether a GPU is visible, so a CPU-only machine builds (and CI
checks) the CUDA code too. Environment switches:

* ``SE_FUSED_CPU_ONLY=1``: skip the CUDA sources (a quick CPU-only build).
* ``TORCH_CUDA_ARCH_LIST``: target GPUs; defaults to ``9.0`` when no GPU is visible.
* ``CUDA_HOME``: the toolkit, when it is not where ``nvcc`` or ``/usr/local/cuda`` says.
* ``SE_FUSED_NO_AVX2=1``: a portable CPU kernel (by default it uses AVX2/FMA when the building CPU has them).
"""
import glob
import importlib.util
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "9.0"
# The CUDA sources' nvcc flags (scripts/ptxas_report.sh compiles one source with them too).
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]


def find_cuda_home():
    """The toolkit root: $CUDA_HOME/$CUDA_PATH, else nvcc's real location, else /usr/local/cuda.

    torch guesses the root from nvcc's directory, which is wrong when nvcc on the
    PATH is a wrapper script (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local).
    """
    def has_toolkit(root):
        return root and os.path.exists(os.path.join(root, "bin", "nvcc")) and \
            os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if has_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if has_toolkit(root):
            return root
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if has_toolkit(root):
            return root
    return None


def want_cuda(torch):
    if os.environ.get("SE_FUSED_CPU_ONLY", "0") == "1":
        print("se_fused: SE_FUSED_CPU_ONLY=1, building the CPU kernels only")
        return False
    if torch.version.cuda is None:
        print("se_fused: torch has no CUDA, building the CPU kernels only")
        return False
    if find_cuda_home() is None:
        print("se_fused: nvcc / CUDA toolkit not found, building the CPU kernels only")
        return False
    return True


def wheel_cuda_includes():
    """Header folders of the nvidia-* wheels torch depends on (cuSPARSE, cuBLAS, ... headers that
    ATen's CUDA headers include but a runtime-only toolkit lacks)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def cpu_vector_flags():
    """Flags that let ATen's ``Vectorized`` use AVX2 in the CPU kernel.

    An extension is compiled without ISA flags, so ``at::vec::Vectorized``
    falls back to its generic scalar form (ATen itself dispatches at run time
    between builds per ISA). When the building machine has AVX2 and FMA, the
    extension is compiled for it, as a source build targets the machine it is
    installed on; ``SE_FUSED_NO_AVX2=1`` builds the portable generic form.
    """
    if os.environ.get("SE_FUSED_NO_AVX2", "0") == "1" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    if not {"avx2", "fma", "f16c"} <= flags:
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def openmp_flags(torch):
    """``-fopenmp`` when torch's ATen threads with OpenMP.

    ``at::parallel_for`` is a header template: compiled without OpenMP it runs
    inline, and the CPU kernel would use one thread whatever
    ``torch.set_num_threads`` says. GCC and Clang on Linux take the flag; the
    library it links (libgomp.so.1) is the one torch already loaded.
    """
    if not torch.backends.openmp.is_available() or platform.system() != "Linux":
        return []
    return ["-fopenmp"]


def extensions():
    import torch

    build_cuda = want_cuda(torch)
    if build_cuda:
        os.environ["CUDA_HOME"] = find_cuda_home()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
            print(f"se_fused: no GPU visible, TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")
    # Imported only now: cpp_extension reads CUDA_HOME when it is first imported.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [os.path.join("csrc", f) for f in (
        "ops.cpp", "python_module.cpp", "squeeze_excitation.cpp", "squeeze_excitation_autograd.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # The C++ standard is torch's choice (C++20 from torch 2.13).
    link_flags = openmp_flags(torch)
    cxx_flags = ["-O3"] + cpu_vector_flags() + link_flags
    if not build_cuda:
        return [CppExtension("se_fused._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return [CUDAExtension("se_fused._C", sources, include_dirs=wheel_cuda_includes(),
                          extra_compile_args={"cxx": cxx_flags + ["-DSE_FUSED_WITH_CUDA"],
                                              "nvcc": NVCC_FLAGS + ["-DSE_FUSED_WITH_CUDA"]},
                          extra_link_args=link_flags)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


def read_version():
    scope = {}
    with open(os.path.join(ROOT, "se_fused", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


if "egg_info" in sys.argv or "dist_info" in sys.argv:
    ext_modules, cmdclass = [], {}  # metadata only: no torch needed
else:
    ext_modules, cmdclass = extensions(), {"build_ext": build_ext_class()}

setup(
    name="se_fused",
    version=read_version(),
    description="Fused Squeeze-and-Excitation block (CUDA, Triton, C++ CPU) with its own backward",
    packages=find_packages(include=["se_fused", "se_fused.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "packaging"],
    extras_require={"test": ["pytest", "timm", "torchvision", "matplotlib", "tqdm"],
                    "bench": ["matplotlib", "tqdm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
