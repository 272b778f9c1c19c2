// The excitation MLP and the weight gradients of the two-pass path as a few
// kernels (interface and rationale in excitation_cuda.h).
//
// The matrices are small (N x C activations, R x C weights) and L2-resident,
// so what limits these kernels is latency and instruction count, not bytes.
// What was measured (batch 256, bf16; profiles in benchmarks/results/):
// - v1, one warp per output walking all of K: 170-310 us per kernel at
//   conv5_x (H100, 94730f6).
// - v2/v3, inputs staged in shared memory, products over C split into blocks
//   of one chunk each whose sums the next kernel adds as it stages its input
//   (no extra launch): still 26-127 us per rows kernel and ~100 us for the
//   weight gradients at every stage (H200, 3c2a7b3), because a runtime switch
//   around each load serialised the loads.
// - v4, input kinds as template parameters and every load unconditional
//   (clamped index, masked after): weight gradients 21-55 us, rows kernels at
//   conv5_x 77 + 39 us (H200, a9f6235). ncu then showed the rows kernels
//   issue-bound (6 cycles per issued instruction, 25% occupancy by registers),
//   most of their instructions the per-value butterflies.
// - v5: one transposing reduction per warp (warp_transpose_sum), 16-byte
//   shared loads feeding 4 FMAs in the rows kernels, 32-bit indices, the
//   weight-gradient kernel at three blocks per SM: rows kernels at conv5_x
//   29 + 21 us, weight gradients 21 / 29 / 41 / 57 us at conv2_x-conv5_x
//   (H100, e88638e).
// - v6: the weight gradients launch only the tiles with work and split the
//   batch over blocks (weight_gradient_splits), adding the splits' float32
//   partial sums in a second kernel: 7.0 / 10.3 / 22.7 / 45.4 us at
//   conv2_x-conv5_x (H100, cca1da2).
// A block handles kSamples samples, so each weight is read from L2 once per
// block. Sums run in a fixed order (reduction trees, warps in order, splits in
// order, samples in order): bitwise reproducible.
#include "excitation_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "device_utils.cuh"
#include "env_knobs.h"

namespace se_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kSamples = 8;       // samples per block: accumulators per thread
constexpr int kChunk = 256;       // k values staged at a time in the products split over C, and per split by default
constexpr int kSummingWidth = 128; // k values staged at a time where K = R (the products that add the splits)
// Outputs per warp (rows kernel) and per lane (columns kernel): few in the products split over C,
// so they have many blocks; more in the products that add the splits, so fewer blocks re-read them.
constexpr int kSplitRowsPerWarp = 2, kSummingRowsPerWarp = 4;
constexpr int kSplitColumnsPerLane = 1, kSummingColumnsPerLane = 2;
constexpr int kWeightGradRows = 8;    // output rows per thread in the weight-gradient kernel
constexpr int kWeightGradBatch = 32;  // samples staged at a time there
constexpr int kWeightGradMaxGroups = kThreads / kWarp;  // row groups per block: a tile is at least a warp wide
constexpr int kWeightGradATile = kWeightGradBatch * kWeightGradRows * kWeightGradMaxGroups;  // staged a (floats)

// How a kernel reads element (n, k) of its float32 input matrix (N, K). A compile-time
// parameter of the kernels: with a runtime switch around each element's load, the
// compiler joined the branches with a move of the loaded value, and that move made the
// warp wait for each load before issuing the next (v3 on an H200: 264 serial L2 round
// trips per weight-gradient block, ~100 us at every stage; profile in
// benchmarks/results/*-3c2a7b3-gpu_check.log).
enum InputKind : int {
  kPlain = 0,             // a[n, k]
  kActivated = 1,         // act(a[n, k]): a is the saved pre-activation
  kGateGrad = 2,          // a[n, k] * gate'(aux[n, k]): a is ds, aux the saved scale, so this is dv
  kSumActivate = 3,       // act(u), u = sum_t a[t, n, k] (fc1's partial sums, bias included); u is written back
  kSumActivationGrad = 4  // act'(aux[n, k]) * sum_t a[t, n, k] (W2^T dv's partial sums, hidden); written back
};

template <int Kind>
struct KindTraits {
  static constexpr bool kSum = Kind == kSumActivate || Kind == kSumActivationGrad;
  static constexpr bool kAux = Kind == kGateGrad || Kind == kSumActivationGrad;
};

struct Input {
  const float* a;
  const float* aux;
  int parts;             // partial sums to add (the Sum kinds)
  int64_t part_stride;   // elements between them
  float* write_back;     // (N, K): the summed value, or nullptr
};

constexpr int kPartsInFlight = 4;  // partial sums loaded at once per staged element (the Sum kinds)

// The loads of E elements at indices idx (already clamped to a valid address where the
// element is masked): straight-line loads with no arithmetic on a loaded value until all
// are issued, so they are all in flight together. Sum kinds: kPartsInFlight parts at a
// time (ceil(parts / kPartsInFlight) round trips), the adds after each group's loads.
// Indices are 32-bit (excitation_kernels_apply checks N * max(C, R) < 2^31): half the
// registers of 64-bit ones, which bounded the weight-gradient kernel's occupancy.
template <int Kind, int E>
__device__ __forceinline__ void gather_raw(const Input& in, const int (&idx)[E], float (&v)[E], float (&aux)[E]) {
  if constexpr (KindTraits<Kind>::kAux) {
#pragma unroll
    for (int e = 0; e < E; ++e) aux[e] = in.aux[idx[e]];
  }
  if constexpr (KindTraits<Kind>::kSum) {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = 0.f;
    for (int t0 = 0; t0 < in.parts; t0 += kPartsInFlight) {
      float part[kPartsInFlight][E];
#pragma unroll
      for (int tt = 0; tt < kPartsInFlight; ++tt) {
        const int64_t offset = static_cast<int64_t>(min(t0 + tt, in.parts - 1)) * in.part_stride;
#pragma unroll
        for (int e = 0; e < E; ++e) part[tt][e] = in.a[offset + idx[e]];
      }
#pragma unroll
      for (int tt = 0; tt < kPartsInFlight; ++tt)
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] += t0 + tt < in.parts ? part[tt][e] : 0.f;  // in order t = 0, 1, ...
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = in.a[idx[e]];
  }
}

// An element's value from its raw loads. Where asked, the Sum kinds write back what the
// rest of the pass needs: u (the pre-activation) for kSumActivate, du for kSumActivationGrad.
template <int Kind>
__device__ __forceinline__ float finish_input(const Input& in, float v, float aux, int64_t i, bool write,
                                              int activation, int gate) {
  if constexpr (Kind == kSumActivate) {
    if (write) in.write_back[i] = v;
    return apply_activation(v, activation);
  } else if constexpr (Kind == kSumActivationGrad) {
    const float du = activation_backward(v, aux, activation);
    if (write) in.write_back[i] = du;
    return du;
  } else if constexpr (Kind == kActivated) {
    return apply_activation(v, activation);
  } else if constexpr (Kind == kGateGrad) {
    return gate_backward_from_output(v, aux, gate);
  } else {
    return v;
  }
}

// A (kRows, kWidth) piece of the input staged in shared memory: tile[s * stride + kk] =
// input(n0 + s, k0 + kk) for s < ns, kk < kc (0 elsewhere), in two halves. load() issues every
// load into registers (no arithmetic on a loaded value until all are issued, so the piece costs
// about one L2 round trip); store() finishes the values and writes them. Between the two a kernel
// may compute on the piece staged before (the tiled products), issue other loads (the weight
// gradients' b), or nothing (stage_input). A warp takes consecutive k of one sample: coalesced
// loads, conflict-free stores.
template <int Kind, int kRows, int kWidth>
struct InputStage {
  static constexpr int kPerThread = kRows * kWidth / kThreads;
  static_assert(kRows * kWidth % kThreads == 0, "a staged piece is a whole number of elements per thread");
  int idx[kPerThread];
  bool valid[kPerThread];
  float v[kPerThread], aux[kPerThread];

  __device__ __forceinline__ void load(const Input& in, int64_t n0, int ns, int k0, int kc, int K) {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int flat = threadIdx.x + e * kThreads, s = flat / kWidth, kk = flat % kWidth;
      valid[e] = s < ns && kk < kc;
      idx[e] = valid[e] ? static_cast<int>(n0 + s) * K + k0 + kk : 0;
    }
    gather_raw<Kind>(in, idx, v, aux);
  }
  template <int kStride>
  __device__ __forceinline__ void store(float* tile, const Input& in, bool write, int activation, int gate) const {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int flat = threadIdx.x + e * kThreads;
      tile[flat / kWidth * kStride + flat % kWidth] =
          valid[e] ? finish_input<Kind>(in, v[e], aux[e], idx[e], write, activation, gate) : 0.f;
    }
  }
};

// tile[s][kk] = input(n0 + s, k0 + kk) for s < ns, kk < kc (0 elsewhere): both halves at once.
template <int Kind, int kWidth>
__device__ __forceinline__ void stage_input(float (&tile)[kSamples][kWidth], const Input& in, int64_t n0, int ns,
                                            int k0, int kc, int K, bool write, int activation, int gate) {
  InputStage<Kind, kSamples, kWidth> stage;
  stage.load(in, n0, ns, k0, kc, K);
  stage.template store<kWidth>(&tile[0][0], in, write, activation, gate);
}

// The samples and the k range of one block of the products (grid: x output tiles, y splits of
// K, z groups of `samples` samples), and whether it writes the summed input back.
struct BlockSpan {
  int64_t n0;
  int ns, split, k_begin, k_end;
  bool writer;
  __device__ BlockSpan(const Input& in, int64_t N, int K, int k_split, int samples = kSamples)
      : n0(static_cast<int64_t>(blockIdx.z) * samples),
        ns(static_cast<int>(min(static_cast<int64_t>(samples), N - n0))),
        split(blockIdx.y),
        k_begin(split * k_split),
        k_end(min(K, k_begin + k_split)),
        writer(blockIdx.x == 0 && in.write_back != nullptr) {}
};

// For each kWidth-wide piece of the block's k range: load_weights(k0, kc) (the block's
// weight loads, issued before the staging's so both are in flight at once), stage the
// input, then compute(k0, kc) on the staged piece.
template <int Kind, int kWidth, typename LoadWeights, typename Compute>
__device__ __forceinline__ void for_each_staged_chunk(float (&tile)[kSamples][kWidth], const Input& in,
                                                      const BlockSpan& b, int K, int activation, int gate,
                                                      const LoadWeights& load_weights, const Compute& compute) {
  for (int k0 = b.k_begin; k0 < b.k_end; k0 += kWidth) {
    const int kc = min(kWidth, b.k_end - k0);
    load_weights(k0, kc);
    stage_input<Kind, kWidth>(tile, in, b.n0, b.ns, k0, kc, K, b.writer, activation, gate);
    __syncthreads();
    compute(k0, kc);
    __syncthreads();
  }
}

enum OutputKind : int {
  kPartial = 0,           // out[split, n, j] = sum over this block's k range (+ bias[j] in split 0)
  kAddBiasThenGate = 1,   // out[n, j] = gate(sum + bias[j])
  kScaled = 2             // out[n, j] = factor * sum
};

struct Output {
  float* out;
  int kind;
  const void* bias;       // the layer's bias in the weight dtype, or nullptr
  float factor;
  int64_t part_stride;    // kPartial
};

// The bias that output (split, j) adds (0 where none): loaded before the block's sums
// are done, so its round trip overlaps theirs.
template <typename w_t>
__device__ __forceinline__ float bias_of(const Output& o, int split, int j) {
  const bool adds = o.bias != nullptr && (o.kind == kAddBiasThenGate || (o.kind == kPartial && split == 0));
  return adds ? static_cast<float>(static_cast<const w_t*>(o.bias)[j]) : 0.f;
}

__device__ __forceinline__ void store_output(const Output& o, int split, int64_t n, int j, int J, float total,
                                             float bias, int gate) {
  if (o.kind == kPartial) {
    o.out[split * o.part_stride + n * J + j] = total + bias;
  } else if (o.kind == kAddBiasThenGate) {
    o.out[n * J + j] = apply_gate(total + bias, gate);
  } else {
    o.out[n * J + j] = total * o.factor;
  }
}

// out[n, j] = sum_k in(n, k) * W[j, k], W (J, K) row-major. Block: kSamples samples
// (blockIdx.z), `row_tiles` tiles of kWarps * kRowsPerWarp rows (tiles blockIdx.x *
// row_tiles + t), the k range of split blockIdx.y (k_split values, staged kWidth at a
// time). A warp owns kRowsPerWarp rows of a tile; a lane owns groups of 4 consecutive k
// (one 16-byte shared load per sample feeds 4 FMAs: ncu had the rows kernels issue-bound),
// all of a chunk's weight loads in flight at once; the lanes' sums meet in one transposing
// reduction. Several row tiles per block: where the block's k range is one staged piece
// (fc1 at the default split, fc2 at R <= 128), the piece is staged once for all its tiles
// (the samples' inputs are the same for every tile) and the next tile's weights load
// during this tile's reduction. Each output's sum runs in the same order whatever
// row_tiles is (the bits do not depend on it).
template <typename w_t, int kRowsPerWarp, int Kind, int kWidth>
__global__ void __launch_bounds__(kThreads, 2) excitation_rows_kernel(Input in, const w_t* __restrict__ W, Output o,
                                                                   int64_t N, int J, int K, int k_split,
                                                                   int row_tiles, int activation, int gate) {
  constexpr int kGroups = kWidth / (4 * kWarp);  // groups of 4 k per lane in a staged piece
  constexpr int kTileRows = kWarps * kRowsPerWarp;
  static_assert(kWidth % (4 * kWarp) == 0, "whole groups of 4 per lane");
  __shared__ alignas(16) float tile[kSamples][kWidth];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const BlockSpan b(in, N, K, k_split);
  const int first_tile = blockIdx.x * row_tiles;
  const int tiles = min(row_tiles, (J + kTileRows - 1) / kTileRows - first_tile);  // uniform across the block
  const bool one_piece = b.k_end - b.k_begin <= kWidth;                            // uniform too
  int rows[kRowsPerWarp];
  const auto set_rows = [&](int row_tile) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) rows[r] = (row_tile * kRowsPerWarp + r) * kWarps + warp;
  };
  float acc[kRowsPerWarp * kSamples];  // [r * kSamples + s]
  w_t w[kRowsPerWarp][kGroups][4];
  // The first k of group g of this lane (within the staged piece).
  const auto group_k = [&](int g) { return (g * kWarp + lane) * 4; };
  const auto load_weights = [&](int k0, int kc) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int kk = group_k(g) + q;
          w[r][g][q] = W[rows[r] < J && kk < kc ? static_cast<int64_t>(rows[r]) * K + k0 + kk : 0];
        }
  };
  const auto compute = [&](int, int kc) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      float4 staged[kSamples];
#pragma unroll
      for (int s = 0; s < kSamples; ++s) staged[s] = *reinterpret_cast<const float4*>(&tile[s][group_k(g)]);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float weight[4];  // 0 past kc (the tile is 0 there too)
#pragma unroll
        for (int q = 0; q < 4; ++q) weight[q] = group_k(g) + q < kc ? static_cast<float>(w[r][g][q]) : 0.f;
#pragma unroll
        for (int s = 0; s < kSamples; ++s) {
          float& a = acc[r * kSamples + s];
          a = fmaf(weight[0], staged[s].x, a);
          a = fmaf(weight[1], staged[s].y, a);
          a = fmaf(weight[2], staged[s].z, a);
          a = fmaf(weight[3], staged[s].w, a);
        }
      }
    }
  };
  const int kc = b.k_end - b.k_begin;  // the one piece's width (one_piece)
  set_rows(first_tile);
  if (one_piece) {
    load_weights(b.k_begin, kc);  // before the staging's loads, so both are in flight at once
    stage_input<Kind, kWidth>(tile, in, b.n0, b.ns, b.k_begin, kc, K, b.writer, activation, gate);
    __syncthreads();
  }
  constexpr int kValues = kRowsPerWarp * kSamples, kLanesPerValue = kWarp / kValues;
  static_assert(kValues <= kWarp, "one value per lane at least");
  const int value = lane / kLanesPerValue, r = value / kSamples, s = value % kSamples;
  for (int t = 0; t < tiles; ++t) {
    const int row_tile = first_tile + t;
    float bias[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int j = (row_tile * kRowsPerWarp + rr) * kWarps + warp;
      bias[rr] = j < J ? bias_of<w_t>(o, b.split, j) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kValues; ++i) acc[i] = 0.f;
    if (one_piece) {
      compute(b.k_begin, kc);
      if (t + 1 < tiles) {  // the next tile's weights, in flight during this tile's reduction
        set_rows(row_tile + 1);
        load_weights(b.k_begin, kc);
      }
    } else {
      set_rows(row_tile);
      for_each_staged_chunk<Kind, kWidth>(tile, in, b, K, activation, gate, load_weights, compute);
    }
    const float total = warp_transpose_sum(acc, lane);
    float row_bias = 0.f;  // bias[r], selected without a runtime index into registers
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) row_bias = rr == r ? bias[rr] : row_bias;
    const int j = (row_tile * kRowsPerWarp + r) * kWarps + warp;
    if (lane % kLanesPerValue == 0 && j < J && s < b.ns)
      store_output(o, b.split, b.n0 + s, j, J, total, row_bias, gate);
  }
}

// out[n, j] = sum_k in(n, k) * W[k, j], W (K, J) row-major. Block: kSamples samples
// (blockIdx.z), kWarp * kColumnsPerLane columns (blockIdx.x; consecutive lanes read
// consecutive columns), the k range of split blockIdx.y; the warps take interleaved k
// of each staged chunk (kColumnGroup at a time, their loads in flight together) and
// their sums are added in warp order.
template <typename w_t, int kColumnsPerLane, int Kind, int kWidth>
__global__ void __launch_bounds__(kThreads, 2) excitation_columns_kernel(Input in, const w_t* __restrict__ W, Output o,
                                                                      int64_t N, int J, int K, int k_split,
                                                                      int activation, int gate) {
  constexpr int kColumns = kWarp * kColumnsPerLane;
  constexpr int kPerWarp = kWidth / kWarps;                // k values of a staged piece per warp
  constexpr int kColumnGroup = 32 / kColumnsPerLane;       // of them loaded at once (32 registers)
  static_assert(kPerWarp % kColumnGroup == 0, "whole groups per chunk");
  __shared__ float tile[kSamples][kWidth];
  __shared__ float partial[kWarps][kSamples][kColumns];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int j0 = blockIdx.x * kColumns;
  const BlockSpan b(in, N, K, k_split);
  float acc[kColumnsPerLane][kSamples] = {};
  w_t w[kColumnGroup][kColumnsPerLane];
  // Group g of this warp's k values: kk = warp + (g * kColumnGroup + i) * kWarps.
  const auto load_group = [&](int g, int k0, int kc) {
#pragma unroll
    for (int i = 0; i < kColumnGroup; ++i)
#pragma unroll
      for (int c = 0; c < kColumnsPerLane; ++c) {
        const int kk = warp + (g * kColumnGroup + i) * kWarps, j = j0 + c * kWarp + lane;
        w[i][c] = W[kk < kc && j < J ? static_cast<int64_t>(k0 + kk) * J + j : 0];
      }
  };
  const auto compute = [&](int k0, int kc) {
#pragma unroll 1
    for (int g = 0; g < kPerWarp / kColumnGroup; ++g) {
      if (g > 0) load_group(g, k0, kc);  // group 0 was loaded beside the staging
#pragma unroll
      for (int i = 0; i < kColumnGroup; ++i) {
        const int kk = warp + (g * kColumnGroup + i) * kWarps;
#pragma unroll
        for (int c = 0; c < kColumnsPerLane; ++c) {
          const float weight = kk < kc && j0 + c * kWarp + lane < J ? static_cast<float>(w[i][c]) : 0.f;
#pragma unroll
          for (int s = 0; s < kSamples; ++s) acc[c][s] += weight * tile[s][kk];
        }
      }
    }
  };
  for_each_staged_chunk<Kind, kWidth>(tile, in, b, K, activation, gate,
                                      [&](int k0, int kc) { load_group(0, k0, kc); }, compute);
#pragma unroll
  for (int c = 0; c < kColumnsPerLane; ++c)
#pragma unroll
    for (int s = 0; s < kSamples; ++s) partial[warp][s][c * kWarp + lane] = acc[c][s];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kSamples * kColumns; idx += kThreads) {
    const int s = idx / kColumns, jj = idx % kColumns, j = j0 + jj;
    if (s >= b.ns || j >= J) continue;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][s][jj];
    store_output(o, b.split, b.n0 + s, j, J, total, bias_of<w_t>(o, b.split, j), gate);
  }
}

// The tiled products (SE_FUSED_CUDA_MLP=tiled; docs/cuda-notes.md, "The tiled MLP products").
// The rows and columns kernels above give a block kSamples = 8 samples, so every weight is read
// from L2 once per 8 samples, and their many short blocks run in waves of about one L2 round trip
// each (fc1 and fc2 21 + 29 us at conv5_x, H100 dd6c3b3, ~3 us per wave). Here a block owns a
// (samples x outputs) tile as a GEMM does: 16 x 16 threads, each kPerThreadN samples by
// kPerThreadJ outputs, so a staged value feeds that many FMAs, and the next kTileK-wide piece of
// k loads into registers while the block computes on this one. The products over C write split
// sums that tiled_split_sums_kernel adds once; the products over R read its result.
constexpr int kTileThreadsJ = 16, kTileThreadsN = kThreads / kTileThreadsJ;
constexpr int kTileK = 32;           // k values staged at a time
constexpr int kTileStride = kTileK + 4;  // floats per staged row: 16-byte rows, and row r starts at bank 4r
// Samples per thread in the products over C (fc1, W2^T dv) and over R (fc2, du W1); outputs per thread.
constexpr int kTiledSamplesOverC = 2, kTiledSamplesOverR = 4, kTiledOutputs = 4;
constexpr int kTiledTargetBlocks = 256, kTiledMaxSplits = 16;     // the products over C (tiled_k_split)

// How the weights are stored: W[j * K + k] (fc1 and fc2 in the forward) or W[k * J + j] (the
// backward's products, which read the forward's weights transposed).
enum WeightLayout : int { kWeightRows = 0, kWeightColumns = 1 };

// A (kTileRows, kTileK) piece of W(j, k) staged as tile[jj * kTileStride + kk] (0 outside J and
// kc), in the two halves of InputStage. The loads run along W's contiguous dimension.
template <typename w_t, int Layout, int kTileRows>
struct WeightStage {
  static constexpr int kPerThread = kTileRows * kTileK / kThreads;
  static_assert(kTileRows * kTileK % kThreads == 0, "a staged piece is a whole number of weights per thread");
  w_t w[kPerThread];
  int j0, k0, kc, J;

  // Element e of this thread: (jj, kk) within the piece.
  __device__ __forceinline__ void position(int e, int& jj, int& kk) const {
    const int flat = threadIdx.x + e * kThreads;
    if constexpr (Layout == kWeightRows) {
      jj = flat / kTileK, kk = flat % kTileK;
    } else {
      kk = flat / kTileRows, jj = flat % kTileRows;
    }
  }
  __device__ __forceinline__ void load(const w_t* __restrict__ W, int j0_, int J_, int k0_, int kc_, int K) {
    j0 = j0_, J = J_, k0 = k0_, kc = kc_;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      int jj, kk;
      position(e, jj, kk);
      const bool valid = j0 + jj < J && kk < kc;
      // 32-bit: excitation_kernels_apply checks that every weight has fewer than 2^30 elements.
      w[e] = W[!valid ? 0 : Layout == kWeightRows ? (j0 + jj) * K + k0 + kk : (k0 + kk) * J + j0 + jj];
    }
  }
  __device__ __forceinline__ void store(float* tile) const {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      int jj, kk;
      position(e, jj, kk);
      tile[jj * kTileStride + kk] = j0 + jj < J && kk < kc ? static_cast<float>(w[e]) : 0.f;
    }
  }
};

// out[n, j] = sum_k in(n, k) * W(j, k) over the k range of split blockIdx.y, for the tile of
// kTileThreadsN * kPerThreadN samples (blockIdx.z) by kTileThreadsJ * kPerThreadJ outputs
// (blockIdx.x). Thread (tx, ty) owns samples ty + 16 i and outputs tx + 16 q: a warp's 16-byte
// loads of the staged weights then start at banks 4 tx, and of the staged input at two
// addresses (a broadcast). Each output's sum runs over k in order, so the bits depend on the
// split only.
template <typename w_t, int Kind, int Layout, int kPerThreadN, int kPerThreadJ>
__global__ void __launch_bounds__(kThreads) excitation_tiled_kernel(Input in, const w_t* __restrict__ W, Output o,
                                                                    int64_t N, int J, int K, int k_split,
                                                                    int activation, int gate) {
  static_assert(!KindTraits<Kind>::kSum, "the tiled products read summed inputs (tiled_split_sums_kernel)");
  constexpr int kTileN = kTileThreadsN * kPerThreadN, kTileJ = kTileThreadsJ * kPerThreadJ;
  __shared__ alignas(16) float input_tile[kTileN * kTileStride];
  __shared__ alignas(16) float weight_tile[kTileJ * kTileStride];
  const int tx = threadIdx.x % kTileThreadsJ, ty = threadIdx.x / kTileThreadsJ;
  const BlockSpan b(in, N, K, k_split, kTileN);
  const int j0 = blockIdx.x * kTileJ;
  InputStage<Kind, kTileN, kTileK> input;
  WeightStage<w_t, Layout, kTileJ> weights;
  const auto load = [&](int k0) {
    const int kc = min(kTileK, b.k_end - k0);
    weights.load(W, j0, J, k0, kc, K);
    input.load(in, b.n0, b.ns, k0, kc, K);
  };
  float acc[kPerThreadN][kPerThreadJ] = {};
  load(b.k_begin);
  for (int k0 = b.k_begin; k0 < b.k_end; k0 += kTileK) {
    input.template store<kTileStride>(input_tile, in, false, activation, gate);
    weights.store(weight_tile);
    __syncthreads();
    if (k0 + kTileK < b.k_end) load(k0 + kTileK);  // in flight during this piece's products
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 4) {
      float4 a[kPerThreadN], w[kPerThreadJ];
#pragma unroll
      for (int i = 0; i < kPerThreadN; ++i)
        a[i] = *reinterpret_cast<const float4*>(&input_tile[(ty + kTileThreadsN * i) * kTileStride + kk]);
#pragma unroll
      for (int q = 0; q < kPerThreadJ; ++q)
        w[q] = *reinterpret_cast<const float4*>(&weight_tile[(tx + kTileThreadsJ * q) * kTileStride + kk]);
#pragma unroll
      for (int i = 0; i < kPerThreadN; ++i)
#pragma unroll
        for (int q = 0; q < kPerThreadJ; ++q) {
          float& sum = acc[i][q];
          sum = fmaf(a[i].x, w[q].x, sum);
          sum = fmaf(a[i].y, w[q].y, sum);
          sum = fmaf(a[i].z, w[q].z, sum);
          sum = fmaf(a[i].w, w[q].w, sum);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kPerThreadJ; ++q) {
    const int j = j0 + tx + kTileThreadsJ * q;
    if (j >= J) continue;
    const float bias = bias_of<w_t>(o, b.split, j);
#pragma unroll
    for (int i = 0; i < kPerThreadN; ++i) {
      const int s = ty + kTileThreadsN * i;
      if (s < b.ns) store_output(o, b.split, b.n0 + s, j, J, acc[i][q], bias, gate);
    }
  }
}

// The split sums of a tiled product over C, added once: the products over R then read the
// result, where the rows and columns kernels' staging adds the splits again in each of their
// blocks (for the tiled tiles, C/64 times: 35 MB of L2 reads at conv5_x, batch 256). Element
// i of (N, R): the splits in order (the same sum as that staging), finished as Kind
// (kSumActivate: u; kSumActivationGrad: du = act'(hidden) * sum) and written to in.write_back.
constexpr int kSplitSumsPerThread = 4;  // elements per thread, their loads in flight together
template <int Kind>
__global__ void __launch_bounds__(kThreads) tiled_split_sums_kernel(Input in, int count, int activation, int gate) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kSplitSumsPerThread + threadIdx.x;
  int idx[kSplitSumsPerThread];
  float v[kSplitSumsPerThread], aux[kSplitSumsPerThread];
#pragma unroll
  for (int e = 0; e < kSplitSumsPerThread; ++e)
    idx[e] = static_cast<int>(min(first + e * kThreads, static_cast<int64_t>(count) - 1));  // clamped: a valid load
  gather_raw<Kind>(in, idx, v, aux);
#pragma unroll
  for (int e = 0; e < kSplitSumsPerThread; ++e)
    if (first + e * kThreads < count) finish_input<Kind>(in, v[e], aux[e], idx[e], true, activation, gate);
}

// One weight gradient: weight_grad[i, j] = sum_n a(n, i) * b(n, j) for a (N, I),
// b (N, J), and bias_grad[i] = sum_n a(n, i).
struct WeightGradProblem {
  Input a;  // kPlain or kGateGrad
  Input b;  // kPlain or kActivated
  void* weight_grad;  // (I, J) in the weight's dtype
  void* bias_grad;    // (I)
  int I, J;
  // Columns per tile, a power of two in [kWarp, kThreads] (weight_gradient_width): a block's
  // kThreads / width row groups of kWeightGradRows rows share what it stages.
  int width;
  __host__ __device__ int groups() const { return kThreads / width; }
  __host__ __device__ int tile_rows() const { return kWeightGradRows * groups(); }
  __host__ __device__ int tiles_x() const { return (J + width - 1) / width; }
  __host__ __device__ int tiles() const { return tiles_x() * ((I + tile_rows() - 1) / tile_rows()); }
  // Floats of one batch split's partial sums of this layer: I rows of J + 1 (the bias last).
  __host__ __device__ int64_t partial_size() const { return static_cast<int64_t>(I) * (J + 1); }
};

// One block of weight_gradients_cuda_kernel: tile (tile_x, tile_y) of one layer, kGroups row
// groups of kWeightGradRows rows by kThreads / kGroups columns, over the samples
// [n_begin, n_end). A thread owns column j of its group's rows. The samples are staged
// kWeightGradBatch at a time (all of a batch's loads in flight together: each thread loads
// kWeightGradBatch / kGroups of b and kGroups of a) and walked in order. The first tile column
// also sums the bias gradients of its rows, a thread per row: bias_grad[i] is the same sum with
// b = 1, which a column of its own would add as a tile of one column where J is a multiple of
// the width (fc1's gradient at every SE-ResNet stage). With `partial` (a split of the batch),
// the block writes its float32 sums there, (I, J + 1) row-major; else the gradients themselves.
template <typename w_t, int AKind, int BKind, int kGroups>
__device__ __forceinline__ void weight_gradient_block(const WeightGradProblem& q, int tile_x, int tile_y,
                                                      int n_begin, int n_end, float* partial,
                                                      int activation, int gate,
                                                      float (&b_tile)[kWeightGradBatch][kThreads],
                                                      float (&a_tile)[kWeightGradATile]) {
  constexpr int kWidth = kThreads / kGroups, kTileRows = kWeightGradRows * kGroups;
  constexpr int kBLoads = kWeightGradBatch / kGroups;
  static_assert(kWeightGradBatch % kGroups == 0 && kWeightGradBatch * kTileRows <= kWeightGradATile,
                "a staged batch is a whole number of loads per thread and fits the a tile");
  const int column = threadIdx.x % kWidth, group = threadIdx.x / kWidth;
  const int j = tile_x * kWidth + column;
  const int tile_i0 = tile_y * kTileRows, tile_rows = min(kTileRows, q.I - tile_i0);
  const int i0 = tile_i0 + group * kWeightGradRows;
  const bool sums_bias = tile_x == 0 && static_cast<int>(threadIdx.x) < tile_rows;  // row tile_i0 + threadIdx.x
  float acc[kWeightGradRows] = {};
  float bias_acc = 0.f;
  for (int nb = n_begin; nb < n_end; nb += kWeightGradBatch) {
    const int nc = min(kWeightGradBatch, n_end - nb);
    // b: the thread's column at samples group, group + kGroups, ...; a: the (nc, tile_rows) block
    // of rows tile_i0 ..., staged row-major with kTileRows columns. Both batches' loads are issued
    // before either is finished and stored.
    int b_idx[kBLoads];
#pragma unroll
    for (int e = 0; e < kBLoads; ++e) {
      const int s = group + e * kGroups;
      b_idx[e] = s < nc && j < q.J ? (nb + s) * q.J + j : 0;
    }
    float b_values[kBLoads], b_aux[kBLoads];
    gather_raw<BKind>(q.b, b_idx, b_values, b_aux);
    InputStage<AKind, kWeightGradBatch, kTileRows> a_stage;
    a_stage.load(q.a, nb, nc, tile_i0, tile_rows, q.I);
#pragma unroll
    for (int e = 0; e < kBLoads; ++e) {
      const int s = group + e * kGroups;
      b_tile[s][column] =
          s < nc && j < q.J ? finish_input<BKind>(q.b, b_values[e], b_aux[e], 0, false, activation, gate) : 0.f;
    }
    a_stage.template store<kTileRows>(a_tile, q.a, false, activation, gate);
    __syncthreads();
    const float* a_rows = a_tile + group * kWeightGradRows;
#pragma unroll 8
    for (int nn = 0; nn < nc; ++nn) {
      const float bv = b_tile[nn][column];
#pragma unroll
      for (int t = 0; t < kWeightGradRows; ++t) acc[t] += a_rows[nn * kTileRows + t] * bv;
    }
    if (sums_bias) {
#pragma unroll 8
      for (int nn = 0; nn < nc; ++nn) bias_acc += a_tile[nn * kTileRows + threadIdx.x];
    }
    __syncthreads();
  }
  if (j < q.J) {
#pragma unroll
    for (int t = 0; t < kWeightGradRows; ++t) {
      const int i = i0 + t;
      if (i >= q.I) break;
      if (partial != nullptr) {
        partial[static_cast<int64_t>(i) * (q.J + 1) + j] = acc[t];
      } else {
        static_cast<w_t*>(q.weight_grad)[static_cast<int64_t>(i) * q.J + j] = static_cast<w_t>(acc[t]);
      }
    }
  }
  if (sums_bias) {
    const int i = tile_i0 + threadIdx.x;
    if (partial != nullptr) {
      partial[static_cast<int64_t>(i) * (q.J + 1) + q.J] = bias_acc;
    } else {
      static_cast<w_t*>(q.bias_grad)[i] = static_cast<w_t>(bias_acc);
    }
  }
}

// Tile t of one layer, in the block shape its width asks for (a block-uniform branch).
template <typename w_t, int AKind, int BKind>
__device__ __forceinline__ void weight_gradient_tile(const WeightGradProblem& q, int t, int n_begin, int n_end,
                                                     float* partial, int activation, int gate,
                                                     float (&b_tile)[kWeightGradBatch][kThreads],
                                                     float (&a_tile)[kWeightGradATile]) {
  const int tile_x = t % q.tiles_x(), tile_y = t / q.tiles_x();
  const auto run = [&](auto groups) {
    weight_gradient_block<w_t, AKind, BKind, decltype(groups)::value>(q, tile_x, tile_y, n_begin, n_end, partial,
                                                                      activation, gate, b_tile, a_tile);
  };
  switch (q.groups()) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    default: return run(std::integral_constant<int, kWeightGradMaxGroups>{});
  }
}

// Both layers' gradients in one launch: blockIdx.x enumerates the tiles of fc1's gradient
// (from du and pooled), then those of fc2's (from dv, which Layer2AKind kGateGrad forms from
// ds and the saved scale, kPlain reads, and act(hidden)); blockIdx.y is the split of the
// batch (samples_per_split each). Only tiles with work are launched: sized by max(R, C) for
// both layers, the v5 grid was 4608 blocks at conv5_x of which 400 had work.
template <typename w_t, int Layer2AKind>
__global__ void __launch_bounds__(kThreads, 3) weight_gradients_cuda_kernel(WeightGradProblem layer0,
                                                                         WeightGradProblem layer1, int N,
                                                                         int samples_per_split, float* partial,
                                                                         int activation, int gate) {
  __shared__ float b_tile[kWeightGradBatch][kThreads];
  __shared__ __align__(16) float a_tile[kWeightGradATile];  // 16-byte loads of a thread's rows
  // 32-bit sample indices: excitation_kernels_apply checks N * max(C, R) < 2^31.
  const int n_begin = blockIdx.y * samples_per_split, n_end = min(N, n_begin + samples_per_split);
  // A split's partial sums: fc1's (I0, J0 + 1), then fc2's (I1, J1 + 1).
  float* split_partial = partial != nullptr
                             ? partial + blockIdx.y * (layer0.partial_size() + layer1.partial_size())
                             : nullptr;
  const int tiles0 = layer0.tiles();
  if (static_cast<int>(blockIdx.x) < tiles0) {
    weight_gradient_tile<w_t, kPlain, kPlain>(layer0, blockIdx.x, n_begin, n_end, split_partial, activation, gate,
                                              b_tile, a_tile);
  } else {
    weight_gradient_tile<w_t, Layer2AKind, kActivated>(
        layer1, blockIdx.x - tiles0, n_begin, n_end,
        split_partial != nullptr ? split_partial + layer0.partial_size() : nullptr, activation, gate, b_tile, a_tile);
  }
}

// The gradients from the splits' partial sums, added in split order: element e of a
// split's (fc1 then fc2) partial block goes to its weight or bias gradient.
template <typename w_t>
__global__ void __launch_bounds__(kThreads) weight_gradient_splits_kernel(WeightGradProblem layer0,
                                                                         WeightGradProblem layer1,
                                                                         const float* __restrict__ partial,
                                                                         int splits) {
  const int64_t size0 = layer0.partial_size(), per_split = size0 + layer1.partial_size();
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < per_split;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float total = 0.f;
    for (int s = 0; s < splits; ++s) total += partial[s * per_split + e];
    // The fields picked one by one: a reference to either parameter struct put both on the stack.
    const bool first = e < size0;
    const int64_t local = first ? e : e - size0, J = first ? layer0.J : layer1.J;
    const int64_t i = local / (J + 1), j = local % (J + 1);
    if (j < J) {
      static_cast<w_t*>(first ? layer0.weight_grad : layer1.weight_grad)[i * J + j] = static_cast<w_t>(total);
    } else {
      static_cast<w_t*>(first ? layer0.bias_grad : layer1.bias_grad)[i] = static_cast<w_t>(total);
    }
  }
}

// Splits of the batch for the weight gradients: enough blocks for about two waves of an
// H100 at three blocks per SM (kWeightGradTargetBlocks), at most kWeightGradMaxSplits, and
// at least one staging batch per split. Batch 256: 8 / 8 / 8 / 4 splits at conv2_x-conv5_x
// (6 / 16 / 64 / 256 tiles; with the tiles of v6, 36 / 76 / 168 / 400, they were 8 / 8 / 5 / 2).
// v5 walked all 256 samples in every block (8 dependent staging rounds), in one wave of
// 36-168 blocks, or a wave and 4 blocks at conv5_x. From the shape only, so the sums' order
// (and the bits) do not depend on the GPU.
constexpr int kWeightGradTargetBlocks = 792, kWeightGradMaxSplits = 8;
int weight_gradient_splits(int tiles, int64_t N) {
  const int64_t by_blocks = (kWeightGradTargetBlocks + tiles - 1) / std::max(tiles, 1);
  const int64_t by_batch = std::max<int64_t>(1, N / kWeightGradBatch);
  return static_cast<int>(std::min<int64_t>({by_blocks, by_batch, kWeightGradMaxSplits}));
}

// Columns per weight-gradient tile for a gradient of J columns: the smallest power of two
// that holds them, at least a warp and at most kThreads. Up to 2026-11-27 every tile was
// kThreads wide and the bias a column of its own: fc2's gradient has R + 1 columns, so half to
// seven eighths of the threads had none at conv2_x-conv5_x (R = 16 ... 128), and fc1's bias
// took a ninth tile column of one column at conv5_x (400 tiles there, 256 now; weight
// gradients 45 us of the conv5_x backward's ~170, H100 dd6c3b3). SE_FUSED_CUDA_WGRAD_TILES=wide
// keeps kThreads-wide tiles for comparison. The tiling decides the splits of the batch
// (weight_gradient_splits), so the knob changes the bits; the default depends on the shape only.
bool weight_gradient_wide_tiles() { return choice_from_env("SE_FUSED_CUDA_WGRAD_TILES", {"fit", "wide"}, 0) == 1; }
int weight_gradient_width(int J, bool wide) {
  if (wide) return kThreads;
  int width = kWarp;
  while (width < J && width < kThreads) width *= 2;
  return width;
}

unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// k values per split of C in the products over C (fc1 forward, W2^T dv backward): kChunk, or
// SE_FUSED_CUDA_MLP_SPLIT (a multiple of kChunk) for tuning. At conv5_x a split of kChunk makes
// 2048 blocks of one staged piece each for fc1, about eight waves of blocks whose time is
// mostly one L2 round trip and a reduction (21 us of the forward's 112, H100 dd6c3b3); a larger
// split has fewer blocks that each walk several pieces, and fewer partial sums for the
// next product to add. The split decides the order of the sums (the bits), so it comes
// from the shape and this knob only, never from the device.
// (docs/cuda-notes.md, "The two-pass MLP's splits of C".)
int mlp_k_split() {
  return static_cast<int>(integer_from_env("SE_FUSED_CUDA_MLP_SPLIT", kChunk, kChunk, int64_t(1) << 20,
                                           "a multiple of 256 in [256, 2^20]", kChunk));
}

// Row tiles per block of the rows kernels (fc1 and fc2 forward): 1, or
// SE_FUSED_CUDA_MLP_ROW_TILES for tuning. fc2's grid is C/32 row tiles x N/8 sample groups
// (2048 blocks at conv5_x, 29 us); with several tiles per block the staged input serves
// them all and the blocks are fewer. Any value gives the same bits.
int mlp_row_tiles() {
  return static_cast<int>(integer_from_env("SE_FUSED_CUDA_MLP_ROW_TILES", 1, 1, 1 << 16,
                                           "an integer in [1, 65536]"));
}

// Which MLP products run (SE_FUSED_CUDA_MLP): by the shape (auto, the default), the rows and
// columns kernels, the tiled kernel, or the ATen ops (excitation_kernels_apply says no).
//
// auto takes the tiled kernel where the weights are large and the batch fills its sample tiles:
// the rows kernels read each weight once per 8 samples, the tiled kernel once per 32 or 64, for
// one more launch. Measured side by side (H100 a482069, batch 256 bf16 NHWC, profile_block.py's
// cuda and cuda/tiled-mlp rows, MLP kernels' device time): C x R = 4096 and 16384 (conv2_x,
// conv3_x) 7.5 / 10.9 us for the rows kernels against 11.5 / 12.9 tiled; 65536 and 262144
// (conv4_x, conv5_x) 20.0 / 50.0 against 16.2 / 23.9 (the conv5_x forward 0.112 -> 0.086 ms, its
// forward+backward 0.262 -> 0.221 ms). The threshold lies between the two measured pairs; the batch
// bound (one 32-sample tile) is not measured: below it the tiled blocks are mostly padding while
// the rows kernels read the weights at most 4 times. From the shape only, so the bits do not depend
// on the GPU.
enum class MlpKernels : int { kRowsColumns = 0, kAten = 1, kTiled = 2 };
constexpr int64_t kTiledMinWeights = 32768, kTiledMinBatch = kTileThreadsN * kTiledSamplesOverC;
int mlp_kernels_requested() { return choice_from_env("SE_FUSED_CUDA_MLP", {"auto", "kernels", "aten", "tiled"}, 0); }
MlpKernels mlp_kernels(const SEProblem& p) {
  const int choice = mlp_kernels_requested();
  if (choice == 0) {
    const bool tiled = p.C * p.R >= kTiledMinWeights && p.N >= kTiledMinBatch;
    return tiled ? MlpKernels::kTiled : MlpKernels::kRowsColumns;
  }
  return static_cast<MlpKernels>(choice - 1);
}

// k values per split of C in the tiled products over C (fc1 forward, W2^T dv backward): enough
// splits for about kTiledTargetBlocks blocks (two per SM of an H100 at their ~114 registers)
// with the output tiles of R x N, at most kTiledMaxSplits (tiled_split_sums_kernel loads them all),
// each split a whole number of staged pieces, so that a block walks few pieces one after another.
// From the shape only, so the bits do not depend on the GPU. Batch 256: 8 / 16 / 16 / 16 splits
// of 32 / 32 / 64 / 128 channels at conv2_x-conv5_x (8 to 16 tiles; 64-256 blocks).
int tiled_k_split(int64_t N, int64_t R, int64_t C) {
  const int64_t tiles =
      ceil_div(R, kTileThreadsJ * kTiledOutputs) * int64_t(ceil_div(N, kTileThreadsN * kTiledSamplesOverC));
  const int64_t pieces = ceil_div(C, kTileK);
  const int64_t splits = std::min<int64_t>({ceil_div(kTiledTargetBlocks, tiles), kTiledMaxSplits, pieces});
  return static_cast<int>(ceil_div(ceil_div(C, std::max<int64_t>(splits, 1)), kTileK) * kTileK);
}

// What the forward and the backward MLP launches share: the weights as (R, C) and (C, R)
// matrices, the grid's sample groups and splits over C, and the buffer of the split sums.
struct MlpLaunch {
  at::Tensor w1, w2, partial;
  int64_t N;
  int R, C, act, gate;
  bool tiled;     // the tiled kernel (SE_FUSED_CUDA_MLP=tiled), else the rows and columns kernels
  int k_split;    // k values per split of C (tiled_k_split, or mlp_k_split)
  int row_tiles;  // row tiles per block of the rows kernels (mlp_row_tiles)
  unsigned groups, splits;
  MlpLaunch(const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, const SEProblem& p,
            const at::TensorOptions& float_options)
      : w1(fc1_weight.reshape({p.R, p.C}).contiguous()),
        w2(fc2_weight.reshape({p.C, p.R}).contiguous()),
        N(p.N),
        R(static_cast<int>(p.R)),
        C(static_cast<int>(p.C)),
        act(static_cast<int>(p.activation)),
        gate(static_cast<int>(p.gate)),
        tiled(mlp_kernels(p) == MlpKernels::kTiled),
        k_split(tiled ? tiled_k_split(p.N, p.R, p.C) : mlp_k_split()),
        row_tiles(mlp_row_tiles()),
        groups(ceil_div(p.N, kSamples)),
        splits(ceil_div(p.C, k_split)) {
    partial = at::empty({static_cast<int64_t>(splits), p.N, p.R}, float_options);
  }
  // Grid of a product with J outputs, outputs_per_block per block, split over C or not.
  dim3 grid(int J, int outputs_per_block, bool split_over_c) const {
    return dim3(ceil_div(J, outputs_per_block), split_over_c ? splits : 1, groups);
  }
  // The same for the tiled kernel with kPerThreadN samples per thread.
  dim3 tiled_grid(int J, int per_thread_n, bool split_over_c) const {
    return dim3(ceil_div(J, kTileThreadsJ * kTiledOutputs), split_over_c ? splits : 1,
                ceil_div(N, kTileThreadsN * per_thread_n));
  }
  // The same for a rows kernel: row_tiles tiles of rows_per_tile rows per block.
  dim3 rows_grid(int J, int rows_per_tile, bool split_over_c) const {
    return dim3(ceil_div(ceil_div(J, rows_per_tile), row_tiles), split_over_c ? splits : 1, groups);
  }
  // The first product's output: the sums of each split (+ bias in split 0; bias may be nullptr).
  Output split_sums(const void* bias) const {
    return Output{partial.mutable_data_ptr<float>(), kPartial, bias, 1.f, N * R};
  }
  // The second product's input: the splits added (read as kSumActivate, or as kSumActivationGrad
  // with aux the saved hidden), written back.
  Input summed_splits(const float* aux, at::Tensor& write_back) const {
    return Input{partial.const_data_ptr<float>(), aux, static_cast<int>(splits), N * R,
                 write_back.mutable_data_ptr<float>()};
  }
};

// A float32 (N, K) matrix, with aux (the saved scale, for a kGateGrad read) where given.
Input input_of(const at::Tensor& a, const at::Tensor* aux = nullptr) {
  return Input{a.const_data_ptr<float>(), aux ? aux->const_data_ptr<float>() : nullptr, 0, 0, nullptr};
}

// The tiled path's split sums added into `out` (N, R): u (Kind kSumActivate) or du
// (kSumActivationGrad, with aux the saved hidden).
template <int Kind>
void launch_tiled_split_sums(const MlpLaunch& m, const float* aux, at::Tensor& out, cudaStream_t stream) {
  const int64_t count = m.N * m.R;
  tiled_split_sums_kernel<Kind><<<ceil_div(count, int64_t(kThreads) * kSplitSumsPerThread), kThreads, 0, stream>>>(
      m.summed_splits(aux, out), static_cast<int>(count), m.act, m.gate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void check_excitation_knobs() {
  mlp_kernels_requested();
  mlp_k_split();
  mlp_row_tiles();
  weight_gradient_wide_tiles();
}

bool excitation_kernels_apply(const at::Tensor& pooled, const SEProblem& p,
                              std::initializer_list<const at::Tensor*> params) {
  if (mlp_kernels(p) == MlpKernels::kAten) return false;
  if (pooled.scalar_type() != at::kFloat) return false;  // float64 inputs keep the ATen ops
  // Grid limit (65535): sample groups along gridDim.z.
  if (pooled.size(0) > int64_t(65535) * kSamples) return false;
  if (p.N * std::max(p.C, p.R) >= INT_MAX) return false;  // 32-bit indices into (N, C) and (N, R) (gather_raw)
  const at::ScalarType dtype = (*params.begin())->scalar_type();
  return std::all_of(params.begin(), params.end(), [&](const at::Tensor* t) {
    return t->scalar_type() == dtype && t->numel() < (INT_MAX / 2);
  });
}

void excitation_forward_kernels(const at::Tensor& pooled, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                                const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, at::Tensor& hidden,
                                at::Tensor& scale, const SEProblem& p, cudaStream_t stream) {
  const at::Tensor b1 = fc1_bias.contiguous(), b2 = fc2_bias.contiguous();
  // fc1 split over C (short dependency chains, many blocks); fc2 adds the splits as it stages its input
  // (the tiled kernel: tiled_split_sums_kernel adds them once, between the two).
  const MlpLaunch m(fc1_weight, fc2_weight, p, pooled.options());
  const Output gated{scale.mutable_data_ptr<float>(), kAddBiasThenGate, b2.const_data_ptr(), 1.f, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.w1.scalar_type(), "excitation_forward_kernels", [&] {
    if (m.tiled) {
      excitation_tiled_kernel<scalar_t, kPlain, kWeightRows, kTiledSamplesOverC, kTiledOutputs>
          <<<m.tiled_grid(m.R, kTiledSamplesOverC, true), kThreads, 0, stream>>>(
              input_of(pooled), m.w1.const_data_ptr<scalar_t>(), m.split_sums(b1.const_data_ptr()), p.N, m.R, m.C,
              m.k_split, m.act, m.gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_tiled_split_sums<kSumActivate>(m, nullptr, hidden, stream);
      excitation_tiled_kernel<scalar_t, kActivated, kWeightRows, kTiledSamplesOverR, kTiledOutputs>
          <<<m.tiled_grid(m.C, kTiledSamplesOverR, false), kThreads, 0, stream>>>(
              input_of(hidden), m.w2.const_data_ptr<scalar_t>(), gated, p.N, m.C, m.R, m.R, m.act, m.gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    excitation_rows_kernel<scalar_t, kSplitRowsPerWarp, kPlain, kChunk>
        <<<m.rows_grid(m.R, kWarps * kSplitRowsPerWarp, true), kThreads, 0, stream>>>(
            input_of(pooled), m.w1.const_data_ptr<scalar_t>(), m.split_sums(b1.const_data_ptr()), p.N, m.R, m.C,
            m.k_split, m.row_tiles, m.act, m.gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    excitation_rows_kernel<scalar_t, kSummingRowsPerWarp, kSumActivate, kSummingWidth>
        <<<m.rows_grid(m.C, kWarps * kSummingRowsPerWarp, false), kThreads, 0, stream>>>(
            m.summed_splits(nullptr, hidden), m.w2.const_data_ptr<scalar_t>(), gated, p.N, m.C, m.R,
            m.R, m.row_tiles, m.act, m.gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void excitation_backward_kernels(const at::Tensor& ds, const at::Tensor& scale, const at::Tensor& hidden,
                                 const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, at::Tensor& du,
                                 at::Tensor& dz_over_p, const SEProblem& p, cudaStream_t stream) {
  const MlpLaunch m(fc1_weight, fc2_weight, p, ds.options());
  // W2^T dv with dv = ds * gate'(scale), split over C: W2 (C, R) read as (K = C, J = R).
  const Input dv = input_of(ds, &scale);  // read as kGateGrad
  // du = act'(hidden) * (sum of the splits), written back; dz / P = (du W1) / P: W1 (R, C) read as (K = R, J = C).
  const Output scaled{dz_over_p.mutable_data_ptr<float>(), kScaled, nullptr, 1.f / static_cast<float>(p.P), 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.w1.scalar_type(), "excitation_backward_kernels", [&] {
    if (m.tiled) {
      excitation_tiled_kernel<scalar_t, kGateGrad, kWeightColumns, kTiledSamplesOverC, kTiledOutputs>
          <<<m.tiled_grid(m.R, kTiledSamplesOverC, true), kThreads, 0, stream>>>(
              dv, m.w2.const_data_ptr<scalar_t>(), m.split_sums(nullptr), p.N, m.R, m.C, m.k_split, m.act, m.gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_tiled_split_sums<kSumActivationGrad>(m, hidden.const_data_ptr<float>(), du, stream);
      excitation_tiled_kernel<scalar_t, kPlain, kWeightColumns, kTiledSamplesOverR, kTiledOutputs>
          <<<m.tiled_grid(m.C, kTiledSamplesOverR, false), kThreads, 0, stream>>>(
              input_of(du), m.w1.const_data_ptr<scalar_t>(), scaled, p.N, m.C, m.R, m.R, m.act, m.gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    excitation_columns_kernel<scalar_t, kSplitColumnsPerLane, kGateGrad, kChunk>
        <<<m.grid(m.R, kWarp * kSplitColumnsPerLane, true), kThreads, 0, stream>>>(
            dv, m.w2.const_data_ptr<scalar_t>(), m.split_sums(nullptr), p.N, m.R, m.C, m.k_split, m.act, m.gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    excitation_columns_kernel<scalar_t, kSummingColumnsPerLane, kSumActivationGrad, kSummingWidth>
        <<<m.grid(m.C, kWarp * kSummingColumnsPerLane, false), kThreads, 0, stream>>>(
            m.summed_splits(hidden.const_data_ptr<float>(), du), m.w1.const_data_ptr<scalar_t>(),
            scaled, p.N, m.C, m.R, m.R, m.act, m.gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_gradients_kernel(
    const at::Tensor& dv_or_ds, const c10::optional<at::Tensor>& gate_scale, const at::Tensor& du,
    const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const SEProblem& p, cudaStream_t stream) {
  TORCH_CHECK(fc1_weight.scalar_type() == fc2_weight.scalar_type(),
              "se_fused: weight_gradients_kernel needs both weights in one dtype");
  at::Tensor dw1 = at::empty({p.R, p.C}, fc1_weight.options()), db1 = at::empty({p.R}, fc1_weight.options());
  at::Tensor dw2 = at::empty({p.C, p.R}, fc2_weight.options()), db2 = at::empty({p.C}, fc2_weight.options());
  const int R = static_cast<int>(p.R), C = static_cast<int>(p.C);
  const Input dv = gate_scale ? input_of(dv_or_ds, &*gate_scale) : input_of(dv_or_ds);
  const bool wide = weight_gradient_wide_tiles();
  const WeightGradProblem layer1{input_of(du), input_of(pooled), dw1.mutable_data_ptr(), db1.mutable_data_ptr(), R,
                                 C, weight_gradient_width(C, wide)};
  const WeightGradProblem layer2{dv, input_of(hidden), dw2.mutable_data_ptr(), db2.mutable_data_ptr(), C, R,
                                 weight_gradient_width(R, wide)};
  const int tiles = layer1.tiles() + layer2.tiles();
  const int splits = weight_gradient_splits(tiles, p.N);
  const int samples_per_split = static_cast<int>((p.N + splits - 1) / splits);
  // With one split the blocks write the gradients; with several, float32 partial sums that
  // a second kernel adds in split order.
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, layer1.partial_size() + layer2.partial_size()}, pooled.options());
  float* partial_ptr = splits > 1 ? partial.mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw1.scalar_type(), "weight_gradients_kernel", [&] {
    const auto kernel = gate_scale ? weight_gradients_cuda_kernel<scalar_t, kGateGrad>
                                   : weight_gradients_cuda_kernel<scalar_t, kPlain>;
    kernel<<<dim3(tiles, splits), kThreads, 0, stream>>>(layer1, layer2, static_cast<int>(p.N), samples_per_split,
                                                         partial_ptr,
                                                         static_cast<int>(p.activation), static_cast<int>(p.gate));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t elements = layer1.partial_size() + layer2.partial_size();
      weight_gradient_splits_kernel<scalar_t>
          <<<ceil_div(elements, kThreads), kThreads, 0, stream>>>(layer1, layer2, partial_ptr, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dw1.view(fc1_weight.sizes()), db1, dw2.view(fc2_weight.sizes()), db2};
}

}  // namespace cuda
}  // namespace se_fused
