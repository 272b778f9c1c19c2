// The excitation MLP and the weight gradients as a few CUDA kernels
// (excitation_cuda.cu), in place of the ATen ops of
// se_fused::excitation_forward/backward and weight_gradients. With the ATen
// ops a forward+backward of the two-pass path was 35-42 launches and, at
// conv3_x-conv5_x, bound by host time rather than by HBM (H100, batch 256,
// docs/cuda-notes.md); with these kernels it is 9 launches (4 forward, 5
// backward). Every sum runs in a fixed order (bitwise reproducible).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <tuple>

#include "../squeeze_excitation.h"

namespace se_fused {
namespace cuda {

// True when the kernels serve this call: float32 accumulation, the given
// parameters all in one dtype, and sizes within the kernels' grid and 32-bit index
// limits. SE_FUSED_CUDA_MLP=aten sends every call to the ATen ops instead (to
// compare the two; the tests run both); SE_FUSED_CUDA_MLP=tiled keeps the kernels
// but runs the MLP's products in the tiled kernel (excitation_cuda.cu).
bool excitation_kernels_apply(const at::Tensor& pooled, const SEProblem& p,
                              std::initializer_list<const at::Tensor*> params);

// Reads every knob of these kernels (SE_FUSED_CUDA_MLP, _MLP_SPLIT, _MLP_ROW_TILES,
// _WGRAD_TILES) and throws c10::ValueError for a bad value. The ops call it before their
// first launch, so a bad knob refuses the whole call with nothing launched, and the later
// reads (per chunk, in MlpLaunch's member initialisers) cannot throw.
void check_excitation_knobs();

// hidden (N, R) = W1 pooled + b1 (pre-activation); scale (N, C) = gate(W2 act(hidden) + b2).
// pooled, hidden, scale: contiguous float32; N > 0.
void excitation_forward_kernels(const at::Tensor& pooled, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                                const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, at::Tensor& hidden,
                                at::Tensor& scale, const SEProblem& p, cudaStream_t stream);

// From ds (N, C) = sum_p g*x and the saved scale/hidden:
// du (N, R) = act'(hidden) * (W2^T dv) with dv = ds * gate'(scale), and
// dz_over_p (N, C) = (W1^T du) / P. All float32 and contiguous; N > 0.
void excitation_backward_kernels(const at::Tensor& ds, const at::Tensor& scale, const at::Tensor& hidden,
                                 const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, at::Tensor& du,
                                 at::Tensor& dz_over_p, const SEProblem& p, cudaStream_t stream);

// (dW1, db1, dW2, db2), each shaped like its parameter and typed like its
// layer's weight (as se_fused::weight_gradients returns them), in one launch:
// dW1 = du^T pooled, db1 = sum_n du, dW2 = dv^T act(hidden), db2 = sum_n dv, with dv the
// gradient at the gate's input, or, when `gate_scale` is defined, dv = `dv_or_ds` * gate'(gate_scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_gradients_kernel(
    const at::Tensor& dv_or_ds, const c10::optional<at::Tensor>& gate_scale, const at::Tensor& du,
    const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const SEProblem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace se_fused
