// Fused softmax / log_softmax for llmfast::softmax_fwd / softmax_bwd (CUDA).
//
//   z = x*scale (+ additive mask | -inf where a bool mask or causal hides the column)
//   y = softmax(z) or log_softmax(z) over the last dim, in fp32 whatever the storage dtype
// backward: softmax dx = scale*y*(dy - sum(dy*y)); log_softmax dx = scale*(dy - exp(y)*sum(dy)).
//
// input: [A, B, L, N] contiguous, M = A*B*L rows; mask: [A, B, L, N] view with any strides (0
// where broadcast). Bytes: one read and one write of each element (the block path re-reads the
// row, from L2 for all but huge rows). Two kernels per direction:
//  * N <= 1024: one warp per row, the row held in registers (ITERS values per lane),
//    warp-shuffle reductions.
//  * N > 1024: one block per row, 16-byte packed loads when N and the pointers allow, an online
//    (max, sum) first pass and a second pass that writes y. Any length works (262144 and
//    beyond): nothing is truncated.
// A row with nothing visible (mask / causal) gives zeros and zero gradient, never NaN.
#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

struct MaskArgs {
  const void* ptr = nullptr;
  int64_t sa = 0, sb = 0, sl = 0, sn = 0;
  int64_t B = 1, L = 1;
  int kind = 0;  // 0 none, 1 bool (true = keep), 2 float32 additive
  bool causal = false;
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

// ---------------------------------------------------------------------------------------------
// Forward, N <= 32 * ITERS: one warp per row, 4 rows per 128-thread block.
template <typename T, int ITERS>
__global__ void _softmax_fwd_warp_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t M, int N, float scale,
                                         MaskArgs mk, bool log) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= M) return;  // whole warps leave together
  const RowInfo ri = row_info(row, mk);
  const T* xr = x + row * N;
  float z[ITERS];
  float mx = kNegInf;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = i * 32 + lane;  // lanes read consecutive elements: coalesced
    z[i] = j < N ? masked_z(to_float(xr[j]), j, scale, mk, ri) : kNegInf;
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
    if (j < N) yr[j] = from_float<T>(finish(z[i], mx, sum, log, dead));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, any N: one block per row, online (max, sum) per thread, then merged over the block.
struct MaxSum {
  float m, s;  // running max, sum of exp(z - m)
};

struct OnlineMerge {
  __device__ __forceinline__ MaxSum operator()(MaxSum a, MaxSum b) const {
    const float mn = fmaxf(a.m, b.m);
    return {mn, mn == kNegInf ? a.s + b.s : a.s * __expf(a.m - mn) + b.s * __expf(b.m - mn)};
  }
};

__device__ __forceinline__ void online_add(MaxSum& st, float z) {
  const float mn = fmaxf(st.m, z);
  if (mn == kNegInf) return;  // still nothing visible
  st.s = st.s * __expf(st.m - mn) + __expf(z - mn);
  st.m = mn;
}

template <typename T, int VEC>
__global__ void _softmax_fwd_block_kernel(const T* __restrict__ x, T* __restrict__ y, int N, float scale,
                                          MaskArgs mk, bool log) {
  __shared__ MaxSum smem[32];
  const int64_t row = blockIdx.x;
  const RowInfo ri = row_info(row, mk);
  const auto* xr = reinterpret_cast<const Pack<T, VEC>*>(x + row * N);
  auto* yr = reinterpret_cast<Pack<T, VEC>*>(y + row * N);
  const int nvec = N / VEC;  // VEC divides N (the launcher guarantees it)

  MaxSum st{kNegInf, 0.f};
  for (int p = threadIdx.x; p < nvec; p += blockDim.x) {
    const Pack<T, VEC> pk = xr[p];
#pragma unroll
    for (int v = 0; v < VEC; ++v) online_add(st, masked_z(to_float(pk.v[v]), p * VEC + v, scale, mk, ri));
  }
  st = block_reduce(st, OnlineMerge{}, MaxSum{kNegInf, 0.f}, smem);
  // a NaN anywhere (which fmaxf skips) has already made st.s NaN
  const bool dead = (mk.kind != 0 || mk.causal) && st.m == kNegInf;
  for (int p = threadIdx.x; p < nvec; p += blockDim.x) {
    const Pack<T, VEC> pk = xr[p];
    Pack<T, VEC> out;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float z = masked_z(to_float(pk.v[v]), p * VEC + v, scale, mk, ri);
      out.v[v] = from_float<T>(finish(z, st.m, st.s, log, dead));
    }
    yr[p] = out;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, with masked positions (y = -inf) and fully masked rows (written as zeros, so exp(y)
// sums to N > 1) getting zero gradient. The row-sum term is dy*y (softmax) or dy (log_softmax);
// a masked position's -inf is a constant, so its dy is left out of the sum (as in the reference).
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
__global__ void _softmax_bwd_warp_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
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
    gv[i] = j < N ? to_float(g[j]) : 0.f;
    pv[i] = j < N ? to_float(p[j]) : (log ? kNegInf : 0.f);
    total += bwd_term(gv[i], pv[i], log, masked);
    if (log) psum += __expf(pv[i]);
  }
  total = warp_sum(total);
  const bool dead_row = log && masked && N > 1 && warp_sum(psum) > 1.5f;
  T* d = dx + row * N;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = i * 32 + lane;
    if (j < N) d[j] = from_float<T>(bwd_value(gv[i], pv[i], total, scale, log, masked, dead_row));
  }
}

template <typename T, int VEC>
__global__ void _softmax_bwd_block_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
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
      const float gv = to_float(gp.v[v]), pv = to_float(pp.v[v]);
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
      out.v[v] = from_float<T>(
          bwd_value(to_float(gp.v[v]), to_float(pp.v[v]), total, scale, log, masked, dead_row));
    d[q] = out;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers: M rows of N (>= 1) elements.

constexpr int kWarpRowsPerBlock = 4;  // 128 threads: 4 rows per block
constexpr int kBlockThreads = 512;
constexpr int kWarpRowMax = 1024;

// f(std::integral_constant<int, ITERS>) with ITERS = next power of two >= ceil(N / 32).
template <typename F>
cudaError_t with_iters(int N, F&& f) {
  const int need = (N + 31) / 32;
  if (need <= 1) return f(std::integral_constant<int, 1>{});
  if (need <= 2) return f(std::integral_constant<int, 2>{});
  if (need <= 4) return f(std::integral_constant<int, 4>{});
  if (need <= 8) return f(std::integral_constant<int, 8>{});
  if (need <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 32>{});
}

// f(std::integral_constant<int, VEC>) with 16-byte packs when N and every pointer allow, else
// single elements.
template <typename T, typename F>
cudaError_t with_vec(int N, std::initializer_list<const void*> ptrs, F&& f) {
  bool ok = N % kPackVec<T> == 0;
  for (const void* q : ptrs) ok = ok && aligned16(q);
  if (ok) return f(std::integral_constant<int, kPackVec<T>>{});
  return f(std::integral_constant<int, 1>{});
}

inline dim3 warp_rows_grid(int64_t M) {
  return dim3(static_cast<unsigned>((M + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock));
}

// y = softmax(x) (log: log_softmax); M < 2^31 when N > kWarpRowMax (one block per row).
inline cudaError_t softmax_fwd_launch(const void* x, void* y, int64_t M, int N, float scale, const MaskArgs& mk,
                                      bool log, DType dt, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    if (N <= kWarpRowMax) {
      return with_iters(N, [&](auto iters) {
        return launch(_softmax_fwd_warp_kernel<T, decltype(iters)::value>, warp_rows_grid(M),
                      dim3(32 * kWarpRowsPerBlock), 0, stream, xp, yp, M, N, scale, mk, log);
      });
    }
    return with_vec<T>(N, {xp, yp}, [&](auto vec) {
      return launch(_softmax_fwd_block_kernel<T, decltype(vec)::value>, dim3(static_cast<unsigned>(M)),
                    dim3(kBlockThreads), 0, stream, xp, yp, N, scale, mk, log);
    });
  });
}

// dx from (dy, y); same geometry as the forward.
inline cudaError_t softmax_bwd_launch(const void* dy, const void* y, void* dx, int64_t M, int N, float scale,
                                      bool log, bool masked, DType dt, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = static_cast<const T*>(dy);
    const T* pp = static_cast<const T*>(y);
    T* dp = static_cast<T*>(dx);
    if (N <= kWarpRowMax) {
      return with_iters(N, [&](auto iters) {
        return launch(_softmax_bwd_warp_kernel<T, decltype(iters)::value>, warp_rows_grid(M),
                      dim3(32 * kWarpRowsPerBlock), 0, stream, gp, pp, dp, M, N, scale, log, masked);
      });
    }
    return with_vec<T>(N, {gp, pp, dp}, [&](auto vec) {
      return launch(_softmax_bwd_block_kernel<T, decltype(vec)::value>, dim3(static_cast<unsigned>(M)),
                    dim3(kBlockThreads), 0, stream, gp, pp, dp, N, scale, log, masked);
    });
  });
}

}  // namespace
}  // namespace llmfast::cuda

#ifndef LLMFAST_CUDA_KERNELS_ONLY
// =============================================================================================
// torch binding
// =============================================================================================
#include <ATen/ops/empty_like.h>

#include "cuda/binding.h"

namespace llmfast::cuda {
namespace {

// Rows longer than this would overflow the kernels' int column index; one block per row
// bounds the row count of the block path by the grid's x limit.
constexpr int64_t kMaxCols = (int64_t(1) << 31) - 1;

Tensor softmax_fwd(const Tensor& input, double scale, const std::optional<Tensor>& mask, bool is_causal, bool log) {
  constexpr const char* op = "llmfast::softmax_fwd";
  check_on_device(op, "input", input);
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(), op, ": input must be a contiguous [A, B, L, N] tensor, got ",
              input.sizes());
  const DType dt = dtype_of(op, "input", input);
  const DeviceGuard guard(input.device());
  TORCH_CHECK(input.size(3) <= kMaxCols, op, ": rows longer than 2^31 - 1 are not supported");
  MaskArgs mk;
  mk.B = input.size(1), mk.L = input.size(2), mk.causal = is_causal;
  if (defined(mask)) {
    const Tensor& m = *mask;
    check_mask(op, m, input.sizes(), input);
    mk.ptr = m.const_data_ptr();
    mk.sa = m.stride(0), mk.sb = m.stride(1), mk.sl = m.stride(2), mk.sn = m.stride(3);
    mk.kind = m.scalar_type() == at::kBool ? 1 : 2;
  }
  Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  const int N = static_cast<int>(input.size(3));
  const int64_t M = input.numel() / N;
  TORCH_CHECK(N <= kWarpRowMax || M <= kMaxCols, op, ": too many rows for one launch");
  check_launch(softmax_fwd_launch(input.const_data_ptr(), out.mutable_data_ptr(), M, N, static_cast<float>(scale),
                                  mk, log, dt, current_stream()));
  return out;
}

Tensor softmax_bwd(const Tensor& grad_out, const Tensor& out, double scale, bool log, bool masked) {
  constexpr const char* op = "llmfast::softmax_bwd";
  check_on_device(op, "out", out);
  check_like(op, "grad_out", grad_out, out);
  const DType dt = dtype_of(op, "out", out);
  const DeviceGuard guard(out.device());
  const Tensor dy = grad_out.contiguous(), y = out.contiguous();
  Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  TORCH_CHECK(y.size(-1) <= kMaxCols, op, ": rows longer than 2^31 - 1 are not supported");
  const int N = static_cast<int>(y.size(-1));
  const int64_t M = y.numel() / N;
  TORCH_CHECK(N <= kWarpRowMax || M <= kMaxCols, op, ": too many rows for one launch");
  check_launch(softmax_bwd_launch(dy.const_data_ptr(), y.const_data_ptr(), dx.mutable_data_ptr(), M, N,
                                  static_cast<float>(scale), log, masked, dt, current_stream()));
  return dx;
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
