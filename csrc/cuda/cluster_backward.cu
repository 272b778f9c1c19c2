// Backward kernel of the cluster path: g (masked by the ReLU output in the
// residual form) and x are brought on chip once, ds = sum g*x is reduced from
// shared memory, the MLP backward runs batched over the cluster's samples, and
// dx = g*s + dz/P is written from the g kept on chip. HBM traffic 3T (5T with
// the residual: out read, grad_residual written as well). Persistent and, where
// two chunk buffers fit, double-buffered (for_each_group).
#include "cluster_kernels.cuh"

namespace se_fused {
namespace cuda {
namespace {

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kClusterThreads) se_backward_cluster_kernel(
    ClusterGeometry geo, const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ out,
    const float* __restrict__ w1, const float* __restrict__ w2t, const float* __restrict__ hidden,
    const float* __restrict__ scale, T* __restrict__ grad_x, T* __restrict__ grad_residual,
    float* __restrict__ dv_out, float* __restrict__ du_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cg::cluster_group cluster = cg::this_cluster();
  const ClusterSmem sm = carve(geo, smem_raw);
  constexpr int kVec = Vec16<T>::kSize;
  // A chunk buffer holds g (kept until dx is written) and then x.
  const int64_t chunk_elements = static_cast<int64_t>(geo.rows_per_cta) * geo.row_len;
  const auto load = [&](const ClusterPlace& pl, unsigned char* buffer) {
    issue_chunk_copy(reinterpret_cast<T*>(buffer), grad_out + pl.base, pl.len);
    issue_chunk_copy(reinterpret_cast<T*>(buffer) + chunk_elements, x + pl.base, pl.len);
  };
  for_each_group(geo, static_cast<int>(cluster.block_rank()), smem_raw, load, [&](const ClusterPlace& pl,
                                                                                 unsigned char* buffer) {
    T* g_chunk = reinterpret_cast<T*>(buffer);
    const T* x_chunk = g_chunk + chunk_elements;

    // 1. ds = sum_p g'*x with g' = grad_out masked by the ReLU output.
    const int vectors = pl.len / kVec;
    if (out != nullptr) {
      for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
        const Vec16<T> ov = *reinterpret_cast<const Vec16<T>*>(out + pl.base + int64_t(i) * kVec);
        Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(g_chunk + i * kVec);
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (relu_blocks(to_float(ov.v[e]))) gv.v[e] = from_float<T>(0.f);
        *reinterpret_cast<Vec16<T>*>(g_chunk + i * kVec) = gv;
        *reinterpret_cast<Vec16<T>*>(grad_residual + pl.base + int64_t(i) * kVec) = gv;
      }
      __syncthreads();
    }
    reduce_chunk<T, kChannelsLast>(geo, pl, g_chunk, x_chunk, sm, sm.vec);
    if constexpr (kChannelsLast) cluster.sync();
    finalize_own<kChannelsLast>(cluster, geo, pl, sm);
    __syncthreads();
    for (int j = threadIdx.x; j < geo.own_share; j += blockDim.x) {
      const int c = pl.m * geo.own_share + j;
      float dv = 0.f;
      if (pl.real && c < geo.C) {
        dv = gate_backward_from_output(sm.own[j], scale[pl.n * geo.C + c], geo.gate);
        dv_out[pl.n * geo.C + c] = dv;
      }
      sm.own[j] = dv;
    }
    cluster.sync();

    // 2. MLP backward: du = (dv W2) * act'(u), dz = du W1 (batched over the group).
    gather_channels(cluster, geo, sm);
    __syncthreads();
    hidden_layer(geo, pl, w2t, sm, [&](int g, int r, float acc) {
      const int64_t n = pl.group_n0 + g;
      if (n >= geo.N) return 0.f;
      const float du = activation_backward(acc, hidden[n * geo.R + r], geo.activation);
      du_out[n * geo.R + r] = du;
      return du;
    });
    cluster.sync();
    gather_hidden(cluster, geo, sm);
    __syncthreads();
    const float inv_p = 1.f / static_cast<float>(geo.P);
    output_layer(geo, pl, w1, sm, [&](int, int, float acc) { return acc * inv_p; });
    cluster.sync();  // also a barrier of this CTA's threads: vec is rewritten below
    const int chans = epilogue_channels(geo, kChannelsLast);
    float* chan_scale = sm.vec;
    float* chan_add = sm.vec + chans;
    for (int j = threadIdx.x; j < chans; j += blockDim.x) {
      const int c = epilogue_channel<kChannelsLast>(geo, pl, j);
      const bool valid = pl.real && c < geo.C;
      chan_add[j] = c < geo.C ? output_value(cluster, geo, sm, pl.g, c) : 0.f;
      chan_scale[j] = valid ? scale[pl.n * geo.C + c] : 0.f;
    }
    cluster.sync();

    // 3. dx = g'*s + dz/P from the g' kept in shared memory.
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
      const Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(g_chunk + i * kVec);
      Vec16<T> dx;
      float s[kVec], add[kVec];
      channel_values<kChannelsLast>(geo, chan_scale, i * kVec, s);
      channel_values<kChannelsLast>(geo, chan_add, i * kVec, add);
#pragma unroll
      for (int e = 0; e < kVec; ++e) dx.v[e] = from_float<T>(to_float(gv.v[e]) * s[e] + add[e]);
      *reinterpret_cast<Vec16<T>*>(grad_x + pl.base + int64_t(i) * kVec) = dx;
    }
  });
#else
  __trap();
#endif
}


}  // namespace

const void* backward_cluster_kernel(at::ScalarType dtype, bool channels_last) {
  return dispatch_cluster(dtype, channels_last, [](auto t, auto cl) {
    return reinterpret_cast<const void*>(&se_backward_cluster_kernel<decltype(t), decltype(cl)::value>);
  });
}

void launch_backward_cluster(const ClusterGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                             int clusters, const BackwardClusterArgs& a, cudaStream_t stream) {
  dispatch_cluster(dtype, channels_last, [&](auto t, auto cl) {
    using T = decltype(t);
    launch_cluster_kernel(se_backward_cluster_kernel<T, decltype(cl)::value>, geo, smem, clusters, stream,
                          static_cast<const T*>(a.grad_out), static_cast<const T*>(a.x),
                          static_cast<const T*>(a.out), a.w1, a.w2t, a.hidden, a.scale, static_cast<T*>(a.grad_x),
                          static_cast<T*>(a.grad_residual), a.dv, a.du);
    return 0;
  });
}

}  // namespace cuda
}  // namespace se_fused
