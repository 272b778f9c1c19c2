"""Compile the Triton kernels for a GPU architecture without a GPU (ahead of time, through ptxas).

    python -m se_fused.triton.compile_check [--arch 90] [--all]

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python on NumPy and
never meets the compiler, so a kernel that the interpreter accepts can still
fail to compile for a GPU (a non-constexpr block shape, a type the lowering
lacks, a float64 math call). This compiles each kernel for the variants the
launchers use (dtypes, layouts, modes, block shapes) to a cubin, and prints
each kernel's register use and any spills reported by ptxas. Must run without
``TRITON_INTERPRET=1`` (the kernels would be interpreted objects). Exit status
0 when everything compiled, 1 when something did not, 2 when this triton
cannot compile ahead of time (its NVIDIA backend or compile API is missing).
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Dict, Iterator, List, Tuple

Variant = Tuple[object, Dict[str, str], Dict[str, object], int]  # kernel, pointer types, constexprs, num_warps

PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}


def _acc(dtype: str) -> str:
    return "*fp64" if dtype == "float64" else "*fp32"


def variants(everything: bool) -> Iterator[Variant]:
    """The kernel instances to compile: a representative set, or with ``everything`` the full product."""
    import torch

    from . import (_common, batched_linear, channel_reduce, excite_backward, excite_forward, pipelined_backward,
                   pipelined_forward, weight_grad)

    blocks = _common.GPU_BLOCKS
    # Representative: every constexpr branch once (the storage dtype only changes loads and stores;
    # float64 takes other math lowerings), the block shapes the launchers pick for SE-ResNet shapes.
    dtypes = list(PTR) if everything else ["bfloat16", "float64"]
    for dtype, mode, channels_last in itertools.product(dtypes, (0, 1, 2), (False, True)):
        cfg = _common._reduce_config(256, 3136, channels_last, blocks)
        yield (channel_reduce.channel_reduce_kernel,
               dict(x_ptr=PTR[dtype], g_ptr=PTR[dtype], o_ptr=PTR[dtype], partial_ptr=_acc(dtype)),
               dict(MODE=mode, CHANNELS_LAST=channels_last, ACC_FP64=dtype == "float64",
                    BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p), 4)
    steps = [  # the four MLP steps of ops.py: (A_BIAS, A_FACTOR, A_ACTIVATE, OUT_BIAS, OUT_GATE)
        (False, 0, False, False, False), (True, 0, True, True, True), (False, 1, False, False, False),
        (False, 2, False, False, False)]
    for (acc, weight), step, (act, gate) in itertools.product(
            (("float32", "bfloat16"), ("float64", "float64")) if not everything else
            (("float32", "float32"), ("float32", "bfloat16"), ("float64", "float64")), steps,
            ((0, 0), (1, 1)) if not everything else ((0, 0), (0, 1), (1, 0), (1, 1))):
        a_bias, a_factor, a_activate, out_bias, out_gate = step
        # The tiles linear_tile picks at SE-ResNet's stages (C, R): the largest (conv5_x) for
        # every step, and with --all each stage's (the products over R are 16-128 long).
        over_c = step in (steps[0], steps[2])
        # A launch specialises an int argument equal to 1 as a constant: the weights' stride along k
        # in the forward (W[j, k]), along j in the backward (Wᵀ), which makes their loads 16 bytes wide.
        unit_stride = {"stride_wk": 1} if a_factor == 0 else {"stride_wj": 1}
        for c, r in ((256, 16), (512, 32), (1024, 64), (2048, 128)) if everything else ((2048, 128),):
            tile = _common._linear_tile(c if over_c else r, r if over_c else c, acc == "float64", over_c, None, blocks)
            yield (batched_linear.batched_linear_kernel,
                   dict(a_part_ptr=_acc(acc), a_bias_ptr=PTR[weight], aux_ptr=_acc(acc), a_store_ptr=_acc(acc),
                        w_ptr=PTR[weight], bias_ptr=PTR[weight], out_ptr=_acc(acc)),
                   dict(A_BIAS=a_bias, A_FACTOR=a_factor, A_STORE=True, A_ACTIVATE=a_activate, OUT_BIAS=out_bias,
                        OUT_GATE=out_gate, ACTIVATION=act, GATE=gate, ACC_FP64=acc == "float64",
                        BLOCK_N=tile.block_n, BLOCK_J=tile.block_j, BLOCK_K=tile.block_k, **unit_stride), 4)
    # The smallest MLP tile BlockSizes accepts (the reduction TL_DOT_MIN_K long, as the tests' tiny
    # blocks use). Triton 3.6 on an H100 refused the 8-long reduction the interpreter had run
    # (e88638e; Triton 3.8 compiles it), so the smallest tile BlockSizes allows is compiled too.
    for a_factor in (0, 1):
        yield (batched_linear.batched_linear_kernel,
               dict(a_part_ptr="*fp32", a_bias_ptr="*bf16", aux_ptr="*fp32", a_store_ptr="*fp32", w_ptr="*bf16",
                    bias_ptr="*bf16", out_ptr="*fp32"),
               dict(A_BIAS=False, A_FACTOR=a_factor, A_STORE=True, A_ACTIVATE=False, OUT_BIAS=False, OUT_GATE=False,
                    ACTIVATION=0, GATE=0, ACC_FP64=False, BLOCK_N=2, BLOCK_J=8, BLOCK_K=_common.TL_DOT_MIN_K), 4)
    configs = [(c.kwargs["TILE"], c.num_warps) for c in _common.elementwise_autotune_configs()]
    if not everything:
        configs = [_common.elementwise_config(256, 3136)]
    for dtype, flag, channels_last, inner, (tile, warps) in itertools.product(
            dtypes, (False, True), (False, True), (1, 64, 128, 256) if everything else (1, 256), configs):
        yield (excite_forward.excite_forward_kernel,
               dict(x_ptr=PTR[dtype], scale_ptr=_acc(dtype), residual_ptr=PTR[dtype], out_ptr=PTR[dtype]),
               dict(HAS_RESIDUAL=flag, CHANNELS_LAST=channels_last, ACC_FP64=dtype == "float64",
                    BLOCK_INNER=inner, TILE=tile), warps)
        yield (excite_backward.excite_backward_kernel,
               dict(grad_out_ptr=PTR[dtype], out_ptr=PTR[dtype], scale_ptr=_acc(dtype), dz_ptr=_acc(dtype),
                    grad_x_ptr=PTR[dtype], grad_residual_ptr=PTR[dtype]),
               dict(HAS_OUT=flag, CHANNELS_LAST=channels_last, ACC_FP64=dtype == "float64",
                    BLOCK_INNER=inner, TILE=tile), warps)
    # The pipelined forward and backward at the launcher's GPU blocks for SE-ResNet's stages (conv2_x's
    # 64 x 128 and conv5_x's 8 x 1024 in bf16; each stage's with --all), group blocks of 16 rows, tl.dot's
    # least, and 32 with --all (groups past 16 samples set by SE_FUSED_TRITON_PIPELINE_GROUP), the group
    # MLP's blocks of one program per SM, and with --all of two: the atomics, the spin-wait loop, the
    # group MLP.
    stages = ((256, 3136), (512, 784), (1024, 196), (2048, 49)) if everything else ((256, 3136), (2048, 49))
    for dtype, residual, channels_last, group_block, (c, p), per_sm in itertools.product(
            dtypes, (False, True), (False, True), (16, 32) if everything else (16,), stages,
            (1, 2) if everything else (1,)):
        _, tile_rows = pipelined_forward.tile_rows_of(c, p, getattr(torch, dtype).itemsize, 32768)
        acc = torch.float64 if dtype == "float64" else torch.float32
        pipeline_blocks = pipelined_forward.kernel_blocks(c, c // 16, tile_rows, group_block, dtype == "float64",
                                                          per_sm, pipelined_forward.default_block_elements(acc))
        yield (pipelined_backward.pipelined_backward_kernel,
               dict(grad_out_ptr=PTR[dtype], x_ptr=PTR[dtype], out_ptr=PTR[dtype], grad_x_ptr=PTR[dtype],
                    grad_residual_ptr=PTR[dtype], w1_ptr=PTR[dtype], w2_ptr=PTR[dtype], hidden_ptr=_acc(dtype),
                    scale_ptr=_acc(dtype), dv_ptr=_acc(dtype), du_ptr=_acc(dtype), dz_ptr=_acc(dtype),
                    partial_ptr=_acc(dtype), sync_ptr="*i32"),
               dict(HAS_OUT=residual, CHANNELS_LAST=channels_last, ACTIVATION=1, GATE=1,
                    ACC_FP64=dtype == "float64", **pipeline_blocks), 8)
        yield (pipelined_forward.pipelined_forward_kernel,
               dict(x_ptr=PTR[dtype], residual_ptr=PTR[dtype], out_ptr=PTR[dtype], w1_ptr=PTR[dtype],
                    b1_ptr=PTR[dtype], w2_ptr=PTR[dtype], b2_ptr=PTR[dtype], pooled_ptr=_acc(dtype),
                    hidden_ptr=_acc(dtype), scale_ptr=_acc(dtype), partial_ptr=_acc(dtype), sync_ptr="*i32"),
               dict(HAS_RESIDUAL=residual, CHANNELS_LAST=channels_last, ACTIVATION=1, GATE=0,
                    ACC_FP64=dtype == "float64", **pipeline_blocks), 8)
    for (acc, weight), activate in itertools.product(
            (("float32", "bfloat16"), ("float64", "float64")) if not everything else
            (("float32", "float32"), ("float32", "bfloat16"), ("float32", "float16"), ("float64", "float64")),
            (False, True)):
        yield (weight_grad.weight_grad_kernel,
               dict(a_ptr=_acc(acc), b_ptr=_acc(acc), out_ptr=PTR[weight], bias_out_ptr=PTR[weight]),
               dict(B_ACTIVATE=activate, ACTIVATION=1, ACC_FP64=acc == "float64", BLOCK_N=blocks.weight_grad_block_n,
                    BLOCK_I=blocks.weight_grad_block_i, BLOCK_J=blocks.weight_grad_block_j), 4)


def _ptxas_report(ptx: str, arch: int) -> List[str]:
    """ptxas -v lines (registers, spills) for ``ptx``, using the ptxas that ships with triton."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        suffix = "a" if arch >= 90 else ""
        run = subprocess.run([ptxas, f"--gpu-name=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        return [line.strip() for line in run.stderr.splitlines() if "registers" in line or "spill" in line]
    finally:
        os.unlink(f.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90 = Hopper)")
    parser.add_argument("--all", action="store_true", help="every dtype/option/config, not a representative set")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels are interpreted objects under it)")
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"compile_check: this triton cannot compile ahead of time ({exc})")
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = compiled = 0
    for kernel, pointer_types, constexprs, num_warps in variants(args.all):
        signature, attrs = {}, {}
        for index, name in enumerate(kernel.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            else:
                signature[name] = pointer_types.get(name, "i32")
                attrs[(index,)] = [["tt.divisibility", 16]]  # the common, vectorised specialisation
        types = ",".join(sorted(set(pointer_types.values())))
        label = f"{kernel.__name__} [{types}] {constexprs} num_warps={num_warps}"
        try:
            source = ASTSource(kernel, signature, constexprs, attrs)
        except TypeError as exc:
            print(f"compile_check: triton {triton.__version__}'s ASTSource differs ({exc})")
            return 2
        try:
            binary = triton.compile(source, target=target, options={"num_warps": num_warps})
        except Exception as exc:  # noqa: BLE001 (report every failure, then exit 1)
            failures += 1
            print(f"FAILED {label}\n{''.join(traceback.format_exception_only(exc))}")
            continue
        compiled += 1
        report = _ptxas_report(binary.asm["ptx"], args.arch)
        spills = [line for line in report if "spill" in line and " 0 bytes spill stores" not in line]
        registers = next((line for line in report if "registers" in line), "")
        print(f"ok {label}: {registers.split(',')[0] if registers else ''}{' SPILLS ' + '; '.join(spills) if spills else ''}")
    print(f"compile_check: triton {triton.__version__}, sm_{args.arch}: {compiled} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
