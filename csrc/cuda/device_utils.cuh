// Device helpers shared by the SE CUDA kernels: element conversion, 16-byte
// vectors, asynchronous global->shared copies, the activation/gate functions
// and fixed-order warp reductions (bitwise reproducible).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace se_fused {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// The PyTorch semantics the fused epilogues must keep: relu(NaN) = NaN, and
// relu's backward passes the gradient wherever the output is not <= 0.
__device__ __forceinline__ float relu_nan(float v) { return v < 0.f ? 0.f : v; }
__device__ __forceinline__ bool relu_blocks(float out) { return out <= 0.f; }

// activation: 0 relu, 1 silu; gate: 0 sigmoid, 1 hardsigmoid (se_fused::Activation/Gate).
__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + __expf(-v)); }

__device__ __forceinline__ float apply_activation(float u, int activation) {
  return activation == 0 ? relu_nan(u) : u * sigmoidf_(u);
}
// grad * act'(u); relu selects (an infinite grad stays out where the unit is off).
__device__ __forceinline__ float activation_backward(float grad, float u, int activation) {
  if (activation == 0) return u > 0.f ? grad : 0.f;
  const float s = sigmoidf_(u);
  return grad * (s * (1.f + u * (1.f - s)));
}
__device__ __forceinline__ float apply_gate(float v, int gate) {
  return gate == 0 ? sigmoidf_(v) : fminf(fmaxf(v / 6.f + 0.5f, 0.f), 1.f);
}
// grad * gate'(v) in terms of s = gate(v); hardsigmoid's slope is 1/6 exactly where 0 < s < 1
// and is selected, not multiplied, so an infinite grad gives 0 outside.
__device__ __forceinline__ float gate_backward_from_output(float grad, float s, int gate) {
  return gate == 0 ? grad * (s * (1.f - s)) : ((s > 0.f && s < 1.f) ? grad / 6.f : 0.f);
}

// Butterfly sum over a warp: every lane ends with the same, order-fixed total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each of V values over the warp's lanes (V a power of two up to kWarp): halving
// exchanges, each sending half of a lane's values to its partner, take V - 1 shuffles plus
// one per offset left, against 5 per value for separate butterflies (the excitation
// rows kernels' reductions, where they were most of the instructions at K = R). Lane l
// returns the total of value l / (kWarp / V); every value's sum runs in a fixed order.
template <int N, int Offset, int V>
__device__ __forceinline__ float halving_sums(float (&v)[V], int lane) {
  if constexpr (N > 1) {  // compile-time indices throughout, so v stays in registers
    const bool upper = (lane & Offset) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float send = upper ? v[i] : v[i + N / 2];
      const float keep = upper ? v[i + N / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Offset);
    }
    return halving_sums<N / 2, Offset / 2>(v, lane);
  } else {
#pragma unroll
    for (int offset = Offset; offset > 0; offset /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
    return v[0];
  }
}

template <int V>
__device__ __forceinline__ float warp_transpose_sum(float (&v)[V], int lane) {
  static_assert(V >= 1 && V <= kWarp && (V & (V - 1)) == 0, "a power of two up to a warp");
  return halving_sums<V, kWarp / 2>(v, lane);
}

// 16 bytes of `T`, loaded and stored as one access.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// cp.async (sm_80+): 16-byte global->shared copies that need no registers, so
// a CTA can have its whole slice in flight at once.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}
// Closes this thread's group of cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight
// (1: the older of two groups has landed while the newer one keeps loading).
template <int kPending>
__device__ __forceinline__ void cp_async_wait_pending() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// The GPU's global timer in ns (one clock for all SMs, unlike clock64): the pipelined path's trace.
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t = 0;
#if defined(__CUDA_ARCH__)
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
#endif
  return t;
}

// Flags and counters between CTAs of one launch (the pipelined path): gpu-scope
// acquire/release, so data written before a release is visible after the acquire
// that reads it. Data written by other CTAs is then read with ld.global.cg (L2, not
// the SM's L1, which is not coherent and may hold an older copy of the line).
__device__ __forceinline__ unsigned load_acquire_gpu(const unsigned* p) {
  unsigned v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
#endif
  return v;
}
__device__ __forceinline__ void store_release_gpu(unsigned* p, unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
#endif
}
__device__ __forceinline__ unsigned fetch_add_acq_rel_gpu(unsigned* p, unsigned v) {
  unsigned old = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
#endif
  return old;
}

// 16-byte global accesses for a line's last use (evict it first, so the lines still
// to be re-read stay in L2).
template <typename T>
__device__ __forceinline__ Vec16<T> load16_last_use(const T* p) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  Vec16<T> v;
  static_assert(sizeof(v) == sizeof(raw), "16 bytes");
  memcpy(&v, &raw, sizeof(raw));
  return v;
}
template <typename T>
__device__ __forceinline__ void store16_streaming(T* p, const Vec16<T>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// out[0..V) = run[0..V) for a 16-byte aligned run of V floats (V a multiple of 4), as
// float4 loads: the epilogues' per-channel values, which one float per element read
// with bank conflicts (shared memory) or V loads per vector (global).
template <int V>
__device__ __forceinline__ void load_float_run(const float* run, float (&out)[V]) {
  static_assert(V % 4 == 0, "whole float4 loads");
#pragma unroll
  for (int q = 0; q < V / 4; ++q) {
    const float4 f = reinterpret_cast<const float4*>(run)[q];
    out[4 * q] = f.x, out[4 * q + 1] = f.y, out[4 * q + 2] = f.z, out[4 * q + 3] = f.w;
  }
}

}  // namespace cuda
}  // namespace se_fused
