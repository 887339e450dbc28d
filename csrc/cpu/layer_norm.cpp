// LayerNorm with an optional fused residual add, forward and backward, on the CPU.
//
//   s     = x + r                          (when a residual is given; stored, rounded)
//   mean  = sum(s) / N,  var = sum((s - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
//   x_hat = (s - mean) * rstd,  y = x_hat * w + b
// backward, with g = dy * w:
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (+ d_summed),
//   dw = sum_rows dy * x_hat,  db = sum_rows dy
//
// x: [M, N] (unit column stride); forward spreads rows over threads, backward spreads
// fixed blocks of rows (norm.h: RowBlocks) so dw/db partial sums need no atomics. A row
// is read from memory once: the stats take two vectorised passes per 8 KB chunk while it
// is in L1 (row_mean_var), the output one more pass from L1/L2. fp16/bf16 rows are
// widened to fp32 scratch rows first. With fresh outputs of this size (8192 x 4096 fp32
// = 128 MB) most of the time goes to the kernel faulting and zeroing the output pages,
// the same for torch's kernels; the work here is kept at or below torch's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/norm.h"

namespace llmfast::cpu {
namespace {

constexpr const char* kFwd = "llmfast::layer_norm_fwd";
constexpr const char* kBwd = "llmfast::layer_norm_bwd";

template <typename scalar_t>
void layer_norm_fwd_rows(const Tensor& x, const Tensor& r, const Tensor& w, const Tensor& b, double eps_d,
                         Tensor& y, Tensor& s, Tensor& mean_t, Tensor& rstd_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = x.size(1);
  const acc_t* wp = ptr_or_null<acc_t>(w);
  const acc_t* bp = ptr_or_null<acc_t>(b);
  acc_t* mp = mean_t.mutable_data_ptr<acc_t>();
  acc_t* rsp = rstd_t.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(eps_d);

  with_flags(wp != nullptr, bp != nullptr, [&](auto has_w, auto has_b) {
    constexpr bool HW = decltype(has_w)::value, HB = decltype(has_b)::value;
    norm_fwd_rows<scalar_t>(x, r, y, s, [&](int64_t m, const acc_t* xr, acc_t* yr) {
      acc_t mu, var;
      row_mean_var(xr, N, mu, var);
      const acc_t rs = acc_t(1) / std::sqrt(var + eps);
      mp[m] = mu;
      rsp[m] = rs;
      const Vec vmu(mu), vrs(rs);
      for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) {
        Vec v = (Vec::loadu(xr + j, cnt) - vmu) * vrs;  // centre first: x*rs - mu*rs would cancel
        if constexpr (HW && HB) {
          v = at::vec::fmadd(v, Vec::loadu(wp + j, cnt), Vec::loadu(bp + j, cnt));
        } else if constexpr (HW) {
          v = v * Vec::loadu(wp + j, cnt);
        } else if constexpr (HB) {
          v = v + Vec::loadu(bp + j, cnt);
        }
        v.store(yr + j, cnt);
      });
    });
  });
}

template <typename scalar_t>
void layer_norm_bwd_rows(const Tensor& dy, const Tensor& ds, const Tensor& x, const Tensor& w,
                         const Tensor& mean_t, const Tensor& rstd_t, Tensor& dx, acc_type<scalar_t>* dw_part,
                         acc_type<scalar_t>* db_part, const RowBlocks& blocks) {
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
  const acc_t* mp = mean_t.const_data_ptr<acc_t>();
  const acc_t* rsp = rstd_t.const_data_ptr<acc_t>();
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
  const bool params = dw_part != nullptr || db_part != nullptr;
  const OutputStream stream(x.size(0), N * static_cast<int64_t>(sizeof(scalar_t)));

  with_flags(wp != nullptr, params, [&](auto has_w, auto has_params) {
    constexpr bool HW = decltype(has_w)::value, HP = decltype(has_params)::value;
    at::parallel_for(0, blocks.K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<acc_t> bx0(same ? 0 : N), bx1(same ? 0 : N), bdy0(same ? 0 : N), bdy1(same ? 0 : N);
      std::vector<acc_t> bds(same || !dsp ? 0 : N);
      RowOut<scalar_t> dx_out(stream, N);
      acc_t* bx[2] = {bx0.data(), bx1.data()};
      acc_t* bdy[2] = {bdy0.data(), bdy1.data()};
      // The current group's dw/db sums (both kept when either is needed: db costs one add).
      std::vector<acc_t> gdw(HP ? N : 0), gdb(HP ? N : 0);
      acc_t* pdw = gdw.data();
      acc_t* pdb = gdb.data();

      // R rows (1 or 2) at once: pass 1 of a row pair updates the group sums once for
      // both rows, halving that read-modify-write traffic (the costliest part of pass 1).
      auto rows = [&](auto r_const, int64_t m) {
        constexpr int R = decltype(r_const)::value;
        const acc_t* xr[R];
        const acc_t* gr[R];
        Vec vmu[R], vrs[R];
        for (int r = 0; r < R; ++r) {
          xr[r] = load_row<scalar_t, acc_t>(xp + (m + r) * sx, N, bx[r]);
          gr[r] = load_row<scalar_t, acc_t>(dyp + (m + r) * sdy, N, bdy[r]);
          vmu[r] = Vec(mp[m + r]);
          vrs[r] = Vec(rsp[m + r]);
        }
        // pass 1: sum(g), sum(g * x_hat) per row, and the group's dw/db sums. Masked tail
        // lanes load dy = 0, so every product there is 0. Two accumulator sets (u) break
        // the add/fma dependency chains.
        Vec ta[R], tb[R];
        for (int r = 0; r < R; ++r) ta[r] = tb[r] = Vec(acc_t(0));
        for (int64_t c = 0; c < N; c += kChunk) {
          const int64_t e = std::min(N, c + kChunk);
          Vec sa[2][R], sb[2][R];
          for (int u = 0; u < 2; ++u) {
            for (int r = 0; r < R; ++r) sa[u][r] = sb[u][r] = Vec(acc_t(0));
          }
          auto step = [&](int64_t j, int64_t cnt, int u) {
            Vec wv(acc_t(1)), dw_acc, db_acc;
            if constexpr (HW) wv = Vec::loadu(wp + j, cnt);
            if constexpr (HP) {
              dw_acc = Vec::loadu(pdw + j, cnt);
              db_acc = Vec::loadu(pdb + j, cnt);
            }
            for (int r = 0; r < R; ++r) {
              const Vec xh = (Vec::loadu(xr[r] + j, cnt) - vmu[r]) * vrs[r];
              const Vec d = Vec::loadu(gr[r] + j, cnt);
              const Vec g = HW ? d * wv : d;
              sa[u][r] = sa[u][r] + g;
              sb[u][r] = at::vec::fmadd(g, xh, sb[u][r]);
              if constexpr (HP) {
                dw_acc = at::vec::fmadd(d, xh, dw_acc);
                db_acc = db_acc + d;
              }
            }
            if constexpr (HP) {
              dw_acc.store(pdw + j, cnt);
              db_acc.store(pdb + j, cnt);
            }
          };
          int64_t j = c;
          for (; j + 2 * V <= e; j += 2 * V) {
            step(j, V, 0);
            step(j + V, V, 1);
          }
          for (; j < e; j += V) step(j, std::min<int64_t>(V, e - j), 0);
          for (int r = 0; r < R; ++r) {
            ta[r] = ta[r] + (sa[0][r] + sa[1][r]);
            tb[r] = tb[r] + (sb[0][r] + sb[1][r]);
          }
        }
        // pass 2, per row: dx = rstd * (g - c1 - x_hat * c2) (+ d_summed)
        for (int r = 0; r < R; ++r) {
          const Vec c1(hsum(ta[r]) * inv_n), c2(hsum(tb[r]) * inv_n);
          const acc_t* x_r = xr[r];
          const acc_t* g_r = gr[r];
          const Vec mu = vmu[r], rs = vrs[r];
          const acc_t* dsr = dsp ? load_row<scalar_t, acc_t>(dsp + (m + r) * sds, N, bds.data()) : nullptr;
          scalar_t* const dx_dst = dxp + (m + r) * N;
          acc_t* dxr = dx_out.acc_row(dx_dst);
          auto out = [&](int64_t j, int64_t cnt) {
            const Vec xh = (Vec::loadu(x_r + j, cnt) - mu) * rs;
            Vec g = Vec::loadu(g_r + j, cnt);
            if constexpr (HW) g = g * Vec::loadu(wp + j, cnt);
            return at::vec::fnmadd(xh, c2, g - c1) * rs;
          };
          if (dsr) {
            for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) { (out(j, cnt) + Vec::loadu(dsr + j, cnt)).store(dxr + j, cnt); });
          } else {
            for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) { out(j, cnt).store(dxr + j, cnt); });
          }
          dx_out.finish(dx_dst, dxr);
        }
      };

      for (int64_t k = kb; k < ke; ++k) {
        const int64_t b0 = blocks.begin(k), b1 = blocks.end(k);
        if (dw_part) std::fill(dw_part + k * N, dw_part + (k + 1) * N, acc_t(0));
        if (db_part) std::fill(db_part + k * N, db_part + (k + 1) * N, acc_t(0));
        // kGroup is even and groups start at even offsets, so a pair never straddles two
        for (int64_t m = b0; m < b1;) {
          stream.prepare_rows(dxp + m * N, m - b0, b1 - m);  // m - b0 is even: rows go in pairs
          if (HP && (m - b0) % kGroup == 0) {
            std::fill(pdw, pdw + N, acc_t(0));
            std::fill(pdb, pdb + N, acc_t(0));
          }
          if (m + 1 < b1) {
            rows(std::integral_constant<int, 2>{}, m);
            m += 2;
          } else {
            rows(std::integral_constant<int, 1>{}, m);
            m += 1;
          }
          if (HP && ((m - b0) % kGroup == 0 || m == b1)) {
            if (dw_part) add_row(dw_part + k * N, pdw, N);
            if (db_part) add_row(db_part + k * N, pdb, N);
          }
        }
      }
      stream.fence();
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input, const std::optional<Tensor>& residual,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps) {
  check_input(kFwd, input);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_rows(kFwd, "residual", *residual, input);
  const Tensor w = acc_param(kFwd, "weight", weight, input);
  const Tensor b = acc_param(kFwd, "bias", bias, input);
  const int64_t M = input.size(0), N = input.size(1);
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor y = at::empty({M, N}, opts);
  Tensor s = has_res ? at::empty({M, N}, opts) : at::empty({0}, opts);
  const auto stat_opts = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor mean = at::empty({M}, stat_opts), rstd = at::empty({M}, stat_opts);
  if (M == 0) return {y, s, mean, rstd};
  TORCH_CHECK(N > 0, kFwd, ": rows must have at least one element");
  const Tensor r = has_res ? *residual : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "llmfast_layer_norm_fwd_cpu", [&] {
    layer_norm_fwd_rows<scalar_t>(input, r, w, b, eps, y, s, mean, rstd);
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
  const Tensor w = acc_param(kBwd, "weight", weight, x);
  const int64_t M = x.size(0), N = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  for (const Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M && t->scalar_type() == acc && t->device() == x.device(), kBwd,
                ": mean/rstd must be [", M, "] ", acc, " tensors on ", x.device());
  }
  const auto acc_opts = x.options().dtype(acc);
  Tensor dx = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dw = at::empty({weight_grad ? N : 0}, acc_opts), db = at::empty({bias_grad ? N : 0}, acc_opts);
  if (M == 0 || N == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  const RowBlocks blocks = row_blocks(M, N);
  Tensor dw_part = weight_grad ? at::empty({blocks.K, N}, acc_opts) : Tensor();
  Tensor db_part = bias_grad ? at::empty({blocks.K, N}, acc_opts) : Tensor();
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const Tensor ds = has_ds ? *grad_summed : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "llmfast_layer_norm_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* pw = weight_grad ? dw_part.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* pb = bias_grad ? db_part.mutable_data_ptr<acc_t>() : nullptr;
    layer_norm_bwd_rows<scalar_t>(grad_out, ds, x, w, mean_c, rstd_c, dx, pw, pb, blocks);
    if (pw) sum_partials(pw, blocks.K, N, dw.mutable_data_ptr<acc_t>());
    if (pb) sum_partials(pb, blocks.K, N, db.mutable_data_ptr<acc_t>());
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace llmfast::cpu
