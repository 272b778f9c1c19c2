// Device side of the cluster (read-once) path, shared by cluster_forward.cu and
// cluster_backward.cu. A thread-block cluster owns G samples; each sample is
// split into M contiguous chunks, one per CTA (K = G*M CTAs). A CTA keeps its
// chunk in shared memory between the squeeze and the excite; the cluster
// exchanges per-channel sums and the MLP vectors through distributed shared
// memory, and splits the MLP (batched over the G samples) across its CTAs.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include "cluster.h"
#include "device_utils.cuh"

namespace cg = cooperative_groups;

namespace se_fused {
namespace cuda {
namespace {

// Shared-memory float region of a CTA; *remote* arrays are read by other CTAs
// of the cluster through distributed shared memory.
struct ClusterSmem {
  float* own;     // [own_share] remote: finished per-channel values of this CTA's share
  float* part;    // [C] (NHWC) remote: this chunk's partial channel sums
  float* ushare;  // [G][share_a] remote: this CTA's slice of the hidden layer
  float* bshare;  // [G][share_b] remote: this CTA's slice of the output layer
  float* vec;     // local: gathered MLP inputs, then per-channel epilogue values
};

__device__ __forceinline__ ClusterSmem carve(const ClusterGeometry& geo, unsigned char* raw) {
  float* f = reinterpret_cast<float*>(raw + static_cast<int64_t>(geo.chunk_bytes) * geo.buffers);
  return {f + geo.off_own, f + geo.off_part, f + geo.off_ushare, f + geo.off_bshare, f + geo.off_vec};
}

// Position of this CTA in group `group` (G samples from group * G): sample g of
// the group, chunk m of the sample.
struct ClusterPlace {
  int rank, g, m;
  int64_t n;         // sample index (may be >= N for the padding of the last group)
  bool real;
  int row0, rows;    // first row and number of rows of the chunk
  int len;           // elements in the chunk
  int64_t base;      // element offset of the chunk in the tensor
  int64_t group_n0;  // first sample of the group
};

__device__ __forceinline__ ClusterPlace locate(const ClusterGeometry& geo, int rank, int64_t group) {
  ClusterPlace pl;
  pl.rank = rank;
  pl.g = rank / geo.M;
  pl.m = rank % geo.M;
  pl.group_n0 = group * geo.G;
  pl.n = pl.group_n0 + pl.g;
  pl.real = pl.n < geo.N;
  pl.row0 = pl.m * geo.rows_per_cta;
  pl.rows = pl.real ? max(0, min(geo.rows_total - pl.row0, geo.rows_per_cta)) : 0;
  pl.len = pl.rows * geo.row_len;
  pl.base = pl.n * static_cast<int64_t>(geo.C) * geo.P + static_cast<int64_t>(pl.row0) * geo.row_len;
  return pl;
}

template <typename T>
__device__ __forceinline__ void issue_chunk_copy(T* dst, const T* src, int len) {
  constexpr int kVec = Vec16<T>::kSize;
  for (int i = threadIdx.x; i < len / kVec; i += blockDim.x) cp_async_16(dst + i * kVec, src + i * kVec);
}

// Per-channel sums of a chunk (a, or a*b) in a fixed order. NCHW: own[r] for
// local row r (a whole channel). NHWC: part[c] over the chunk's pixels, with
// `scratch` (blockDim * 16 bytes' worth of elements, in floats) combining pixel
// lanes in lane order.
template <typename T, bool kChannelsLast>
__device__ void reduce_chunk(const ClusterGeometry& geo, const ClusterPlace& pl, const T* a, const T* b,
                             const ClusterSmem& sm, float* scratch) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  if constexpr (!kChannelsLast) {
    for (int r = warp; r < geo.own_share; r += warps) {
      float acc0 = 0.f, acc1 = 0.f;
      if (r < pl.rows) {
        const T* ar = a + r * geo.P;
        const T* br = b ? b + r * geo.P : nullptr;
        int q = lane;
        for (; q + kWarp < geo.P; q += 2 * kWarp) {
          acc0 += to_float(ar[q]) * (br ? to_float(br[q]) : 1.f);
          acc1 += to_float(ar[q + kWarp]) * (br ? to_float(br[q + kWarp]) : 1.f);
        }
        if (q < geo.P) acc0 += to_float(ar[q]) * (br ? to_float(br[q]) : 1.f);
      }
      const float total = warp_sum(acc0 + acc1);
      if (lane == 0) sm.own[r] = total;
    }
  } else {
    const int C = geo.C;
    constexpr int kVec = Vec16<T>::kSize;
    const int vector_columns = C / kVec;
    const int lanes = C <= static_cast<int>(blockDim.x) ? static_cast<int>(blockDim.x) / C : 1;
    if (C % kVec == 0 && vector_columns <= static_cast<int>(blockDim.x)) {
      // 16-byte loads: a thread sums kVec channels over every vector_lanes-th pixel of the chunk,
      // and the pixel lanes are added in lane order through `scratch` (vector_lanes * C <=
      // blockDim * kVec floats; make_geometry sizes it). One element per thread per pixel was
      // most of the kernel's instructions (ncu at dd6c3b3: an instruction every 4.9 cycles per
      // scheduler with 8 warps per SM).
      const int vector_lanes = static_cast<int>(blockDim.x) / vector_columns;
      const int column = tid % vector_columns, pixel_lane = tid / vector_columns;
      if (pixel_lane < vector_lanes) {
        float acc[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
        for (int r = pixel_lane; r < pl.rows; r += vector_lanes) {
          const int i = r * C + column * kVec;
          const Vec16<T> av = *reinterpret_cast<const Vec16<T>*>(a + i);
          Vec16<T> bv;
          if (b) bv = *reinterpret_cast<const Vec16<T>*>(b + i);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] += to_float(av.v[e]) * (b ? to_float(bv.v[e]) : 1.f);
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) scratch[pixel_lane * C + column * kVec + e] = acc[e];
      }
      __syncthreads();
      for (int c = tid; c < C; c += blockDim.x) {
        float total = 0.f;
        for (int l = 0; l < vector_lanes; ++l) total += scratch[l * C + c];
        sm.part[c] = total;
      }
    } else if (lanes > 1) {
      const int c = tid % C, pixel_lane = tid / C;
      float acc = 0.f;
      if (pixel_lane < lanes) {
        for (int r = pixel_lane; r < pl.rows; r += lanes) {
          const int i = r * C + c;
          acc += to_float(a[i]) * (b ? to_float(b[i]) : 1.f);
        }
        scratch[pixel_lane * C + c] = acc;
      }
      __syncthreads();
      if (tid < C) {
        float total = 0.f;
        for (int l = 0; l < lanes; ++l) total += scratch[l * C + tid];
        sm.part[tid] = total;
      }
    } else {
      for (int c = tid; c < C; c += blockDim.x) {
        float acc0 = 0.f, acc1 = 0.f;
        int r = 0;
        for (; r + 1 < pl.rows; r += 2) {
          acc0 += to_float(a[r * C + c]) * (b ? to_float(b[r * C + c]) : 1.f);
          acc1 += to_float(a[(r + 1) * C + c]) * (b ? to_float(b[(r + 1) * C + c]) : 1.f);
        }
        if (r < pl.rows) acc0 += to_float(a[r * C + c]) * (b ? to_float(b[r * C + c]) : 1.f);
        sm.part[c] = acc0 + acc1;
      }
    }
  }
}

// Loads a thread issues at once before using them: weights in the MLP layers, remote sums in
// finalize_own. Both are on the cluster's critical path (every CTA waits for them at the next
// barrier), and loops with one load per iteration left the round trips in series. Batched,
// the best plans gained 7-47% at conv3_x-conv5_x and in every backward (H100, dd6c3b3 against
// cca1da2; docs/cuda-notes.md). 4, not 8: 8 pushed the bf16 forward into spills.
constexpr int kMlpLoads = 4;

// NHWC: own[j] = sum over the sample's M chunks (in rank order) of part[c] for
// the channels c = m*own_share + j this CTA owns. Needs a cluster barrier before.
template <bool kChannelsLast>
__device__ void finalize_own(cg::cluster_group& cluster, const ClusterGeometry& geo, const ClusterPlace& pl,
                             const ClusterSmem& sm) {
  if constexpr (kChannelsLast) {
    for (int j = threadIdx.x; j < geo.own_share; j += blockDim.x) {
      const int c = pl.m * geo.own_share + j;
      // kMlpLoads remote loads issued before their adds (a loop over M left them in series:
      // one distributed-shared-memory round trip each), added in rank order.
      float total = 0.f;
      for (int m0 = 0; m0 < geo.M; m0 += kMlpLoads) {
        float parts[kMlpLoads];
#pragma unroll
        for (int u = 0; u < kMlpLoads; ++u)
          parts[u] = m0 + u < geo.M && c < geo.C ? cluster.map_shared_rank(sm.part, pl.g * geo.M + m0 + u)[c] : 0.f;
#pragma unroll
        for (int u = 0; u < kMlpLoads; ++u) total += parts[u];  // 0 past M
      }
      sm.own[j] = total;
    }
  }
}

// The group loop of the persistent cluster kernels. A launch holds as many clusters as
// the GPU keeps resident; each walks the groups of G samples `clusters` apart (all CTAs of
// a cluster walk the same groups, so their cluster barriers match). `load(place, buffer)`
// issues a group's cp.async copies into a chunk buffer (uncommitted); `body(place,
// buffer)` uses them. With two buffers (geo.buffers == 2) the next group's copies are in
// flight while `body` runs, so the loads overlap the reduction, the cluster barriers, the
// MLP and the stores (ncu had the one-group-per-cluster kernel at 29.5% of DRAM bandwidth,
// 38% of its stalls at barriers, H200 651df3d); with one, they start after `body`.
template <typename Load, typename Body>
__device__ __forceinline__ void for_each_group(const ClusterGeometry& geo, int rank, unsigned char* smem,
                                               const Load& load, const Body& body) {
  const int64_t groups = (geo.N + geo.G - 1) / geo.G, stride = gridDim.x / geo.K;
  const auto buffer = [&](int64_t iteration) {  // chunk_bytes is a 16-byte multiple
    return smem + (iteration % geo.buffers) * static_cast<int64_t>(geo.chunk_bytes);
  };
  // Places are recomputed from the group index where needed: kept alive across `body`,
  // two of them pushed the backward kernel from 123 registers to 128 and spills.
  int64_t group = blockIdx.x / geo.K;
  load(locate(geo, rank, group), buffer(0));
  cp_async_commit();
  for (int64_t iteration = 0; group < groups; ++iteration) {
    const int64_t next_group = group + stride;
    const bool prefetch = geo.buffers == 2 && next_group < groups;
    if (prefetch) {
      // The other buffer was last read by the previous group's body: every thread is past it
      // (the loop's barriers) before it is overwritten.
      __syncthreads();
      load(locate(geo, rank, next_group), buffer(iteration + 1));
      cp_async_commit();
      cp_async_wait_pending<1>();  // this group's copies have landed; the next group's keep loading
    } else {
      cp_async_wait_pending<0>();
    }
    __syncthreads();
    body(locate(geo, rank, group), buffer(iteration));
    if (!prefetch && next_group < groups) {
      // One buffer: the next group's copies start once every thread is done with this one.
      __syncthreads();
      load(locate(geo, rank, next_group), buffer(iteration));
      cp_async_commit();
    }
    group = next_group;
  }
}

// vec[g][c] = own value of channel c of sample g, from whichever CTA owns it.
__device__ void gather_channels(cg::cluster_group& cluster, const ClusterGeometry& geo, const ClusterSmem& sm) {
  const int total = geo.G * geo.C;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int g = i / geo.C, c = i % geo.C, owner = c / geo.own_share;
    sm.vec[i] = cluster.map_shared_rank(sm.own, g * geo.M + owner)[c - owner * geo.own_share];
  }
}

// vec[g][r] = hidden value r of sample g, from the CTA whose MLP rows hold it.
__device__ void gather_hidden(cg::cluster_group& cluster, const ClusterGeometry& geo, const ClusterSmem& sm) {
  const int total = geo.G * geo.R;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int g = i / geo.R, r = i % geo.R, owner = r / geo.share_a;
    sm.vec[i] = cluster.map_shared_rank(sm.ushare, owner)[g * geo.share_a + r - owner * geo.share_a];
  }
}

// Output-layer value of channel c of sample g (lives in the CTA whose MLP columns hold c).
__device__ __forceinline__ float output_value(cg::cluster_group& cluster, const ClusterGeometry& geo,
                                              const ClusterSmem& sm, int g, int c) {
  const int owner = c / geo.share_b;
  return cluster.map_shared_rank(sm.bshare, owner)[g * geo.share_b + c - owner * geo.share_b];
}

// Hidden layer, rows [rank*share_a, ...): acc[g] = sum_c A[r][c] vec[g][c]; one
// warp per row, lanes over channels, one accumulator per sample of the group.
// `post(g, r, acc)` returns what the output layer consumes. kLoads: weights a lane
// loads before using them (the pipelined path's single CTA runs the whole MLP of a
// group, R / 8 rows per warp, so it keeps more in flight than a cluster's share).
template <int kLoads = kMlpLoads, typename Post>
__device__ void hidden_layer(const ClusterGeometry& geo, const ClusterPlace& pl, const float* __restrict__ A,
                             const ClusterSmem& sm, const Post& post) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int r0 = pl.rank * geo.share_a, r1 = min(geo.R, r0 + geo.share_a);
  for (int r = r0 + warp; r < r1; r += warps) {
    float acc[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
    const float* row = A + static_cast<int64_t>(r) * geo.C;
    for (int c0 = lane; c0 < geo.C; c0 += kLoads * kWarp) {
      float w[kLoads];  // kLoads L2 loads in flight, then their products in order
#pragma unroll
      for (int u = 0; u < kLoads; ++u) w[u] = c0 + u * kWarp < geo.C ? __ldg(row + c0 + u * kWarp) : 0.f;
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int c = c0 + u * kWarp;
        if (c >= geo.C) break;
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < geo.G) acc[g] += w[u] * sm.vec[g * geo.C + c];
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < geo.G) {
        const float total = warp_sum(acc[g]);
        if (lane == 0) sm.ushare[g * geo.share_a + (r - r0)] = post(g, r, total);
      }
    }
  }
}

// Output layer, columns [rank*share_b, ...): acc[g] = sum_r B[r][c] vec[g][r];
// one thread per channel. `post(g, c, acc)` returns the value kept in bshare.
template <int kLoads = kMlpLoads, typename Post>
__device__ void output_layer(const ClusterGeometry& geo, const ClusterPlace& pl, const float* __restrict__ B,
                             const ClusterSmem& sm, const Post& post) {
  const int c0 = pl.rank * geo.share_b, c1 = min(geo.C, c0 + geo.share_b);
  for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
    float acc[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
    for (int r0 = 0; r0 < geo.R; r0 += kLoads) {
      float w[kLoads];  // kLoads L2 loads in flight, then their products in order
#pragma unroll
      for (int u = 0; u < kLoads; ++u)
        w[u] = r0 + u < geo.R ? __ldg(B + static_cast<int64_t>(r0 + u) * geo.C + c) : 0.f;
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int r = r0 + u;
        if (r >= geo.R) break;
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < geo.G) acc[g] += w[u] * sm.vec[g * geo.R + r];
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
      if (g < geo.G) sm.bshare[g * geo.share_b + (c - c0)] = post(g, c, acc[g]);
  }
}

// Channel of the first element of 16-byte vector i of a chunk, as an index into
// the CTA's per-channel arrays (NCHW: local row; NHWC: channel), and the
// position within that channel's run.
struct ChannelCursor {
  int index, pos;
  template <bool kChannelsLast>
  __device__ __forceinline__ void start(const ClusterGeometry& geo, int element) {
    if constexpr (kChannelsLast) {
      index = element % geo.C;
      pos = 0;
    } else {
      index = element / geo.P;
      pos = element - index * geo.P;
    }
  }
  template <bool kChannelsLast>
  __device__ __forceinline__ void advance(const ClusterGeometry& geo) {
    if constexpr (kChannelsLast) {
      if (++index == geo.C) index = 0;
    } else {
      if (++pos == geo.P) {
        pos = 0;
        ++index;
      }
    }
  }
};

// values[channel] for the kVec consecutive elements of a chunk from `element` on, through
// ChannelCursor. channels_last with C a multiple of kVec: the kVec channels are consecutive
// from a multiple of kVec, read as 16-byte loads (values must be 16-byte aligned; make_geometry
// aligns the epilogue arrays). One float per element, at a stride of kVec floats across a
// warp, was an 8-way bank conflict in bf16 (ncu: 4.9 wavefronts per shared load request,
// dd6c3b3). Same values either way.
template <bool kChannelsLast, int kVec>
__device__ __forceinline__ void channel_values(const ClusterGeometry& geo, const float* values, int element,
                                               float (&out)[kVec]) {
  if (kChannelsLast && geo.C % kVec == 0) {
    load_float_run(values + element % geo.C, out);
  } else {
    ChannelCursor cur;
    cur.start<kChannelsLast>(geo, element);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      out[e] = values[cur.index];
      cur.advance<kChannelsLast>(geo);
    }
  }
}

// Number of channel entries a CTA's epilogue arrays hold.
__device__ __forceinline__ int epilogue_channels(const ClusterGeometry& geo, bool channels_last) {
  return channels_last ? geo.C : geo.own_share;
}

// Channel (in the sample) of epilogue entry j.
template <bool kChannelsLast>
__device__ __forceinline__ int epilogue_channel(const ClusterGeometry& geo, const ClusterPlace& pl, int j) {
  return kChannelsLast ? j : pl.row0 + j;
}


// Runs `f(T tag, channels_last tag)` for the dtypes the cluster path serves.
template <typename F>
decltype(auto) dispatch_cluster(at::ScalarType dtype, bool channels_last, const F& f) {
  auto with_layout = [&](auto tag) {
    return channels_last ? f(tag, std::true_type{}) : f(tag, std::false_type{});
  };
  switch (dtype) {
    case at::kFloat: return with_layout(float{});
    case at::kHalf: return with_layout(at::Half{});
    case at::kBFloat16: return with_layout(at::BFloat16{});
    default: TORCH_CHECK(false, "se_fused: no cluster kernel for ", dtype);
  }
  return with_layout(float{});
}

// Launches `clusters` clusters of geo.K CTAs.
template <typename Kernel, typename... Args>
void launch_cluster_kernel(Kernel kernel, const ClusterGeometry& geo, size_t smem, int64_t clusters,
                           cudaStream_t stream, Args... args) {
  TORCH_CHECK(clusters > 0 && clusters * geo.K < (int64_t(1) << 31), "se_fused: batch too large for one launch");
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_launch_config(reinterpret_cast<const void*>(kernel), geo, smem,
                                                          static_cast<unsigned>(clusters * geo.K), stream, attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, geo, args...));
}

}  // namespace
}  // namespace cuda
}  // namespace se_fused
