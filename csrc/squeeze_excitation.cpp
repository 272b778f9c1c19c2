// Argument checks shared by the CPU and CUDA ops, and the excitation MLP in ATen ops (used by the CUDA op;
// the CPU kernel has its own, csrc/cpu/excitation_cpu.h).
#include "squeeze_excitation.h"

#include <ATen/ops/silu.h>

namespace se_fused {

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::ReLU;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, "se_fused: activation must be 'relu' or 'silu', got '", name, "'");
  return Activation::ReLU;
}

Gate parse_gate(const std::string& name) {
  if (name == "sigmoid") return Gate::Sigmoid;
  if (name == "hardsigmoid") return Gate::HardSigmoid;
  TORCH_CHECK_VALUE(false, "se_fused: gate must be 'sigmoid' or 'hardsigmoid', got '", name, "'");
  return Gate::Sigmoid;
}

at::ScalarType accumulate_type(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor contiguous_like(const at::Tensor& t, const at::Tensor& layout_of) {
  return is_channels_last(layout_of) ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), "se_fused: ", name,
                   " must be float16, bfloat16, float32 or float64; got ", describe(t));
  TORCH_CHECK_VALUE(t.device() == x.device(), "se_fused: ", name, " is on ", t.device(), " but x is on ",
                    x.device());
}

// x in NCHW or NHWC order; anything else is copied into the closer one.
at::Tensor kernel_layout(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  if (x.stride(1) < std::min(x.stride(2), x.stride(3))) return x.contiguous(at::MemoryFormat::ChannelsLast);
  return x.contiguous();
}

SEProblem check_shapes(const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                       const std::string& activation, const std::string& gate) {
  TORCH_CHECK_VALUE(x.dim() == 4, "se_fused: x must be 4-D (N, C, H, W); got ", describe(x));
  SEProblem p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.P = x.size(2) * x.size(3);
  p.R = fc1_weight.dim() > 0 ? fc1_weight.size(0) : 0;
  TORCH_CHECK_VALUE(p.C > 0 && p.P > 0, "se_fused: x needs C >= 1 and H*W >= 1; got ", describe(x));
  TORCH_CHECK_VALUE((fc1_weight.dim() == 2 || fc1_weight.dim() == 4) && fc1_weight.numel() == p.R * p.C &&
                        fc1_weight.size(1) == p.C && p.R > 0,
                    "se_fused: fc1_weight must be (R, C=", p.C, "[, 1, 1]); got ", describe(fc1_weight));
  TORCH_CHECK_VALUE((fc2_weight.dim() == 2 || fc2_weight.dim() == 4) && fc2_weight.numel() == p.R * p.C &&
                        fc2_weight.size(0) == p.C && fc2_weight.size(1) == p.R,
                    "se_fused: fc2_weight must be (C=", p.C, ", R=", p.R, "[, 1, 1]); got ", describe(fc2_weight));
  p.activation = parse_activation(activation);
  p.gate = parse_gate(gate);
  return p;
}

void check_small(const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape) {
  check_tensor(name, t, x);
  TORCH_CHECK_VALUE(t.sizes() == shape, "se_fused: ", name, " must have shape ", shape, "; got ", describe(t));
}

}  // namespace

SEProblem check_forward_args(at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                             const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                             c10::optional<at::Tensor>& residual, const std::string& activation,
                             const std::string& gate) {
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), "se_fused: x must be float16, bfloat16, float32 or float64; got ",
                   describe(x));
  check_tensor("fc1_weight", fc1_weight, x);
  check_tensor("fc2_weight", fc2_weight, x);
  SEProblem p = check_shapes(x, fc1_weight, fc2_weight, activation, gate);
  check_small("fc1_bias", fc1_bias, x, {p.R});
  check_small("fc2_bias", fc2_bias, x, {p.C});
  x = kernel_layout(x);
  p.channels_last = is_channels_last(x);
  if (residual.has_value()) {
    check_tensor("residual", *residual, x);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "se_fused: residual must have x's shape ", x.sizes(),
                      "; got ", describe(*residual));
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "se_fused: residual must have x's dtype ",
                     x.scalar_type(), "; got ", describe(*residual));
    residual = contiguous_like(*residual, x);
    p.has_residual = true;
  }
  return p;
}

SEProblem check_backward_args(at::Tensor& grad_out, at::Tensor& x, c10::optional<at::Tensor>& out,
                              const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                              const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& scale,
                              const std::string& activation, const std::string& gate) {
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), "se_fused: x must be a float tensor; got ", describe(x));
  check_tensor("fc1_weight", fc1_weight, x);
  check_tensor("fc2_weight", fc2_weight, x);
  SEProblem p = check_shapes(x, fc1_weight, fc2_weight, activation, gate);
  x = kernel_layout(x);
  p.channels_last = is_channels_last(x);
  check_tensor("grad_out", grad_out, x);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "se_fused: grad_out must have x's shape ", x.sizes(), "; got ",
                    describe(grad_out));
  grad_out = contiguous_like(grad_out.to(x.scalar_type()), x);
  const auto acc = accumulate_type(x.scalar_type());
  for (auto [name, t, cols] : {std::make_tuple("pooled", &pooled, p.C), std::make_tuple("hidden", &hidden, p.R),
                               std::make_tuple("scale", &scale, p.C)}) {
    check_small(name, *t, x, {p.N, cols});
    TORCH_CHECK_TYPE(t->scalar_type() == acc && t->is_contiguous(), "se_fused: ", name, " must be contiguous ",
                     acc, " (as the forward saved it); got ", describe(*t));
  }
  if (out.has_value()) {
    check_tensor("out", *out, x);
    TORCH_CHECK_VALUE(out->sizes() == x.sizes() && out->scalar_type() == x.scalar_type(),
                      "se_fused: out must be the forward's output, shaped and typed like x; got ", describe(*out));
    out = contiguous_like(*out, x);
    p.has_residual = true;
  }
  return p;
}

namespace {

at::Tensor as_matrix(const at::Tensor& w, int64_t rows, int64_t cols, at::ScalarType acc) {
  return w.reshape({rows, cols}).to(acc);
}

at::Tensor apply_activation(const at::Tensor& u, Activation a) {
  return a == Activation::ReLU ? at::relu(u) : at::silu(u);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> excitation_forward(const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                                      const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                                      const at::Tensor& fc2_bias, const SEProblem& p) {
  const auto acc = pooled.scalar_type();
  at::Tensor hidden = at::addmm(fc1_bias.to(acc), pooled, as_matrix(fc1_weight, p.R, p.C, acc).t());
  at::Tensor v = at::addmm(fc2_bias.to(acc), apply_activation(hidden, p.activation),
                           as_matrix(fc2_weight, p.C, p.R, acc).t());
  // Not at::hardsigmoid: on CUDA it multiplies by 1/6 rounded to float32 even for float64.
  at::Tensor scale = p.gate == Gate::Sigmoid ? at::sigmoid(v) : (v + 3).clamp(0, 6) / 6;
  return {hidden.contiguous(), scale.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> excitation_backward(const at::Tensor& ds, const at::Tensor& hidden,
                                                                   const at::Tensor& scale,
                                                                   const at::Tensor& fc1_weight,
                                                                   const at::Tensor& fc2_weight, const SEProblem& p) {
  const auto acc = ds.scalar_type();
  // gate'(v) from s = gate(v): sigmoid s(1-s); hardsigmoid 1/6 exactly where 0 < s < 1. The masked
  // cases select rather than multiply, so an infinite ds does not turn into NaN where the slope is 0
  // (as PyTorch's own hardsigmoid and relu backwards behave).
  at::Tensor dv = p.gate == Gate::Sigmoid ? ds * (scale * (1 - scale))
                                          : at::where(at::logical_and(scale > 0, scale < 1), ds / 6.0,
                                                      at::zeros_like(ds));
  at::Tensor dh = at::mm(dv, as_matrix(fc2_weight, p.C, p.R, acc));
  at::Tensor du;
  if (p.activation == Activation::ReLU) {
    du = at::where(hidden > 0, dh, at::zeros_like(dh));
  } else {
    at::Tensor sig = at::sigmoid(hidden);
    du = dh * (sig * (1 + hidden * (1 - sig)));
  }
  at::Tensor dz = at::mm(du, as_matrix(fc1_weight, p.R, p.C, acc));
  return {dv, du, dz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_gradients(
    const at::Tensor& dv, const at::Tensor& du, const at::Tensor& pooled, const at::Tensor& hidden,
    const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, const SEProblem& p) {
  at::Tensor h = apply_activation(hidden, p.activation);
  at::Tensor dw1 = at::mm(du.t(), pooled).reshape(fc1_weight.sizes()).to(fc1_weight.scalar_type());
  at::Tensor db1 = du.sum(0).to(fc1_weight.scalar_type());
  at::Tensor dw2 = at::mm(dv.t(), h).reshape(fc2_weight.sizes()).to(fc2_weight.scalar_type());
  at::Tensor db2 = dv.sum(0).to(fc2_weight.scalar_type());
  return {dw1, db1, dw2, db2};
}

ForwardResult allocate_forward_outputs(const at::Tensor& x, const SEProblem& p) {
  auto small = x.options().dtype(accumulate_type(x.scalar_type()));
  return {at::empty_like(x), at::empty({p.N, p.C}, small), at::empty({p.N, p.R}, small),
          at::empty({p.N, p.C}, small)};
}

}  // namespace se_fused
