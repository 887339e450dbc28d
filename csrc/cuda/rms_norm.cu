// RMSNorm with an optional fused residual add, forward and backward, in CUDA.
//
//   s     = x + r                        (with a residual: rounded to x's dtype, stored)
//   rstd  = 1 / sqrt(sum(s^2) / N + eps),  y = s * rstd * w
// backward, with x_hat = s * rstd and g = dy * w:
//   dx = rstd * (g - x_hat * mean(g * x_hat)) (+ d_summed)
//   dw = sum_rows dy * x_hat                 (per-team partial rows, then an ordered sum)
//
// Same geometry as csrc/cuda/layer_norm.cu (norm.cuh): one warp or one block per row,
// fp32 statistics, two passes over the row each way.
#include <torch/library.h>

#include "cuda/norm.cuh"

namespace llmfast::cuda {
namespace {

constexpr const char* kFwd = "llmfast::rms_norm_fwd";
constexpr const char* kBwd = "llmfast::rms_norm_bwd";

template <typename T, bool WARP_ROWS>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, const float* __restrict__ w,
                                    T* __restrict__ y, T* __restrict__ s, float* __restrict__ rstd, int64_t M,
                                    int64_t N, int64_t sx, int64_t sr, float eps) {
  __shared__ float2 smem[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;  // warp mode: the whole warp leaves; block mode: grid == M
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const T* xr = x + row * sx;
  const T* rr = r ? r + row * sr : nullptr;
  T* sr_out = s ? s + row * N : nullptr;
  // pass 1: s (stored once) and sum(s^2); pass 2 recomputes x + r (an L2 hit) rather
  // than read back s, which this kernel writes
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
    acc = fmaf(v, v, acc);
  }
  const float rs = rsqrtf(team_sum2<WARP_ROWS>(acc, 0.f, smem).x / static_cast<float>(N) + eps);
  if (tid == 0) rstd[row] = rs;
  T* yr = y + row * N;
  for (int64_t j = tid; j < N; j += nt) {
    float o = (rr ? static_cast<float>(add_round(xr[j], rr[j])) : static_cast<float>(xr[j])) * rs;
    if (w) o *= w[j];
    yr[j] = static_cast<T>(o);
  }
}

template <typename T, bool WARP_ROWS>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ ds, const T* __restrict__ x,
                                    const float* __restrict__ w, const float* __restrict__ rstd, T* __restrict__ dx,
                                    float* __restrict__ dw_part, int64_t M, int64_t N, int64_t sx, int64_t sdy,
                                    int64_t sds) {
  __shared__ float2 smem[32];
  // Team `team` takes rows team, team + n_teams, ... and owns partial row `team` of
  // dw_part ([n_teams, N], zeroed by the host): no atomics, no races.
  const int64_t team = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t n_teams = int64_t(gridDim.x) * blockDim.y;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  float* pdw = dw_part ? dw_part + team * N : nullptr;
  const float n = static_cast<float>(N);
  for (int64_t row = team; row < M; row += n_teams) {  // block mode: uniform per block
    const T* xr = x + row * sx;
    const T* gr = dy + row * sdy;
    const float rs = rstd[row];
    float bsum = 0.f;
    for (int64_t j = tid; j < N; j += nt) {
      const float xh = static_cast<float>(xr[j]) * rs;
      const float d = static_cast<float>(gr[j]);
      const float g = w ? d * w[j] : d;
      bsum = fmaf(g, xh, bsum);
      if (pdw) pdw[j] = fmaf(d, xh, pdw[j]);
    }
    const float c2 = team_sum2<WARP_ROWS>(bsum, 0.f, smem).x / n;
    T* dxr = dx + row * N;
    const T* dsr = ds ? ds + row * sds : nullptr;
    for (int64_t j = tid; j < N; j += nt) {
      const float xh = static_cast<float>(xr[j]) * rs;
      const float d = static_cast<float>(gr[j]);
      const float g = w ? d * w[j] : d;
      float o = (g - xh * c2) * rs;
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

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& input, const std::optional<Tensor>& residual,
                                                const std::optional<Tensor>& weight, double eps) {
  check_input(kFwd, input);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_rows(kFwd, "residual", *residual, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor w = f32_param(kFwd, "weight", weight, input);
  const int64_t M = input.size(0), N = input.size(1);
  Tensor y = at::empty({M, N}, input.options());
  Tensor s = has_res ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  Tensor rstd = at::empty({M}, input.options().dtype(at::kFloat));
  if (M == 0) return {y, s, rstd};
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
    auto kernel = g.warp_rows ? rms_norm_fwd_kernel<T, true> : rms_norm_fwd_kernel<T, false>;
    kernel<<<grid, block, 0, stream>>>(input.const_data_ptr<T>(), rp, cptr<float>(w), y.mutable_data_ptr<T>(), sp,
                                       rstd.mutable_data_ptr<float>(), M, N, input.stride(0), sr,
                                       static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const std::optional<Tensor>& grad_summed,
                                        const Tensor& x, const std::optional<Tensor>& weight, const Tensor& rstd,
                                        bool weight_grad) {
  check_input(kBwd, x);
  check_rows(kBwd, "grad_out", grad_out, x);
  const bool has_ds = grad_summed.has_value() && grad_summed->defined() && grad_summed->numel() > 0;
  if (has_ds) check_rows(kBwd, "grad_summed", *grad_summed, x);
  check_stats(kBwd, rstd, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor w = f32_param(kBwd, "weight", weight, x);
  const int64_t M = x.size(0), N = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return {dx, at::zeros({weight_grad ? N : 0}, f32)};
  const RowLaunch g = row_launch(N);
  const int64_t blocks = bwd_blocks(g, M, N);
  Tensor dw_part = weight_grad ? at::zeros({blocks * g.rows_per_block, N}, f32) : Tensor();
  const Tensor rstd_c = rstd.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_float(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    const T* dsp = has_ds ? grad_summed->const_data_ptr<T>() : nullptr;
    const int64_t sds = has_ds ? grad_summed->stride(0) : 0;
    auto kernel = g.warp_rows ? rms_norm_bwd_kernel<T, true> : rms_norm_bwd_kernel<T, false>;
    kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(g.threads, g.rows_per_block), 0, stream>>>(
        grad_out.const_data_ptr<T>(), dsp, x.const_data_ptr<T>(), cptr<float>(w), rstd_c.const_data_ptr<float>(),
        dx.mutable_data_ptr<T>(), weight_grad ? dw_part.mutable_data_ptr<float>() : nullptr, M, N, x.stride(0),
        grad_out.stride(0), sds);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  Tensor dw = at::empty({weight_grad ? N : 0}, f32);
  if (weight_grad) sum_partials(dw_part, dw);
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace llmfast::cuda
