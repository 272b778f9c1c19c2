// Forward kernel of the cluster path: squeeze from shared memory, the MLP
// batched over the cluster's samples, excite from the same shared memory.
// HBM traffic 2T (3T with the residual epilogue): x read once, out written once.
//
// Persistent and, where two chunk buffers fit, double-buffered (for_each_group).
#include "cluster_kernels.cuh"

namespace se_fused {
namespace cuda {
namespace {

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kClusterThreads) se_forward_cluster_kernel(
    ClusterGeometry geo, const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ w1,
    const float* __restrict__ b1, const float* __restrict__ w2t, const float* __restrict__ b2,
    T* __restrict__ out, float* __restrict__ pooled, float* __restrict__ hidden, float* __restrict__ scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cg::cluster_group cluster = cg::this_cluster();
  const ClusterSmem sm = carve(geo, smem_raw);
  constexpr int kVec = Vec16<T>::kSize;
  const auto load = [&](const ClusterPlace& pl, unsigned char* buffer) {
    issue_chunk_copy(reinterpret_cast<T*>(buffer), x + pl.base, pl.len);
  };
  for_each_group(geo, static_cast<int>(cluster.block_rank()), smem_raw, load, [&](const ClusterPlace& pl,
                                                                                 unsigned char* buffer) {
    const T* chunk = reinterpret_cast<const T*>(buffer);
    // 1. Squeeze: per-channel sums of the chunk in shared memory.
    reduce_chunk<T, kChannelsLast>(geo, pl, chunk, static_cast<const T*>(nullptr), sm, sm.vec);
    if constexpr (kChannelsLast) cluster.sync();  // partial sums of all chunks visible
    finalize_own<kChannelsLast>(cluster, geo, pl, sm);
    __syncthreads();
    const float inv_p = 1.f / static_cast<float>(geo.P);
    for (int j = threadIdx.x; j < geo.own_share; j += blockDim.x) {
      const int c = pl.m * geo.own_share + j;
      sm.own[j] *= inv_p;
      if (pl.real && c < geo.C) pooled[pl.n * geo.C + c] = sm.own[j];
    }
    cluster.sync();

    // 2. Excitation, batched over the group's samples and split across the cluster.
    gather_channels(cluster, geo, sm);
    __syncthreads();
    hidden_layer(geo, pl, w1, sm, [&](int g, int r, float acc) {
      const float u = acc + __ldg(b1 + r);
      const int64_t n = pl.group_n0 + g;
      if (n < geo.N) hidden[n * geo.R + r] = u;
      return apply_activation(u, geo.activation);
    });
    cluster.sync();
    gather_hidden(cluster, geo, sm);
    __syncthreads();
    output_layer(geo, pl, w2t, sm, [&](int g, int c, float acc) {
      const float s = apply_gate(acc + __ldg(b2 + c), geo.gate);
      const int64_t n = pl.group_n0 + g;
      if (n < geo.N) scale[n * geo.C + c] = s;
      return s;
    });
    cluster.sync();  // every thread of the cluster (this CTA's too) is past the MLP; vec is rewritten below
    const int chans = epilogue_channels(geo, kChannelsLast);
    for (int j = threadIdx.x; j < chans; j += blockDim.x) {
      const int c = epilogue_channel<kChannelsLast>(geo, pl, j);
      sm.vec[j] = c < geo.C ? output_value(cluster, geo, sm, pl.g, c) : 0.f;
    }
    cluster.sync();  // no CTA leaves while another still reads its shared memory

    // 3. Excite from shared memory: out = x*s (+ residual, ReLU).
    const int vectors = pl.len / kVec;
    constexpr int kUnroll = 4;
    for (int i0 = threadIdx.x; i0 < vectors; i0 += kUnroll * blockDim.x) {
      Vec16<T> rv[kUnroll];
      if (residual != nullptr) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = i0 + u * blockDim.x;
          if (i < vectors) rv[u] = *reinterpret_cast<const Vec16<T>*>(residual + pl.base + int64_t(i) * kVec);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * blockDim.x;
        if (i >= vectors) break;
        const Vec16<T> xv = *reinterpret_cast<const Vec16<T>*>(chunk + i * kVec);
        Vec16<T> ov;
        float s[kVec];
        channel_values<kChannelsLast>(geo, sm.vec, i * kVec, s);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          float y = to_float(xv.v[e]) * s[e];
          if (residual != nullptr) y = relu_nan(y + to_float(rv[u].v[e]));
          ov.v[e] = from_float<T>(y);
        }
        *reinterpret_cast<Vec16<T>*>(out + pl.base + int64_t(i) * kVec) = ov;
      }
    }

  });
#else
  __trap();  // launched only on sm_90 and newer (see plan_cluster)
#endif
}


}  // namespace

const void* forward_cluster_kernel(at::ScalarType dtype, bool channels_last) {
  return dispatch_cluster(dtype, channels_last, [](auto t, auto cl) {
    return reinterpret_cast<const void*>(&se_forward_cluster_kernel<decltype(t), decltype(cl)::value>);
  });
}

void launch_forward_cluster(const ClusterGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                            int clusters, const ForwardClusterArgs& a, cudaStream_t stream) {
  dispatch_cluster(dtype, channels_last, [&](auto t, auto cl) {
    using T = decltype(t);
    launch_cluster_kernel(se_forward_cluster_kernel<T, decltype(cl)::value>, geo, smem, clusters, stream,
                          static_cast<const T*>(a.x), static_cast<const T*>(a.residual), a.w1, a.b1, a.w2t, a.b2,
                          static_cast<T*>(a.out), a.pooled, a.hidden, a.scale);
    return 0;
  });
}

}  // namespace cuda
}  // namespace se_fused
