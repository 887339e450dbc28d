// Pieces shared by the LayerNorm and RMSNorm CUDA kernels (csrc/cuda/layer_norm.cu,
// csrc/cuda/rms_norm.cu): argument checks, launch geometry, row reductions and the
// deterministic weight-gradient reduction.
//
// Geometry: a "team" of threads owns one row. Rows up to kWarpRowMax elements get one
// warp each (8 rows per 256-thread block, reductions by shuffles only); longer rows get
// a whole block (128..1024 threads) and a shared-memory step. A thread walks its
// columns j = tid, tid + T, ...; later passes over a row re-read it from L1/L2.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>

namespace llmfast::cuda {

using at::Tensor;

constexpr int64_t kWarpRowMax = 1024;
constexpr int kWarpRowsPerBlock = 8;

struct RowLaunch {
  bool warp_rows;
  int threads;         // blockDim.x: threads per row
  int rows_per_block;  // blockDim.y
};

inline RowLaunch row_launch(int64_t N) {
  if (N <= kWarpRowMax) return {true, 32, kWarpRowsPerBlock};
  int t = 128;
  while (t < 1024 && int64_t(t) * 8 < N) t *= 2;  // >= ~8 elements per thread
  return {false, t, 1};
}

// Number of teams (partial-sum rows) for backward: enough to fill the GPU twice over,
// few enough that the [P, N] fp32 partials stay within 64 MB.
inline int64_t bwd_blocks(const RowLaunch& g, int64_t M, int64_t N) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (M + g.rows_per_block - 1) / g.rows_per_block;
  const int64_t cap = std::max<int64_t>(1, (int64_t(1) << 24) / (std::max<int64_t>(N, 1) * g.rows_per_block));
  return std::max<int64_t>(1, std::min({needed, 2 * sms, cap}));
}

// ---------------------------------------------------------------------------------
// Argument checks (the Python layer checks user input; these guard direct op calls)

inline void check_input(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": input must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, op, ": input must be 2-D [M, N], got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": input must be float32, float16 or bfloat16 on CUDA, got ", t);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": input must have unit stride along its last dim");
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows");
}

inline void check_rows(const char* op, const char* arg, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes(), op, ": ", arg, " has shape ", t.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " dtype ", t.scalar_type(), " != input dtype ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", arg, " is on ", t.device(), ", input on ", like.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", arg, " must have unit stride along its last dim");
}

// weight/bias: [N], input's dtype or float32; the kernels read them as contiguous fp32.
inline Tensor f32_param(const char* op, const char* arg, const std::optional<Tensor>& p, const Tensor& x) {
  if (!p.has_value() || !p->defined()) return Tensor();
  const Tensor& t = *p;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", arg, " must have shape [", x.size(1), "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", arg, " dtype ",
              t.scalar_type(), " must be the input's (", x.scalar_type(), ") or float32");
  TORCH_CHECK(t.device() == x.device(), op, ": ", arg, " is on ", t.device(), ", input on ", x.device());
  return t.to(at::kFloat).contiguous();
}

inline void check_stats(const char* op, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.scalar_type() == at::kFloat && t.device() == x.device(),
              op, ": mean/rstd must be [", x.size(0), "] float32 tensors on ", x.device());
}

template <typename T>
inline const T* cptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (a, b) summed over the threads of this row's team; every thread gets the totals.
// The xor-butterfly and the fixed warp order make the result independent of timing.
// Block mode: called by every thread of the block (one row per block).
template <bool WARP_ROWS>
__device__ __forceinline__ float2 team_sum2(float a, float b, float2* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (WARP_ROWS) {
    return make_float2(a, b);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();  // smem may still be read from the previous call
    if (lane == 0) smem[warp] = make_float2(a, b);
    __syncthreads();
    const float2 v = lane < nwarps ? smem[lane] : make_float2(0.f, 0.f);
    return make_float2(warp_sum(v.x), warp_sum(v.y));
  }
}

// x + r rounded to T: the norm sees exactly the `summed` it returns.
template <typename T>
__device__ __forceinline__ T add_round(T x, T r) {
  return static_cast<T>(static_cast<float>(x) + static_cast<float>(r));
}

// out[j] = sum_p part[p, j] in order p = 0..P-1: block (32 columns, 8 row slices), each
// slice sums rows p = ty, ty + 8, ..., then slice totals are added in order.
static __global__ void sum_partials_kernel(const float* __restrict__ part, int64_t P, int64_t N,
                                           float* __restrict__ out) {
  __shared__ float slice[8][33];
  const int64_t j = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (j < N) {
    for (int64_t p = threadIdx.y; p < P; p += 8) acc += part[p * N + j];
  }
  slice[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < N) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += slice[k][threadIdx.x];
    out[j] = t;
  }
}

static void sum_partials(const Tensor& part, Tensor& out) {
  const int64_t P = part.size(0), N = part.size(1);
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((N + 31) / 32));
  sum_partials_kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(part.const_data_ptr<float>(), P, N,
                                                                            out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace llmfast::cuda
