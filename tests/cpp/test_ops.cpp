// C++ test of the se_fused ops as a libtorch user calls them: through the
// dispatcher, by schema name, from the shared library se_fused_ops (CPU).
//
// Ground truth: the SE block of SPEC §1 written here with plain ATen ops and
// differentiated by libtorch's autograd, in float64. Tolerance, as in
// tests/tolerances.py: the op's max-abs error against that truth may be at most
// twice the error of the same ATen reference run in the storage dtype (the
// baseline) plus a floor of 512 eps(dtype) x max|truth|, for the output and for
// every gradient. When the library has CUDA kernels and a GPU is present, the
// same cases run on the GPU too (truth and baseline stay on the CPU). Exit
// status 0 when every case passes.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using BackwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using ForwardSig = ForwardOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const std::optional<Tensor>&, c10::string_view, c10::string_view);
using BackwardSig = BackwardOut(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                                c10::string_view);
using DifferentiableSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const std::optional<Tensor>&, c10::string_view, c10::string_view);

// An op of the library, found through the dispatcher by schema name as a C++ user finds it.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const auto& forward_op() {
  static const auto op = find_op<ForwardSig>("se_fused::squeeze_excitation_forward");
  return op;
}

const auto& backward_op() {
  static const auto op = find_op<BackwardSig>("se_fused::squeeze_excitation_backward");
  return op;
}

const auto& differentiable_op() {
  static const auto op = find_op<DifferentiableSig>("se_fused::squeeze_excitation");
  return op;
}

int failures = 0;
int checks = 0;

#define EXPECT(cond, ...)                              \
  do {                                                 \
    ++checks;                                          \
    if (!(cond)) {                                     \
      ++failures;                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

// ---- the reference: SPEC §1 in ATen ops ------------------------------------------------------------

Tensor activation(const Tensor& u, const std::string& name) {
  return name == "relu" ? at::relu(u) : u * at::sigmoid(u);  // silu(u) = u * sigmoid(u)
}

Tensor gate(const Tensor& v, const std::string& name) {
  // hardsigmoid written as clamp(v + 3, 0, 6) / 6: exact 1/6 slope in float64 (ATen's
  // hardsigmoid_backward multiplies by a float32 1/6).
  return name == "sigmoid" ? at::sigmoid(v) : at::clamp(v + 3.0, 0.0, 6.0) / 6.0;
}

// y = x * gate(W2 act(W1 mean_hw(x) + b1) + b2), or relu(y + residual).
Tensor reference_forward(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                         const std::optional<Tensor>& residual, const std::string& act, const std::string& gt) {
  const int64_t R = w1.size(0), C = w1.size(1);
  Tensor pooled = x.mean({2, 3});
  Tensor hidden = at::linear(pooled, w1.reshape({R, C}), b1);
  Tensor scale = gate(at::linear(activation(hidden, act), w2.reshape({C, R}), b2), gt);
  Tensor y = x * scale.unsqueeze(-1).unsqueeze(-1);
  return residual ? at::relu(y + *residual) : y;
}

struct Result {
  // out, then the gradients of x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual (if any)
  std::vector<Tensor> tensors;
};

const char* kNames[] = {"out", "grad_x", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias",
                        "grad_residual"};

struct Case {
  int64_t N, C, R, H, W;
  bool channels_last, residual;
  std::string act, gate;
};

struct Inputs {
  Tensor x, w1, b1, w2, b2, grad_out;
  std::optional<Tensor> residual;
  Inputs to(at::ScalarType dtype, at::Device device = at::kCPU) const {
    auto cast = [&](const Tensor& t) { return t.to(device, dtype); };  // to() keeps the memory format
    Inputs r{cast(x), cast(w1), cast(b1), cast(w2), cast(b2), cast(grad_out), std::nullopt};
    if (residual) r.residual = cast(*residual);
    return r;
  }
};

// Random inputs, float64 values already rounded to `dtype`, x/residual/grad_out in the case's layout.
Inputs make_inputs(const Case& c, at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto rounded = [&](const Tensor& t) { return t.to(dtype).to(at::kDouble); };
  auto layout = [&](const Tensor& t) {
    return c.channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
  };
  Inputs in;
  // A per-(sample, channel) offset keeps the pooled means O(1).
  in.x = layout(rounded(at::randn({c.N, c.C, c.H, c.W}, f64) + at::randn({c.N, c.C, 1, 1}, f64)));
  in.w1 = rounded(at::randn({c.R, c.C, 1, 1}, f64) * (2.0 / std::sqrt(double(c.C))));
  in.b1 = rounded(at::randn({c.R}, f64) * 0.5);
  in.w2 = rounded(at::randn({c.C, c.R, 1, 1}, f64) * (2.0 / std::sqrt(double(c.R))));
  in.b2 = rounded(at::randn({c.C}, f64) * 0.5);
  in.grad_out = layout(rounded(at::randn({c.N, c.C, c.H, c.W}, f64)));
  if (c.residual) {
    // residual = offset - y with |offset| >= 0.25: about half the outputs are clipped by the
    // epilogue's relu and none sits near its kink, where rounding could flip the mask.
    Tensor y = reference_forward(in.x, in.w1, in.b1, in.w2, in.b2, std::nullopt, c.act, c.gate);
    Tensor sign = at::where(at::rand({c.N, c.C, c.H, c.W}, f64) < 0.5, -1.0, 1.0);
    Tensor offset = sign * (0.25 + at::rand({c.N, c.C, c.H, c.W}, f64));
    in.residual = layout(rounded(offset - y));
  }
  return in;
}

// The reference under autograd, in the inputs' dtype.
Result run_reference(const Inputs& in, const Case& c) {
  std::vector<Tensor> leaves = {in.x, in.w1, in.b1, in.w2, in.b2};
  if (in.residual) leaves.push_back(*in.residual);
  for (auto& t : leaves) t = t.detach().requires_grad_(true);
  std::optional<Tensor> residual;
  if (in.residual) residual = leaves[5];
  Tensor out = reference_forward(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], residual, c.act, c.gate);
  auto grads = torch::autograd::grad({out}, leaves, {in.grad_out});
  Result r;
  r.tensors.push_back(out.detach());
  for (auto& g : grads) r.tensors.push_back(g);
  return r;
}

// The ops, called through the dispatcher as a C++ user would.
Result run_ops(const Inputs& in, const Case& c) {
  auto [out, pooled, hidden, scale] = forward_op().call(in.x, in.w1, in.b1, in.w2, in.b2, in.residual, c.act, c.gate);
  std::optional<Tensor> saved_out;
  if (c.residual) saved_out = out;
  auto [gx, gres, gw1, gb1, gw2, gb2] =
      backward_op().call(in.grad_out, in.x, saved_out, in.w1, in.w2, pooled, hidden, scale, c.act, c.gate);

  // Layout and dtype promises of the schema (csrc/ops.cpp).
  const auto fmt = c.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  EXPECT(out.is_contiguous(fmt) && gx.is_contiguous(fmt), "out/grad_x not in x's memory format");
  const auto acc = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  EXPECT(pooled.scalar_type() == acc && hidden.scalar_type() == acc && scale.scalar_type() == acc,
         "saved intermediates not in the accumulation dtype");
  EXPECT(pooled.sizes() == at::IntArrayRef({c.N, c.C}) && hidden.sizes() == at::IntArrayRef({c.N, c.R}),
         "pooled/hidden shapes");
  EXPECT(gw1.sizes() == in.w1.sizes() && gw2.sizes() == in.w2.sizes() && gw1.scalar_type() == in.w1.scalar_type(),
         "weight gradients not shaped/typed like the weights");
  Result r;
  r.tensors = {out, gx, gw1, gb1, gw2, gb2};
  if (c.residual) r.tensors.push_back(gres);
  for (auto& t : r.tensors) t = t.cpu();
  return r;
}

double max_abs_error(const Tensor& a, const Tensor& ref) {
  if (ref.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - ref).abs().max().item<double>();
}

double eps_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kFloat: return std::numeric_limits<float>::epsilon();
    case at::kHalf: return 9.765625e-4;   // 2^-10
    default: return 7.8125e-3;             // bfloat16: 2^-7
  }
}

std::string describe(const Case& c, at::ScalarType dtype, at::Device device = at::kCPU) {
  char buf[240];
  std::snprintf(buf, sizeof buf, "%s %s N=%ld C=%ld R=%ld H=%ld W=%ld %s %s %s/%s", device.str().c_str(),
                c10::toString(dtype),
                (long)c.N, (long)c.C, (long)c.R, (long)c.H, (long)c.W, c.channels_last ? "channels_last" : "nchw",
                c.residual ? "residual" : "plain", c.act.c_str(), c.gate.c_str());
  return buf;
}

void check_case(const Case& c, at::ScalarType dtype, uint64_t seed, at::Device device = at::kCPU) {
  const Inputs in64 = make_inputs(c, dtype, seed);
  const Inputs in = in64.to(dtype);
  const Result truth = run_reference(in64, c);
  const Result baseline = dtype == at::kDouble ? truth : run_reference(in, c);
  const Result got = run_ops(in64.to(dtype, device), c);
  const std::string what = describe(c, dtype, device);
  EXPECT(got.tensors.size() == truth.tensors.size(), "%s: result count", what.c_str());
  // Floors as tests/tolerances.py: 512 eps for float32/64, one ulp for half types.
  const double floor = (dtype == at::kDouble || dtype == at::kFloat ? 512.0 : 1.0) * eps_of(dtype);
  for (size_t i = 0; i < truth.tensors.size() && i < got.tensors.size(); ++i) {
    const Tensor& ref = truth.tensors[i];
    EXPECT(got.tensors[i].sizes() == ref.sizes(), "%s: %s shape", what.c_str(), kNames[i]);
    if (got.tensors[i].sizes() != ref.sizes()) continue;
    const double err = max_abs_error(got.tensors[i], ref);
    const double base = max_abs_error(baseline.tensors[i], ref);
    const double scale = ref.abs().max().item<double>();
    const double bound = 2.0 * base + floor * scale;
    EXPECT(err <= bound, "%s: %s max-abs error %.3e > bound %.3e (baseline %.3e, max|ref| %.3e)",
           what.c_str(), kNames[i], err, bound, base, scale);
  }
}

// The differentiable op (its autograd is the library's, csrc/squeeze_excitation_autograd.cpp), as C++
// training code calls it: the reference's gradients in float64 (so the bound is the floor); with no
// input requiring grad, and in inference mode, the forward op's output and no graph.
void check_differentiable_op() {
  const auto& op = differentiable_op();
  for (bool residual : {false, true}) {
    const Case c{2, 24, 3, 5, 5, true, residual, "silu", "sigmoid"};
    const Inputs in = make_inputs(c, at::kDouble, 1000 + residual);
    const Result truth = run_reference(in, c);
    std::vector<Tensor> leaves = {in.x, in.w1, in.b1, in.w2, in.b2};
    if (in.residual) leaves.push_back(*in.residual);
    for (auto& t : leaves) t = t.detach().requires_grad_(true);
    std::optional<Tensor> res;
    if (residual) res = leaves[5];
    Tensor out = op.call(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], res, c.act, c.gate);
    out.backward(in.grad_out);
    std::vector<Tensor> got = {out.detach()};
    for (auto& t : leaves) got.push_back(t.grad());
    const double floor = 512.0 * eps_of(at::kDouble);
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT(got[i].defined(), "differentiable op (residual=%d): %s not computed", residual, kNames[i]);
      if (!got[i].defined()) continue;
      const double err = max_abs_error(got[i], truth.tensors[i]);
      const double bound = floor * truth.tensors[i].abs().max().item<double>();
      EXPECT(err <= bound, "differentiable op (residual=%d): %s max-abs error %.3e > %.3e", residual, kNames[i],
             err, bound);
    }
    const Tensor want = std::get<0>(forward_op().call(in.x, in.w1, in.b1, in.w2, in.b2, in.residual, c.act, c.gate));
    const Tensor plain = op.call(in.x, in.w1, in.b1, in.w2, in.b2, in.residual, c.act, c.gate);
    EXPECT(!plain.requires_grad() && at::equal(plain, want), "differentiable op without grad (residual=%d)",
           residual);
    c10::InferenceMode inference;
    const Tensor inferred = op.call(in.x, in.w1, in.b1, in.w2, in.b2, in.residual, c.act, c.gate);
    EXPECT(inferred.is_inference() && at::equal(inferred, want), "differentiable op in inference mode (residual=%d)",
           residual);
  }
}

// An error case must raise c10::Error with a message, never crash.
void check_rejects_bad_input() {
  const auto& forward = forward_op();
  Tensor x = at::randn({2, 8, 3, 3});
  Tensor w1 = at::randn({2, 8, 1, 1}), b1 = at::randn({2}), w2 = at::randn({8, 2, 1, 1}), b2 = at::randn({8});
  bool threw = false;
  try {
    forward.call(x, at::randn({2, 7, 1, 1}), b1, w2, b2, std::nullopt, "relu", "sigmoid");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("fc1_weight") != std::string::npos;
  }
  EXPECT(threw, "a mismatched fc1_weight must raise an error naming fc1_weight");
  threw = false;
  try {
    forward.call(x, w1, b1, w2, b2, std::nullopt, "gelu", "sigmoid");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("activation") != std::string::npos;
  }
  EXPECT(threw, "an unknown activation must raise an error naming it");
}

}  // namespace

int main() {
  // The library registered its ops when it was loaded.
  for (const char* name : {"se_fused::squeeze_excitation_forward", "se_fused::squeeze_excitation_backward",
                           "se_fused::squeeze_excitation"}) {
    const bool found = c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
    EXPECT(found, "op %s not registered: is libse_fused_ops linked (--no-as-needed) and loaded?", name);
    if (!found) return 1;
  }
  const std::vector<Case> shapes = {
      // N, C, R, H, W: an SE-ResNet stage at small size, and SPEC §3's odd shapes.
      {2, 64, 4, 7, 7, false, false, "relu", "sigmoid"},
      {1, 7, 1, 3, 1, false, false, "relu", "sigmoid"},     // N = 1, C = 7, R = 1, H·W = 3
      {2, 37, 3, 7, 7, false, false, "relu", "sigmoid"},    // C prime, H·W = 49
      {3, 37, 1, 1, 1, false, false, "relu", "sigmoid"},    // H·W = 1
      {2, 40, 3, 5, 5, false, false, "relu", "sigmoid"},    // C a multiple of 8, not of 32
  };
  const std::vector<std::pair<std::string, std::string>> options = {
      {"relu", "sigmoid"}, {"relu", "hardsigmoid"}, {"silu", "sigmoid"}, {"silu", "hardsigmoid"}};
  uint64_t seed = 1;
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    for (Case c : shapes) {
      for (bool channels_last : {false, true}) {
        for (bool residual : {false, true}) {
          c.channels_last = channels_last;
          c.residual = residual;
          check_case(c, dtype, seed++);
        }
      }
    }
    // Every activation/gate pair, both layouts and forms, on one shape.
    for (const auto& [act, gt] : options) {
      for (bool channels_last : {false, true}) {
        for (bool residual : {false, true}) {
          check_case({2, 48, 6, 5, 4, channels_last, residual, act, gt}, dtype, seed++);
        }
      }
    }
  }
  // Half types: output and gradients against the float64 truth (baseline: ATen in that dtype).
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (bool channels_last : {false, true}) {
      check_case({2, 64, 4, 7, 7, channels_last, true, "relu", "sigmoid"}, dtype, seed++);
      check_case({2, 40, 3, 5, 5, channels_last, false, "silu", "hardsigmoid"}, dtype, seed++);
    }
  }
  check_rejects_bad_input();
  check_differentiable_op();
  // The CUDA kernels, when this library has them and a GPU is present.
  const bool cuda_kernels = forward_op().hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  if (cuda_kernels && at::hasCUDA()) {
    const int before = checks;
    for (at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
      for (Case c : shapes) {
        for (bool channels_last : {false, true}) {
          for (bool residual : {false, true}) {
            c.channels_last = channels_last;
            c.residual = residual;
            check_case(c, dtype, seed++, at::kCUDA);
          }
        }
      }
    }
    // SPEC §3's conv2_x and conv5_x stages (batch 4), where the kernels pick their large-tensor paths.
    for (bool channels_last : {false, true}) {
      check_case({4, 256, 16, 56, 56, channels_last, true, "relu", "sigmoid"}, at::kBFloat16, seed++, at::kCUDA);
      check_case({4, 2048, 128, 7, 7, channels_last, false, "relu", "sigmoid"}, at::kFloat, seed++, at::kCUDA);
    }
    std::printf("CUDA: %d checks\n", checks - before);
  } else {
    std::printf("CUDA: not run (%s)\n", cuda_kernels ? "no GPU" : "library built without CUDA kernels");
  }
  std::printf("%s: %d of %d checks passed\n", failures ? "FAILED" : "OK", checks - failures, checks);
  return failures ? 1 : 0;
}
