// The excitation MLP and the weight gradients of the two-pass path as a few
// kernels (interface and rationale in excitation_cuda.h).
//
// The matrices are small (N x C activations, R x C weights), so the kernels aim
// at few launches and at spreading the weight reads over many SMs, not at
// tensor-core throughput. A block handles kSamples samples, so each weight
// element is read from L2 once per block, not once per sample. Sums run in a
// fixed order: lane-strided partial sums and a butterfly (rows kernel), warps
// over contiguous k ranges added in warp order (columns kernel), samples in
// order (weight gradients).
#include "excitation_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "device_utils.cuh"

namespace se_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kSamples = 8;  // samples per block: accumulators per thread
static_assert(kSamples * kWarp == kThreads, "the columns kernel finalises one (sample, column) per thread");
constexpr int kWeightGradRows = 8;  // output rows per thread in the weight-gradient kernel

// How a kernel reads element i of its float32 input matrix.
enum InputKind : int {
  kPlain = 0,      // as stored
  kActivated = 1,  // act(v): v is the saved pre-activation
  kGateGrad = 2,   // v * gate'(s): v is ds, s the saved scale, so the result is dv
};

__device__ __forceinline__ float load_input(const float* __restrict__ a, const float* __restrict__ gate_scale,
                                            int64_t i, int kind, int activation, int gate) {
  const float v = a[i];
  if (kind == kActivated) return apply_activation(v, activation);
  if (kind == kGateGrad) return gate_backward_from_output(v, gate_scale[i], gate);
  return v;
}

enum RowsEpilogue : int { kAddBias = 0, kAddBiasThenGate = 1 };

// out[n, j] = epilogue(sum_k in(n, k) * W[j, k] (+ bias[j])) with W (J, K)
// row-major: a warp per output row, its lanes across k (coalesced weight reads).
template <typename w_t>
__global__ void __launch_bounds__(kThreads) excitation_rows_kernel(
    const float* __restrict__ in, int in_kind, const w_t* __restrict__ W, const w_t* __restrict__ bias,
    float* __restrict__ out, int epilogue, int64_t N, int J, int K, int activation, int gate) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSamples;
  const int ns = static_cast<int>(min(static_cast<int64_t>(kSamples), N - n0));
  for (int j = blockIdx.x * kWarps + warp; j < J; j += gridDim.x * kWarps) {
    float acc[kSamples];
#pragma unroll
    for (int s = 0; s < kSamples; ++s) acc[s] = 0.f;
    const w_t* w_row = W + static_cast<int64_t>(j) * K;
    for (int k = lane; k < K; k += kWarp) {
      const float w = static_cast<float>(w_row[k]);
#pragma unroll
      for (int s = 0; s < kSamples; ++s)
        if (s < ns) acc[s] += w * load_input(in, nullptr, (n0 + s) * K + k, in_kind, activation, gate);
    }
    const float b = static_cast<float>(bias[j]);
#pragma unroll
    for (int s = 0; s < kSamples; ++s) {
      const float total = warp_sum(acc[s]) + b;  // every lane holds the total; lane s stores it
      if (lane == s && s < ns) out[(n0 + s) * J + j] = epilogue == kAddBiasThenGate ? apply_gate(total, gate) : total;
    }
  }
}

enum ColumnsEpilogue : int { kActivationGrad = 0, kScaleBy = 1 };

// out[n, j] = epilogue(sum_k in(n, k) * W[k, j]) with W (K, J) row-major: lanes
// across j (coalesced), the warps over contiguous k ranges, their partial sums
// added in warp order. Epilogues: act'(hidden[n, j]) * sum, or factor * sum.
template <typename w_t>
__global__ void __launch_bounds__(kThreads) excitation_columns_kernel(
    const float* __restrict__ in, const float* __restrict__ gate_scale, int in_kind, const w_t* __restrict__ W,
    const float* __restrict__ hidden, float* __restrict__ out, int epilogue, float factor, int64_t N, int J, int K,
    int activation, int gate) {
  __shared__ float partial[kWarps][kSamples][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int j = blockIdx.x * kWarp + lane;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSamples;
  const int ns = static_cast<int>(min(static_cast<int64_t>(kSamples), N - n0));
  const int k_per_warp = (K + kWarps - 1) / kWarps;
  const int k_begin = warp * k_per_warp, k_end = min(K, k_begin + k_per_warp);
  float acc[kSamples];
#pragma unroll
  for (int s = 0; s < kSamples; ++s) acc[s] = 0.f;
  if (j < J) {
    for (int k = k_begin; k < k_end; ++k) {
      const float w = static_cast<float>(W[static_cast<int64_t>(k) * J + j]);
#pragma unroll
      for (int s = 0; s < kSamples; ++s)
        if (s < ns) acc[s] += w * load_input(in, gate_scale, (n0 + s) * K + k, in_kind, activation, gate);
    }
  }
#pragma unroll
  for (int s = 0; s < kSamples; ++s) partial[warp][s][lane] = acc[s];
  __syncthreads();
  const int s = threadIdx.x / kWarp;  // this thread finalises (sample s, column j)
  if (s < ns && j < J) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][s][lane];
    const int64_t o = (n0 + s) * J + j;
    out[o] = epilogue == kActivationGrad ? activation_backward(total, hidden[o], activation) : total * factor;
  }
}

// One weight gradient: weight_grad[i, j] = sum_n a(n, i) * b(n, j) for a (N, I),
// b (N, J), and bias_grad[i] = sum_n a(n, i).
struct WeightGradProblem {
  const float* a;
  const float* a_gate_scale;  // kGateGrad input only
  int a_kind;
  const float* b;
  int b_kind;
  void* weight_grad;  // (I, J) in the weight's dtype
  void* bias_grad;    // (I)
  int I, J;
};

// Both layers' gradients in one launch (blockIdx.z picks the layer). A thread
// owns column j of kWeightGradRows rows and walks the batch in order; column
// j == J is the bias (b = 1).
template <typename w_t>
__global__ void __launch_bounds__(kThreads) weight_gradients_cuda_kernel(WeightGradProblem layer0,
                                                                         WeightGradProblem layer1, int64_t N,
                                                                         int activation, int gate) {
  const WeightGradProblem q = blockIdx.z == 0 ? layer0 : layer1;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i0 = blockIdx.y * kWeightGradRows;
  if (j > q.J || i0 >= q.I) return;
  const int rows = min(kWeightGradRows, q.I - i0);
  float acc[kWeightGradRows];
#pragma unroll
  for (int t = 0; t < kWeightGradRows; ++t) acc[t] = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    const float bv = j < q.J ? load_input(q.b, nullptr, n * q.J + j, q.b_kind, activation, gate) : 1.f;
#pragma unroll
    for (int t = 0; t < kWeightGradRows; ++t)
      if (t < rows) acc[t] += load_input(q.a, q.a_gate_scale, n * q.I + i0 + t, q.a_kind, activation, gate) * bv;
  }
#pragma unroll
  for (int t = 0; t < kWeightGradRows; ++t) {
    if (t >= rows) continue;
    if (j < q.J) {
      static_cast<w_t*>(q.weight_grad)[static_cast<int64_t>(i0 + t) * q.J + j] = static_cast<w_t>(acc[t]);
    } else {
      static_cast<w_t*>(q.bias_grad)[i0 + t] = static_cast<w_t>(acc[t]);
    }
  }
}

unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Blocks along the output rows: enough, with the sample groups, for ~4 blocks per SM.
unsigned row_blocks(int64_t rows, unsigned sample_groups) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, kWarps), ceil_div(4 * sms, sample_groups))));
}

}  // namespace

bool excitation_kernels_apply(const at::Tensor& pooled, std::initializer_list<const at::Tensor*> params) {
  const char* env = std::getenv("SE_FUSED_CUDA_MLP");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  TORCH_CHECK_VALUE(env == nullptr || *env == '\0' || std::strcmp(env, "kernels") == 0,
                    "se_fused: SE_FUSED_CUDA_MLP must be kernels or aten; got '", env, "'");
  if (pooled.scalar_type() != at::kFloat) return false;  // float64 inputs keep the ATen ops
  // Grid limits: sample groups and weight-gradient row groups along gridDim.y.
  if (pooled.size(0) > int64_t(65535) * kSamples || pooled.size(1) > int64_t(65535) * kWeightGradRows) return false;
  const at::ScalarType dtype = (*params.begin())->scalar_type();
  return std::all_of(params.begin(), params.end(), [&](const at::Tensor* t) {
    return t->scalar_type() == dtype && (t->numel() == 0 || t->numel() < (INT_MAX / 2));
  });
}

void excitation_forward_kernels(const at::Tensor& pooled, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                                const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, at::Tensor& hidden,
                                at::Tensor& scale, const SEProblem& p, cudaStream_t stream) {
  const at::Tensor w1 = fc1_weight.reshape({p.R, p.C}).contiguous(), w2 = fc2_weight.reshape({p.C, p.R}).contiguous();
  const at::Tensor b1 = fc1_bias.contiguous(), b2 = fc2_bias.contiguous();
  const int R = static_cast<int>(p.R), C = static_cast<int>(p.C);
  const int act = static_cast<int>(p.activation), gate = static_cast<int>(p.gate);
  const unsigned groups = ceil_div(p.N, kSamples);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w1.scalar_type(), "excitation_forward_kernels", [&] {
    excitation_rows_kernel<scalar_t><<<dim3(row_blocks(R, groups), groups), kThreads, 0, stream>>>(
        pooled.const_data_ptr<float>(), kPlain, w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(),
        hidden.mutable_data_ptr<float>(), kAddBias, p.N, R, C, act, gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    excitation_rows_kernel<scalar_t><<<dim3(row_blocks(C, groups), groups), kThreads, 0, stream>>>(
        hidden.const_data_ptr<float>(), kActivated, w2.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(),
        scale.mutable_data_ptr<float>(), kAddBiasThenGate, p.N, C, R, act, gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void excitation_backward_kernels(const at::Tensor& ds, const at::Tensor& scale, const at::Tensor& hidden,
                                 const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, at::Tensor& du,
                                 at::Tensor& dz_over_p, const SEProblem& p, cudaStream_t stream) {
  const at::Tensor w1 = fc1_weight.reshape({p.R, p.C}).contiguous(), w2 = fc2_weight.reshape({p.C, p.R}).contiguous();
  const int R = static_cast<int>(p.R), C = static_cast<int>(p.C);
  const int act = static_cast<int>(p.activation), gate = static_cast<int>(p.gate);
  const unsigned groups = ceil_div(p.N, kSamples);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w1.scalar_type(), "excitation_backward_kernels", [&] {
    // du = act'(hidden) * (dv W2), dv = ds * gate'(scale): W2 (C, R) read as (K = C, J = R).
    excitation_columns_kernel<scalar_t><<<dim3(ceil_div(R, kWarp), groups), kThreads, 0, stream>>>(
        ds.const_data_ptr<float>(), scale.const_data_ptr<float>(), kGateGrad, w2.const_data_ptr<scalar_t>(),
        hidden.const_data_ptr<float>(), du.mutable_data_ptr<float>(), kActivationGrad, 1.f, p.N, R, C, act, gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dz / P = (du W1) / P: W1 (R, C) read as (K = R, J = C).
    excitation_columns_kernel<scalar_t><<<dim3(ceil_div(C, kWarp), groups), kThreads, 0, stream>>>(
        du.const_data_ptr<float>(), nullptr, kPlain, w1.const_data_ptr<scalar_t>(), nullptr,
        dz_over_p.mutable_data_ptr<float>(), kScaleBy, 1.f / static_cast<float>(p.P), p.N, C, R, act, gate);
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
  const WeightGradProblem layer1{du.const_data_ptr<float>(), nullptr, kPlain, pooled.const_data_ptr<float>(),
                                 kPlain, dw1.mutable_data_ptr(), db1.mutable_data_ptr(), R, C};
  const WeightGradProblem layer2{dv_or_ds.const_data_ptr<float>(),
                                 gate_scale ? gate_scale->const_data_ptr<float>() : nullptr,
                                 gate_scale ? kGateGrad : kPlain,
                                 hidden.const_data_ptr<float>(),
                                 kActivated,
                                 dw2.mutable_data_ptr(),
                                 db2.mutable_data_ptr(),
                                 C,
                                 R};
  const dim3 grid(ceil_div(std::max(R, C) + 1, kThreads), ceil_div(std::max(R, C), kWeightGradRows), 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw1.scalar_type(), "weight_gradients_kernel", [&] {
    weight_gradients_cuda_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        layer1, layer2, p.N, static_cast<int>(p.activation), static_cast<int>(p.gate));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dw1.view(fc1_weight.sizes()), db1, dw2.view(fc2_weight.sizes()), db2};
}

}  // namespace cuda
}  // namespace se_fused
