// Host-visible interface of the cluster (read-once) path: its geometry and
// the launchers of its forward and backward kernels (cluster_forward.cu,
// cluster_backward.cu). Planning lives in squeeze_excitation_cuda.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace se_fused {
namespace cuda {

constexpr int kClusterThreads = 256;
constexpr int kMaxGroup = 16;        // samples per cluster (accumulators per thread in the MLP)
constexpr int kMaxClusterSize = 16;  // non-portable maximum on sm_90

// Geometry of one cluster launch. "Rows" are the contiguous units a chunk is
// cut along: channels of P pixels (NCHW) or pixels of C channels (NHWC).
struct ClusterGeometry {
  int64_t N;
  int C, R, P;
  int M, G, K;             // CTAs per sample, samples per cluster, CTAs per cluster
  int rows_total, row_len; // C x P (NCHW) or P x C (NHWC)
  int rows_per_cta;
  int own_share;           // ceil(C / M): channels whose sums a CTA finalises
  int share_a, share_b;    // ceil(R / K) MLP rows, ceil(C / K) MLP columns per CTA
  int activation, gate;
  int chunk_bytes;         // shared bytes of one chunk buffer (16-byte multiple)
  int buffers;             // chunk buffers before the float region: 2 lets a persistent
                           // cluster load its next group while it uses this one
  // float offsets into the region after the chunk buffers
  int off_own, off_part, off_ushare, off_bshare, off_vec;
  int floats;
};

struct ForwardClusterArgs {
  const void* x;
  const void* residual;  // nullptr: plain form
  const float* w1;       // (R, C)
  const float* b1;       // (R)
  const float* w2t;      // (R, C): W2 transposed
  const float* b2;       // (C)
  void* out;
  float* pooled;         // (N, C)
  float* hidden;         // (N, R), pre-activation
  float* scale;          // (N, C)
};

struct BackwardClusterArgs {
  const void* grad_out;
  const void* x;
  const void* out;       // nullptr unless the residual form
  const float* w1;       // (R, C)
  const float* w2t;      // (R, C)
  const float* hidden;   // (N, R) saved pre-activation
  const float* scale;    // (N, C) saved scale
  void* grad_x;
  void* grad_residual;   // nullptr unless the residual form
  float* dv;             // (N, C) gradient at the gate's input
  float* du;             // (N, R) gradient at the activation's input
};

// The configuration of a launch of `blocks` CTAs in clusters of geo.K CTAs, each with
// `smem` bytes of dynamic shared memory, for the launch itself and for occupancy
// queries. Sets the kernel's attributes this needs (they are per kernel, and plans
// differ per shape). `attr` receives the cluster dimension and must outlive the result.
inline cudaLaunchConfig_t cluster_launch_config(const void* kernel, const ClusterGeometry& geo, size_t smem,
                                                unsigned blocks, cudaStream_t stream, cudaLaunchAttribute& attr) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kClusterThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = geo.K;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return config;
}

// The kernel a (dtype, layout) pair runs, for occupancy queries.
const void* forward_cluster_kernel(at::ScalarType dtype, bool channels_last);
const void* backward_cluster_kernel(at::ScalarType dtype, bool channels_last);

// Launch `clusters` persistent clusters of K CTAs (each walks the groups of G samples
// `clusters` apart) with `smem` bytes of dynamic shared memory each.
void launch_forward_cluster(const ClusterGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                            int clusters, const ForwardClusterArgs& args, cudaStream_t stream);
void launch_backward_cluster(const ClusterGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                             int clusters, const BackwardClusterArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace se_fused
