// The excitation MLP of the CPU kernel, on raw rows in the accumulation type
// (the parameters may stay in a 16-bit storage type, widened as loaded).
//
// Per call the MLP is a handful of products of a (G, C) or (G, R) block of
// per-sample vectors with a (R, C) weight: G is the batch (8 at the benchmark
// shapes), so these are matrix-vector products in disguise, bound by reading
// the weights. BLAS GEMMs tuned for large M spend several times the weight
// read on them, and the ATen ops around them cost more than the arithmetic
// at small C; here each weight vector is loaded once per block of
// kSampleBlock samples, the activation and gate are vectorised passes over
// the small (G, R) and (G, C) blocks, and nothing is allocated per product.
//
// Every output element is computed by one thread in a fixed order (vector
// lanes over k, then the lanes summed in order, then the tail), so results do
// not depend on the number of threads and are bitwise reproducible. The math
// is SPEC §1 as in se_fused/_reference.py, with PyTorch's own formulas for the
// pointwise parts (so NaN and Inf propagate as in the eager path).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../squeeze_excitation.h"

// Lambdas the compiler must inline into a vector loop (C10_ALWAYS_INLINE carries
// `inline`, which a lambda's declarator does not take).
#if defined(__GNUC__) || defined(__clang__)
#define SE_FUSED_LAMBDA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define SE_FUSED_LAMBDA_ALWAYS_INLINE
#endif

namespace se_fused::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// The mask of the first `count` of `lanes` lanes (32-bit lanes of 8, or 64-bit of 4) for AVX2 masked moves.
template <int lanes>
__m256i lane_mask(int64_t count) {
  alignas(32) static constexpr int32_t ones_then_zeros[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones_then_zeros + 8 - count * (8 / lanes)));
}
#endif

// Samples that share one load of a weight vector (registers: kSampleBlock ×
// kRowBlock accumulators in dot_tile, kSampleBlock × kColumnBlockVectors in
// accumulate_column_block).
constexpr int64_t kSampleBlock = 4;

// The lanes of v summed (ATen's shuffle tree: a fixed order).
template <typename T>
T sum_lanes(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, v);
}

// The first `count` (< one vector) elements at p, as a vector / stored from
// one. AVX2 masked moves do it in one instruction (masked-off lanes are
// neither read nor written, so a row's end never touches the next page);
// elsewhere ATen's copy through a stack buffer.
template <typename T>
Vec<T> load_partial(const T* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<T, float>) return _mm256_maskload_ps(p, lane_mask<8>(count));
  if constexpr (std::is_same_v<T, double>) return _mm256_maskload_pd(p, lane_mask<4>(count));
#endif
  return Vec<T>::loadu(p, count);
}

template <typename T>
void store_partial(const Vec<T>& v, T* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<T, float>) return _mm256_maskstore_ps(p, lane_mask<8>(count), v);
  if constexpr (std::is_same_v<T, double>) return _mm256_maskstore_pd(p, lane_mask<4>(count), v);
#endif
  v.store(p, count);
}

// One vector of accumulation-type values (T) from storage elements at p (S):
// the same type is a plain load, a 16-bit float type is converted in
// registers (8 elements widened to float), so sweeps read reduced-precision
// tensors in place instead of converting each row into a buffer first (a
// buffer round trip per element made a bfloat16 sweep slower than the
// float32 one over twice the bytes).
template <typename T, typename S>
Vec<T> load_as(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return Vec<T>::loadu(p);
  } else {
    static_assert(std::is_same_v<T, float> && at::is_reduced_floating_point_v<S>);
    Vec<float> v;
    at::vec::load_to_float<S>(p, v);
    return v;
  }
}

// The first `count` (< one vector) storage elements at p as accumulation
// values; the lanes past count are 0 for 16-bit types (read through a stack
// copy, so nothing past count is touched).
template <typename T, typename S>
Vec<T> load_partial_as(const S* p, int64_t count) {
  if constexpr (std::is_same_v<S, T>) {
    return load_partial(p, count);
  } else {
    S part[Vec<T>::size()] = {};
    std::copy(p, p + count, part);
    return load_as<T>(part);
  }
}

// out[k] = f(in[k]...) for k < n: whole vectors, then the tail as one partial
// vector through the same formula (lanes past n are computed, never stored).
// Each input is read as accumulation values (load_as): T or a 16-bit type.
template <typename T, typename F, typename... In>
void map_row(const F& f, T* out, int64_t n, const In*... in) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  for (; k + L <= n; k += L) f(load_as<T>(in + k)...).store(out + k);
  if (k < n) store_partial(f(load_partial_as<T>(in + k, n - k)...), out + k, n - k);
}

// map_row, with the tail computed as a whole vector too when `padded`: then
// it reads every `in` and writes `out` up to L - 1 elements past n, which the
// caller must own (the next row of a block, rewritten later by the same
// thread, or a buffer's padding). That saves the masked store that ends a
// row: AVX2 masked stores are slow on AMD cores (a third of an in-cache scale
// sweep over rows of 49 floats on the EPYC VM).
template <typename T, typename F, typename... In>
void map_row_padded(const F& f, bool padded, T* out, int64_t n, const In*... in) {
  if (!padded) return map_row<T>(f, out, n, in...);
  constexpr int64_t L = Vec<T>::size();
  for (int64_t k = 0; k < n; k += L) f(load_as<T>(in + k)...).store(out + k);
}

// Non-temporal ("streaming") stores write whole 64-byte lines to memory
// without first reading them into the cache (the read-for-ownership a plain
// store pays, a third of a scale sweep's DRAM traffic) and without keeping
// them there. They pay off for outputs too large to stay in the cache; a
// thread that streams must `stream_fence()` before another thread may read.
// Without AVX2 they are plain stores.
template <typename T>
void stream_store(const Vec<T>& v, T* p) {  // p aligned to the vector's size
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  static_assert(sizeof(Vec<T>) == 32);
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#else
  v.store(p);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  _mm_sfence();
#endif
}

// How many of the n elements at p come before its first 64-byte boundary (n
// when p is not even aligned to its type, so nothing is streamed then).
template <typename T>
int64_t elements_before_line(const T* p, int64_t n) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  if (address % sizeof(T) != 0) return n;
  return std::min<int64_t>(n, static_cast<int64_t>(((64 - address % 64) % 64) / sizeof(T)));
}

// map_row whose whole 64-byte lines of `out` are streamed (the partial lines
// at either end, shared with the neighbouring rows, are plain stores; the
// last one as map_row_padded's when `padded`).
template <typename T, typename F, typename... In>
void stream_row(const F& f, bool padded, T* out, int64_t n, const In*... in) {
  constexpr int64_t L = Vec<T>::size(), per_line = 64 / sizeof(T);
  int64_t k = elements_before_line(out, n);
  map_row<T>(f, out, k, in...);
  for (; k + per_line <= n; k += per_line) {
    for (int64_t v = 0; v < per_line; v += L) stream_store(f(load_as<T>(in + k + v)...), out + k + v);
  }
  map_row_padded<T>(f, padded, out + k, n - k, (in + k)...);
}

// dst[k] = f(in[k]...) for k < n, dst of a 16-bit type S: two vectors of T at
// a time, converted and stored together (no float32 row in between); with
// `stream`, dst's whole 64-byte lines are streamed. The last elements (fewer
// than two vectors) are computed from whole vectors when `padded` (the
// inputs may be read up to L - 1 elements past n, as in map_row_padded;
// only n elements are stored), else, like the elements before dst's first
// line boundary, through a small row on the stack.
template <typename T, typename S, typename F, typename... In>
void map_row_narrow(const F& f, bool padded, bool stream, S* dst, int64_t n, const In*... in) {
  static_assert(sizeof(S) == 2 && std::is_same_v<T, float>);
  constexpr int64_t L = Vec<T>::size(), W = 2 * L, per_line = 64 / sizeof(S);
  static_assert(Vec<S>::size() == W && per_line % W == 0);
  auto two = [&](int64_t k) {
    return at::vec::convert_from_float<S>(f(load_as<T>(in + k)...), f(load_as<T>(in + k + L)...));
  };
  auto few = [&](int64_t k, int64_t count) {
    T row[W];
    map_row<T>(f, row, count, (in + k)...);
    at::vec::convert(row, dst + k, count);
  };
  int64_t k = 0;
  if (stream) {
    const int64_t head = elements_before_line(dst, n);
    for (; k + W <= head; k += W) two(k).store(dst + k);
    if (k < head) few(k, head - k);
    for (k = head; k + per_line <= n; k += per_line) {
      for (int64_t v = 0; v < per_line; v += W) stream_store(two(k + v), dst + k + v);
    }
  }
  for (; k + W <= n; k += W) two(k).store(dst + k);
  if (k < n && padded) {
    const Vec<T> lo = f(load_as<T>(in + k)...);
    const Vec<T> hi = n - k > L ? f(load_as<T>(in + k + L)...) : Vec<T>(0);
    at::vec::convert_from_float<S>(lo, hi).store(dst + k, static_cast<int>(n - k));
  } else if (k < n) {
    few(k, n - k);
  }
}

// dst[k] = f(in[k]...) for k < n: a row of storage elements (S) computed in
// the accumulation type T, in place (S = T) or two vectors at a time narrowed
// to a 16-bit type (map_row_narrow). `padded`: the inputs may be read past n,
// and dst written past n when S = T (map_row_padded). `stream`: dst's whole
// cache lines go past the cache (stream_store); the caller calls
// stream_fence() when done.
template <typename T, typename S, typename F, typename... In>
void write_row(const F& f, bool padded, bool stream, S* dst, int64_t n, const In*... in) {
  if constexpr (std::is_same_v<S, T>) {
    if (stream) {
      stream_row<T>(f, padded, dst, n, in...);
    } else {
      map_row_padded<T>(f, padded, dst, n, in...);
    }
  } else {
    map_row_narrow<T>(f, padded, stream, dst, n, in...);
  }
}

// The per-row values (c0[r], c1[r], as vectors) of consecutive vectors of a
// flat sweep over rows of P >= one vector of elements: a vector across the end
// of a row gets them blended (its first lanes the ending row's).
template <typename T>
class RowValues {
 public:
  RowValues(const T* c0, const T* c1, int64_t P, int64_t rows, int64_t start)
      : c0_(c0), c1_(c1), P_(P), rows_(rows), r_(start / P), row_end_((r_ + 1) * P), a_(c0[r_]), b_(c1[r_]) {}

  // The values for the vector [i, i + L); i advances by L from `start`.
  // Always inlined: as a call the loop spilled its vectors around it (4x slower).
  C10_ALWAYS_INLINE std::pair<Vec<T>, Vec<T>> at(int64_t i) {
    constexpr int64_t L = Vec<T>::size();
    if (i + L <= row_end_) {
      const auto values = std::make_pair(a_, b_);
      if (i + L == row_end_) advance();
      return values;
    }
    // Lanes [0, k) in row r, the rest in row r + 1 (which exists: the sweep ends on a row end).
    const int64_t k = row_end_ - i;
    const Vec<T> a = a_, b = b_;
    advance();
    return {Vec<T>::set(a_, a, k), Vec<T>::set(b_, b, k)};
  }

 private:
  C10_ALWAYS_INLINE void advance() {
    if (++r_ >= rows_) return;
    row_end_ += P_;
    a_ = Vec<T>(c0_[r_]);
    b_ = Vec<T>(c1_[r_]);
  }

  const T *c0_, *c1_;
  int64_t P_, rows_, r_, row_end_;
  Vec<T> a_, b_;
};

// A block of `rows` NCHW rows of P >= one vector of elements each, contiguous
// in memory: out[r·P + k] = f(c0[r], c1[r], in[r·P + k]...) computed in T
// (the per-row values as vectors; out of type T, or of a 16-bit type S
// narrowed two vectors at a time), with every whole 64-byte line of out
// streamed, in one flat sweep of aligned vectors (RowValues blends the
// per-row values where a vector crosses a row end). The partial lines at the
// block's two ends, shared with the neighbouring blocks, are plain stores.
// Streaming row by row (write_row) cannot do this for short
// rows: a row of 196 or 784 bytes leaves a partial line at both ends.
template <typename T, typename S, typename F, typename... In>
void stream_rows(const F& f, int64_t rows, int64_t P, const T* c0, const T* c1, S* out, const In*... in) {
  constexpr bool kNarrow = !std::is_same_v<S, T>;
  constexpr int64_t L = Vec<T>::size(), step = kNarrow ? 2 * L : L, per_line = 64 / sizeof(S);
  const int64_t n = rows * P;
  // [i0, i1) row by row with plain stores. Kept out of line: inlined at its two call
  // sites it left the sweep's loop calling `compute` instead of inlining it, and the
  // float32 NCHW forward ran 2.7x slower (conv2_x batch 8: 4.47 against 1.65 ms).
  auto plain = [&](int64_t i0, int64_t i1) C10_NOINLINE {
    while (i0 < i1) {
      const int64_t r = i0 / P, end = std::min(i1, (r + 1) * P);
      const Vec<T> a(c0[r]), b(c1[r]);
      write_row<T>([&](auto... v) { return f(a, b, v...); }, false, false, out + i0, end - i0, (in + i0)...);
      i0 = end;
    }
  };
  const int64_t head = elements_before_line(out, n), body_end = head + (n - head) / per_line * per_line;
  plain(0, head);
  if (head < body_end) {
    RowValues<T> values(c0, c1, P, rows, head);
    auto compute = [&](int64_t i) SE_FUSED_LAMBDA_ALWAYS_INLINE {
      const auto [a, b] = values.at(i);
      return f(a, b, load_as<T>(in + i)...);
    };
    for (int64_t i = head; i < body_end; i += step) {
      if constexpr (kNarrow) {
        const Vec<T> lo = compute(i);
        stream_store(at::vec::convert_from_float<S>(lo, compute(i + L)), out + i);
      } else {
        stream_store(compute(i), out + i);
      }
    }
  }
  plain(body_end, n);
}

// map_row over n elements spread over the threads (pointwise: how the range is
// split changes no result).
template <typename T, typename F, typename... In>
void parallel_map(const F& f, T* out, int64_t n, const In*... in) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) { map_row<T>(f, out + i0, i1 - i0, (in + i0)...); });
}

// sums[i] = sum of the lanes of acc[i] for i < n. Eight float vectors are
// reduced together by a tree of horizontal adds on AVX2 (about one
// instruction per sum instead of six); other types and ISAs one by one.
template <typename T, std::size_t n>
void sum_lanes_of(const std::array<Vec<T>, n>& acc, T* sums) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<T, float> && n == 8 && Vec<T>::size() == 8) {
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    return;
  }
#endif
  for (std::size_t i = 0; i < n; ++i) sums[i] = sum_lanes(acc[i]);
}

// An array of N vectors, element i = f(i) with i a compile-time constant,
// built from the values. Default-constructing an array of ATen vectors
// zeroes it (Vectorized() does) through the stack, and filling it afterwards
// went through memory in 16-byte halves read back as 32 bytes, which stalls
// store forwarding: together the better part of a tile at K = 64 or N = 8.
template <typename F, std::size_t... I>
auto make_vectors(const F& f, std::index_sequence<I...>) {
  using V = decltype(f(std::integral_constant<std::size_t, 0>{}));
  return std::array<V, sizeof...(I)>{{f(std::integral_constant<std::size_t, I>{})...}};
}

template <std::size_t N, typename F>
auto make_vectors(const F& f) {
  return make_vectors(f, std::make_index_sequence<N>{});
}

// count (<= one vector) elements at p as accumulation values (T): a whole
// vector or a partial load (load_as, load_partial_as).
template <typename T, typename S>
Vec<T> load_lanes(const S* p, int64_t count) {
  return count == Vec<T>::size() ? load_as<T>(p) : load_partial_as<T>(p, count);
}

// out[g, j] = bias[j] + sum_k W[j, k] * in[g, k] for the NB samples from g0
// and the NR rows from j0: NB·NR independent FMA chains, each weight vector
// loaded once for NB samples and each input vector once for NR rows. The
// weights (and bias) may be stored in a 16-bit type (W_t), widened as loaded.
template <typename T, int64_t NB, int64_t NR, typename W_t>
void dot_tile(const W_t* W, const W_t* bias, int64_t J, int64_t K, const T* in, int64_t g0, int64_t j0, T* out) {
  constexpr int64_t L = Vec<T>::size();
  const W_t* w = W + j0 * K;
  const T* x = in + g0 * K;
  // Element b·NR + r: sample g0 + b against row j0 + r. The first step sets
  // the sums, the K % L tail is one masked step.
  const int64_t first = std::min(K, L);
  auto acc = make_vectors<NB * NR>([&](auto i) {
    return load_lanes<T>(w + (i % NR) * K, first) * load_lanes<T>(x + (i / NR) * K, first);
  });
  auto step = [&](int64_t k, int64_t count) {
    for (int64_t b = 0; b < NB; ++b) {
      const Vec<T> xv = load_lanes<T>(x + b * K + k, count);
      for (int64_t r = 0; r < NR; ++r)
        acc[b * NR + r] = at::vec::fmadd(load_lanes<T>(w + r * K + k, count), xv, acc[b * NR + r]);
    }
  };
  int64_t k = first;
  for (; k + L <= K; k += L) step(k, L);
  if (k < K) step(k, K - k);
  T sums[NB * NR];
  sum_lanes_of(acc, sums);
  for (int64_t b = 0; b < NB; ++b) {
    for (int64_t r = 0; r < NR; ++r)
      out[(g0 + b) * J + j0 + r] = (bias ? static_cast<T>(bias[j0 + r]) : T(0)) + sums[b * NR + r];
  }
}

// Rows per tile of the forward products (with kSampleBlock samples: 8 chains).
constexpr int64_t kRowBlock = 2;

// out (G, J) = in (G, K) · Wᵀ + bias, with W (J, K) row-major: the layout of
// both fc weights for the forward products. Threads own blocks of rows j.
template <typename T, typename W_t>
void matmul_transposed_weight(const W_t* W, const W_t* bias, int64_t J, int64_t K, const T* in, int64_t G, T* out) {
  const int64_t pairs = (J + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, pairs, std::max<int64_t>(1, 1024 / K), [&](int64_t p0, int64_t p1) {
    for (int64_t pr = p0; pr < p1; ++pr) {
      const int64_t j0 = pr * kRowBlock;
      const bool full = j0 + kRowBlock <= J;
      int64_t g0 = 0;
      for (; g0 + kSampleBlock <= G; g0 += kSampleBlock) {
        if (full) {
          dot_tile<T, kSampleBlock, kRowBlock>(W, bias, J, K, in, g0, j0, out);
        } else {
          dot_tile<T, kSampleBlock, 1>(W, bias, J, K, in, g0, j0, out);
        }
      }
      for (; g0 < G; ++g0) {
        if (full) {
          dot_tile<T, 1, kRowBlock>(W, bias, J, K, in, g0, j0, out);
        } else {
          dot_tile<T, 1, 1>(W, bias, J, K, in, g0, j0, out);
        }
      }
    }
  });
}

constexpr int64_t kColumnBlockVectors = 2;

// Rows of W a column block takes before the next block: each row is loaded
// one 64-byte block at a time (a stride of K elements between rows), which
// the hardware prefetchers did not follow, so while a block sweeps its rows
// it prefetches the same block of the rows one tile further, which the next
// tile reads. Walking all J rows per block without prefetching made the
// product latency-bound whenever W was out of the cache, as it is between
// a network's forward and backward. MLP backward at C = 2048 (N = 8, 2
// threads, interleaved A/B, two runs): weights cold 447/527 -> 309/325 us,
// in cache 234/256 -> 243/265 us. Tiles of 16 rows cost 10-15% in cache,
// tiles of 64 rows or prefetching 64 rows ahead did worse cold (357-397 us).
constexpr int64_t kWeightRowTile = 32;

// Hints that the line at p will be read soon (into the outer caches; a
// prefetch never faults).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#endif
}

// out[g, k0:k0+width] (+)= sum_{j0 <= j < j1} in[g, j] * W[j, k0:k0+width]
// for NB samples starting at g0; width <= VB vectors. The sum starts from
// row 0 when j0 = 0, else from the partial sums in out (stored exactly), so
// every element is one FMA chain over j in order. kFull (width = VB vectors,
// all but the last block of a row) compiles the loads without masks: with a
// per-vector choice in the j loop the accumulators went to the stack on every j.
template <typename T, int64_t NB, int64_t VB, bool kFull, typename W_t>
void column_block(const W_t* W, int64_t J, int64_t K, int64_t j0, int64_t j1, int64_t k0, int64_t width, const T* in,
                  int64_t g0, T* out) {
  constexpr int64_t L = Vec<T>::size();
  int64_t lanes[VB];
  for (int64_t v = 0; v < VB; ++v) lanes[v] = kFull ? L : std::clamp<int64_t>(width - v * L, 0, L);
  const W_t* w = W + k0;
  auto load_w = [&](int64_t j, int64_t v) {
    return kFull ? load_as<T>(w + j * K + v * L) : load_lanes<T>(w + j * K + v * L, lanes[v]);
  };
  auto out_at = [&](int64_t b, int64_t v) { return out + (g0 + b) * K + k0 + v * L; };
  // Element b·VB + v: sample g0 + b, vector v of the block.
  auto acc = make_vectors<NB * VB>([&](auto i) {
    constexpr int64_t b = i / VB, v = i % VB;
    if (j0 > 0) return kFull ? Vec<T>::loadu(out_at(b, v)) : load_lanes<T>(out_at(b, v), lanes[v]);
    return Vec<T>(in[(g0 + b) * J]) * load_w(0, v);
  });
  for (int64_t j = std::max<int64_t>(j0, 1); j < j1; ++j) {
    if (j + kWeightRowTile < J) prefetch(w + (j + kWeightRowTile) * K);
    for (int64_t b = 0; b < NB; ++b) {
      const Vec<T> a(in[(g0 + b) * J + j]);
      for (int64_t v = 0; v < VB; ++v) acc[b * VB + v] = at::vec::fmadd(a, load_w(j, v), acc[b * VB + v]);
    }
  }
  for (int64_t b = 0; b < NB; ++b) {
    for (int64_t v = 0; v < VB; ++v) {
      if (kFull) {
        acc[b * VB + v].store(out_at(b, v));
      } else if (lanes[v] > 0) {
        store_partial(acc[b * VB + v], out_at(b, v), lanes[v]);
      }
    }
  }
}

template <typename T, int64_t NB, int64_t VB, typename W_t>
void accumulate_column_block(const W_t* W, int64_t J, int64_t K, int64_t j0, int64_t j1, int64_t k0, int64_t width,
                             const T* in, int64_t g0, T* out) {
  if (width == VB * Vec<T>::size()) {
    column_block<T, NB, VB, true>(W, J, K, j0, j1, k0, width, in, g0, out);
  } else {
    column_block<T, NB, VB, false>(W, J, K, j0, j1, k0, width, in, g0, out);
  }
}

// out (G, K) = in (G, J) · W, with W (J, K) row-major: the backward products
// through the fc weights. Threads own contiguous ranges of column blocks of
// out; a block keeps kSampleBlock samples × kColumnBlockVectors vectors of
// accumulators (8 FMA chains; 8×1 and 2×4 measured the same on a 2-core
// EPYC). Each thread takes W's rows kWeightRowTile at a time across all its
// blocks (column_block).
template <typename T, typename W_t>
void matmul_weight(const W_t* W, int64_t J, int64_t K, const T* in, int64_t G, T* out) {
  constexpr int64_t KB = kColumnBlockVectors * Vec<T>::size();
  const int64_t blocks = (K + KB - 1) / KB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j0 = 0; j0 < J; j0 += kWeightRowTile) {
      const int64_t j1 = std::min(J, j0 + kWeightRowTile);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t k0 = blk * KB, width = std::min(KB, K - k0);
        int64_t g0 = 0;
        for (; g0 + kSampleBlock <= G; g0 += kSampleBlock)
          accumulate_column_block<T, kSampleBlock, kColumnBlockVectors>(W, J, K, j0, j1, k0, width, in, g0, out);
        for (; g0 < G; ++g0)
          accumulate_column_block<T, 1, kColumnBlockVectors>(W, J, K, j0, j1, k0, width, in, g0, out);
      }
    }
  });
}

// grad_W[j0 + jb, k + v·L ...] over the batch for JB rows from j0 and VB
// vectors from k: JB·VB independent FMA chains over n, samples in order (the
// 4 chains of a single row left the FMA units waiting on their latency).
template <typename T, int64_t JB, int64_t VB>
void gradient_tile(const T* coef, const T* rows, int64_t N, int64_t J, int64_t K, int64_t j0, int64_t k, T* grad_w) {
  constexpr int64_t L = Vec<T>::size();
  // Element jb·VB + v: row j0 + jb, vector v from k.
  auto acc = make_vectors<JB * VB>(
      [&](auto i) { return Vec<T>(coef[j0 + i / VB]) * Vec<T>::loadu(rows + k + (i % VB) * L); });
  for (int64_t n = 1; n < N; ++n) {
    for (int64_t jb = 0; jb < JB; ++jb) {
      const Vec<T> c(coef[n * J + j0 + jb]);
      for (int64_t v = 0; v < VB; ++v)
        acc[jb * VB + v] = at::vec::fmadd(c, Vec<T>::loadu(rows + n * K + k + v * L), acc[jb * VB + v]);
    }
  }
  for (int64_t jb = 0; jb < JB; ++jb)
    for (int64_t v = 0; v < VB; ++v) acc[jb * VB + v].store(grad_w + (j0 + jb) * K + k + v * L);
}

// grad_W (J, K) = coefᵀ (J, N) · rows (N, K) and grad_b (J) = sum_n coef[n, :]:
// a weight gradient summed over the batch, samples in order. Tiles of
// kGradientRows rows × kGradientVectors vectors, then single vectors and
// single elements for K's tail. Tiles of 1×4 and 2×2 measured the same at
// C = 2048 (each weight gradient 50-70 us on 2 threads against ~25 us of
// FMAs; more likely limited by its 1 MB of stores than by the tile).
constexpr int64_t kGradientRows = 2, kGradientVectors = 4;

template <typename T>
void weight_gradient(const T* coef, const T* rows, int64_t N, int64_t J, int64_t K, T* grad_w, T* grad_b) {
  constexpr int64_t L = Vec<T>::size(), KB = kGradientVectors * L;
  if (N == 0) {
    std::fill(grad_w, grad_w + J * K, T(0));
    std::fill(grad_b, grad_b + J, T(0));
    return;
  }
  at::parallel_for(0, J, std::max<int64_t>(1, 2048 / K), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1;) {
      const bool pair = j + kGradientRows <= j1;
      int64_t k = 0;
      for (; k + KB <= K; k += KB) {
        if (pair) {
          gradient_tile<T, kGradientRows, kGradientVectors>(coef, rows, N, J, K, j, k, grad_w);
        } else {
          gradient_tile<T, 1, kGradientVectors>(coef, rows, N, J, K, j, k, grad_w);
        }
      }
      const int64_t rows_here = pair ? kGradientRows : 1;
      for (int64_t jj = j; jj < j + rows_here; ++jj) {
        for (int64_t kk = k; kk + L <= K; kk += L) gradient_tile<T, 1, 1>(coef, rows, N, J, K, jj, kk, grad_w);
        T* o = grad_w + jj * K;
        for (int64_t t = k + (K - k) / L * L; t < K; ++t) {
          T s = 0;
          for (int64_t n = 0; n < N; ++n) s += coef[n * J + jj] * rows[n * K + t];
          o[t] = s;
        }
        T b = 0;
        for (int64_t n = 0; n < N; ++n) b += coef[n * J + jj];
        grad_b[jj] = b;
      }
      j += rows_here;
    }
  });
}

// The pointwise parts, vectorised and written as PyTorch's CPU kernels write
// them (Sleef exp; max/min that keep NaN), so NaN and Inf come out where the
// eager path puts them: relu max(u, 0), silu u / (1 + exp(-u)), sigmoid
// 1 / (1 + exp(-v)), hardsigmoid clamp(v + 3, 0, 6) / 6.
template <typename T>
Vec<T> sigmoid(const Vec<T>& v) {
  return (Vec<T>(1) + v.neg().exp()).reciprocal();
}

template <typename T>
Vec<T> activate(const Vec<T>& u, Activation a) {
  if (a == Activation::ReLU) return at::vec::clamp_min(u, Vec<T>(0));
  return u / (Vec<T>(1) + u.neg().exp());
}

template <typename T>
Vec<T> apply_gate(const Vec<T>& v, Gate g) {
  if (g == Gate::Sigmoid) return sigmoid(v);
  return at::vec::clamp(v + Vec<T>(3), Vec<T>(0), Vec<T>(6)) / Vec<T>(6);
}

// d activation(u) · dh; relu passes the gradient only where u > 0.
template <typename T>
Vec<T> activation_backward(const Vec<T>& dh, const Vec<T>& u, Activation a) {
  if (a == Activation::ReLU) return Vec<T>::blendv(Vec<T>(0), dh, u > Vec<T>(0));
  const Vec<T> sig = sigmoid(u);
  return dh * (sig * (Vec<T>(1) + u * (Vec<T>(1) - sig)));
}

// d gate(v) · ds from s = gate(v): sigmoid s(1 - s); hardsigmoid 1/6 where
// 0 < s < 1 and an exact 0 elsewhere (selected, so an infinite ds stays 0).
template <typename T>
Vec<T> gate_backward(const Vec<T>& ds, const Vec<T>& s, Gate g) {
  if (g == Gate::Sigmoid) return ds * (s * (Vec<T>(1) - s));
  return Vec<T>::blendv(Vec<T>(0), ds / Vec<T>(6), (s > Vec<T>(0)) & (s < Vec<T>(1)));
}

// act[i] = activation(hidden[i]) for n values.
template <typename T>
void activate_all(const T* hidden, int64_t n, Activation a, T* act) {
  parallel_map<T>([a](Vec<T> u) { return activate(u, a); }, act, n, hidden);
}

// The MLP's parameters, as (R, C) and (C, R) row-major, stored in the
// accumulation type or in the input's 16-bit type (W_t; read as T).
template <typename W_t>
struct ExcitationWeights {
  const W_t* w1;  // (R, C)
  const W_t* b1;  // (R), null in the backward
  const W_t* w2;  // (C, R)
  const W_t* b2;  // (C), null in the backward
};

// hidden (G, R) = z W1ᵀ + b1 (pre-activation); scale (G, C) = gate(act(hidden) W2ᵀ + b2).
// `act` is (G, R) scratch.
template <typename T, typename W_t>
void excitation_forward_rows(const SEProblem& p, const ExcitationWeights<W_t>& w, const T* z, int64_t G, T* hidden,
                             T* act, T* scale) {
  matmul_transposed_weight(w.w1, w.b1, p.R, p.C, z, G, hidden);
  activate_all(hidden, G * p.R, p.activation, act);
  matmul_transposed_weight(w.w2, w.b2, p.C, p.R, act, G, scale);
  const Gate gate = p.gate;
  parallel_map<T>([gate](Vec<T> v) { return apply_gate(v, gate); }, scale, G * p.C, scale);
}

// From ds (G, C) = sum_p g*x: dv (G, C) at the gate's input, du (G, R) at the
// activation's input, dz (G, C) at the pooled means. `dh` is (G, R) scratch.
template <typename T, typename W_t>
void excitation_backward_rows(const SEProblem& p, const ExcitationWeights<W_t>& w, const T* ds, const T* hidden,
                              const T* scale, int64_t G, T* dv, T* dh, T* du, T* dz) {
  const Gate gate = p.gate;
  const Activation activation = p.activation;
  parallel_map<T>([gate](Vec<T> d, Vec<T> s) { return gate_backward(d, s, gate); }, dv, G * p.C, ds, scale);
  matmul_weight(w.w2, p.C, p.R, dv, G, dh);
  parallel_map<T>([activation](Vec<T> d, Vec<T> u) { return activation_backward(d, u, activation); }, du,
                  G * p.R, dh, hidden);
  matmul_weight(w.w1, p.R, p.C, du, G, dz);
}

}  // namespace se_fused::cpu
