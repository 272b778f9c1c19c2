// Shared declarations of the se_fused ops: argument checks, the problem
// description every kernel reads, and the small excitation MLP in ATen ops.
// The math is SPEC §1; the Python reference is se_fused/_reference.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace se_fused {

enum class Activation : int { ReLU = 0, SiLU = 1 };
enum class Gate : int { Sigmoid = 0, HardSigmoid = 1 };

Activation parse_activation(const std::string& name);
Gate parse_gate(const std::string& name);

// One SE call, after its arguments were checked and brought into a layout the
// kernels read in place (x NCHW- or NHWC-contiguous; residual, out, grad_out
// in the same layout).
struct SEProblem {
  int64_t N = 0, C = 0, R = 0, P = 0;  // batch, channels, reduced width, H*W
  bool channels_last = false;
  bool has_residual = false;
  Activation activation = Activation::ReLU;
  Gate gate = Gate::Sigmoid;
};

// dtype of the saved per-sample intermediates and of all accumulation.
at::ScalarType accumulate_type(at::ScalarType storage);

// True when x is stored NHWC (and not also NCHW-contiguous).
bool is_channels_last(const at::Tensor& x);

// x (or any tensor shaped like it) made contiguous in `layout_of`'s layout.
at::Tensor contiguous_like(const at::Tensor& t, const at::Tensor& layout_of);

// Checks the forward's arguments (TORCH_CHECK with shapes, dtypes, devices in
// the message) and returns the problem plus x/residual in a kernel layout.
SEProblem check_forward_args(at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                             const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                             c10::optional<at::Tensor>& residual, const std::string& activation,
                             const std::string& gate);

// Checks the backward's arguments likewise.
SEProblem check_backward_args(at::Tensor& grad_out, at::Tensor& x, c10::optional<at::Tensor>& out,
                              const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                              const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& scale,
                              const std::string& activation, const std::string& gate);

// The excitation MLP on pooled (N, C) in the accumulation dtype:
// returns (hidden (N, R) pre-activation, scale (N, C)).
std::tuple<at::Tensor, at::Tensor> excitation_forward(const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                                      const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                                      const at::Tensor& fc2_bias, const SEProblem& p);

// The MLP's backward from ds (N, C) = sum_p g*x: returns
// (dv (N, C) gradient at the gate's input, du (N, R) at the activation's input, dz (N, C) at the pooled means).
std::tuple<at::Tensor, at::Tensor, at::Tensor> excitation_backward(const at::Tensor& ds, const at::Tensor& hidden,
                                                                   const at::Tensor& scale,
                                                                   const at::Tensor& fc1_weight,
                                                                   const at::Tensor& fc2_weight, const SEProblem& p);

// Weight gradients reduced over the batch (fixed-order GEMMs, deterministic),
// each shaped and typed like its parameter: (dW1, db1, dW2, db2).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_gradients(
    const at::Tensor& dv, const at::Tensor& du, const at::Tensor& pooled, const at::Tensor& hidden,
    const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, const SEProblem& p);

// Outputs of the forward/backward ops (see the schema in ops.cpp).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Allocates the forward's outputs; out is empty_like(x) (x's layout).
ForwardResult allocate_forward_outputs(const at::Tensor& x, const SEProblem& p);

}  // namespace se_fused
