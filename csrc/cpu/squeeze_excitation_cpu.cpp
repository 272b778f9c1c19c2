// Fused SE forward and backward on the CPU.
//
// Forward, two sweeps over x: (1) pool every (sample, channel) in float32,
// (2) after the batched MLP, write x*s (+ residual, ReLU) in one pass.
// Backward, two sweeps: (1) ds = sum_p g*x with the ReLU mask applied on the
// fly, (2) dx = g*s + dz/P (and dresidual = g) in one pass. No full-size
// temporaries; rows are converted to float32 in small thread-local buffers.
// NCHW rows are channels (P elements); NHWC rows are pixels (C elements).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../squeeze_excitation.h"

namespace se_fused {
namespace {

template <typename T>
using opmath = at::opmath_type<T>;

// A row of storage elements seen in the accumulation type: read in place when
// the types agree, else converted into a buffer the reader owns.
template <typename scalar_t>
class RowReader {
 public:
  using acc_t = opmath<scalar_t>;
  const acc_t* read(const scalar_t* src, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      buf_.resize(n);
      at::vec::convert(src, buf_.data(), n);
      return buf_.data();
    }
  }

 private:
  std::vector<acc_t> buf_;
};

// A row to be written as storage, computed in the accumulation type.
template <typename scalar_t>
class RowWriter {
 public:
  using acc_t = opmath<scalar_t>;
  acc_t* open(scalar_t* dst, int64_t n) {
    dst_ = dst;
    n_ = n;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return dst;
    } else {
      buf_.resize(n);
      return buf_.data();
    }
  }
  void commit() {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(buf_.data(), dst_, n_);
  }

 private:
  std::vector<acc_t> buf_;
  scalar_t* dst_ = nullptr;
  int64_t n_ = 0;
};

// Work items are (sample, channel block) for the reductions, so each item owns
// its outputs: no atomics, a fixed summation order, bitwise reproducible.
constexpr int64_t kChannelBlock = 64;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_item));
}

// sum_p a[n,c,p] * (b ? b[n,c,p] : 1), the ReLU mask of `mask_by` applied to a,
// into out[n,c] (accumulation type, (N, C) contiguous).
template <typename scalar_t>
void channel_sums(const SEProblem& p, const scalar_t* a, const scalar_t* b, const scalar_t* mask_by,
                  opmath<scalar_t>* out) {
  using acc_t = opmath<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t N = p.N, C = p.C, P = p.P;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  auto masked = [](Vec g, Vec o) { return Vec::blendv(g, Vec(0), o <= Vec(0)); };
  at::parallel_for(0, N * blocks, grain_for(kChannelBlock * P), [&](int64_t begin, int64_t end) {
    RowReader<scalar_t> ra, rb, rm;
    std::vector<acc_t> masked_row, sums(kChannelBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      if (!p.channels_last) {
        for (int64_t c = c0; c < c0 + cb; ++c) {
          const int64_t off = (n * C + c) * P;
          const acc_t* av = ra.read(a + off, P);
          if (mask_by) {
            masked_row.resize(P);
            at::vec::map2<acc_t>(masked, masked_row.data(), av, rm.read(mask_by + off, P), P);
            av = masked_row.data();
          }
          out[n * C + c] = b ? at::vec::map2_reduce_all<acc_t>([](Vec x, Vec y) { return x * y; },
                                                               [](Vec x, Vec y) { return x + y; }, av,
                                                               rb.read(b + off, P), P)
                             : at::vec::reduce_all<acc_t>([](Vec x, Vec y) { return x + y; }, av, P);
        }
      } else {
        std::fill(sums.begin(), sums.begin() + cb, acc_t(0));
        for (int64_t q = 0; q < P; ++q) {
          const int64_t off = (n * P + q) * C + c0;
          const acc_t* av = ra.read(a + off, cb);
          if (mask_by) {
            masked_row.resize(cb);
            at::vec::map2<acc_t>(masked, masked_row.data(), av, rm.read(mask_by + off, cb), cb);
            av = masked_row.data();
          }
          if (b) {
            at::vec::map3<acc_t>([](Vec s, Vec x, Vec y) { return s + x * y; }, sums.data(), sums.data(), av,
                                 rb.read(b + off, cb), cb);
          } else {
            at::vec::map2<acc_t>([](Vec s, Vec x) { return s + x; }, sums.data(), sums.data(), av, cb);
          }
        }
        std::copy(sums.begin(), sums.begin() + cb, out + n * C + c0);
      }
    }
  });
}

// Calls f(n, c0, count, offset) for every row of the tensor: NCHW rows are one
// channel (count = P, c0 = its channel), NHWC rows one pixel (count = C, c0 = 0).
template <typename F>
void for_each_row(const SEProblem& p, const F& f) {
  const int64_t rows = p.channels_last ? p.N * p.P : p.N * p.C;
  const int64_t len = p.channels_last ? p.C : p.P;
  at::parallel_for(0, rows, grain_for(len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (p.channels_last) {
        f(row / p.P, int64_t(0), len, row * len);
      } else {
        f(row / p.C, row % p.C, len, row * len);
      }
    }
  });
}

template <typename scalar_t>
void scale_forward(const SEProblem& p, const scalar_t* x, const scalar_t* residual,
                   const opmath<scalar_t>* scale, scalar_t* out) {
  using acc_t = opmath<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const bool cl = p.channels_last;
  for_each_row(p, [&](int64_t n, int64_t c0, int64_t len, int64_t off) {
    thread_local RowReader<scalar_t> rx, rr;
    thread_local RowWriter<scalar_t> wo;
    const acc_t* xv = rx.read(x + off, len);
    acc_t* ov = wo.open(out + off, len);
    if (cl) {
      const acc_t* s = scale + n * p.C;
      if (residual) {
        at::vec::map3<acc_t>([](Vec a, Vec sv, Vec r) { return at::vec::maximum(a * sv + r, Vec(0)); }, ov, xv, s,
                             rr.read(residual + off, len), len);
      } else {
        at::vec::map2<acc_t>([](Vec a, Vec sv) { return a * sv; }, ov, xv, s, len);
      }
    } else {
      const Vec sv(scale[n * p.C + c0]);
      if (residual) {
        at::vec::map2<acc_t>([sv](Vec a, Vec r) { return at::vec::maximum(a * sv + r, Vec(0)); }, ov, xv,
                             rr.read(residual + off, len), len);
      } else {
        at::vec::map<acc_t>([sv](Vec a) { return a * sv; }, ov, xv, len);
      }
    }
    wo.commit();
  });
}

template <typename scalar_t>
void scale_backward(const SEProblem& p, const scalar_t* grad_out, const scalar_t* out, const opmath<scalar_t>* scale,
                    const opmath<scalar_t>* dz_over_p, scalar_t* grad_x, scalar_t* grad_res) {
  using acc_t = opmath<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const bool cl = p.channels_last;
  for_each_row(p, [&](int64_t n, int64_t c0, int64_t len, int64_t off) {
    thread_local RowReader<scalar_t> rg, ro;
    thread_local RowWriter<scalar_t> wx, wr;
    const acc_t* gv = rg.read(grad_out + off, len);
    if (out) {
      acc_t* masked = wr.open(grad_res + off, len);
      at::vec::map2<acc_t>([](Vec g, Vec o) { return Vec::blendv(g, Vec(0), o <= Vec(0)); }, masked, gv,
                           ro.read(out + off, len), len);
      gv = masked;
    }
    acc_t* dx = wx.open(grad_x + off, len);
    if (cl) {
      at::vec::map3<acc_t>([](Vec g, Vec s, Vec d) { return g * s + d; }, dx, gv, scale + n * p.C,
                           dz_over_p + n * p.C, len);
    } else {
      const Vec s(scale[n * p.C + c0]), d(dz_over_p[n * p.C + c0]);
      at::vec::map<acc_t>([s, d](Vec g) { return g * s + d; }, dx, gv, len);
    }
    wx.commit();
    if (out) wr.commit();
  });
}

ForwardResult squeeze_excitation_forward_cpu(const at::Tensor& x_in, const at::Tensor& fc1_weight,
                                             const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                             const at::Tensor& fc2_bias, const c10::optional<at::Tensor>& residual_in,
                                             c10::string_view activation, c10::string_view gate) {
  at::Tensor x = x_in;
  c10::optional<at::Tensor> residual = residual_in;
  const SEProblem p = check_forward_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
                                         std::string(activation), std::string(gate));
  auto [out, pooled, hidden, scale] = allocate_forward_outputs(x, p);
  if (p.N == 0) return {out, pooled, hidden, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excitation_forward_cpu", [&] {
    using acc_t = opmath<scalar_t>;
    channel_sums<scalar_t>(p, x.const_data_ptr<scalar_t>(), nullptr, nullptr, pooled.mutable_data_ptr<acc_t>());
    pooled.div_(static_cast<double>(p.P));
    std::tie(hidden, scale) = excitation_forward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, p);
    scale_forward<scalar_t>(p, x.const_data_ptr<scalar_t>(),
                            residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                            scale.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return {out, pooled, hidden, scale};
}

BackwardResult squeeze_excitation_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                               const c10::optional<at::Tensor>& out_in,
                                               const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                                               const at::Tensor& pooled, const at::Tensor& hidden,
                                               const at::Tensor& scale, c10::string_view activation,
                                               c10::string_view gate) {
  at::Tensor grad_out = grad_out_in, x = x_in;
  c10::optional<at::Tensor> out = out_in;
  const SEProblem p = check_backward_args(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden, scale,
                                          std::string(activation), std::string(gate));
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_res = p.has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor ds = at::empty({p.N, p.C}, pooled.options());
  if (p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excitation_backward_cpu",
                                    [&] {
      using acc_t = opmath<scalar_t>;
      const scalar_t* o = out ? out->const_data_ptr<scalar_t>() : nullptr;
      channel_sums<scalar_t>(p, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), o,
                             ds.mutable_data_ptr<acc_t>());
    });
  } else {
    ds.zero_();
  }
  auto [dv, du, dz] = excitation_backward(ds, hidden, scale, fc1_weight, fc2_weight, p);
  if (p.N > 0) {
    at::Tensor dz_over_p = (dz / static_cast<double>(p.P)).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excitation_dx_cpu", [&] {
      using acc_t = opmath<scalar_t>;
      scale_backward<scalar_t>(p, grad_out.const_data_ptr<scalar_t>(),
                               out ? out->const_data_ptr<scalar_t>() : nullptr, scale.const_data_ptr<acc_t>(),
                               dz_over_p.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                               p.has_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr);
    });
  }
  auto [dw1, db1, dw2, db2] = weight_gradients(dv, du, pooled, hidden, fc1_weight, fc2_weight, p);
  return {grad_x, grad_res, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_fused, CPU, m) {
  m.impl("squeeze_excitation_forward", &squeeze_excitation_forward_cpu);
  m.impl("squeeze_excitation_backward", &squeeze_excitation_backward_cpu);
}

}  // namespace se_fused
