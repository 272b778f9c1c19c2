#!/usr/bin/env bash
# Compile one CUDA translation unit for a GPU architecture without a GPU and print what
# ptxas says of each kernel: registers, shared memory, stack frame, spills.
#   bash scripts/ptxas_report.sh csrc/cuda/excitation_cuda.cu [arch, default 90a] [extra nvcc flags...]
# setup.py's include folders and flags (NVCC_FLAGS), so the numbers are the build's.
# ~1 min per file on a 2-core machine; the object is thrown away unless OBJECT=path names
# where to keep it (for `cuobjdump -sass`: Triton's wheel carries one). The CUDA counterpart of
# `python -m se_fused.triton.compile_check`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FILE=${1:?usage: ptxas_report.sh FILE.cu [arch] [nvcc flags...]}
[[ $FILE == /* ]] || FILE="$ROOT/$FILE"
ARCH=${2:-90a}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PYTHON:-$ROOT/.venv/bin/python}
# setup.py's own definitions (they run, its setup() call does not): the toolkit root, the
# ABI, the nvcc flags (one per line, so a flag with spaces stays one), then the include folders.
mapfile -t FOUND < <(cd "$ROOT" && "$PY" - <<'EOF'
import ast, os
tree = ast.parse(open("setup.py").read())
defs = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign))]
scope = {"__file__": os.path.abspath("setup.py")}
exec(compile(ast.Module(defs, []), "setup.py", "exec"), scope)
os.environ["CUDA_HOME"] = scope["find_cuda_home"]() or "/usr/local/cuda"
print(os.environ["CUDA_HOME"])
import torch
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(len(scope["NVCC_FLAGS"]))
print("\n".join(scope["NVCC_FLAGS"]))
from torch.utils.cpp_extension import include_paths
for path in include_paths(device_type="cuda") + scope["wheel_cuda_includes"]():
    print(f"-I{path}")
EOF
)
CUDA_HOME=${FOUND[0]}
ABI=${FOUND[1]}
NVCC_FLAGS=("${FOUND[@]:3:${FOUND[2]}}")
INCLUDES=("${FOUND[@]:$((3 + FOUND[2]))}")
"$CUDA_HOME/bin/nvcc" -c "$FILE" -o "${OBJECT:-/dev/null}" -std=c++20 "${NVCC_FLAGS[@]}" \
  -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Xptxas -v -DSE_FUSED_WITH_CUDA \
  -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
  -I"$ROOT/csrc" "${INCLUDES[@]}" -Xcompiler -fPIC "$@" 2>&1 |
  "$PY" -c '
import re, subprocess, sys
# ptxas names each kernel (Compiling entry function) and then gives its lines.
name, info = None, {}
for line in sys.stdin:
    m = re.search(r"Compiling entry function .(\S+).", line)
    if m:
        name = m.group(1)
        info.setdefault(name, [])
    elif name and re.search(r"Used|spill|stack frame", line):
        info[name].append(line.split("info    :")[-1].strip())
    elif re.search(r"error|warning", line) and "Registers are spilled" not in line:  # (the lines below say it)
        print(line.rstrip())
names = list(info)
plain = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
for mangled, text in zip(names, plain):
    short = text.replace("(anonymous namespace)::", "").replace("se_fused::cuda::", "").replace("void ", "", 1)
    print(short.split("(")[0] + ": " + "; ".join(info[mangled]))
'
