// LayerNorm and RMSNorm with an optional fused residual add, forward and backward, for
// llmfast::norm_fwd / norm_bwd (CUDA). One set of kernels; CENTERED (a template argument)
// picks LayerNorm:
//
//   s     = x + r                          (with a residual: rounded to x's dtype, stored)
//   CENTERED:  m0 = sum(s) / N,  d = s - m0,  mean = m0 + sum(d) / N,
//              var = sum(d^2) / N - (sum(d) / N)^2,  rstd = 1 / sqrt(var + eps),
//              y = (s - mean) * rstd * w + b
//   else:      rstd = 1 / sqrt(sum(s^2) / N + eps),  y = s * rstd * w
// backward, with x_hat = (s - mean) * rstd (RMSNorm: s * rstd) and g = dy * w:
//   dx = rstd * (g - [CENTERED: mean(g)] - x_hat * mean(g * x_hat)) (+ d_summed)
//   dw = sum_rows dy * x_hat,  db = sum_rows dy (CENTERED)   (per-team partial rows, then an ordered sum)
//
// x: [M, N] (unit column stride, row stride sx). A "team" of threads owns one row: rows up to
// kWarpRowMax elements get one warp each (8 rows per 256-thread block, reductions by shuffles
// only); longer rows get a whole block (128..1024 threads) and a shared-memory step. A thread
// walks its columns j = tid, tid + T, ...; later passes over a row re-read it from L1/L2.
// Statistics are fp32; LayerNorm's moments about m0 avoid E[x^2] - E[x]^2 cancellation and give
// a constant row exactly var = 0 (those divisions use __fdiv_rn so --use_fast_math cannot break
// that). Weight/bias gradients are deterministic: no atomics, a fixed summation order.
#include <algorithm>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

constexpr int64_t kNormWarpRowMax = 1024;
constexpr int kNormWarpRowsPerBlock = 8;

struct RowLaunch {
  bool warp_rows;
  int threads;         // blockDim.x: threads per row
  int rows_per_block;  // blockDim.y
};

inline RowLaunch row_launch(int64_t N) {
  if (N <= kNormWarpRowMax) return {true, 32, kNormWarpRowsPerBlock};
  int t = 128;
  while (t < 1024 && int64_t(t) * 8 < N) t *= 2;  // >= ~8 elements per thread
  return {false, t, 1};
}

// Blocks of the backward: enough teams (partial-sum rows) to fill the GPU twice over, few
// enough that the [blocks * rows_per_block, N] fp32 partials stay within 64 MB.
inline int64_t norm_bwd_blocks(const RowLaunch& g, int64_t M, int64_t N, int sms) {
  const int64_t needed = (M + g.rows_per_block - 1) / g.rows_per_block;
  const int64_t cap = std::max<int64_t>(1, (int64_t(1) << 24) / (std::max<int64_t>(N, 1) * g.rows_per_block));
  return std::max<int64_t>(1, std::min({needed, 2 * int64_t(sms), cap}));
}

// What the launchers take (the kernels get the fields as arguments).
struct NormParams {
  const void* x = nullptr;  // [M, N], row stride sx: the input (fwd) or what the forward normalised (bwd)
  const void* r = nullptr;  // [M, N], row stride sr: residual or nullptr (fwd)
  const float* w = nullptr;  // [N] or nullptr
  const float* b = nullptr;  // [N] or nullptr (fwd, CENTERED)
  void* y = nullptr;         // [M, N] contiguous (fwd), or at row stride sy (in place)
  void* s = nullptr;         // [M, N] contiguous: x + r, or nullptr without a residual (fwd)
  float* mean = nullptr;     // [M] (CENTERED; fwd writes, bwd reads)
  float* rstd = nullptr;     // [M] (fwd writes, bwd reads)
  const void* dy = nullptr;  // [M, N], row stride sdy (bwd)
  const void* ds = nullptr;  // [M, N], row stride sds: gradient reaching s, or nullptr (bwd)
  void* dx = nullptr;        // [M, N] contiguous (bwd)
  float* dw_part = nullptr;  // [teams, N], zeroed, or nullptr (bwd)
  float* db_part = nullptr;  // [teams, N], zeroed, or nullptr (bwd, CENTERED)
  int64_t M = 0, N = 0, sx = 0, sr = 0, sy = 0, sdy = 0, sds = 0;
  float eps = 0.f;
};

// v summed over this row's team; every thread of the team gets the total. Block mode: called
// by every thread of the block (one team per block).
template <bool WARP_ROWS, typename V, typename Op>
__device__ __forceinline__ V team_reduce(V v, Op op, V zero, V* smem) {
  if constexpr (WARP_ROWS) {
    return warp_reduce(v, op);
  } else {
    return block_reduce(v, op, zero, smem);
  }
}

// x + r rounded to T: the norm sees exactly the `summed` it returns.
template <typename T>
__device__ __forceinline__ T add_round(T x, T r) {
  return from_float<T>(to_float(x) + to_float(r));
}

// One row of the forward. READ_S: the later passes read back the s this thread stored in
// pass 1 (the in-place variant, where s overwrites r); otherwise they recompute x + r (an
// L2 hit, and no read-after-write through the __restrict__ pointers of _norm_fwd_kernel).
// mean/rstd may be nullptr (no statistics kept).
template <typename T, bool CENTERED, bool WARP_ROWS, bool READ_S>
__device__ __forceinline__ void norm_fwd_row(const T* x, const T* r, const float* w, const float* b, T* y, T* s,
                                             float* mean, float* rstd, int64_t row, int64_t N, int64_t sx, int64_t sr,
                                             int64_t sy, int64_t ss, float eps, float* smem1, float2* smem2) {
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const T* xr = x + row * sx;
  const T* rr = r ? r + row * sr : nullptr;
  T* sr_out = s ? s + row * ss : nullptr;
  const float n = static_cast<float>(N);

  auto load = [&](int64_t j) {
    if (!rr) return to_float(xr[j]);
    return READ_S ? to_float(sr_out[j]) : to_float(add_round(xr[j], rr[j]));
  };
  // pass 1: s (stored once) and its sum (LayerNorm) or sum of squares (RMSNorm)
  float acc = 0.f;
  for (int64_t j = tid; j < N; j += nt) {
    float v;
    if (rr) {
      const T sv = add_round(xr[j], rr[j]);
      sr_out[j] = sv;
      v = to_float(sv);
    } else {
      v = to_float(xr[j]);
    }
    acc = CENTERED ? acc + v : fmaf(v, v, acc);
  }
  float mu = 0.f, rs;
  if constexpr (CENTERED) {
    const float m0 = __fdiv_rn(team_reduce<WARP_ROWS>(acc, Sum{}, 0.f, smem1), n);
    // pass 2: moments about m0
    float d1 = 0.f, d2 = 0.f;
    for (int64_t j = tid; j < N; j += nt) {
      const float d = load(j) - m0;
      d1 += d;
      d2 = fmaf(d, d, d2);
    }
    const float2 t = team_reduce<WARP_ROWS>(make_float2(d1, d2), Sum2{}, make_float2(0.f, 0.f), smem2);
    const float dm = __fdiv_rn(t.x, n);
    mu = m0 + dm;
    rs = rsqrtf(fmaxf(__fdiv_rn(t.y, n) - dm * dm, 0.f) + eps);
    if (tid == 0 && mean) mean[row] = mu;
  } else {
    rs = rsqrtf(team_reduce<WARP_ROWS>(acc, Sum{}, 0.f, smem1) / n + eps);
  }
  if (tid == 0 && rstd) rstd[row] = rs;
  // last pass: the output (each element read before it is written: y may be x)
  T* yr = y + row * sy;
  for (int64_t j = tid; j < N; j += nt) {
    float o = (CENTERED ? load(j) - mu : load(j)) * rs;
    if (w) o *= w[j];
    if (CENTERED && b) o += b[j];
    yr[j] = from_float<T>(o);
  }
}

// The kernels take NormParams' fields as __restrict__ arguments: read-only data then goes
// through the non-coherent (LDG.CONSTANT) path. y, s: [M, N] contiguous.
template <typename T, bool CENTERED, bool WARP_ROWS>
__global__ void _norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, const float* __restrict__ w,
                                 const float* __restrict__ b, T* __restrict__ y, T* __restrict__ s,
                                 float* __restrict__ mean, float* __restrict__ rstd, int64_t M, int64_t N, int64_t sx,
                                 int64_t sr, float eps) {
  __shared__ float smem1[32];
  __shared__ float2 smem2[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;  // warp mode: the whole warp leaves; block mode: grid == M
  norm_fwd_row<T, CENTERED, WARP_ROWS, false>(x, r, w, b, y, s, mean, rstd, row, N, sx, sr, N, N, eps, smem1, smem2);
}

// In place (llmfast::norm_add_): s is r (the sum overwrites the residual) and y is x or a
// separate buffer, all [M, N] rows at their own strides: no __restrict__, no statistics.
template <typename T, bool CENTERED, bool WARP_ROWS>
__global__ void _norm_add_kernel(const T* x, T* r, const float* __restrict__ w, const float* __restrict__ b, T* y,
                                 int64_t M, int64_t N, int64_t sx, int64_t sr, int64_t sy, float eps) {
  __shared__ float smem1[32];
  __shared__ float2 smem2[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;
  norm_fwd_row<T, CENTERED, WARP_ROWS, true>(x, r, w, b, y, r, nullptr, nullptr, row, N, sx, sr, sy, sr, eps, smem1,
                                             smem2);
}

template <typename T, bool CENTERED, bool WARP_ROWS>
__global__ void _norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ ds, const T* __restrict__ x,
                                 const float* __restrict__ w, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_part,
                                 float* __restrict__ db_part, int64_t M, int64_t N, int64_t sx, int64_t sdy,
                                 int64_t sds) {
  __shared__ float smem1[32];
  __shared__ float2 smem2[32];
  // Team `team` takes rows team, team + n_teams, ... and owns partial row `team` of
  // dw_part/db_part ([n_teams, N], zeroed by the host); each thread read-modify-writes
  // only its own columns there, so there are no atomics and no races.
  const int64_t team = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t n_teams = int64_t(gridDim.x) * blockDim.y;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  float* pdw = dw_part ? dw_part + team * N : nullptr;
  float* pdb = CENTERED && db_part ? db_part + team * N : nullptr;
  const float n = static_cast<float>(N);
  // Block mode has one team per block, so every thread of a block runs the same rows
  // (team_reduce's __syncthreads is uniform).
  for (int64_t row = team; row < M; row += n_teams) {
    const T* xr = x + row * sx;
    const T* gr = dy + row * sdy;
    const float mu = CENTERED ? mean[row] : 0.f, rs = rstd[row];
    auto x_hat = [&](int64_t j) { return (CENTERED ? to_float(xr[j]) - mu : to_float(xr[j])) * rs; };
    float a = 0.f, bsum = 0.f;
    for (int64_t j = tid; j < N; j += nt) {
      const float xh = x_hat(j);
      const float d = to_float(gr[j]);
      const float g = w ? d * w[j] : d;
      if (CENTERED) a += g;
      bsum = fmaf(g, xh, bsum);
      if (pdw) pdw[j] = fmaf(d, xh, pdw[j]);
      if (pdb) pdb[j] += d;
    }
    float c1 = 0.f, c2;
    if constexpr (CENTERED) {
      const float2 t = team_reduce<WARP_ROWS>(make_float2(a, bsum), Sum2{}, make_float2(0.f, 0.f), smem2);
      c1 = t.x / n;
      c2 = t.y / n;
    } else {
      c2 = team_reduce<WARP_ROWS>(bsum, Sum{}, 0.f, smem1) / n;
    }
    T* dxr = dx + row * N;
    const T* dsr = ds ? ds + row * sds : nullptr;
    for (int64_t j = tid; j < N; j += nt) {
      const float xh = x_hat(j);
      const float d = to_float(gr[j]);
      const float g = w ? d * w[j] : d;
      // one feature (LayerNorm): dx is exactly 0 (NaN for non-finite x, dy or rs, as in torch),
      // but with fmad contraction g - c1 would be one rounding of d * w (the sum above rounds
      // it), times rs = 1/sqrt(eps)
      float o = (CENTERED && N == 1) ? 0.f * (xh + g) : ((CENTERED ? g - c1 : g) - xh * c2) * rs;
      if (dsr) o += to_float(dsr[j]);
      dxr[j] = from_float<T>(o);
    }
  }
}

// out[j] = sum_p part[p, j] in order p = 0..P-1: block (32 columns, 8 row slices), each
// slice sums rows p = ty, ty + 8, ..., then slice totals are added in order.
__global__ void _norm_sum_partials_kernel(const float* __restrict__ part, int64_t P, int64_t N,
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

// ---------------------------------------------------------------------------------------------
// Launchers (M >= 1, N >= 1)

// f(T{}, centered, warp_rows) with the run-time choices as std::bool_constant.
template <typename F>
inline cudaError_t with_kind(DType dt, bool centered, bool warp_rows, F&& f) {
  return dispatch(dt, [&](auto tag) {
    using Yes = std::true_type;
    using No = std::false_type;
    if (centered) return warp_rows ? f(tag, Yes{}, Yes{}) : f(tag, Yes{}, No{});
    return warp_rows ? f(tag, No{}, Yes{}) : f(tag, No{}, No{});
  });
}

// inplace: _norm_add_kernel (p.s unused: the sum goes to p.r; p.y at row stride p.sy).
inline cudaError_t norm_fwd_launch(const NormParams& p, bool centered, bool inplace, DType dt, cudaStream_t stream) {
  const RowLaunch g = row_launch(p.N);
  const dim3 grid(static_cast<unsigned>((p.M + g.rows_per_block - 1) / g.rows_per_block));
  const dim3 block(g.threads, g.rows_per_block);
  return with_kind(dt, centered, g.warp_rows, [&](auto tag, auto c, auto w) {
    using T = decltype(tag);
    constexpr bool C = decltype(c)::value, W = decltype(w)::value;
    if (inplace)
      return launch(_norm_add_kernel<T, C, W>, grid, block, 0, stream, static_cast<const T*>(p.x),
                    static_cast<T*>(const_cast<void*>(p.r)), p.w, p.b, static_cast<T*>(p.y), p.M, p.N, p.sx, p.sr,
                    p.sy, p.eps);
    return launch(_norm_fwd_kernel<T, C, W>, grid, block, 0, stream, static_cast<const T*>(p.x),
                  static_cast<const T*>(p.r), p.w, p.b, static_cast<T*>(p.y), static_cast<T*>(p.s), p.mean, p.rstd,
                  p.M, p.N, p.sx, p.sr, p.eps);
  });
}

// p.dw_part / p.db_part: [blocks * rows_per_block, N] (blocks from norm_bwd_blocks); their
// column sums go to dw / db ([N], or nullptr).
inline cudaError_t norm_bwd_launch(const NormParams& p, bool centered, int64_t blocks, float* dw, float* db,
                                   DType dt, cudaStream_t stream) {
  const RowLaunch g = row_launch(p.N);
  cudaError_t err = with_kind(dt, centered, g.warp_rows, [&](auto tag, auto c, auto w) {
    using T = decltype(tag);
    auto* kernel = _norm_bwd_kernel<T, decltype(c)::value, decltype(w)::value>;
    return launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(g.threads, g.rows_per_block), 0, stream,
                  static_cast<const T*>(p.dy), static_cast<const T*>(p.ds), static_cast<const T*>(p.x), p.w, p.mean,
                  p.rstd, static_cast<T*>(p.dx), p.dw_part, p.db_part, p.M, p.N, p.sx, p.sdy, p.sds);
  });
  const int64_t P = blocks * g.rows_per_block;
  const dim3 sum_grid(static_cast<unsigned>((p.N + 31) / 32)), sum_block(32, 8);
  if (err == cudaSuccess && dw)
    err = launch(_norm_sum_partials_kernel, sum_grid, sum_block, 0, stream, p.dw_part, P, p.N, dw);
  if (err == cudaSuccess && db)
    err = launch(_norm_sum_partials_kernel, sum_grid, sum_block, 0, stream, p.db_part, P, p.N, db);
  return err;
}

}  // namespace
}  // namespace llmfast::cuda

#ifndef LLMFAST_CUDA_KERNELS_ONLY
// =============================================================================================
// torch binding
// =============================================================================================
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cuda/binding.h"

namespace llmfast::cuda {
namespace {

constexpr const char* kFwd = "llmfast::norm_fwd";
constexpr const char* kBwd = "llmfast::norm_bwd";

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& input, const std::optional<Tensor>& residual,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, double eps, bool centered) {
  check_on_device(kFwd, "input", input);
  const auto [w, b] = check_norm_fwd(kFwd, input, residual, weight, bias, centered);
  const DType dt = dtype_of(kFwd, "input", input);
  const int64_t M = input.size(0), N = input.size(1);
  TORCH_CHECK(M < (int64_t(1) << 31), kFwd, ": at most 2^31 - 1 rows");
  const DeviceGuard guard(input.device());
  const bool has_res = defined(residual);
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous), f32 = opts.dtype(at::kFloat);
  Tensor y = at::empty({M, N}, opts), s = has_res ? at::empty({M, N}, opts) : at::empty({0}, opts);
  Tensor mean = at::empty({centered ? M : 0}, f32), rstd = at::empty({M}, f32);
  if (M == 0) return {y, s, mean, rstd};
  TORCH_CHECK(N > 0, kFwd, ": rows must have at least one element");
  NormParams p;
  p.x = input.const_data_ptr(), p.sx = input.stride(0);
  if (has_res) p.r = residual->const_data_ptr(), p.sr = residual->stride(0), p.s = s.mutable_data_ptr();
  p.w = ptr_or_null<float>(w), p.b = ptr_or_null<float>(b);
  p.y = y.mutable_data_ptr();
  p.mean = centered ? mean.mutable_data_ptr<float>() : nullptr;
  p.rstd = rstd.mutable_data_ptr<float>();
  p.M = M, p.N = N, p.eps = static_cast<float>(eps);
  check_launch(norm_fwd_launch(p, centered, false, dt, current_stream()));
  return {y, s, mean, rstd};
}

void norm_add_(const Tensor& input, const std::optional<Tensor>& residual, const std::optional<Tensor>& out,
               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, bool centered) {
  constexpr const char* op = "llmfast::norm_add_";
  check_on_device(op, "input", input);
  const auto [w, b] = check_norm_add(op, input, residual, out, weight, bias, centered);
  const DType dt = dtype_of(op, "input", input);
  const int64_t M = input.size(0), N = input.size(1);
  TORCH_CHECK(M < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows");
  if (M == 0) return;
  TORCH_CHECK(N > 0, op, ": rows must have at least one element");
  const DeviceGuard guard(input.device());
  const Tensor& y = defined(out) ? *out : input;
  NormParams p;
  p.x = input.const_data_ptr(), p.sx = input.stride(0);
  if (defined(residual)) p.r = residual->mutable_data_ptr(), p.sr = residual->stride(0);
  p.w = ptr_or_null<float>(w), p.b = ptr_or_null<float>(b);
  p.y = y.mutable_data_ptr(), p.sy = y.stride(0);
  p.M = M, p.N = N, p.eps = static_cast<float>(eps);
  check_launch(norm_fwd_launch(p, centered, true, dt, current_stream()));
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& grad_out, const std::optional<Tensor>& grad_summed,
                                            const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
                                            const Tensor& rstd, bool centered, bool weight_grad, bool bias_grad) {
  check_on_device(kBwd, "x", x);
  const Tensor w = check_norm_bwd(kBwd, grad_out, grad_summed, x, weight, mean, rstd, centered, bias_grad);
  const DType dt = dtype_of(kBwd, "x", x);
  const int64_t M = x.size(0), N = x.size(1);
  const DeviceGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return {dx, at::zeros({weight_grad ? N : 0}, f32), at::zeros({bias_grad ? N : 0}, f32)};
  Tensor dw = at::empty({weight_grad ? N : 0}, f32), db = at::empty({bias_grad ? N : 0}, f32);
  const RowLaunch g = row_launch(N);
  const int64_t blocks = norm_bwd_blocks(g, M, N, sm_count()), P = blocks * g.rows_per_block;
  Tensor dw_part = weight_grad ? at::zeros({P, N}, f32) : Tensor();
  Tensor db_part = bias_grad ? at::zeros({P, N}, f32) : Tensor();
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  NormParams p;
  p.x = x.const_data_ptr(), p.sx = x.stride(0);
  p.dy = grad_out.const_data_ptr(), p.sdy = grad_out.stride(0);
  if (defined(grad_summed) && grad_summed->numel() > 0) {
    p.ds = grad_summed->const_data_ptr();
    p.sds = grad_summed->stride(0);
  }
  p.w = ptr_or_null<float>(w);
  p.mean = centered ? const_cast<float*>(mean_c.const_data_ptr<float>()) : nullptr;  // read only here
  p.rstd = const_cast<float*>(rstd_c.const_data_ptr<float>());
  p.dx = dx.mutable_data_ptr();
  p.dw_part = weight_grad ? dw_part.mutable_data_ptr<float>() : nullptr;
  p.db_part = bias_grad ? db_part.mutable_data_ptr<float>() : nullptr;
  p.M = M, p.N = N;
  check_launch(norm_bwd_launch(p, centered, blocks, weight_grad ? dw.mutable_data_ptr<float>() : nullptr,
                               bias_grad ? db.mutable_data_ptr<float>() : nullptr, dt, current_stream()));
  return {dx, dw, db};
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("norm_add_", &norm_add_);
}

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
