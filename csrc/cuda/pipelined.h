// Host-visible interface of the pipelined (read-once through L2) path: its geometry
// and the launchers of its forward and backward kernels (pipelined.cu). Planning
// lives in squeeze_excitation_cuda.cu (plan_pipelined).
//
// Why a third path. The cluster path keeps a sample in shared memory and was
// measured latency-bound (H100 ncu: 8 warps per SM, 24% of DRAM bandwidth); the
// two-pass path runs each pass near the bandwidth but moves 3T forward, and its
// L2-sized batch chunks lost to their per-chunk launches (docs/cuda-notes.md).
// The pipelined path is one persistent launch of co-resident CTAs: each cuts the
// batch into tiles, reduces tile j (first read, from HBM), and `delay` steps later
// scales it (second read, from L2, where the tiles of the last `delay` steps still
// are), so HBM moves 2T forward and 3T backward, and the per-sample barrier is a
// counter in global memory (apex's one-pass GroupNorm), not a launch.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cluster.h"

namespace se_fused {
namespace cuda {

constexpr int kPipelineThreads = 256;
// Two CTAs (16 warps) per SM at least: at most 128 registers per thread (unbounded, the
// NHWC backward took 212: one CTA per SM), and the planner keeps a CTA's shared memory
// to half an SM's where it chooses the group size.
constexpr int kPipelineMinBlocks = 2;
// The staged MLP (see PipelineGeometry::mlp_block): floats of one weight buffer at most.
constexpr int kMlpStageFloats = 8192;

struct PipelineGeometry {
  int64_t N;
  int C, R, P;
  int G;               // samples per group: one arrival counter and one MLP (batched over the group)
  int activation, gate;
  // A sample is cut into tiles = row_blocks * channel_blocks. NCHW: a tile is
  // tile_channels whole channels (row_blocks = 1). NHWC: tile_rows pixels by
  // tile_channels channels; with several row blocks each one's channel sums are
  // partial and the group's finishing CTA adds them in row-block order.
  int tile_rows, tile_channels;
  int row_blocks, channel_blocks, tiles;
  int delay;           // steps between reducing a tile and scaling it; delay * grid >= G * tiles
  // The group MLP. mlp_block > 0: staged, the (R, C) weights streamed through two shared
  // buffers of R x mlp_block floats (row stride mlp_block + 4, mlp_stage_floats each) with
  // cp.async; 0: direct, the cluster path's layer functions (each lane's weight loads from L2,
  // a chain of round trips: ~180 us per group estimated at conv5_x).
  int mlp_block, mlp_stage_floats;
  // float offsets into dynamic shared memory
  int off_scratch, off_values, off_vec, off_ushare, off_bshare, off_stage, off_stash;
  int floats;
  ClusterGeometry mlp; // the MLP's view (K = M = 1, G samples) for the cluster path's layer functions
};

// SE_FUSED_CUDA_PIPELINE_TRACE (a diagnosis, benchmarks/pipeline_trace.py): per CTA and step,
// thread 0's %globaltimer (ns) at these points, 0 where the step had no such point.
enum PipelineTracePoint : int {
  kTraceStart = 0,   // the step begins
  kTraceReduced,     // its tile reduced and its arrival counted (0: no tile left to reduce)
  kTraceFinished,    // the group MLP it ran and the ready flag released (0: it finished no group)
  kTraceReady,       // the ready flag of the tile it scales seen (0: no tile to scale yet)
  kTraceScaled,      // that tile scaled
  kTracePoints
};

// Global scratch a launch needs (from PyTorch's allocator):
// partial: float (N, row_blocks, C); sync: int32 (2 * groups), zeroed (arrivals, ready flags);
// trace: nullptr, or int64 (grid, trace_steps, kTracePoints), zeroed.
struct PipelineWorkspace {
  float* partial;
  unsigned* arrivals;
  unsigned* ready;
  unsigned long long* trace;
  int trace_steps;  // ceil(N * tiles / grid) + delay: the longest CTA's steps
};

// The kernel a (dtype, layout) pair runs, for occupancy queries.
const void* forward_pipelined_kernel(at::ScalarType dtype, bool channels_last);
const void* backward_pipelined_kernel(at::ScalarType dtype, bool channels_last);

// Launch `blocks` co-resident CTAs (a cooperative launch: the runtime refuses a grid
// that cannot be resident at once, so the spin-waits on the ready flags cannot
// deadlock) with `smem` bytes of dynamic shared memory each. The arguments are the
// cluster path's (same outputs); backward also writes dz/P (float (N, C)) to `dz_over_p`.
void launch_forward_pipelined(const PipelineGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                              int blocks, const ForwardClusterArgs& args, const PipelineWorkspace& work,
                              cudaStream_t stream);
void launch_backward_pipelined(const PipelineGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                               int blocks, const BackwardClusterArgs& args, float* dz_over_p,
                               const PipelineWorkspace& work, cudaStream_t stream);

}  // namespace cuda
}  // namespace se_fused
