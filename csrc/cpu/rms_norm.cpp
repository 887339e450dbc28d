// RMSNorm with an optional fused residual add, forward and backward, on the CPU.
//
//   s     = x + r                       (when a residual is given; stored, rounded)
//   rstd  = 1 / sqrt(sum(s^2) / N + eps),  x_hat = s * rstd,  y = x_hat * w
// backward, with g = dy * w:
//   dx = rstd * (g - x_hat * mean(g * x_hat)) (+ d_summed),  dw = sum_rows dy * x_hat
//
// Same layout and threading as csrc/cpu/layer_norm.cpp: one row at a time per thread,
// read once from memory, then two passes over it in L1/L2 (sum of squares, output).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/norm.h"

namespace llmfast::cpu {
namespace {

constexpr const char* kFwd = "llmfast::rms_norm_fwd";
constexpr const char* kBwd = "llmfast::rms_norm_bwd";

template <typename scalar_t>
void rms_norm_fwd_rows(const Tensor& x, const Tensor& r, const Tensor& w, double eps_d, Tensor& y, Tensor& s,
                       Tensor& rstd_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = x.size(1);
  const acc_t* wp = ptr_or_null<acc_t>(w);
  acc_t* rsp = rstd_t.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(eps_d);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);

  with_flags(wp != nullptr, false, [&](auto has_w, auto) {
    constexpr bool HW = decltype(has_w)::value;
    norm_fwd_rows<scalar_t>(x, r, y, s, [&](int64_t m, const acc_t* xr, acc_t* yr) {
      const acc_t rs = acc_t(1) / std::sqrt(row_sumsq(xr, N) * inv_n + eps);
      rsp[m] = rs;
      const Vec vrs(rs);
      for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) {
        Vec v = Vec::loadu(xr + j, cnt) * vrs;
        if constexpr (HW) v = v * Vec::loadu(wp + j, cnt);
        v.store(yr + j, cnt);
      });
    });
  });
}

template <typename scalar_t>
void rms_norm_bwd_rows(const Tensor& dy, const Tensor& ds, const Tensor& x, const Tensor& w, const Tensor& rstd_t,
                       Tensor& dx, acc_type<scalar_t>* dw_part, const RowBlocks& blocks) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const int64_t N = x.size(1);
  const int64_t sx = x.stride(0), sdy = dy.stride(0), sds = ds.defined() ? ds.stride(0) : 0;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* dsp = ds.defined() ? ds.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t* wp = ptr_or_null<acc_t>(w);
  const acc_t* rsp = rstd_t.const_data_ptr<acc_t>();
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
  const OutputStream stream(x.size(0), N * static_cast<int64_t>(sizeof(scalar_t)));

  with_flags(wp != nullptr, dw_part != nullptr, [&](auto has_w, auto has_dw) {
    constexpr bool HW = decltype(has_w)::value, HP = decltype(has_dw)::value;
    at::parallel_for(0, blocks.K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<acc_t> bx(same ? 0 : N), bdy(same ? 0 : N), bds(same || !dsp ? 0 : N);
      RowOut<scalar_t> dx_out(stream, N);
      std::vector<acc_t> gdw(HP ? N : 0);  // the current group's dw sums
      acc_t* pdw = gdw.data();
      for (int64_t k = kb; k < ke; ++k) {
        if (HP) std::fill(dw_part + k * N, dw_part + (k + 1) * N, acc_t(0));
        for (int64_t m = blocks.begin(k); m < blocks.end(k); ++m) {
          stream.prepare_rows(dxp + m * N, m - blocks.begin(k), blocks.end(k) - m);
          if (HP && (m - blocks.begin(k)) % kGroup == 0) std::fill(pdw, pdw + N, acc_t(0));
          const acc_t* xr = load_row<scalar_t, acc_t>(xp + m * sx, N, bx.data());
          const acc_t* gr = load_row<scalar_t, acc_t>(dyp + m * sdy, N, bdy.data());
          const Vec vrs(rsp[m]);
          // pass 1: sum(g * x_hat) and the group's dw sums (masked tail lanes load dy = 0);
          // two accumulators break the fma dependency chain
          auto step = [&](int64_t j, int64_t cnt, Vec& sb) {
            const Vec xh = Vec::loadu(xr + j, cnt) * vrs;
            const Vec d = Vec::loadu(gr + j, cnt);
            Vec g = d;
            if constexpr (HW) g = d * Vec::loadu(wp + j, cnt);
            sb = at::vec::fmadd(g, xh, sb);
            if constexpr (HP) at::vec::fmadd(d, xh, Vec::loadu(pdw + j, cnt)).store(pdw + j, cnt);
          };
          Vec tb(acc_t(0));
          for (int64_t c = 0; c < N; c += kChunk) {
            const int64_t e = std::min(N, c + kChunk);
            Vec sb0(acc_t(0)), sb1(acc_t(0));
            int64_t j = c;
            for (; j + 2 * V <= e; j += 2 * V) {
              step(j, V, sb0);
              step(j + V, V, sb1);
            }
            for (; j < e; j += V) step(j, std::min<int64_t>(V, e - j), sb0);
            tb = tb + (sb0 + sb1);
          }
          const Vec c2(hsum(tb) * inv_n);
          // pass 2: dx = rstd * (g - x_hat * c2) (+ d_summed)
          const acc_t* dsr = dsp ? load_row<scalar_t, acc_t>(dsp + m * sds, N, bds.data()) : nullptr;
          scalar_t* const dx_dst = dxp + m * N;
          acc_t* dxr = dx_out.acc_row(dx_dst);
          auto out = [&](int64_t j, int64_t cnt) {
            const Vec xh = Vec::loadu(xr + j, cnt) * vrs;
            Vec g = Vec::loadu(gr + j, cnt);
            if constexpr (HW) g = g * Vec::loadu(wp + j, cnt);
            return at::vec::fnmadd(xh, c2, g) * vrs;
          };
          if (dsr) {
            for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) { (out(j, cnt) + Vec::loadu(dsr + j, cnt)).store(dxr + j, cnt); });
          } else {
            for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) { out(j, cnt).store(dxr + j, cnt); });
          }
          dx_out.finish(dx_dst, dxr);
          if (HP && ((m + 1 - blocks.begin(k)) % kGroup == 0 || m + 1 == blocks.end(k))) {
            add_row(dw_part + k * N, pdw, N);
          }
        }
      }
      stream.fence();
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& input, const std::optional<Tensor>& residual,
                                                const std::optional<Tensor>& weight, double eps) {
  check_input(kFwd, input);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_rows(kFwd, "residual", *residual, input);
  const Tensor w = acc_param(kFwd, "weight", weight, input);
  const int64_t M = input.size(0), N = input.size(1);
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor y = at::empty({M, N}, opts);
  Tensor s = has_res ? at::empty({M, N}, opts) : at::empty({0}, opts);
  Tensor rstd = at::empty({M}, input.options().dtype(acc_scalar_type(input.scalar_type())));
  if (M == 0) return {y, s, rstd};
  TORCH_CHECK(N > 0, kFwd, ": rows must have at least one element");
  const Tensor r = has_res ? *residual : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "llmfast_rms_norm_fwd_cpu", [&] {
    rms_norm_fwd_rows<scalar_t>(input, r, w, eps, y, s, rstd);
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
  const Tensor w = acc_param(kBwd, "weight", weight, x);
  const int64_t M = x.size(0), N = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == M && rstd.scalar_type() == acc && rstd.device() == x.device(), kBwd,
              ": rstd must be a [", M, "] ", acc, " tensor on ", x.device());
  const auto acc_opts = x.options().dtype(acc);
  Tensor dx = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dw = at::empty({weight_grad ? N : 0}, acc_opts);
  if (M == 0 || N == 0) {
    dw.zero_();
    return {dx, dw};
  }
  const RowBlocks blocks = row_blocks(M, N);
  Tensor dw_part = weight_grad ? at::empty({blocks.K, N}, acc_opts) : Tensor();
  const Tensor rstd_c = rstd.contiguous();
  const Tensor ds = has_ds ? *grad_summed : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "llmfast_rms_norm_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* pw = weight_grad ? dw_part.mutable_data_ptr<acc_t>() : nullptr;
    rms_norm_bwd_rows<scalar_t>(grad_out, ds, x, w, rstd_c, dx, pw, blocks);
    if (pw) sum_partials(pw, blocks.K, N, dw.mutable_data_ptr<acc_t>());
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace llmfast::cpu
