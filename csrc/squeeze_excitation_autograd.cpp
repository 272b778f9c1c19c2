// se_fused::squeeze_excitation: the forward op made differentiable in C++.
//
// The Python autograd.Function (se_fused/function.py) costs its Python on
// every call: on the 2-core EPYC VM a forward+backward through it took ~90 us
// more than the two ops alone at tiny shapes, and 250-300 us more at conv4_x
// (the interpreter runs cold after a sweep over megabytes). Here the graph node
// is a C++ torch::autograd::Function, so the backward runs without Python, and
// libtorch C++ users get a differentiable op too. The compiled backends (cpu,
// cuda) are called through this op; see se_fused/function.py. Forward+backward
// through autograd, float32 NCHW batch 8, interleaved, the autograd.Function
// against this op: tiny shape 132 -> 78 us, conv4_x 1499 -> 1392 us, conv5_x
// 1097 -> 956 us.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

#include "squeeze_excitation.h"

namespace se_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ForwardResult call_forward(const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                           const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                           const c10::optional<at::Tensor>& residual, c10::string_view activation,
                           c10::string_view gate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("se_fused::squeeze_excitation_forward", "")
                             .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&,
                                                  const c10::optional<at::Tensor>&, c10::string_view,
                                                  c10::string_view)>();
  return op.call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate);
}

BackwardResult call_backward(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                             const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, const at::Tensor& pooled,
                             const at::Tensor& hidden, const at::Tensor& scale, c10::string_view activation,
                             c10::string_view gate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("se_fused::squeeze_excitation_backward", "")
                             .typed<BackwardResult(const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, c10::string_view, c10::string_view)>();
  return op.call(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale, activation, gate);
}

// The kernels compute their small MLP in float32 (CUDA: ATen's addmm/mm), which
// autocast would re-type; the inputs were already cast by the caller.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The backward op has no derivative of its own. With create_graph (a gradient
// penalty, Hessian-vector products) the gradients are passed through this
// node, which raises when anything differentiates them, rather than letting
// them act as constants and give second derivatives without this block's
// terms, silently. Its inputs include the tensors the gradients depend on (x
// and the weights), so a second backward towards those reaches it. The Python
// autograd paths do the same (se_fused/_once.py).
class NotTwiceDifferentiable : public torch::autograd::Function<NotTwiceDifferentiable> {
 public:
  static variable_list forward(AutogradContext*, at::TensorList grads, at::TensorList depends_on) {
    return grads.vec();
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "se_fused: the fused SE block is differentiable once: its backward has no derivative, so a "
                "double backward (create_graph=True, e.g. a gradient penalty) cannot go through it; "
                "se_fused.SEBlock (plain PyTorch ops) can");
    return {};
  }
};

// grads unchanged, or (when the engine records a graph of the backward) routed
// through NotTwiceDifferentiable, depending on `depends_on`.
variable_list once_differentiable(variable_list grads, const variable_list& depends_on) {
  if (!at::GradMode::is_enabled()) return grads;
  std::vector<at::Tensor> defined, inputs;
  for (const auto& g : grads) {
    if (g.defined()) defined.push_back(g);
  }
  for (const auto& t : depends_on) {
    if (t.defined() && t.requires_grad()) inputs.push_back(t);
  }
  if (inputs.empty()) return grads;
  const variable_list guarded = NotTwiceDifferentiable::apply(at::TensorList(defined), at::TensorList(inputs));
  auto next = guarded.begin();
  for (auto& g : grads) {
    if (g.defined()) g = *next++;
  }
  return grads;
}

class SqueezeExcitationFunction : public torch::autograd::Function<SqueezeExcitationFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fc1_weight,
                            const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                            const c10::optional<at::Tensor>& residual, c10::string_view activation,
                            c10::string_view gate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    NoAutocast no_autocast;
    auto [out, pooled, hidden, scale] =
        call_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate);
    // Saved: what the backward op reads; in the residual form the output (its sign is the ReLU mask).
    ctx->save_for_backward(
        {x, residual.has_value() ? out : at::Tensor(), fc1_weight, fc2_weight, pooled, hidden, scale});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["gate"] = std::string(gate);
    ctx->saved_data["fc1_bias_dtype"] = static_cast<int64_t>(fc1_bias.scalar_type());
    ctx->saved_data["fc2_bias_dtype"] = static_cast<int64_t>(fc2_bias.scalar_type());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const variable_list saved = ctx->get_saved_variables();
    const c10::optional<at::Tensor> out = saved[1].defined() ? c10::optional<at::Tensor>(saved[1]) : c10::nullopt;
    variable_list grads;
    {
      NoAutocast no_autocast;
      at::NoGradGuard no_grad;  // the op records nothing (see once_differentiable)
      auto [grad_x, grad_residual, grad_w1, grad_b1, grad_w2, grad_b2] =
          call_backward(grad_out, saved[0], out, saved[2], saved[3], saved[4], saved[5], saved[6],
                        ctx->saved_data["activation"].toStringRef(), ctx->saved_data["gate"].toStringRef());
      // The backward op types bias gradients like the weights; autograd wants each like its input.
      auto like_bias = [&](const at::Tensor& g, const char* key) {
        return g.to(static_cast<at::ScalarType>(ctx->saved_data[key].toInt()));
      };
      grads = {grad_x, grad_w1, like_bias(grad_b1, "fc1_bias_dtype"), grad_w2, like_bias(grad_b2, "fc2_bias_dtype"),
               out.has_value() ? grad_residual : at::Tensor()};
    }
    grads = once_differentiable(std::move(grads), {saved[0], saved[2], saved[3]});  // x, fc1_weight, fc2_weight
    grads.resize(8);  // none for activation and gate
    return grads;
  }
};

at::Tensor squeeze_excitation_autograd(const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                                       const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                                       const c10::optional<at::Tensor>& residual, c10::string_view activation,
                                       c10::string_view gate) {
  return SqueezeExcitationFunction::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate);
}

// Below autograd (inference mode, tensors that need no graph): the forward op's output alone.
at::Tensor squeeze_excitation_no_grad(const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                                      const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                                      const c10::optional<at::Tensor>& residual, c10::string_view activation,
                                      c10::string_view gate) {
  NoAutocast no_autocast;
  return std::get<0>(call_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation, gate));
}

}  // namespace

TORCH_LIBRARY_IMPL(se_fused, Autograd, m) {
  m.impl("squeeze_excitation", &squeeze_excitation_autograd);
}

TORCH_LIBRARY_IMPL(se_fused, CompositeExplicitAutograd, m) {
  m.impl("squeeze_excitation", &squeeze_excitation_no_grad);
}

}  // namespace se_fused
