// Fused SE forward and backward on the CPU, in cache-sized chunks of samples.
//
// The batch is cut into chunks small enough to stay in the last-level cache
// between the two sweeps the math needs, so DRAM sees about the minimum:
// forward reads x once and writes out (2T; +T for the residual), backward reads
// grad_out and x once and writes grad_x (3T; +2T for the residual). Per chunk:
//   forward:  channel sums -> the MLP batched over the chunk -> x*s (+res, ReLU)
//   backward: sum g'*x     -> MLP backward over the chunk    -> g'*s + dz/P
// The MLP is the shared ATen code (squeeze_excitation.cpp), so each weight is
// read once per chunk, not once per sample. Samples of a chunk run in parallel
// when there are at least as many as threads, else one at a time with the
// threads inside each. Work inside a sample is cut into fixed blocks reduced
// in block order: results do not depend on the thread count and are bitwise
// reproducible. Weight gradients are fixed-order GEMMs over the whole batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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

// The ReLU of the residual epilogue lets the gradient through wherever its
// output is not <= 0 (NaN included), as PyTorch's threshold_backward does.
template <typename Vec>
Vec relu_mask(Vec g, Vec out) {
  return Vec::blendv(g, Vec(0), out <= Vec(0));
}

// Pixels per block of the NHWC channel sums (fixed, so the summation order
// does not depend on the number of threads).
constexpr int64_t kPixelBlock = 64;

// sums[c] = sum_p a[c, p] * (b ? b[c, p] : 1) over one sample, with a masked
// by the ReLU output `mask_by` when given. Pointers are to the sample's slice.
template <typename scalar_t>
void sample_channel_sums(const SEProblem& p, const scalar_t* a, const scalar_t* b, const scalar_t* mask_by,
                         opmath<scalar_t>* sums) {
  using acc_t = opmath<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t C = p.C, P = p.P;
  auto add = [](Vec x, Vec y) { return x + y; };
  auto mul = [](Vec x, Vec y) { return x * y; };
  if (!p.channels_last) {
    at::parallel_for(0, C, std::max<int64_t>(1, 16384 / P), [&](int64_t begin, int64_t end) {
      RowReader<scalar_t> ra, rb, rm;
      std::vector<acc_t> masked;
      for (int64_t c = begin; c < end; ++c) {
        const acc_t* av = ra.read(a + c * P, P);
        if (mask_by) {
          masked.resize(P);
          at::vec::map2<acc_t>(relu_mask<Vec>, masked.data(), av, rm.read(mask_by + c * P, P), P);
          av = masked.data();
        }
        sums[c] = b ? at::vec::map2_reduce_all<acc_t>(mul, add, av, rb.read(b + c * P, P), P)
                    : at::vec::reduce_all<acc_t>(add, av, P);
      }
    });
    return;
  }
  const int64_t blocks = (P + kPixelBlock - 1) / kPixelBlock;
  std::vector<acc_t> partial(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    RowReader<scalar_t> ra, rb, rm;
    std::vector<acc_t> masked;
    for (int64_t blk = begin; blk < end; ++blk) {
      acc_t* acc = partial.data() + blk * C;
      std::fill(acc, acc + C, acc_t(0));
      for (int64_t q = blk * kPixelBlock; q < std::min(P, (blk + 1) * kPixelBlock); ++q) {
        const acc_t* av = ra.read(a + q * C, C);
        if (mask_by) {
          masked.resize(C);
          at::vec::map2<acc_t>(relu_mask<Vec>, masked.data(), av, rm.read(mask_by + q * C, C), C);
          av = masked.data();
        }
        if (b) {
          at::vec::map3<acc_t>([](Vec s, Vec x, Vec y) { return s + x * y; }, acc, acc, av, rb.read(b + q * C, C), C);
        } else {
          at::vec::map2<acc_t>(add, acc, acc, av, C);
        }
      }
    }
  });
  std::copy(partial.begin(), partial.begin() + C, sums);
  for (int64_t blk = 1; blk < blocks; ++blk) at::vec::map2<acc_t>(add, sums, sums, partial.data() + blk * C, C);
}

// Calls f(channel_or_-1, offset, length) for every row of one sample, in
// parallel: NCHW rows are channels (P elements), NHWC rows are pixels (C elements).
template <typename F>
void for_each_sample_row(const SEProblem& p, const F& f) {
  const int64_t rows = p.channels_last ? p.P : p.C;
  const int64_t len = p.channels_last ? p.C : p.P;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) f(p.channels_last ? int64_t(-1) : row, row * len, len);
  });
}

// out = x * s (+ residual, ReLU) over one sample.
template <typename scalar_t>
void sample_scale_forward(const SEProblem& p, const scalar_t* x, const scalar_t* residual,
                          const opmath<scalar_t>* scale, scalar_t* out) {
  using acc_t = opmath<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  for_each_sample_row(p, [&](int64_t c, int64_t off, int64_t len) {
    thread_local RowReader<scalar_t> rx, rr;
    thread_local RowWriter<scalar_t> wo;
    const acc_t* xv = rx.read(x + off, len);
    acc_t* ov = wo.open(out + off, len);
    if (c < 0) {  // NHWC: a pixel's channels against the scale vector
      if (residual) {
        at::vec::map3<acc_t>([](Vec a, Vec s, Vec r) { return at::vec::maximum(a * s + r, Vec(0)); }, ov, xv, scale,
                             rr.read(residual + off, len), len);
      } else {
        at::vec::map2<acc_t>([](Vec a, Vec s) { return a * s; }, ov, xv, scale, len);
      }
    } else {
      const Vec s(scale[c]);
      if (residual) {
        at::vec::map2<acc_t>([s](Vec a, Vec r) { return at::vec::maximum(a * s + r, Vec(0)); }, ov, xv,
                             rr.read(residual + off, len), len);
      } else {
        at::vec::map<acc_t>([s](Vec a) { return a * s; }, ov, xv, len);
      }
    }
    wo.commit();
  });
}

// grad_x = g' * s + dz/P, and grad_residual = g' (g' = grad_out masked by the
// ReLU output) when `out` is given, over one sample.
template <typename scalar_t>
void sample_scale_backward(const SEProblem& p, const scalar_t* grad_out, const scalar_t* out,
                           const opmath<scalar_t>* scale, const opmath<scalar_t>* dz_over_p, scalar_t* grad_x,
                           scalar_t* grad_res) {
  using acc_t = opmath<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  for_each_sample_row(p, [&](int64_t c, int64_t off, int64_t len) {
    thread_local RowReader<scalar_t> rg, ro;
    thread_local RowWriter<scalar_t> wx, wr;
    const acc_t* gv = rg.read(grad_out + off, len);
    if (out) {
      acc_t* masked = wr.open(grad_res + off, len);
      at::vec::map2<acc_t>(relu_mask<Vec>, masked, gv, ro.read(out + off, len), len);
      gv = masked;
    }
    acc_t* dx = wx.open(grad_x + off, len);
    if (c < 0) {
      at::vec::map3<acc_t>([](Vec g, Vec s, Vec d) { return g * s + d; }, dx, gv, scale, dz_over_p, len);
    } else {
      const Vec s(scale[c]), d(dz_over_p[c]);
      at::vec::map<acc_t>([s, d](Vec g) { return g * s + d; }, dx, gv, len);
    }
    wx.commit();
    if (out) wr.commit();
  });
}

// Runs f(n) for the samples [n0, n1): in parallel when there are enough of
// them to feed every thread, else one after another with the threads inside
// each (at::parallel_for nested in a parallel region runs inline).
template <typename F>
void for_each_sample(int64_t n0, int64_t n1, const F& f) {
  if (n1 - n0 >= at::get_num_threads()) {
    at::parallel_for(n0, n1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) f(n);
    });
  } else {
    for (int64_t n = n0; n < n1; ++n) f(n);
  }
}

// Samples per chunk: as many as keep `bytes_per_sample` (the bytes the second
// sweep reads again) within the cache budget, at least one.
// SE_FUSED_CPU_CHUNK_BYTES overrides the budget (8 MiB: a share of a typical
// last-level cache that leaves room for the outputs streaming past).
int64_t samples_per_chunk(int64_t bytes_per_sample) {
  static const int64_t budget = [] {
    const char* env = std::getenv("SE_FUSED_CPU_CHUNK_BYTES");
    return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : int64_t(8) << 20;
  }();
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_sample));
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
    const int64_t slice = p.C * p.P;
    const int64_t chunk = samples_per_chunk(slice * static_cast<int64_t>(sizeof(scalar_t)));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t* zp = pooled.mutable_data_ptr<acc_t>();
    for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
      const int64_t n1 = std::min(p.N, n0 + chunk);
      for_each_sample(n0, n1, [&](int64_t n) {
        acc_t* z = zp + n * p.C;
        sample_channel_sums<scalar_t>(p, xp + n * slice, nullptr, nullptr, z);
        const acc_t inv_p = acc_t(1) / static_cast<acc_t>(p.P);
        for (int64_t c = 0; c < p.C; ++c) z[c] *= inv_p;
      });
      auto [h, s] = excitation_forward(pooled.narrow(0, n0, n1 - n0), fc1_weight, fc1_bias, fc2_weight, fc2_bias, p);
      hidden.narrow(0, n0, n1 - n0).copy_(h);
      scale.narrow(0, n0, n1 - n0).copy_(s);
      const acc_t* sp = scale.const_data_ptr<acc_t>();
      for_each_sample(n0, n1, [&](int64_t n) {
        sample_scale_forward<scalar_t>(p, xp + n * slice, rp ? rp + n * slice : nullptr, sp + n * p.C,
                                       op + n * slice);
      });
    }
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
  at::Tensor dv = at::zeros({p.N, p.C}, pooled.options());
  at::Tensor du = at::zeros({p.N, p.R}, pooled.options());
  at::Tensor ds = at::zeros({p.N, p.C}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excitation_backward_cpu", [&] {
    using acc_t = opmath<scalar_t>;
    const int64_t slice = p.C * p.P;
    // The second sweep reads grad_out (and out) again.
    const int64_t chunk = samples_per_chunk(slice * static_cast<int64_t>(sizeof(scalar_t)) * (out ? 2 : 1));
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = out ? out->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* grp = p.has_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    acc_t* dsp = ds.mutable_data_ptr<acc_t>();
    for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
      const int64_t n1 = std::min(p.N, n0 + chunk), g = n1 - n0;
      for_each_sample(n0, n1, [&](int64_t n) {
        const int64_t off = n * slice;
        sample_channel_sums<scalar_t>(p, gp + off, xp + off, op ? op + off : nullptr, dsp + n * p.C);
      });
      auto [dv_c, du_c, dz_c] = excitation_backward(ds.narrow(0, n0, g), hidden.narrow(0, n0, g),
                                                    scale.narrow(0, n0, g), fc1_weight, fc2_weight, p);
      dv.narrow(0, n0, g).copy_(dv_c);
      du.narrow(0, n0, g).copy_(du_c);
      const at::Tensor dz_over_p = (dz_c / static_cast<double>(p.P)).contiguous();
      const acc_t* dzp = dz_over_p.const_data_ptr<acc_t>();
      for_each_sample(n0, n1, [&](int64_t n) {
        const int64_t off = n * slice;
        sample_scale_backward<scalar_t>(p, gp + off, op ? op + off : nullptr, sp + n * p.C, dzp + (n - n0) * p.C,
                                        gxp + off, grp ? grp + off : nullptr);
      });
    }
  });
  auto [dw1, db1, dw2, db2] = weight_gradients(dv, du, pooled, hidden, fc1_weight, fc2_weight, p);
  return {grad_x, grad_res, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_fused, CPU, m) {
  m.impl("squeeze_excitation_forward", &squeeze_excitation_forward_cpu);
  m.impl("squeeze_excitation_backward", &squeeze_excitation_backward_cpu);
}

}  // namespace se_fused
