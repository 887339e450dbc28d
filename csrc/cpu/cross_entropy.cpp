// Fused cross-entropy on the CPU, forward and backward, for class-index targets.
//
// logits x: [N, C] contiguous; target t: [N] int64; weight w: none or [C] in the
// accumulation dtype (fp32; fp64 for fp64 logits); eps = label_smoothing. Per row i
// (t = t_i, lse = log Σ_c exp x_c):
//
//   loss_i = (1-eps) w_t (lse - x_t) + (eps/C) Σ_c w_c (lse - x_c)     (0 if t == ignore_index)
//   dloss_i/dx_c = p_c ((1-eps) w_t + (eps/C) W) - (eps/C) w_c - (1-eps) w_t [c == t]
//
// with p_c = exp(x_c - lse), W = Σ_c w_c (w = 1 and W = C without weights). This is
// torch's definition (LossNLL.cpp): with weights, the smoothing term weighs every class
// by its own w_c, and 'mean' divides by Σ_i w_{t_i}, which the Python side does.
//
// Forward is one pass over each row with an online log-sum-exp: the row streams through
// in blocks of kBlock elements (L1-sized); each block's max is taken while the block is
// in L1, the running sum is rescaled only when the max grows, so every element costs
// one exp. The smoothing sum Σ w_c (x_c - m) is kept relative to the running max m
// (rescaled by -W_seen * Δm when m grows), so lse - x_c terms never cancel: both parts
// of W (lse - m) - Σ w_c (x_c - m) are >= 0.
// lse is kept as an unevaluated sum hi + lo (hi = fl(lse), lo its rounding error, by
// TwoSum): at |x| ~ 1e4 fp32 rounds lse by up to 5e-4, which exp(x - lse) would turn
// into a 5e-4 relative error on every probability; exp((x - hi) - lo) keeps them as
// accurate as torch's log_softmax.
// Backward reads x once and writes dx once (no softmax tensor in between);
// cross_entropy_fwd_grad does both passes per row while the row is still in L2 and
// writes the gradient over the logits (for the fused linear + cross-entropy).
//
// Ignored rows are skipped: loss 0, lse 0, gradient 0. A target outside [0, C) that is
// not ignore_index raises (TORCH_CHECK inside at::parallel_for is rethrown by it).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/row.h"
#include "cpu/stream.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;

// Elements per block: 2048 fp32 = 8 KiB, so a block stays in L1 between its max and
// its exp sweep (and between the load and store of the gradient sweep).
constexpr int64_t kBlock = 2048;

template <typename acc_t>
struct CeParams {
  int64_t C;
  int64_t ignore_index;
  const acc_t* w;   // [C] or nullptr
  acc_t eps;        // label smoothing
  acc_t w_total;    // Σ_c w_c (C without weights)
};

template <typename acc_t>
struct RowStats {
  acc_t m;       // row max
  acc_t ls;      // log Σ_c exp(x_c - m), so lse = m + ls
  acc_t hi, lo;  // lse = hi + lo, hi = fl(m + ls)
  acc_t smooth;  // Σ_c w_c (lse - x_c); only computed when eps > 0
};

// hi + lo == a + b exactly (Knuth's TwoSum; needs IEEE rounding, no -ffast-math).
template <typename T>
inline void two_sum(T a, T b, T& hi, T& lo) {
  hi = a + b;
  if (!std::isfinite(hi)) {
    lo = 0;
    return;
  }
  const T bb = hi - a;
  lo = (a - (hi - bb)) + (b - bb);
}

template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_stats(const scalar_t* x, const CeParams<acc_t>& p, acc_t* buf) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = p.eps != acc_t(0);
  acc_t m = ninf, s = 0, S = 0, w_seen = 0;
  bool smooth_inf = false;  // a block of only -inf logits: log p = -inf there, smoothing term is +inf
  for (int64_t j0 = 0; j0 < p.C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, p.C - j0);
    const acc_t* xb = load_row<scalar_t, acc_t>(x + j0, n, buf);
    const acc_t bm = vec_max(xb, n);
    // A NaN anywhere poisons the row, as in torch; so does +inf, whose x - max is
    // inf - inf = NaN in torch's log_softmax (loss and every gradient NaN, not just its own).
    if (std::isnan(bm) || bm == -ninf) {
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      return {nan, nan, nan, nan, nan};
    }
    if (bm > m) {
      if (m != ninf) {
        s *= std::exp(m - bm);
        if (smooth) S -= w_seen * (bm - m);
      }
      m = bm;
    }
    if (m == ninf) {  // every logit so far is -inf: no probability mass yet
      smooth_inf |= smooth;
      continue;
    }
    const Vec vm(m);
    s += at::vec::map_reduce_all<acc_t>([vm](Vec v) { return (v - vm).exp_u20(); },
                                       [](Vec a, Vec b) { return a + b; }, xb, n);
    if (smooth) {
      if (p.w) {
        S += at::vec::map2_reduce_all<acc_t>([vm](Vec v, Vec w) { return (v - vm) * w; },
                                            [](Vec a, Vec b) { return a + b; }, xb, p.w + j0, n);
        w_seen += vec_sum(p.w + j0, n);
      } else {
        S += at::vec::map_reduce_all<acc_t>([vm](Vec v) { return v - vm; },
                                           [](Vec a, Vec b) { return a + b; }, xb, n);
        w_seen += acc_t(n);
      }
    }
  }
  RowStats<acc_t> st{m, std::log(s), 0, 0, 0};
  two_sum(st.m, st.ls, st.hi, st.lo);
  if (smooth) st.smooth = smooth_inf ? std::numeric_limits<acc_t>::infinity() : w_seen * st.ls - S;
  return st;
}

// dx_c = g * dloss/dx_c for one row, block by block (dx may alias x). With `stream`
// (a fresh dx larger than the last-level cache, never x itself) each block is finished
// in buf and streamed out (stream.h).
template <typename scalar_t, typename acc_t>
void row_grad(const scalar_t* x, scalar_t* dx, const CeParams<acc_t>& p, int64_t t, acc_t hi, acc_t lo, acc_t g,
              acc_t* buf, const OutputStream* stream = nullptr) {
  alignas(64) scalar_t out[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];  // a streamed half block
  using Vec = Vectorized<acc_t>;
  const acc_t wt = p.w ? p.w[t] : acc_t(1);
  // A poisoned row (NaN lse: a NaN or +inf logit) is NaN at every class, as in torch; exp_u20
  // would turn x - NaN into inf or 0, so the NaN rides on the coefficient.
  const acc_t coef = std::isnan(hi) ? hi : g * ((acc_t(1) - p.eps) * wt + p.eps / acc_t(p.C) * p.w_total);
  const acc_t a = g * p.eps / acc_t(p.C);     // subtracted at every class (times w_c)
  const acc_t b = g * (acc_t(1) - p.eps) * wt;  // subtracted at the target
  const Vec vhi(hi), vlo(lo), vcoef(coef), va(a);
  for (int64_t j0 = 0; j0 < p.C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, p.C - j0);
    const acc_t* xb = load_row<scalar_t, acc_t>(x + j0, n, buf);
    // in place over buf (or dx) is safe: map reads then writes each vector
    acc_t* db = stream ? buf : row_buffer<scalar_t, acc_t>(dx + j0, buf);
    if (a == acc_t(0)) {
      at::vec::map([vhi, vlo, vcoef](Vec v) { return (v - vhi - vlo).exp_u20() * vcoef; }, db, xb, n);
    } else if (p.w) {
      at::vec::map2([vhi, vlo, vcoef, va](Vec v, Vec w) { return (v - vhi - vlo).exp_u20() * vcoef - w * va; }, db, xb,
                    p.w + j0, n);
    } else {
      at::vec::map([vhi, vlo, vcoef, va](Vec v) { return (v - vhi - vlo).exp_u20() * vcoef - va; }, db, xb, n);
    }
    if (t >= j0 && t < j0 + n) db[t - j0] -= b;
    if (stream) {
      const scalar_t* src = reinterpret_cast<const scalar_t*>(db);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        store_row<scalar_t, acc_t>(db, out, n);
        src = out;
      }
      stream->write(dx + j0, src, n * static_cast<int64_t>(sizeof(scalar_t)));
    } else {
      store_row<scalar_t, acc_t>(db, dx + j0, n);
    }
  }
}

template <typename acc_t>
void check_target(int64_t t, int64_t row, const CeParams<acc_t>& p) {
  TORCH_CHECK_INDEX(t >= 0 && t < p.C, "cross_entropy: target ", t, " at row ", row, " is out of bounds for ", p.C,
              " classes (targets must be in [0, ", p.C, ") or equal ignore_index=", p.ignore_index, ")");
}

// Forward over all rows; with write_grad, also overwrites x with d(Σ_i loss_i)/dx.
template <typename scalar_t>
void fwd_rows(Tensor& x, const Tensor& target, const CeParams<acc_type<scalar_t>>& p, Tensor& loss, Tensor& lse,
              bool write_grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), C = p.C;
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  acc_t* lp = loss.mutable_data_ptr<acc_t>();
  acc_t* ep = lse.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, grain_for(C), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* xr = xp + i * C;  // int64: N * C may pass 2^31
      const int64_t t = tp[i];
      if (t == p.ignore_index) {
        lp[i] = 0;
        ep[2 * i] = ep[2 * i + 1] = 0;
        if (write_grad) std::fill(xr, xr + C, scalar_t(0));
        continue;
      }
      check_target(t, i, p);
      const RowStats<acc_t> st = row_stats<scalar_t, acc_t>(xr, p, buf);
      const acc_t wt = p.w ? p.w[t] : acc_t(1);
      // lse - x_t as (m - x_t) + ls: exact when x_t is the max
      acc_t l = (acc_t(1) - p.eps) * wt * ((st.m - static_cast<acc_t>(xr[t])) + st.ls);
      if (p.eps != acc_t(0)) l += p.eps / acc_t(C) * st.smooth;
      lp[i] = l;
      ep[2 * i] = st.hi;
      ep[2 * i + 1] = st.lo;
      if (write_grad) row_grad<scalar_t, acc_t>(xr, xr, p, t, st.hi, st.lo, acc_t(1), buf);
    }
  });
}

template <typename scalar_t>
void bwd_rows(const Tensor& grad, const Tensor& x, const Tensor& target, const Tensor& lse,
              const CeParams<acc_type<scalar_t>>& p, Tensor& dx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), C = p.C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  const acc_t* gp = grad.const_data_ptr<acc_t>();
  const acc_t* ep = lse.const_data_ptr<acc_t>();
  const OutputStream stream(N, C * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, N, grain_for(C), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      stream.prepare_rows(dp + i * C, i - begin, end - i);
      const int64_t t = tp[i];
      if (t == p.ignore_index) {
        std::fill(dp + i * C, dp + (i + 1) * C, scalar_t(0));
        continue;
      }
      check_target(t, i, p);
      row_grad<scalar_t, acc_t>(xp + i * C, dp + i * C, p, t, ep[2 * i], ep[2 * i + 1], gp[i], buf,
                                stream.on ? &stream : nullptr);
    }
    stream.fence();
  });
}

template <typename acc_t>
CeParams<acc_t> make_params(const Tensor& x, const std::optional<Tensor>& weight, int64_t ignore_index, double eps) {
  CeParams<acc_t> p{x.size(1), ignore_index, nullptr, static_cast<acc_t>(eps), static_cast<acc_t>(x.size(1))};
  if (weight.has_value()) {
    p.w = weight->const_data_ptr<acc_t>();
    p.w_total = x.size(1) > 0 ? vec_sum(p.w, x.size(1)) : acc_t(0);
  }
  return p;
}

std::tuple<Tensor, Tensor> fwd_impl(const char* name, Tensor& x, const Tensor& target,
                                    const std::optional<Tensor>& weight, int64_t ignore_index,
                                    double label_smoothing, bool write_grad) {
  check_cross_entropy(name, x, target, weight, label_smoothing);
  const auto opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  Tensor loss = at::empty({x.size(0)}, opts), lse = at::empty({x.size(0), 2}, opts);
  if (x.size(0) == 0) return {loss, lse};
  TORCH_CHECK(x.size(1) > 0, name, ": logits have 0 classes");
  const Tensor t = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "llmfast_cross_entropy_fwd_cpu", [&] {
    const auto p = make_params<acc_type<scalar_t>>(x, weight, ignore_index, label_smoothing);
    fwd_rows<scalar_t>(x, t, p, loss, lse, write_grad);
  });
  return {loss, lse};
}

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& target,
                                             const std::optional<Tensor>& weight, int64_t ignore_index,
                                             double label_smoothing) {
  Tensor x = logits;  // not written: write_grad is false
  return fwd_impl("llmfast::cross_entropy_fwd", x, target, weight, ignore_index, label_smoothing, false);
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_grad(Tensor& logits, const Tensor& target,
                                                  const std::optional<Tensor>& weight, int64_t ignore_index,
                                                  double label_smoothing) {
  return fwd_impl("llmfast::cross_entropy_fwd_grad", logits, target, weight, ignore_index, label_smoothing, true);
}

Tensor cross_entropy_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                         const std::optional<Tensor>& weight, const Tensor& lse, int64_t ignore_index,
                         double label_smoothing) {
  const char* name = "llmfast::cross_entropy_bwd";
  check_cross_entropy(name, logits, target, weight, label_smoothing);
  check_cross_entropy_bwd(name, grad_loss, lse, logits);
  Tensor dx = at::empty_like(logits);
  if (logits.numel() == 0) return dx;
  const Tensor g = grad_loss.contiguous(), t = target.contiguous(), e = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "llmfast_cross_entropy_bwd_cpu",
                                  [&] {
                                    const auto p = make_params<acc_type<scalar_t>>(logits, weight, ignore_index,
                                                                                   label_smoothing);
                                    bwd_rows<scalar_t>(g, logits, t, e, p, dx);
                                  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad);
}

}  // namespace llmfast::cpu
