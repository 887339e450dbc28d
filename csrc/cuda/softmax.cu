// Fused softmax / log_softmax on CUDA: z = x*scale (+ additive mask | bool mask |
// causal), y = softmax(z) over the last dim, in fp32 whatever the storage dtype.
//
// input: [A, B, L, N] contiguous, M = A*B*L rows; mask: [A, B, L, N] view with any
// strides (0 where broadcast). Two kernels:
//  * N <= 1024: one warp per row, the row held in registers (ITERS values per
//    lane), warp-shuffle reductions, one read and one write of each element.
//  * N > 1024: one block per row, 16-byte packed loads when N and the pointers
//    allow, an online (max, sum) first pass and a second pass that writes y. Any
//    length works (262144 and beyond): nothing is truncated.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

using at::Tensor;

struct MaskArgs {
  const void* ptr;
  int64_t sa, sb, sl, sn;
  int64_t B, L;
  int kind;  // 0 none, 1 bool (true = keep), 2 float32 additive
  bool causal;
};

struct RowInfo {
  int64_t moff;  // offset of the row in the mask
  int64_t l;     // row index within its [L, N] matrix (for causal)
};

__device__ __forceinline__ RowInfo row_info(int64_t row, const MaskArgs& mk) {
  const int64_t l = row % mk.L, b = (row / mk.L) % mk.B, a = row / (mk.L * mk.B);
  return {a * mk.sa + b * mk.sb + l * mk.sl, l};
}

// z_j for a visible column, -inf for a hidden one.
__device__ __forceinline__ float masked_z(float x, int64_t j, float scale, const MaskArgs& mk, const RowInfo& ri) {
  if (mk.causal && j > ri.l) return kNegInf;
  float z = x * scale;
  if (mk.kind == 1) {
    if (!static_cast<const bool*>(mk.ptr)[ri.moff + j * mk.sn]) return kNegInf;
  } else if (mk.kind == 2) {
    z += static_cast<const float*>(mk.ptr)[ri.moff + j * mk.sn];
  }
  return z;
}

__device__ __forceinline__ float finish(float z, float mx, float sum, bool log, bool dead) {
  if (dead) return 0.f;
  return log ? z - mx - __logf(sum) : __expf(z - mx) / sum;
}

// ---------------------------------------------------------------------------------
// Forward, N <= 32 * ITERS: one warp per row.
template <typename T, int ITERS>
__global__ void softmax_fwd_warp_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t M, int N, float scale,
                                        MaskArgs mk, bool log) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= M) return;
  const RowInfo ri = row_info(row, mk);
  const T* xr = x + row * N;
  float z[ITERS];
  float mx = kNegInf;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = i * 32 + lane;  // lanes read consecutive elements: coalesced
    z[i] = j < N ? masked_z(static_cast<float>(xr[j]), j, scale, mk, ri) : kNegInf;
    mx = fmaxf(mx, z[i]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) sum += __expf(z[i] - mx);  // NaN inputs make sum NaN, as in torch
  sum = warp_sum(sum);
  const bool dead = (mk.kind != 0 || mk.causal) && mx == kNegInf;  // nothing visible: zeros
  T* yr = y + row * N;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = i * 32 + lane;
    if (j < N) yr[j] = static_cast<T>(finish(z[i], mx, sum, log, dead));
  }
}

// ---------------------------------------------------------------------------------
// Forward, any N: one block per row, online (max, sum), packed loads.
__device__ __forceinline__ void online_add(float& m, float& s, float z) {
  const float mn = fmaxf(m, z);
  if (mn == kNegInf) return;  // still nothing visible
  s = s * __expf(m - mn) + __expf(z - mn);
  m = mn;
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  s = mn == kNegInf ? s + s2 : s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

template <typename T, int VEC>
__global__ void softmax_fwd_block_kernel(const T* __restrict__ x, T* __restrict__ y, int N, float scale,
                                         MaskArgs mk, bool log) {
  __shared__ float sm_m[32], sm_s[32];
  const int64_t row = blockIdx.x;
  const RowInfo ri = row_info(row, mk);
  const T* xr = x + row * N;
  T* yr = y + row * N;
  const int nvec = N / VEC;  // VEC divides N (the launcher guarantees it)

  float m = kNegInf, s = 0.f;
  for (int p = threadIdx.x; p < nvec; p += blockDim.x) {
    const Pack<T, VEC> pk = reinterpret_cast<const Pack<T, VEC>*>(xr)[p];
#pragma unroll
    for (int v = 0; v < VEC; ++v) online_add(m, s, masked_z(static_cast<float>(pk.v[v]), p * VEC + v, scale, mk, ri));
  }
  // block-wide merge of the per-thread (max, sum) pairs
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  m = lane < nwarps ? sm_m[lane] : kNegInf;
  s = lane < nwarps ? sm_s[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }
  // a NaN anywhere (which fmaxf skips) has already made s NaN
  const bool dead = (mk.kind != 0 || mk.causal) && m == kNegInf;
  // second pass: the row is re-read, from L2 for all but huge rows
  for (int p = threadIdx.x; p < nvec; p += blockDim.x) {
    const Pack<T, VEC> pk = reinterpret_cast<const Pack<T, VEC>*>(xr)[p];
    Pack<T, VEC> out;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float z = masked_z(static_cast<float>(pk.v[v]), p * VEC + v, scale, mk, ri);
      out.v[v] = static_cast<T>(finish(z, m, s, log, dead));
    }
    reinterpret_cast<Pack<T, VEC>*>(yr)[p] = out;
  }
}

// ---------------------------------------------------------------------------------
// Backward. softmax: dx = scale*y*(dy - sum(dy*y)); log_softmax: dx = scale*(dy -
// exp(y)*sum(dy)), with masked positions (y = -inf) and fully masked rows (written
// as zeros, so exp(y) sums to N > 1) getting zero gradient.
// A row-sum term: dy*y (softmax) or dy (log_softmax). A masked position's -inf is a
// constant, so its dy is left out of the sum (as in the reference).
__device__ __forceinline__ float bwd_term(float dy, float y, bool log, bool masked) {
  if (!log) return dy * y;
  return masked && y == kNegInf ? 0.f : dy;
}

__device__ __forceinline__ float bwd_value(float dy, float y, float total, float scale, bool log, bool masked,
                                           bool dead_row) {
  if (!log) return y * (dy - total) * scale;
  if (masked && (dead_row || y == kNegInf)) return 0.f;
  return (dy - __expf(y) * total) * scale;
}

template <typename T, int ITERS>
__global__ void softmax_bwd_warp_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                        int64_t M, int N, float scale, bool log, bool masked) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= M) return;
  const T* g = dy + row * N;
  const T* p = y + row * N;
  float gv[ITERS], pv[ITERS];
  float total = 0.f, psum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = i * 32 + lane;
    gv[i] = j < N ? static_cast<float>(g[j]) : 0.f;
    pv[i] = j < N ? static_cast<float>(p[j]) : (log ? kNegInf : 0.f);
    total += bwd_term(gv[i], pv[i], log, masked);
    if (log) psum += __expf(pv[i]);
  }
  total = warp_sum(total);
  const bool dead_row = log && masked && N > 1 && warp_sum(psum) > 1.5f;
  T* d = dx + row * N;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = i * 32 + lane;
    if (j < N) d[j] = static_cast<T>(bwd_value(gv[i], pv[i], total, scale, log, masked, dead_row));
  }
}

template <typename T, int VEC>
__global__ void softmax_bwd_block_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                         int N, float scale, bool log, bool masked) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const auto* g = reinterpret_cast<const Pack<T, VEC>*>(dy + row * N);
  const auto* p = reinterpret_cast<const Pack<T, VEC>*>(y + row * N);
  auto* d = reinterpret_cast<Pack<T, VEC>*>(dx + row * N);
  const int nvec = N / VEC;
  float total = 0.f, psum = 0.f;
  for (int q = threadIdx.x; q < nvec; q += blockDim.x) {
    const Pack<T, VEC> gp = g[q], pp = p[q];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float gv = static_cast<float>(gp.v[v]), pv = static_cast<float>(pp.v[v]);
      total += bwd_term(gv, pv, log, masked);
      if (log) psum += __expf(pv);
    }
  }
  total = block_sum(total, smem);
  const bool dead_row = log && masked && N > 1 && block_sum(psum, smem) > 1.5f;
  for (int q = threadIdx.x; q < nvec; q += blockDim.x) {
    const Pack<T, VEC> gp = g[q], pp = p[q];
    Pack<T, VEC> out;
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      out.v[v] = static_cast<T>(bwd_value(static_cast<float>(gp.v[v]), static_cast<float>(pp.v[v]), total, scale,
                                          log, masked, dead_row));
    d[q] = out;
  }
}

// ---------------------------------------------------------------------------------
// Launchers

constexpr int kWarpRowsPerBlock = 4;  // 128 threads: 4 rows per block
constexpr int kBlockThreads = 512;

// Runs f(std::integral_constant<int, ITERS>) with ITERS = next power of two >= ceil(N / 32).
template <typename F>
void with_iters(int N, F&& f) {
  const int need = (N + 31) / 32;
  if (need <= 1) f(std::integral_constant<int, 1>{});
  else if (need <= 2) f(std::integral_constant<int, 2>{});
  else if (need <= 4) f(std::integral_constant<int, 4>{});
  else if (need <= 8) f(std::integral_constant<int, 8>{});
  else if (need <= 16) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}

// Runs f(std::integral_constant<int, VEC>) with 16-byte packs when N and every
// pointer allow, else single elements.
template <typename T, typename F>
void with_vec(int N, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = N % kVec == 0;
  for (const void* q : ptrs) ok = ok && reinterpret_cast<uintptr_t>(q) % 16 == 0;
  if (ok) f(std::integral_constant<int, kVec>{});
  else f(std::integral_constant<int, 1>{});
}

#define LLMFAST_DISPATCH_HALF_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

Tensor softmax_fwd(const Tensor& input, double scale, const std::optional<Tensor>& mask, bool is_causal, bool log) {
  TORCH_CHECK(input.is_cuda(), "llmfast::softmax_fwd (cuda): input must be a CUDA tensor");
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(), "llmfast::softmax_fwd: input must be a contiguous [A, B, L, N] tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N64 = input.size(3);
  TORCH_CHECK(N64 < (int64_t(1) << 31), "llmfast::softmax_fwd: rows longer than 2^31 - 1 are not supported");
  MaskArgs mk{nullptr, 0, 0, 0, 0, input.size(1), input.size(2), 0, is_causal};
  if (mask.has_value()) {
    const Tensor& m = *mask;
    TORCH_CHECK(m.sizes() == input.sizes(), "llmfast::softmax_fwd: mask must be viewed as ", input.sizes(), ", got ", m.sizes());
    TORCH_CHECK(m.device() == input.device(), "llmfast::softmax_fwd: mask is on ", m.device(), ", input on ", input.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                "llmfast::softmax_fwd: mask must be bool or float32, got ", m.scalar_type());
    mk = {m.const_data_ptr(), m.stride(0), m.stride(1), m.stride(2), m.stride(3), input.size(1), input.size(2),
          m.scalar_type() == at::kBool ? 1 : 2, is_causal};
  }
  Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  const int N = static_cast<int>(N64);
  const int64_t M = input.numel() / N;
  auto stream = at::cuda::getCurrentCUDAStream();
  LLMFAST_DISPATCH_HALF_TYPES(input.scalar_type(), "llmfast_softmax_fwd_cuda", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    if (N <= 1024) {
      with_iters(N, [&](auto iters) {
        const dim3 grid((M + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
        softmax_fwd_warp_kernel<scalar_t, decltype(iters)::value>
            <<<grid, 32 * kWarpRowsPerBlock, 0, stream>>>(xp, yp, M, N, static_cast<float>(scale), mk, log);
      });
    } else {
      TORCH_CHECK(M < (int64_t(1) << 31), "llmfast::softmax_fwd: too many rows for one launch");
      with_vec<scalar_t>(N, {xp, yp}, [&](auto vec) {
        softmax_fwd_block_kernel<scalar_t, decltype(vec)::value>
            <<<M, kBlockThreads, 0, stream>>>(xp, yp, N, static_cast<float>(scale), mk, log);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor softmax_bwd(const Tensor& grad_out, const Tensor& out, double scale, bool log, bool masked) {
  TORCH_CHECK(out.is_cuda() && grad_out.is_cuda(), "llmfast::softmax_bwd (cuda): tensors must be on CUDA");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "llmfast::softmax_bwd: grad_out has shape ", grad_out.sizes(), ", out ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), "llmfast::softmax_bwd: grad_out dtype ", grad_out.scalar_type(), " != out dtype ", out.scalar_type());
  const c10::cuda::CUDAGuard guard(out.device());
  const Tensor dy = grad_out.contiguous(), y = out.contiguous();
  Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  const int64_t N64 = y.size(-1);
  TORCH_CHECK(N64 < (int64_t(1) << 31), "llmfast::softmax_bwd: rows longer than 2^31 - 1 are not supported");
  const int N = static_cast<int>(N64);
  const int64_t M = y.numel() / N;
  auto stream = at::cuda::getCurrentCUDAStream();
  LLMFAST_DISPATCH_HALF_TYPES(y.scalar_type(), "llmfast_softmax_bwd_cuda", [&] {
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* pp = y.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    if (N <= 1024) {
      with_iters(N, [&](auto iters) {
        const dim3 grid((M + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
        softmax_bwd_warp_kernel<scalar_t, decltype(iters)::value>
            <<<grid, 32 * kWarpRowsPerBlock, 0, stream>>>(gp, pp, dp, M, N, static_cast<float>(scale), log, masked);
      });
    } else {
      TORCH_CHECK(M < (int64_t(1) << 31), "llmfast::softmax_bwd: too many rows for one launch");
      with_vec<scalar_t>(N, {gp, pp, dp}, [&](auto vec) {
        softmax_bwd_block_kernel<scalar_t, decltype(vec)::value>
            <<<M, kBlockThreads, 0, stream>>>(gp, pp, dp, N, static_cast<float>(scale), log, masked);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace llmfast::cuda
