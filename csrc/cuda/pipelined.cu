// Kernels of the pipelined path (pipelined.h): one persistent, cooperative launch
// whose CTAs walk the batch's tiles. CTA b reduces tiles b, b + grid, b + 2 grid, ...
// (step k: tile k * grid + b) and, `delay` steps after reducing a tile, scales the
// same tile, whose lines are then still in L2: HBM traffic 2T forward (3T with the
// residual), 3T backward (5T). A group of G samples has one arrival counter; the
// CTA that brings it to G * tiles runs the group's MLP (batched over the G samples,
// each weight read once per group) and releases the group's ready flag, which the
// scaling steps acquire.
//
// Why the waits cannot deadlock: every CTA is resident (cooperative launch), a
// CTA's steps run in order, and delay * grid >= G * tiles, so every tile of the
// group a scaling step waits for has a smaller index than the tile that CTA
// reduced in the same step; by induction on the tile index, every reduction
// completes, so every group is finished and every wait ends.
//
// Deterministic: a tile's sums are added in a fixed order, a group's partial
// sums in row-block order, and the MLP runs in one CTA in a fixed order; the
// counter only decides which CTA runs it.
#include <cstdio>

#include "cluster_kernels.cuh"
#include "pipelined.h"

namespace se_fused {
namespace cuda {
namespace {

// 16-byte vectors per thread and array in flight in the tile loops: 4 in the forward
// (x), 2 in the backward (g and x; at 4 the NHWC backward spilled 88-520 bytes at the
// 128-register cap), the same bytes per thread.
constexpr int kForwardUnroll = 4, kBackwardUnroll = 2;
constexpr int kPipelineMlpLoads = 8;  // weights a lane loads at once in the direct group MLP (16 spilled)

struct PipelineTile {
  int64_t n, group;
  int row0, rows;      // NHWC: pixels [row0, row0 + rows)
  int c0, channels;    // channels [c0, c0 + channels)
  int row_block;       // NHWC: the partial-sum slot
};

__device__ __forceinline__ PipelineTile locate_tile(const PipelineGeometry& geo, int64_t j) {
  PipelineTile t;
  t.n = j / geo.tiles;
  t.group = t.n / geo.G;
  const int within = static_cast<int>(j - t.n * geo.tiles);
  const int cb = within % geo.channel_blocks;
  t.row_block = within / geo.channel_blocks;
  t.row0 = t.row_block * geo.tile_rows;
  t.rows = min(geo.P - t.row0, geo.tile_rows);
  t.c0 = cb * geo.tile_channels;
  t.channels = min(geo.C - t.c0, geo.tile_channels);
  return t;
}

// Thread 0 waits for a group's ready flag. A wait that never ends is a bug in the
// schedule: the kernel stops with a message instead of hanging the GPU (2^24 polls
// of up to 1 us: seconds, where a real wait is microseconds, or milliseconds under
// compute-sanitizer).
__device__ void wait_ready(const unsigned* flag) {
  unsigned sleep_ns = 32;
  for (int64_t polls = 0; load_acquire_gpu(flag) == 0u; ++polls) {
    if (polls == (int64_t(1) << 24)) {
      printf("se_fused: pipelined kernel: block %d waited too long for a group to finish\n", blockIdx.x);
      __trap();
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __nanosleep(sleep_ns);
#endif
    if (sleep_ns < 1024) sleep_ns *= 2;
  }
}

// The step loop. reduce(tile) writes the tile's channel sums to work.partial;
// finish(group) runs once per group, after all its sums; excite(tile) runs after
// its group's finish.
template <typename Reduce, typename Finish, typename Excite>
__device__ __forceinline__ void run_pipeline(const PipelineGeometry& geo, const PipelineWorkspace& work,
                                             const Reduce& reduce, const Finish& finish, const Excite& excite) {
  __shared__ unsigned finishing;
  const int64_t total = geo.N * geo.tiles, grid = gridDim.x;
  const int64_t steps = (total - blockIdx.x + grid - 1) / grid;  // the host launches at most `total` CTAs
  const bool tracing = work.trace != nullptr && threadIdx.x == 0;
  for (int64_t step = 0; step < steps + geo.delay; ++step) {
    unsigned long long* const trace =
        tracing ? work.trace + (static_cast<int64_t>(blockIdx.x) * work.trace_steps + step) * kTracePoints : nullptr;
    if (trace != nullptr) trace[kTraceStart] = global_timer_ns();
    if (step < steps) {
      const PipelineTile t = locate_tile(geo, step * grid + blockIdx.x);
      __syncthreads();  // the previous step's shared memory is free
      reduce(t);
      __syncthreads();  // every thread's sums are written
      if (threadIdx.x == 0) {
        const int64_t first = t.group * geo.G;
        const unsigned expected = static_cast<unsigned>(min(static_cast<int64_t>(geo.G), geo.N - first) * geo.tiles);
        __threadfence();
        finishing = fetch_add_acq_rel_gpu(work.arrivals + t.group, 1u) + 1u == expected ? 1u : 0u;
        if (trace != nullptr) trace[kTraceReduced] = global_timer_ns();
      }
      __syncthreads();
      if (finishing != 0u) {  // uniform across the CTA
        finish(t.group);
        __syncthreads();
        if (threadIdx.x == 0) {
          __threadfence();
          store_release_gpu(work.ready + t.group, 1u);
          if (trace != nullptr) trace[kTraceFinished] = global_timer_ns();
        }
      }
    }
    if (step >= geo.delay) {
      const PipelineTile t = locate_tile(geo, (step - geo.delay) * grid + blockIdx.x);
      if (threadIdx.x == 0) {
        wait_ready(work.ready + t.group);
        if (trace != nullptr) trace[kTraceReady] = global_timer_ns();
      }
      __syncthreads();
      excite(t);
      if (trace != nullptr) trace[kTraceScaled] = global_timer_ns();
    }
  }
}

// One term of a channel sum: a, zeroed where the ReLU output m blocked the gradient, times b.
template <typename T>
__device__ __forceinline__ float tile_term(const Vec16<T>& a, const Vec16<T>& b, const Vec16<T>& m, bool has_b,
                                           bool has_m, int e) {
  float v = to_float(a.v[e]);
  if (has_m && relu_blocks(to_float(m.v[e]))) v = 0.f;
  if (has_b) v *= to_float(b.v[e]);
  return v;
}

// Channel sums of a tile of a (times b, masked by m) into work.partial.
// NHWC: pixel lanes of 16-byte vector columns, added in lane order through
// `scratch` (lanes * channels <= blockDim * V floats). NCHW: a warp per channel, or
// several per channel (through `scratch`, one float per warp) when the tile has
// fewer channels than the CTA has warps.
template <typename T, bool kChannelsLast, int kUnroll>
__device__ void reduce_tile(const PipelineGeometry& geo, const PipelineTile& t, const T* __restrict__ a,
                            const T* __restrict__ b, const T* __restrict__ m, float* scratch, float* partial) {
  constexpr int V = Vec16<T>::kSize;
  if constexpr (kChannelsLast) {
    const int columns = t.channels / V;  // C and tile_channels are multiples of V; columns <= blockDim
    const int lanes = static_cast<int>(blockDim.x) / columns;
    const int column = threadIdx.x % columns, lane = threadIdx.x / columns;
    if (lane < lanes) {
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      const int64_t base = (t.n * geo.P + t.row0) * geo.C + t.c0 + column * V;
      for (int r0 = lane; r0 < t.rows; r0 += kUnroll * lanes) {
        Vec16<T> av[kUnroll], bv[kUnroll], mv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // loads first, then their sums
          const int r = r0 + u * lanes;
          if (r >= t.rows) break;
          const int64_t i = base + static_cast<int64_t>(r) * geo.C;
          av[u] = *reinterpret_cast<const Vec16<T>*>(a + i);
          if (b != nullptr) bv[u] = *reinterpret_cast<const Vec16<T>*>(b + i);
          if (m != nullptr) mv[u] = *reinterpret_cast<const Vec16<T>*>(m + i);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (r0 + u * lanes >= t.rows) break;
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += tile_term(av[u], bv[u], mv[u], b != nullptr, m != nullptr, e);
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) scratch[lane * t.channels + column * V + e] = acc[e];
    }
    __syncthreads();
    float* out = partial + (t.n * geo.row_blocks + t.row_block) * geo.C + t.c0;
    for (int c = threadIdx.x; c < t.channels; c += blockDim.x) {
      float total = 0.f;
      for (int l = 0; l < lanes; ++l) total += scratch[l * t.channels + c];
      out[c] = total;
    }
  } else {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
    // Sum of channel row `row` (element offset) over the vectors of segment `segment` of
    // `segments` (vectors lane + 32 * segment, then every 32 * segments).
    const auto row_sum = [&](int64_t row, int segment, int segments) {
      float acc0 = 0.f, acc1 = 0.f;
      const int stride = kWarp * segments;
      if (geo.P % V == 0) {  // rows 16-byte aligned
        const Vec16<T> none{};
        for (int q0 = lane + kWarp * segment; q0 < geo.P / V; q0 += 2 * stride) {
          Vec16<T> av[2], bv[2] = {none, none}, mv[2] = {none, none};
#pragma unroll
          for (int u = 0; u < 2; ++u) {  // loads first, then their sums
            const int q = q0 + u * stride;
            if (q >= geo.P / V) break;
            av[u] = *reinterpret_cast<const Vec16<T>*>(a + row + q * V);
            if (b != nullptr) bv[u] = *reinterpret_cast<const Vec16<T>*>(b + row + q * V);
            if (m != nullptr) mv[u] = *reinterpret_cast<const Vec16<T>*>(m + row + q * V);
          }
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            if (q0 + u * stride >= geo.P / V) break;
            float& acc = u == 0 ? acc0 : acc1;
#pragma unroll
            for (int e = 0; e < V; ++e) acc += tile_term(av[u], bv[u], mv[u], b != nullptr, m != nullptr, e);
          }
        }
      } else {
        for (int q = lane + kWarp * segment; q < geo.P; q += stride) {
          float v = to_float(a[row + q]);
          if (m != nullptr && relu_blocks(to_float(m[row + q]))) v = 0.f;
          if (b != nullptr) v *= to_float(b[row + q]);
          ((q / stride) % 2 == 0 ? acc0 : acc1) += v;
        }
      }
      return warp_sum(acc0 + acc1);
    };
    float* out = partial + t.n * geo.C + t.c0;  // row_blocks == 1: whole channels
    if (t.channels >= warps) {
      for (int r = warp; r < t.channels; r += warps) {
        const float total = row_sum((t.n * geo.C + t.c0 + r) * geo.P, 0, 1);
        if (lane == 0) out[r] = total;
      }
    } else {
      // Fewer channels than warps (long rows: plan_pipelined makes the tile a power of two
      // of them): each row is split over per_row warps, added in segment order.
      int per_row = 1;
      while (2 * per_row * t.channels <= warps) per_row *= 2;
      const int r = warp / per_row, segment = warp % per_row;
      const float total = r < t.channels ? row_sum((t.n * geo.C + t.c0 + r) * geo.P, segment, per_row) : 0.f;
      if (lane == 0) scratch[warp] = total;
      __syncthreads();
      if (threadIdx.x < t.channels) {
        float sum = 0.f;
        for (int k = 0; k < per_row; ++k) sum += scratch[threadIdx.x * per_row + k];
        out[threadIdx.x] = sum;
      }
    }
  }
}

// values[j] = f(channel t.c0 + j) for the tile's channels (forward: the scale;
// backward: the scale and dz/P), for excite_tile.
template <typename F>
__device__ __forceinline__ void load_channel_values(const PipelineTile& t, float* values, const F& f) {
  for (int j = threadIdx.x; j < t.channels; j += blockDim.x) values[j] = f(t.c0 + j);
}

// Calls op(element offset, per-channel values of the 16-byte vector there) for every
// vector of the tile, kUnroll vectors per thread at a time. NHWC: rows of the
// tile's channels, whose values are read as float4 runs (values 16-byte aligned, the
// channel block a multiple of V). NCHW: the tile's elements are contiguous; with P
// not a multiple of V a vector may span two channels.
template <typename T, bool kChannelsLast, int kUnroll, int kArrays, typename Op>
__device__ __forceinline__ void for_each_tile_vector(const PipelineGeometry& geo, const PipelineTile& t,
                                                     const float* (&values)[kArrays], const Op& op) {
  constexpr int V = Vec16<T>::kSize;
  const int columns = t.channels / V;
  const int vectors = kChannelsLast ? t.rows * columns : t.channels * geo.P / V;
  const int64_t nchw_base = (t.n * geo.C + t.c0) * geo.P;
  for (int i0 = threadIdx.x; i0 < vectors; i0 += kUnroll * blockDim.x) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i >= vectors) break;
      float v[kArrays][V];
      int64_t element;
      if constexpr (kChannelsLast) {
        const int r = i / columns, col = i % columns;
        element = (t.n * geo.P + t.row0 + r) * geo.C + t.c0 + col * V;
#pragma unroll
        for (int k = 0; k < kArrays; ++k) load_float_run(values[k] + col * V, v[k]);
      } else {
        element = nchw_base + static_cast<int64_t>(i) * V;
#pragma unroll
        for (int k = 0; k < kArrays; ++k) channel_values<false, V>(geo.mlp, values[k], i * V, v[k]);
      }
      op(element, v);
    }
  }
}

// The MLP's shared-memory view for the cluster path's layer functions.
__device__ __forceinline__ ClusterSmem mlp_smem(const PipelineGeometry& geo, float* smem) {
  return {nullptr, nullptr, smem + geo.off_ushare, smem + geo.off_bshare, smem + geo.off_vec};
}

// The group's MLP geometry (its real samples) and place (rank 0 of a 1-CTA "cluster").
__device__ __forceinline__ ClusterGeometry group_mlp(const PipelineGeometry& geo, int64_t group) {
  ClusterGeometry mg = geo.mlp;
  mg.G = static_cast<int>(min(static_cast<int64_t>(geo.G), geo.N - group * geo.G));
  return mg;
}
__device__ __forceinline__ ClusterPlace group_place(const PipelineGeometry& geo, int64_t group) {
  ClusterPlace pl{};
  pl.rank = 0;
  pl.group_n0 = group * geo.G;
  return pl;
}

// vec[g][c] = value(n, c, sum over the row blocks, in order, of the partial sums). The
// partial sums of a channel are loaded kPartialLoads at a time before they are added: one
// at a time, conv2_x's 49 row blocks would be 49 L2 round trips (~30 us) on the path to
// the group's ready flag.
constexpr int kPartialLoads = 8;
template <typename F>
__device__ __forceinline__ void gather_group_sums(const PipelineGeometry& geo, const ClusterGeometry& mg,
                                                  const ClusterPlace& pl, const float* partial, float* vec,
                                                  const F& value) {
  for (int i = threadIdx.x; i < mg.G * geo.C; i += blockDim.x) {
    const int g = i / geo.C, c = i % geo.C;
    const int64_t n = pl.group_n0 + g;
    const float* sums = partial + n * geo.row_blocks * geo.C + c;
    float total = 0.f;
    for (int k0 = 0; k0 < geo.row_blocks; k0 += kPartialLoads) {
      float part[kPartialLoads];
#pragma unroll
      for (int u = 0; u < kPartialLoads; ++u)
        part[u] = k0 + u < geo.row_blocks ? __ldcg(sums + static_cast<int64_t>(k0 + u) * geo.C) : 0.f;
#pragma unroll
      for (int u = 0; u < kPartialLoads; ++u) total += part[u];  // in row-block order; 0 past the end
    }
    vec[i] = value(n, c, total);
  }
}

// --- The staged group MLP (geo.mlp_block > 0) --------------------------------------
// One CTA computes a group's two layers. Loading each weight from L2 as the lanes use it
// (the cluster path's layer functions, fine there with the MLP split over 16 CTAs) makes
// a chain of dependent round trips: R / 8 rows per warp times C / 256 loads per row, ~256
// round trips (~180 us) per group at conv5_x, during which the group's tiles wait. Here
// the (R, C) weight matrix streams through two shared buffers in column blocks, the next
// block's cp.async copies in flight while this one is used: ~C / mlp_block copies of up
// to 32 KiB per layer. Both layers read from shared memory only; every sum runs in a fixed
// order (a thread's rows or columns in order, its splits added in split order).

// cp.async copies of W[0:rows, c0:c0 + n] (row stride C floats; n, c0 and C multiples of 4,
// W 16-byte aligned) into buf (row stride `stride` floats).
__device__ __forceinline__ void issue_weight_block(const float* W, int rows, int C, int c0, int n, int stride,
                                                   float* buf) {
  const int per_row = n / 4;
  for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
    const int r = i / per_row, q = i % per_row;
    cp_async_16(buf + r * stride + q * 4, W + static_cast<int64_t>(r) * C + c0 + q * 4);
  }
}

// consume(c0, n, buf) for each column block [c0, c0 + n) of W[0:rows, :] in order, buf holding
// it at row stride geo.mlp_block + 4, the next block loading meanwhile.
template <typename Consume>
__device__ __forceinline__ void for_each_weight_block(const PipelineGeometry& geo, const float* W, int rows,
                                                      float* stage, const Consume& consume) {
  const int block = geo.mlp_block, stride = block + 4, C = geo.C;
  const auto buffer = [&](int k) { return stage + (k % 2) * geo.mlp_stage_floats; };
  const int blocks = (C + block - 1) / block;
  issue_weight_block(W, rows, C, 0, min(block, C), stride, buffer(0));
  cp_async_commit();
  for (int k = 0; k < blocks; ++k) {
    if (k + 1 < blocks) {
      // The other buffer was last read by block k - 1, before the barrier that ended it.
      const int c1 = (k + 1) * block;
      issue_weight_block(W, rows, C, c1, min(block, C - c1), stride, buffer(k + 1));
      cp_async_commit();
      cp_async_wait_pending<1>();
    } else {
      cp_async_wait_pending<0>();
    }
    __syncthreads();
    consume(k * block, min(block, C - k * block), static_cast<const float*>(buffer(k)));
    __syncthreads();
  }
}

// A staged layer's sums split over threads meet in `stash` (splits * G * width floats): thread
// (split s, output o) stores its G sums where it has a split, and post(g, first + q, total) gets
// each output q < width with its splits added in split order. Barriers before the adds and after
// (the caller's next pass rewrites stash).
template <typename Post>
__device__ __forceinline__ void add_splits_in_order(const float (&acc)[kMaxGroup], bool has_split, int s, int o,
                                                    int splits, int width, int first, int G, float* stash,
                                                    const Post& post) {
  if (has_split) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
      if (g < G) stash[(s * G + g) * width + o] = acc[g];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * width; i += blockDim.x) {
    const int g = i / width, q = i % width;
    float total = 0.f;
    for (int k = 0; k < splits; ++k) total += stash[(k * G + g) * width + q];
    post(g, first + q, total);
  }
  __syncthreads();
}

// out[g][r] = sum_c W[r][c] in[g][c] for r < R (the hidden form: W1 forward, W2^T backward);
// in: [G][C] in shared memory; post(g, r, total). A pass covers up to blockDim rows: thread t
// takes row t % rows and every splits-th column of each block from t / rows on; the splits
// meet in `stash` (blockDim * G floats).
template <typename Post>
__device__ void staged_rows_layer(const PipelineGeometry& geo, int G, const float* W, const float* in,
                                  float* stage, float* stash, const Post& post) {
  const int C = geo.C, R = geo.R, stride = geo.mlp_block + 4;
  for (int r0 = 0; r0 < R; r0 += blockDim.x) {
    const int rows = min(static_cast<int>(blockDim.x), R - r0);
    const int splits = blockDim.x / rows, rr = threadIdx.x % rows, s = threadIdx.x / rows;
    float acc[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
    for_each_weight_block(geo, W + static_cast<int64_t>(r0) * C, rows, stage, [&](int c0, int n, const float* buf) {
      if (s >= splits) return;
      const float* w_row = buf + rr * stride;
      for (int j = s; j < n; j += splits) {
        const float w = w_row[j];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < G) acc[g] = fmaf(w, in[g * C + c0 + j], acc[g]);
      }
    });
    add_splits_in_order(acc, s < splits, s, rr, splits, rows, r0, G, stash, post);
  }
}

// out[g][c] = sum_r W[r][c] in[g][r] for c < C (the output form: W2^T forward, W1 backward);
// in: [G][R] in shared memory; post(g, c, total). Per block, passes of up to blockDim columns:
// thread t takes column t % cols and every splits-th row from t / cols on; splits added in order.
template <typename Post>
__device__ void staged_columns_layer(const PipelineGeometry& geo, int G, const float* W, const float* in,
                                     float* stage, float* stash, const Post& post) {
  const int R = geo.R, stride = geo.mlp_block + 4;
  for_each_weight_block(geo, W, R, stage, [&](int c0, int n, const float* buf) {
    for (int j0 = 0; j0 < n; j0 += blockDim.x) {
      const int cols = min(static_cast<int>(blockDim.x), n - j0);
      const int splits = blockDim.x / cols, jj = threadIdx.x % cols, s = threadIdx.x / cols;
      float acc[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
      if (s < splits) {
        for (int r = s; r < R; r += splits) {
          const float w = buf[r * stride + j0 + jj];
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < G) acc[g] = fmaf(w, in[g * R + r], acc[g]);
        }
      }
      add_splits_in_order(acc, s < splits, s, jj, splits, cols, c0 + j0, G, stash, post);
    }
  });
}

// The group's two layers: hidden(g, r, acc) returns the value the second layer takes (and
// stores what it must); output(g, c, acc) stores. `A` is the first layer's (R, C) matrix, `B`
// the second's; the first layer's inputs are in sm.vec ([G][C]), its outputs go to sm.ushare
// ([G][R]), the second layer's input.
template <typename Hidden, typename Output>
__device__ __forceinline__ void group_mlp_layers(const PipelineGeometry& geo, const ClusterGeometry& mg,
                                                 const ClusterPlace& pl, const ClusterSmem& sm, float* smem,
                                                 const float* A, const float* B, const Hidden& hidden,
                                                 const Output& output) {
  if (geo.mlp_block > 0) {
    float* stage = smem + geo.off_stage;
    float* stash = smem + geo.off_stash;
    staged_rows_layer(geo, mg.G, A, sm.vec, stage, stash, [&](int g, int r, float acc) {
      sm.ushare[g * geo.R + r] = hidden(g, r, acc);
    });
    __syncthreads();
    staged_columns_layer(geo, mg.G, B, sm.ushare, stage, stash, [&](int g, int c, float acc) { output(g, c, acc); });
  } else {
    hidden_layer<kPipelineMlpLoads>(mg, pl, A, sm, hidden);
    __syncthreads();
    ClusterSmem second = sm;
    second.vec = sm.ushare;  // [g][R]: share_a == R, so the hidden layer's output is the next input as laid out
    output_layer<kPipelineMlpLoads>(mg, pl, B, second, [&](int g, int c, float acc) {
      output(g, c, acc);
      return 0.f;  // bshare: not read again
    });
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kPipelineThreads, kPipelineMinBlocks) se_forward_pipelined_kernel(
    PipelineGeometry geo, const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ w1,
    const float* __restrict__ b1, const float* __restrict__ w2t, const float* __restrict__ b2, T* __restrict__ out,
    float* __restrict__ pooled, float* __restrict__ hidden, float* __restrict__ scale, PipelineWorkspace work) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  constexpr int V = Vec16<T>::kSize;
  const auto reduce = [&](const PipelineTile& t) {
    const T* none = nullptr;
    reduce_tile<T, kChannelsLast, kForwardUnroll>(geo, t, x, none, none, smem + geo.off_scratch, work.partial);
  };
  const auto finish = [&](int64_t group) {
    const ClusterGeometry mg = group_mlp(geo, group);
    const ClusterPlace pl = group_place(geo, group);
    const ClusterSmem sm = mlp_smem(geo, smem);
    const float inv_p = 1.f / static_cast<float>(geo.P);
    gather_group_sums(geo, mg, pl, work.partial, sm.vec, [&](int64_t n, int c, float total) {
      const float mean = total * inv_p;
      pooled[n * geo.C + c] = mean;
      return mean;
    });
    __syncthreads();
    group_mlp_layers(
        geo, mg, pl, sm, smem, w1, w2t,
        [&](int g, int r, float acc) {
          const float u = acc + __ldg(b1 + r);
          hidden[(pl.group_n0 + g) * geo.R + r] = u;
          return apply_activation(u, geo.activation);
        },
        [&](int g, int c, float acc) {
          scale[(pl.group_n0 + g) * geo.C + c] = apply_gate(acc + __ldg(b2 + c), geo.gate);
        });
  };
  const auto excite = [&](const PipelineTile& t) {
    float* values = smem + geo.off_values;
    load_channel_values(t, values, [&](int c) { return __ldcg(scale + t.n * geo.C + c); });
    __syncthreads();
    const float* arrays[1] = {values};
    for_each_tile_vector<T, kChannelsLast, kForwardUnroll>(geo, t, arrays, [&](int64_t e, const float (&s)[1][V]) {
      const Vec16<T> xv = load16_last_use(x + e);
      Vec16<T> rv{}, ov;
      if (residual != nullptr) rv = load16_last_use(residual + e);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float y = to_float(xv.v[k]) * s[0][k];
        if (residual != nullptr) y = relu_nan(y + to_float(rv.v[k]));
        ov.v[k] = from_float<T>(y);
      }
      store16_streaming(out + e, ov);
    });
  };
  run_pipeline(geo, work, reduce, finish, excite);
#else
  __trap();  // launched only on sm_70 and newer (see plan_pipelined)
#endif
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kPipelineThreads, kPipelineMinBlocks) se_backward_pipelined_kernel(
    PipelineGeometry geo, const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ out,
    const float* __restrict__ w1, const float* __restrict__ w2t, const float* __restrict__ hidden,
    const float* __restrict__ scale, T* __restrict__ grad_x, T* __restrict__ grad_residual,
    float* __restrict__ dv_out, float* __restrict__ du_out, float* __restrict__ dz_over_p, PipelineWorkspace work) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  constexpr int V = Vec16<T>::kSize;
  // ds = sum_p g'*x with g' = grad_out masked by the ReLU output (residual form).
  const auto reduce = [&](const PipelineTile& t) {
    reduce_tile<T, kChannelsLast, kBackwardUnroll>(geo, t, grad_out, x, out, smem + geo.off_scratch, work.partial);
  };
  const auto finish = [&](int64_t group) {
    const ClusterGeometry mg = group_mlp(geo, group);
    const ClusterPlace pl = group_place(geo, group);
    const ClusterSmem sm = mlp_smem(geo, smem);
    gather_group_sums(geo, mg, pl, work.partial, sm.vec, [&](int64_t n, int c, float ds) {
      const float dv = gate_backward_from_output(ds, __ldg(scale + n * geo.C + c), geo.gate);
      dv_out[n * geo.C + c] = dv;
      return dv;
    });
    __syncthreads();
    const float inv_p = 1.f / static_cast<float>(geo.P);
    group_mlp_layers(
        geo, mg, pl, sm, smem, w2t, w1,
        [&](int g, int r, float acc) {
          const int64_t n = pl.group_n0 + g;
          const float du = activation_backward(acc, hidden[n * geo.R + r], geo.activation);
          du_out[n * geo.R + r] = du;
          return du;
        },
        [&](int g, int c, float acc) { dz_over_p[(pl.group_n0 + g) * geo.C + c] = acc * inv_p; });
  };
  // dx = g'*s + dz/P (and grad_residual = g'), g and out re-read from L2.
  const auto excite = [&](const PipelineTile& t) {
    float* chan_scale = smem + geo.off_values;
    float* chan_add = chan_scale + (geo.tile_channels + 3) / 4 * 4;  // 16-byte aligned for the float4 runs
    load_channel_values(t, chan_scale, [&](int c) { return __ldg(scale + t.n * geo.C + c); });
    load_channel_values(t, chan_add, [&](int c) { return __ldcg(dz_over_p + t.n * geo.C + c); });
    __syncthreads();
    const float* arrays[2] = {chan_scale, chan_add};
    for_each_tile_vector<T, kChannelsLast, kBackwardUnroll>(geo, t, arrays, [&](int64_t e, const float (&v)[2][V]) {
      Vec16<T> gv = load16_last_use(grad_out + e), dx;
      if (out != nullptr) {
        const Vec16<T> ov = load16_last_use(out + e);
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (relu_blocks(to_float(ov.v[k]))) gv.v[k] = from_float<T>(0.f);
        store16_streaming(grad_residual + e, gv);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) dx.v[k] = from_float<T>(to_float(gv.v[k]) * v[0][k] + v[1][k]);
      store16_streaming(grad_x + e, dx);
    });
  };
  run_pipeline(geo, work, reduce, finish, excite);
#else
  __trap();
#endif
}

// A cooperative launch of `blocks` CTAs: the runtime refuses a grid that cannot be
// resident at once (the ready-flag waits rely on it).
template <typename Kernel, typename... Args>
void launch_cooperative(Kernel kernel, size_t smem, int blocks, cudaStream_t stream, Args... args) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kPipelineThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

}  // namespace

const void* forward_pipelined_kernel(at::ScalarType dtype, bool channels_last) {
  return dispatch_cluster(dtype, channels_last, [](auto t, auto cl) {
    return reinterpret_cast<const void*>(&se_forward_pipelined_kernel<decltype(t), decltype(cl)::value>);
  });
}

const void* backward_pipelined_kernel(at::ScalarType dtype, bool channels_last) {
  return dispatch_cluster(dtype, channels_last, [](auto t, auto cl) {
    return reinterpret_cast<const void*>(&se_backward_pipelined_kernel<decltype(t), decltype(cl)::value>);
  });
}

void launch_forward_pipelined(const PipelineGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                              int blocks, const ForwardClusterArgs& a, const PipelineWorkspace& work,
                              cudaStream_t stream) {
  dispatch_cluster(dtype, channels_last, [&](auto t, auto cl) {
    using T = decltype(t);
    launch_cooperative(se_forward_pipelined_kernel<T, decltype(cl)::value>, smem, blocks, stream, geo,
                       static_cast<const T*>(a.x), static_cast<const T*>(a.residual), a.w1, a.b1, a.w2t, a.b2,
                       static_cast<T*>(a.out), a.pooled, a.hidden, a.scale, work);
    return 0;
  });
}

void launch_backward_pipelined(const PipelineGeometry& geo, size_t smem, at::ScalarType dtype, bool channels_last,
                               int blocks, const BackwardClusterArgs& a, float* dz_over_p,
                               const PipelineWorkspace& work, cudaStream_t stream) {
  dispatch_cluster(dtype, channels_last, [&](auto t, auto cl) {
    using T = decltype(t);
    launch_cooperative(se_backward_pipelined_kernel<T, decltype(cl)::value>, smem, blocks, stream, geo,
                       static_cast<const T*>(a.grad_out), static_cast<const T*>(a.x), static_cast<const T*>(a.out),
                       a.w1, a.w2t, a.hidden, a.scale, static_cast<T*>(a.grad_x), static_cast<T*>(a.grad_residual),
                       a.dv, a.du, dz_over_p, work);
    return 0;
  });
}

}  // namespace cuda
}  // namespace se_fused
