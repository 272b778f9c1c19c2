// The se_fused operator library: the one place the op schemas are declared.
// CPU kernels register in csrc/cpu/, CUDA kernels in csrc/cuda/, the C++
// autograd of squeeze_excitation in csrc/squeeze_excitation_autograd.cpp; the
// Python package adds fake kernels and the forward op's autograd
// (se_fused/_ops.py).
// Built into the Python extension (with csrc/python_module.cpp) and into the
// plain shared library of CMakeLists.txt for libtorch C++ users.
#include <torch/library.h>

TORCH_LIBRARY(se_fused, m) {
  // out = x*s, or relu(x*s + residual); pooled (N, C), hidden (N, R) = W1 pooled + b1
  // (pre-activation) and scale (N, C) are float32 (float64 for float64 x), saved for the backward.
  m.def(
      "squeeze_excitation_forward(Tensor x, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, "
      "Tensor fc2_bias, Tensor? residual, str activation, str gate) "
      "-> (Tensor out, Tensor pooled, Tensor hidden, Tensor scale)");
  // out: the forward's output in the residual form (its sign is the ReLU mask), None otherwise.
  // grad_residual is empty (shape [0]) when out is None. Weight gradients are shaped and typed
  // like the weights; bias gradients are typed like the weights.
  m.def(
      "squeeze_excitation_backward(Tensor grad_out, Tensor x, Tensor? out, Tensor fc1_weight, "
      "Tensor fc2_weight, Tensor pooled, Tensor hidden, Tensor scale, str activation, str gate) "
      "-> (Tensor grad_x, Tensor grad_residual, Tensor grad_fc1_weight, Tensor grad_fc1_bias, "
      "Tensor grad_fc2_weight, Tensor grad_fc2_bias)");
  // The forward made differentiable (autograd in C++, csrc/squeeze_excitation_autograd.cpp): out alone,
  // with the backward op as its gradient.
  m.def(
      "squeeze_excitation(Tensor x, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, "
      "Tensor? residual, str activation, str gate) -> Tensor");
}
