// Fused SE forward and backward on the CPU, in cache-sized chunks of samples.
//
// The batch is cut into chunks small enough to stay in the last-level cache
// between the two sweeps the math needs, so DRAM sees about the minimum:
// forward reads x once and writes out (2T; +T for the residual), backward reads
// grad_out and x once and writes grad_x (3T; +2T for the residual). Per chunk:
//   forward:  channel sums -> the MLP batched over the chunk -> x*s (+res, ReLU)
//   backward: sum g'*x     -> MLP backward over the chunk    -> g'*s + dz/P
// (residual form: the first backward sweep writes g' = grad_out·[out > 0],
// the residual's gradient, and the second reads it instead of grad_out and out).
// The MLP (excitation_cpu.h) is batched over the chunk, so each weight is read
// once per chunk, not once per sample. A sweep cuts every sample of the chunk
// into the same fixed blocks of rows and spreads all of them over the threads
// (a chunk of 5 samples keeps 2 threads busy); partial sums are reduced in
// block order, so results do not depend on the thread count and are bitwise
// reproducible. Weight gradients are summed over the whole batch in sample order.
// 16-bit tensors (and parameters stored like x) are read in place and widened
// to float32 in registers (cpu::load_as), and outputs narrowed the same way.
// Outputs larger than the cache budget, over 1 MiB in long rows, or over
// 2 MiB in NCHW are written with streaming stores: NHWC row by row, NCHW as a
// flat sweep over each block of rows (see kCacheBudgetBytes, stream_outputs).
// Tried and dropped on a 2-core EPYC VM: streaming NCHW conv4_x's outputs
// through a staging buffer (forward scale sweep 425 against 289 us); an
// earlier flat sweep (NCHW forward+backward 1.5-1.6 against 1.3-1.4 ms, with
// or without streaming; the flat sweep of cpu::stream_rows, measured
// interleaved, gains: see kStreamFlatMinBytes); the second sweep walking each
// thread's share backwards (to start in what the first sweep left in L2);
// chunk budgets of 2 or 16 MiB, and (measured again) one sample per chunk,
// whose second sweep reads from L2; streaming the weight gradients (conv5_x
// backward 566-606 against 516-547 us); summing short NCHW rows 8 at a time
// with one reduction (1.6x faster on rows of 49 floats in cache, but the
// conv5_x backward went 0.77 -> 0.98 ms); and
// handing out every block of a sweep to whichever thread is free (the
// threads then alternate blocks: no gain, where fixed contiguous shares of
// three quarters and the rest claimed did gain, see for_each_row_block). At
// conv3_x-conv5_x the sweeps run at about the VM's DRAM bandwidth: over the
// same cold NCHW data the channel sums take as long as eager's
// x.sum(dim=(2, 3)) (conv4_x 216-244 against 188-225 us, conv5_x 119-130
// against 107-132 us) and the forward's scale sweep as long as x.clone(). The
// fixed costs decide the rest: the MLP (at conv5_x about as long as all the
// sweeps, its 1 MB weights read in each direction and their gradients
// written) and autograd (the differentiable op's C++ node: ~55 us per
// forward+backward at tiny shapes, against ~105 us through the Python
// autograd.Function, see csrc/squeeze_excitation_autograd.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "../squeeze_excitation.h"
#include "cpu_kernel_build.h"
#include "excitation_cpu.h"

namespace se_fused {
namespace {

template <typename T>
using opmath = at::opmath_type<T>;

// n values of T left uninitialised (a std::vector zeroes them on every
// call), for scratch that is written before it is read.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(new T[n]) {}
  T* data() { return data_.get(); }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
};

// The ReLU of the residual epilogue lets the gradient through wherever its
// output is not <= 0 (NaN included), as PyTorch's threshold_backward does.
template <typename V>
V relu_mask(V g, V out) {
  return V::blendv(g, V(0), out <= V(0));
}

template <typename T>
using Vec = cpu::Vec<T>;

// sum_k a[k] (* b[k] when kDot) over n values, in the accumulation type T
// (a and b read as T: cpu::load_as): four interleaved vector accumulators
// (independent add chains), the tail as one masked vector, then the lanes in
// a fixed order (16-bit inputs: the lanes, then the tail element by element).
template <bool kDot, typename T, typename A, typename B>
T row_sum(const A* a, const B* b, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  auto add = [](const Vec<T>& acc, const Vec<T>& x, const Vec<T>& y) {
    if constexpr (kDot) {
      return at::vec::fmadd(x, y, acc);
    } else {
      return acc + x;
    }
  };
  auto load = [](const auto* p, int64_t k) { return cpu::load_as<T>(p + k); };
  Vec<T> acc[4] = {Vec<T>(0), Vec<T>(0), Vec<T>(0), Vec<T>(0)};
  int64_t k = 0;
  for (; k + 4 * L <= n; k += 4 * L) {
    for (int64_t i = 0; i < 4; ++i)
      acc[i] = add(acc[i], load(a, k + i * L), kDot ? load(b, k + i * L) : Vec<T>(0));
  }
  for (; k + L <= n; k += L) acc[0] = add(acc[0], load(a, k), kDot ? load(b, k) : Vec<T>(0));
  if constexpr (std::is_same_v<A, T> && std::is_same_v<B, T>) {
    if (k < n) {
      acc[1] = add(acc[1], cpu::load_partial(a + k, n - k), kDot ? cpu::load_partial(b + k, n - k) : Vec<T>(0));
    }
    return cpu::sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
  } else {  // 16-bit elements have no masked load: the tail one by one, after the lanes
    T sum = cpu::sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; k < n; ++k) sum += kDot ? T(a[k]) * T(b[k]) : T(a[k]);
    return sum;
  }
}

// Elements per work item of a sweep. Every sample is cut into the same fixed
// blocks of rows whatever the thread count, so sums are formed in one order
// and results are bitwise reproducible.
constexpr int64_t kBlockElements = 16384;

// How the sweeps cut a sample: NCHW rows are channels (P elements), NHWC rows
// are pixels (C elements); `block` rows per work item.
struct RowBlocks {
  int64_t rows, length, block, per_sample;
  explicit RowBlocks(const SEProblem& p)
      : rows(p.channels_last ? p.P : p.C),
        length(p.channels_last ? p.C : p.P),
        block(std::max<int64_t>(1, kBlockElements / length)),
        per_sample((rows + block - 1) / block) {}
};

// Calls f(n, item, row_begin, row_end) for every block of rows of the samples
// [n0, n1) (item counts from 0 at n0), all of them in one parallel region.
// Each thread first sweeps an equal, contiguous share of three quarters of
// the items (one sequential stream), then claims the rest one at a time, so a
// thread that runs slower takes fewer of them instead of holding up the end
// of the sweep: on the 2-core VM one thread often ran ~35% slower than the
// other over the same rows. In interleaved A/B runs: raw conv4_x forward and
// backward 22% faster; the module's forward+backward faster in 8 of 10
// (stage, layout) pairs by up to 11%, the other two within 4%. Which thread
// runs an item changes no result.
template <typename F>
void for_each_row_block(const RowBlocks& b, int64_t n0, int64_t n1, const F& f) {
  const int64_t items = (n1 - n0) * b.per_sample;
  auto run = [&](int64_t i) {
    const int64_t r0 = (i % b.per_sample) * b.block;
    f(n0 + i / b.per_sample, i, r0, std::min(b.rows, r0 + b.block));
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < items; ++i) run(i);
    return;
  }
  const int64_t share = items * 3 / 4 / threads;
  std::atomic<int64_t> next{share * threads};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0 * share; i < t1 * share; ++i) run(i);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      run(i);
    }
  });
}

// Whether row r of a block ending at r1 may be swept in whole vectors
// (cpu::map_row_padded, cpu::write_row's `padded`): NCHW only (an NHWC
// row's per-channel inputs end with the row), and only if the block's
// following rows cover the overrun: rows are read in place, and written in
// place (float32, float64) by this thread, which rewrites the following rows
// afterwards.
template <typename acc_t>
bool padded_row(const SEProblem& p, int64_t r, int64_t r1, int64_t len) {
  constexpr int64_t L = Vec<acc_t>::size();
  return !p.channels_last && (r1 - r) * len >= (len + L - 1) / L * L;
}

// sums[n - n0, c] = sum_p a[n, c, p] * (b ? b[n, c, p] : 1) for the samples
// [n0, n1). With `mask_by` (the residual form's output), a is first masked by
// its ReLU (a' = a where mask_by > 0) and a' is written to `masked_out`: the
// residual's gradient, which the second sweep then reads instead of a and
// mask_by. `partial` is scratch for the NHWC per-block sums.
template <typename scalar_t>
void channel_sums(const SEProblem& p, int64_t n0, int64_t n1, const scalar_t* a, const scalar_t* b,
                  const scalar_t* mask_by, scalar_t* masked_out, opmath<scalar_t>* sums,
                  std::vector<opmath<scalar_t>>& partial) {
  using acc_t = opmath<scalar_t>;
  const RowBlocks blocks(p);
  const int64_t slice = p.C * p.P, len = blocks.length;
  auto plus = [](Vec<acc_t> s, Vec<acc_t> x) { return s + x; };
  if (p.channels_last) partial.resize((n1 - n0) * blocks.per_sample * p.C);
  for_each_row_block(blocks, n0, n1, [&](int64_t n, int64_t item, int64_t r0, int64_t r1) {
    acc_t* acc = p.channels_last ? partial.data() + item * p.C : nullptr;
    if (acc) std::fill(acc, acc + p.C, acc_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = n * slice + r * len;
      const scalar_t* bv = b ? b + off : nullptr;
      // av: the row of a, or (masked) of the residual's gradient just written.
      auto accumulate = [&](const auto* av) {
        if (acc) {  // NHWC: this pixel's channels into the block's partial sums
          if (bv) {
            cpu::map_row<acc_t>([](Vec<acc_t> s, Vec<acc_t> x, Vec<acc_t> y) { return at::vec::fmadd(x, y, s); },
                                acc, len, acc, av, bv);
          } else {
            cpu::map_row<acc_t>(plus, acc, len, acc, av);
          }
        } else {  // NCHW: the whole channel
          sums[(n - n0) * p.C + r] = bv ? row_sum<true, acc_t>(av, bv, len) : row_sum<false, acc_t>(av, av, len);
        }
      };
      if (mask_by) {  // read back from the output: exact in any dtype (grad_out or 0)
        cpu::write_row<acc_t>(relu_mask<Vec<acc_t>>, padded_row<acc_t>(p, r, r1, len), false, masked_out + off,
                              len, a + off, mask_by + off);
        accumulate(masked_out + off);
      } else {
        accumulate(a + off);
      }
    }
  });
  if (!p.channels_last) return;
  at::parallel_for(0, n1 - n0, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      acc_t* out = sums + g * p.C;
      const acc_t* first = partial.data() + g * blocks.per_sample * p.C;
      std::copy(first, first + p.C, out);
      for (int64_t blk = 1; blk < blocks.per_sample; ++blk)
        cpu::map_row<acc_t>(plus, out, p.C, out, first + blk * p.C);
    }
  });
}

// Whether a streamed NCHW sweep writes each block of rows as one flat sweep
// (cpu::stream_rows): rows of at least one vector.
template <typename scalar_t>
bool flat_streaming(const SEProblem& p) {
  return !p.channels_last && p.P >= Vec<opmath<scalar_t>>::size();
}

// out = x * s (+ residual, ReLU) for the samples [n0, n1); scale is (N, C).
// `stream`: write out with streaming stores.
template <typename scalar_t>
void scale_forward(const SEProblem& p, int64_t n0, int64_t n1, const scalar_t* x, const scalar_t* residual,
                   const opmath<scalar_t>* scale, scalar_t* out, bool stream) {
  using acc_t = opmath<scalar_t>;
  using V = Vec<acc_t>;
  const RowBlocks blocks(p);
  const int64_t slice = p.C * p.P, len = blocks.length;
  const bool flat = stream && flat_streaming<scalar_t>(p);
  for_each_row_block(blocks, n0, n1, [&](int64_t n, int64_t, int64_t r0, int64_t r1) {
    if (flat) {
      const int64_t off = n * slice + r0 * len;
      const acc_t* s = scale + n * p.C + r0;
      if (residual) {
        cpu::stream_rows<acc_t>([](V s, V, V a, V rv) { return at::vec::maximum(a * s + rv, V(0)); }, r1 - r0,
                                len, s, s, out + off, x + off, residual + off);
      } else {
        cpu::stream_rows<acc_t>([](V s, V, V a) { return a * s; }, r1 - r0, len, s, s, out + off, x + off);
      }
      cpu::stream_fence();
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = n * slice + r * len;
      const scalar_t* xv = x + off;
      const scalar_t* res = residual ? residual + off : nullptr;
      if (p.channels_last) {  // a pixel's channels against the sample's scale vector
        const acc_t* sv = scale + n * p.C;
        if (res) {
          cpu::write_row<acc_t>([](V a, V s, V rv) { return at::vec::maximum(a * s + rv, V(0)); }, false, stream,
                                out + off, len, xv, sv, res);
        } else {
          cpu::write_row<acc_t>([](V a, V s) { return a * s; }, false, stream, out + off, len, xv, sv);
        }
      } else {
        const V s(scale[n * p.C + r]);
        const bool padded = padded_row<acc_t>(p, r, r1, len);
        if (res) {
          cpu::write_row<acc_t>([s](V a, V rv) { return at::vec::maximum(a * s + rv, V(0)); }, padded, stream,
                                out + off, len, xv, res);
        } else {
          cpu::write_row<acc_t>([s](V a) { return a * s; }, padded, stream, out + off, len, xv);
        }
      }
    }
    if (stream) cpu::stream_fence();
  });
}

// grad_x = g' * s + dz/P for the samples [n0, n1), where g' is grad_out, or
// in the residual form the residual's gradient the first sweep wrote
// (channel_sums). scale is (N, C); dz_over_p is (n1 - n0, C). `stream`: write
// grad_x with streaming stores.
template <typename scalar_t>
void scale_backward(const SEProblem& p, int64_t n0, int64_t n1, const scalar_t* g, const opmath<scalar_t>* scale,
                    const opmath<scalar_t>* dz_over_p, scalar_t* grad_x, bool stream) {
  using acc_t = opmath<scalar_t>;
  using V = Vec<acc_t>;
  const RowBlocks blocks(p);
  const int64_t slice = p.C * p.P, len = blocks.length;
  const bool flat = stream && flat_streaming<scalar_t>(p);
  for_each_row_block(blocks, n0, n1, [&](int64_t n, int64_t, int64_t r0, int64_t r1) {
    if (flat) {
      const int64_t off = n * slice + r0 * len;
      cpu::stream_rows<acc_t>([](V s, V d, V g) { return at::vec::fmadd(g, s, d); }, r1 - r0, len,
                              scale + n * p.C + r0, dz_over_p + (n - n0) * p.C + r0, grad_x + off, g + off);
      cpu::stream_fence();
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = n * slice + r * len;
      const scalar_t* gv = g + off;
      if (p.channels_last) {
        cpu::write_row<acc_t>([](V g, V s, V d) { return at::vec::fmadd(g, s, d); }, false, stream, grad_x + off,
                              len, gv, scale + n * p.C, dz_over_p + (n - n0) * p.C);
      } else {
        const V s(scale[n * p.C + r]), d(dz_over_p[(n - n0) * p.C + r]);
        cpu::write_row<acc_t>([s, d](V g) { return at::vec::fmadd(g, s, d); }, padded_row<acc_t>(p, r, r1, len),
                              stream, grad_x + off, len, gv);
      }
    }
    if (stream) cpu::stream_fence();
  });
}

// The share of the last-level cache the sweeps plan with: 8 MiB, a quarter of
// a typical server LLC slice, leaving room for the outputs streaming past.
// Samples are taken in chunks whose re-read bytes fit it (the second sweep
// then reads them from the cache), and outputs larger than it are written
// with streaming stores: a plain store first reads each line into the cache,
// which only pays when the line is already there (an output buffer recycled
// from a small previous call) or is read again soon from the cache. Measured
// on the 2-core EPYC VM (32 MiB L3 slice, batch 8 fp32 NCHW, forward+backward
// through the module): streaming took 21-23% off conv2_x/conv3_x (25.7 and
// 12.8 MB outputs) and added 10-36% at conv4_x/conv5_x (6.4 and 3.2 MB; for
// long rows see stream_outputs).
// SE_FUSED_CPU_CHUNK_BYTES overrides the chunk budget (read per call).
constexpr int64_t kCacheBudgetBytes = int64_t(8) << 20;

// A byte count from the environment variable `name` (read per call, so tests
// can force either path), or nothing when it is unset or empty. Anything but a
// non-negative integer is refused (atoll read "8MB" as 8 and "abc" as 0).
std::optional<int64_t> bytes_from_env(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0') return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && errno == 0 && value >= 0, "se_fused: ", name,
                    " must be a number of bytes >= 0; got '", env, "'");
  return static_cast<int64_t>(value);
}

// Samples per chunk: as many as keep `bytes_per_sample` (the bytes the second
// sweep reads again) within the cache budget, at least one.
int64_t samples_per_chunk(int64_t bytes_per_sample) {
  const int64_t budget = bytes_from_env("SE_FUSED_CPU_CHUNK_BYTES").value_or(kCacheBudgetBytes);
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_sample));
}

// Streaming also pays for smaller outputs whose rows are long: a row is
// streamed in whole 64-byte lines with plain stores at its partial ends, and
// on short rows that mix costs more than the read-for-ownership it saves.
// Interleaved A/B through the module, forward+backward, float32 batch 8
// (streamed against plain): channels_last conv4_x -13%/-14%, conv5_x
// -8%/-17% (rows of 4 and 8 KiB; at batch 2 and 4 conv5_x -18% and -9%, at
// batch 1 within 2%); NCHW conv4_x +4%/-1% and conv5_x +19%/+28% (rows of
// 784 and 196 bytes, streamed row by row).
constexpr int64_t kStreamRowBytes = int64_t(2) << 10, kStreamMinBytes = int64_t(1) << 20;

// NCHW rows (of at least one vector) are streamed as flat sweeps over whole
// blocks of rows (cpu::stream_rows), which leave partial lines only at the
// ends of a block; that pays for outputs over 2 MiB. Interleaved A/B through
// the module, forward+backward, NCHW batch 8 unless said, plain/residual,
// streamed against plain:
//   float32, two runs: conv4_x -6%/-11% and -13%/-6%, conv5_x -7%/+2% and
//     -2%/+1% (a third run, after RowValues: conv4_x -11%/-7%, conv5_x
//     -10%/-9%); batch 4 conv4_x -11%/-1%, conv5_x -1%/+3%; batch 2
//     (outputs of 1.6 and 0.8 MB) +3%/+13% and +12%/-2%;
//   bfloat16: conv2_x -8%/-7%, conv3_x -1%/-11%, conv4_x -8%/-4% (row by
//     row, streaming had cost conv4_x +41%/+22%).
// Flat against row by row where both stream (float32 conv2_x, conv3_x):
// within 1%.
constexpr int64_t kStreamFlatMinBytes = int64_t(2) << 20;

// Whether a call writing full-size outputs like `output` streams them.
// SE_FUSED_CPU_STREAM_BYTES, when set, replaces the rule: outputs over that
// many bytes are streamed.
template <typename scalar_t>
bool stream_outputs(const SEProblem& p, const at::Tensor& output) {
  const int64_t output_bytes = output.nbytes(), row_bytes = RowBlocks(p).length * output.element_size();
  if (const auto threshold = bytes_from_env("SE_FUSED_CPU_STREAM_BYTES")) return output_bytes > *threshold;
  return output_bytes > kCacheBudgetBytes || (row_bytes >= kStreamRowBytes && output_bytes > kStreamMinBytes) ||
         (flat_streaming<scalar_t>(p) && output_bytes > kStreamFlatMinBytes);
}

// H·W = 1 is NCHW and NHWC at once (the same bytes): read it as NHWC, one row
// of C channels per sample, rather than C rows of one element.
SEProblem with_long_rows(SEProblem p) {
  if (p.P == 1) p.channels_last = true;
  return p;
}

// A parameter as a contiguous tensor of `sizes` in the accumulation type (itself when it already is one).
at::Tensor accumulation_view(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType acc) {
  return t.reshape(sizes).to(acc).contiguous();
}

// Calls f(cpu::ExcitationWeights<...>) with the MLP's parameters (b1 and b2
// may be null): read in place when all of them are contiguous and stored as
// scalar_t (a module in x's dtype), else as accumulation-type copies. For
// 16-bit inputs the copies cost a conversion of every weight per call (at
// C = 2048, 2 MB allocated and converted per forward and per backward).
template <typename scalar_t, typename F>
void with_weights(const SEProblem& p, const at::Tensor& w1, const at::Tensor* b1, const at::Tensor& w2,
                  const at::Tensor* b2, const F& f) {
  using acc_t = opmath<scalar_t>;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    auto stored = [](const at::Tensor* t) {
      return t == nullptr || (t->scalar_type() == c10::CppTypeToScalarType<scalar_t>::value && t->is_contiguous());
    };
    if (stored(&w1) && stored(b1) && stored(&w2) && stored(b2)) {
      auto ptr = [](const at::Tensor* t) { return t ? t->const_data_ptr<scalar_t>() : nullptr; };
      return f(cpu::ExcitationWeights<scalar_t>{ptr(&w1), ptr(b1), ptr(&w2), ptr(b2)});
    }
  }
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor cw1 = accumulation_view(w1, {p.R, p.C}, acc), cw2 = accumulation_view(w2, {p.C, p.R}, acc);
  const at::Tensor cb1 = b1 ? accumulation_view(*b1, {p.R}, acc) : at::Tensor();
  const at::Tensor cb2 = b2 ? accumulation_view(*b2, {p.C}, acc) : at::Tensor();
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
  f(cpu::ExcitationWeights<acc_t>{ptr(cw1), ptr(cb1), ptr(cw2), ptr(cb2)});
}

ForwardResult squeeze_excitation_forward_cpu(const at::Tensor& x_in, const at::Tensor& fc1_weight,
                                             const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                             const at::Tensor& fc2_bias, const c10::optional<at::Tensor>& residual_in,
                                             c10::string_view activation, c10::string_view gate) {
  at::Tensor x = x_in;
  c10::optional<at::Tensor> residual = residual_in;
  const SEProblem p = with_long_rows(check_forward_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual,
                                                        std::string(activation), std::string(gate)));
  auto [out, pooled, hidden, scale] = allocate_forward_outputs(x, p);
  if (p.N == 0) return {out, pooled, hidden, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excitation_forward_cpu", [&] {
    with_weights<scalar_t>(p, fc1_weight, &fc1_bias, fc2_weight, &fc2_bias, [&](const auto& weights) {
      using acc_t = opmath<scalar_t>;
      const int64_t chunk = samples_per_chunk(p.C * p.P * static_cast<int64_t>(sizeof(scalar_t)));
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      acc_t* zp = pooled.mutable_data_ptr<acc_t>();
      acc_t* hp = hidden.mutable_data_ptr<acc_t>();
      acc_t* sp = scale.mutable_data_ptr<acc_t>();
      const bool stream = stream_outputs<scalar_t>(p, out);
      Scratch<acc_t> act(std::min(chunk, p.N) * p.R);
      std::vector<acc_t> partial;
      const acc_t inv_p = acc_t(1) / static_cast<acc_t>(p.P);
      for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
        const int64_t n1 = std::min(p.N, n0 + chunk);
        acc_t* z = zp + n0 * p.C;
        channel_sums<scalar_t>(p, n0, n1, xp, nullptr, nullptr, nullptr, z, partial);
        for (int64_t i = 0; i < (n1 - n0) * p.C; ++i) z[i] *= inv_p;
        cpu::excitation_forward_rows<acc_t>(p, weights, z, n1 - n0, hp + n0 * p.R, act.data(), sp + n0 * p.C);
        scale_forward<scalar_t>(p, n0, n1, xp, rp, sp, op, stream);
      }
    });
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
  const SEProblem p = with_long_rows(check_backward_args(grad_out, x, out, fc1_weight, fc2_weight, pooled, hidden,
                                                         scale, std::string(activation), std::string(gate)));
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_res = p.has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dw1 = at::empty({p.R, p.C}, pooled.options()), db1 = at::empty({p.R}, pooled.options());
  at::Tensor dw2 = at::empty({p.C, p.R}, pooled.options()), db2 = at::empty({p.C}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excitation_backward_cpu", [&] {
    with_weights<scalar_t>(p, fc1_weight, nullptr, fc2_weight, nullptr, [&](const auto& weights) {
      using acc_t = opmath<scalar_t>;
      // The second sweep reads grad_out again (the residual form: the residual's gradient the first wrote).
      const int64_t chunk = samples_per_chunk(p.C * p.P * static_cast<int64_t>(sizeof(scalar_t)));
      const int64_t rows = std::min(chunk, p.N);
      const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* op = out ? out->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
      scalar_t* grp = p.has_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
      const acc_t* zp = pooled.const_data_ptr<acc_t>();
      const acc_t* hp = hidden.const_data_ptr<acc_t>();
      const acc_t* sp = scale.const_data_ptr<acc_t>();
      const bool stream = stream_outputs<scalar_t>(p, grad_x);
      // dv and du are kept for the whole batch: the weight gradients sum them over every sample.
      Scratch<acc_t> dv(p.N * p.C), du(p.N * p.R), ds(rows * p.C), dh(rows * p.R), dz(rows * p.C);
      std::vector<acc_t> partial;
      for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
        const int64_t n1 = std::min(p.N, n0 + chunk), g = n1 - n0;
        channel_sums<scalar_t>(p, n0, n1, gp, xp, op, grp, ds.data(), partial);
        cpu::excitation_backward_rows<acc_t>(p, weights, ds.data(), hp + n0 * p.R, sp + n0 * p.C, g,
                                             dv.data() + n0 * p.C, dh.data(), du.data() + n0 * p.R, dz.data());
        for (int64_t i = 0; i < g * p.C; ++i) dz[i] /= static_cast<acc_t>(p.P);
        scale_backward<scalar_t>(p, n0, n1, op ? grp : gp, sp, dz.data(), gxp, stream);
      }
      Scratch<acc_t> act(p.N * p.R);
      cpu::activate_all(hp, p.N * p.R, p.activation, act.data());
      cpu::weight_gradient(du.data(), zp, p.N, p.R, p.C, dw1.mutable_data_ptr<acc_t>(), db1.mutable_data_ptr<acc_t>());
      cpu::weight_gradient(dv.data(), act.data(), p.N, p.C, p.R, dw2.mutable_data_ptr<acc_t>(),
                           db2.mutable_data_ptr<acc_t>());
    });
  });
  // Shaped like the parameter, typed like its weight (the bias gradients too, as the CUDA op returns them).
  auto like = [](const at::Tensor& grad, const at::Tensor& weight, at::IntArrayRef sizes) {
    return grad.reshape(sizes).to(weight.scalar_type());
  };
  return {grad_x, grad_res, like(dw1, fc1_weight, fc1_weight.sizes()), like(db1, fc1_weight, {p.R}),
          like(dw2, fc2_weight, fc2_weight.sizes()), like(db2, fc2_weight, {p.C})};
}

}  // namespace

CpuKernelBuild cpu_kernel_build() {
#ifdef INTRA_OP_PARALLEL
  constexpr bool parallel = true;
#else
  constexpr bool parallel = false;
#endif
#ifdef CPU_CAPABILITY_AVX2
  return {parallel, "AVX2"};
#else
  return {parallel, "DEFAULT"};
#endif
}

TORCH_LIBRARY_IMPL(se_fused, CPU, m) {
  m.impl("squeeze_excitation_forward", &squeeze_excitation_forward_cpu);
  m.impl("squeeze_excitation_backward", &squeeze_excitation_backward_cpu);
}

}  // namespace se_fused
