// LayerNorm with an optional fused residual add, forward and backward, in CUDA.
//
//   s     = x + r                          (with a residual: rounded to x's dtype, stored)
//   m0    = sum(s) / N,  d = s - m0,  mean = m0 + sum(d) / N,
//   var   = sum(d^2) / N - (sum(d) / N)^2,  rstd = 1 / sqrt(var + eps)
//   y     = (s - mean) * rstd * w + b
// backward, with x_hat = (s - mean) * rstd and g = dy * w:
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (+ d_summed)
//   dw = sum_rows dy * x_hat,  db = sum_rows dy   (per-team partial rows, then an ordered sum)
//
// x: [M, N] (unit column stride, row stride sx); one team (a warp, or a block for rows
// over 1024) per row, geometry in norm.cuh. Statistics are fp32; the moments about m0
// avoid E[x^2] - E[x]^2 cancellation and give a constant row exactly var = 0 (the
// divisions use __fdiv_rn so --use_fast_math cannot break that).
#include <torch/library.h>

#include "cuda/norm.cuh"

namespace llmfast::cuda {
namespace {

constexpr const char* kFwd = "llmfast::layer_norm_fwd";
constexpr const char* kBwd = "llmfast::layer_norm_bwd";

template <typename T, bool WARP_ROWS>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, const float* __restrict__ w,
                                      const float* __restrict__ b, T* __restrict__ y, T* __restrict__ s,
                                      float* __restrict__ mean, float* __restrict__ rstd, int64_t M, int64_t N,
                                      int64_t sx, int64_t sr, float eps) {
  __shared__ float2 smem[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;  // warp mode: the whole warp leaves; block mode: grid == M
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const T* xr = x + row * sx;
  const T* rr = r ? r + row * sr : nullptr;
  T* sr_out = s ? s + row * N : nullptr;
  const float n = static_cast<float>(N);

  // The row as fp32; later passes recompute x + r (an L2 hit) rather than read back s,
  // which this kernel writes.
  auto load = [&](int64_t j) {
    return rr ? static_cast<float>(add_round(xr[j], rr[j])) : static_cast<float>(xr[j]);
  };
  // pass 1: s (stored once) and its sum
  float acc = 0.f;
  for (int64_t j = tid; j < N; j += nt) {
    float v;
    if (rr) {
      const T sv = add_round(xr[j], rr[j]);
      sr_out[j] = sv;
      v = static_cast<float>(sv);
    } else {
      v = static_cast<float>(xr[j]);
    }
    acc += v;
  }
  const float m0 = __fdiv_rn(team_sum2<WARP_ROWS>(acc, 0.f, smem).x, n);
  // pass 2: moments about m0
  float d1 = 0.f, d2 = 0.f;
  for (int64_t j = tid; j < N; j += nt) {
    const float d = load(j) - m0;
    d1 += d;
    d2 = fmaf(d, d, d2);
  }
  const float2 t = team_sum2<WARP_ROWS>(d1, d2, smem);
  const float dm = __fdiv_rn(t.x, n);
  const float mu = m0 + dm;
  const float var = fmaxf(__fdiv_rn(t.y, n) - dm * dm, 0.f);
  const float rs = rsqrtf(var + eps);
  if (tid == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  // pass 3: the output
  T* yr = y + row * N;
  for (int64_t j = tid; j < N; j += nt) {
    float o = (load(j) - mu) * rs;
    if (w) o *= w[j];
    if (b) o += b[j];
    yr[j] = static_cast<T>(o);
  }
}

template <typename T, bool WARP_ROWS>
__global__ void layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ ds, const T* __restrict__ x,
                                      const float* __restrict__ w, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_part,
                                      float* __restrict__ db_part, int64_t M, int64_t N, int64_t sx, int64_t sdy,
                                      int64_t sds) {
  __shared__ float2 smem[32];
  // Team `team` takes rows team, team + n_teams, ... and owns partial row `team` of
  // dw_part/db_part ([n_teams, N], zeroed by the host); each thread read-modify-writes
  // only its own columns there, so there are no atomics and no races.
  const int64_t team = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t n_teams = int64_t(gridDim.x) * blockDim.y;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  float* pdw = dw_part ? dw_part + team * N : nullptr;
  float* pdb = db_part ? db_part + team * N : nullptr;
  const float n = static_cast<float>(N);
  // Block mode has one team per block, so every thread of a block runs the same rows
  // (team_sum2's __syncthreads is uniform).
  for (int64_t row = team; row < M; row += n_teams) {
    const T* xr = x + row * sx;
    const T* gr = dy + row * sdy;
    const float mu = mean[row], rs = rstd[row];
    float a = 0.f, bsum = 0.f;
    for (int64_t j = tid; j < N; j += nt) {
      const float xh = (static_cast<float>(xr[j]) - mu) * rs;
      const float d = static_cast<float>(gr[j]);
      const float g = w ? d * w[j] : d;
      a += g;
      bsum = fmaf(g, xh, bsum);
      if (pdw) pdw[j] = fmaf(d, xh, pdw[j]);
      if (pdb) pdb[j] += d;
    }
    const float2 t = team_sum2<WARP_ROWS>(a, bsum, smem);
    const float c1 = t.x / n, c2 = t.y / n;
    T* dxr = dx + row * N;
    const T* dsr = ds ? ds + row * sds : nullptr;
    for (int64_t j = tid; j < N; j += nt) {
      const float xh = (static_cast<float>(xr[j]) - mu) * rs;
      const float d = static_cast<float>(gr[j]);
      const float g = w ? d * w[j] : d;
      float o = (g - c1 - xh * c2) * rs;
      if (dsr) o += static_cast<float>(dsr[j]);
      dxr[j] = static_cast<T>(o);
    }
  }
}

template <typename F>
void dispatch_half_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input, const std::optional<Tensor>& residual,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps) {
  check_input(kFwd, input);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_rows(kFwd, "residual", *residual, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor w = f32_param(kFwd, "weight", weight, input);
  const Tensor b = f32_param(kFwd, "bias", bias, input);
  const int64_t M = input.size(0), N = input.size(1);
  Tensor y = at::empty({M, N}, input.options());
  Tensor s = has_res ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  const auto f32 = input.options().dtype(at::kFloat);
  Tensor mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  if (M == 0) return {y, s, mean, rstd};
  TORCH_CHECK(N > 0, kFwd, ": rows must have at least one element");
  const RowLaunch g = row_launch(N);
  const dim3 block(g.threads, g.rows_per_block);
  const dim3 grid(static_cast<unsigned>((M + g.rows_per_block - 1) / g.rows_per_block));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_float(input.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    const T* rp = has_res ? residual->const_data_ptr<T>() : nullptr;
    const int64_t sr = has_res ? residual->stride(0) : 0;
    T* sp = has_res ? s.mutable_data_ptr<T>() : nullptr;
    auto kernel = g.warp_rows ? layer_norm_fwd_kernel<T, true> : layer_norm_fwd_kernel<T, false>;
    kernel<<<grid, block, 0, stream>>>(input.const_data_ptr<T>(), rp, cptr<float>(w), cptr<float>(b),
                                       y.mutable_data_ptr<T>(), sp, mean.mutable_data_ptr<float>(),
                                       rstd.mutable_data_ptr<float>(), M, N, input.stride(0), sr,
                                       static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_out, const std::optional<Tensor>& grad_summed,
                                                  const Tensor& x, const std::optional<Tensor>& weight,
                                                  const Tensor& mean, const Tensor& rstd, bool weight_grad,
                                                  bool bias_grad) {
  check_input(kBwd, x);
  check_rows(kBwd, "grad_out", grad_out, x);
  const bool has_ds = grad_summed.has_value() && grad_summed->defined() && grad_summed->numel() > 0;
  if (has_ds) check_rows(kBwd, "grad_summed", *grad_summed, x);
  check_stats(kBwd, mean, x);
  check_stats(kBwd, rstd, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor w = f32_param(kBwd, "weight", weight, x);
  const int64_t M = x.size(0), N = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) {
    return {dx, at::zeros({weight_grad ? N : 0}, f32), at::zeros({bias_grad ? N : 0}, f32)};
  }
  const RowLaunch g = row_launch(N);
  const int64_t blocks = bwd_blocks(g, M, N);
  const int64_t P = blocks * g.rows_per_block;
  Tensor dw_part = weight_grad ? at::zeros({P, N}, f32) : Tensor();
  Tensor db_part = bias_grad ? at::zeros({P, N}, f32) : Tensor();
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_float(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    const T* dsp = has_ds ? grad_summed->const_data_ptr<T>() : nullptr;
    const int64_t sds = has_ds ? grad_summed->stride(0) : 0;
    auto kernel = g.warp_rows ? layer_norm_bwd_kernel<T, true> : layer_norm_bwd_kernel<T, false>;
    kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(g.threads, g.rows_per_block), 0, stream>>>(
        grad_out.const_data_ptr<T>(), dsp, x.const_data_ptr<T>(), cptr<float>(w), mean_c.const_data_ptr<float>(),
        rstd_c.const_data_ptr<float>(), dx.mutable_data_ptr<T>(),
        weight_grad ? dw_part.mutable_data_ptr<float>() : nullptr,
        bias_grad ? db_part.mutable_data_ptr<float>() : nullptr, M, N, x.stride(0), grad_out.stride(0), sds);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  Tensor dw = at::empty({weight_grad ? N : 0}, f32), db = at::empty({bias_grad ? N : 0}, f32);
  if (weight_grad) sum_partials(dw_part, dw);
  if (bias_grad) sum_partials(db_part, db);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace llmfast::cuda
