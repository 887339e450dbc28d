// Fused softmax / log_softmax on the CPU: z = x*scale (+ additive mask | masked
// fill | causal), then a numerically stable softmax over the last dim.
//
// input: [A, B, L, N] contiguous, one row per (a, b, l); mask: [A, B, L, N] view
// with any strides (0 where broadcast). Rows are spread over threads with
// at::parallel_for; each row takes three vectorised passes over an fp32 (fp64 for
// double) buffer: z and its max, exp(z - max) and its sum, the normalisation.
// Outputs larger than the last-level cache are streamed (stream.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/row.h"
#include "cpu/stream.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
void softmax_fwd_rows(const Tensor& x, Tensor& y, double scale_d, const MaskView* mask, bool causal, bool log) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t B = x.size(1), L = x.size(2), N = x.size(3);
  const int64_t M = x.numel() / std::max<int64_t>(N, 1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool masked = mask != nullptr || causal;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  const OutputStream stream(M, N * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in_buf(std::is_same_v<scalar_t, acc_t> ? 0 : N);
    RowOut<scalar_t> y_out(stream, N);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t l = m % L, b = (m / L) % B, a = m / (L * B);
      scalar_t* yr = yp + m * N;
      stream.prepare_rows(yr, m - begin, end - m);
      // Causal rows only see columns [0, l]; the rest is -inf (prob 0).
      const int64_t n = causal ? std::min<int64_t>(N, l + 1) : N;
      const acc_t* xr = load_row<scalar_t, acc_t>(xp + m * N, n, in_buf.data());
      acc_t* z = y_out.acc_row(yr);  // the output row doubles as the working row
      // With a mask, z = x*scale + mask is materialised once (the mask is read once);
      // without one, z is recomputed from x on the fly and the max pass stores nothing.
      const acc_t* zsrc = xr;
      acc_t zscale = scale;
      if (mask) {
        at::vec::map([scale](Vec v) { return v * Vec(scale); }, z, xr, n);
        apply_mask(z, n, *mask, a, b, l);
        zsrc = z;
        zscale = acc_t(1);
      }
      const acc_t mx = n == 0 ? ninf
                       : at::vec::map_reduce_all<acc_t>([zscale](Vec v) { return v * Vec(zscale); },
                                                        [](Vec p, Vec q) { return at::vec::maximum(p, q); }, zsrc, n);
      if (masked && mx == ninf) {  // no visible position: zeros, never NaN
        std::fill(yr, yr + N, scalar_t(0));
        continue;
      }
      if (std::isnan(mx) || mx == -ninf) {  // torch: inf - inf poisons the whole row
        std::fill(yr, yr + N, std::numeric_limits<scalar_t>::quiet_NaN());
        continue;
      }
      // exp(z - max), summed; the probabilities are stored only for softmax.
      Vec vsum(acc_t(0)), vmax(mx), vscale(zscale);
      int64_t j = 0;
      for (; j + Vec::size() <= n; j += Vec::size()) {
        Vec e = (Vec::loadu(zsrc + j) * vscale - vmax).exp_u20();
        if (!log) e.store(z + j);
        vsum = vsum + e;
      }
      if (j < n) {
        // lanes past the tail load zeros and would add exp(-max): blank them
        Vec e = Vec::set(Vec(acc_t(0)), (Vec::loadu(zsrc + j, n - j) * vscale - vmax).exp_u20(), n - j);
        if (!log) e.store(z + j, n - j);
        vsum = vsum + e;
      }
      const acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vsum);
      if (log) {
        const acc_t lse = mx + std::log(sum);
        at::vec::map([lse, zscale](Vec v) { return v * Vec(zscale) - Vec(lse); }, z, zsrc, n);
        std::fill(z + n, z + N, ninf);
      } else {
        const acc_t inv = acc_t(1) / sum;
        at::vec::map([inv](Vec v) { return v * Vec(inv); }, z, z, n);
        std::fill(z + n, z + N, acc_t(0));
      }
      y_out.finish(yr, z);
    }
    stream.fence();
  });
}

template <typename scalar_t>
void softmax_bwd_rows(const Tensor& dy, const Tensor& y, Tensor& dx, double scale_d, bool log, bool masked) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = y.size(-1);
  const int64_t M = y.numel() / std::max<int64_t>(N, 1);
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;

  const OutputStream stream(M, N * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b_dy(same ? 0 : N), b_y(same ? 0 : N);
    RowOut<scalar_t> dx_out(stream, N);
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* const dx_dst = dxp + m * N;
      stream.prepare_rows(dx_dst, m - begin, end - m);
      const acc_t* g = load_row<scalar_t, acc_t>(dyp + m * N, N, b_dy.data());
      const acc_t* p = load_row<scalar_t, acc_t>(yp + m * N, N, b_y.data());
      acc_t* d = dx_out.acc_row(dx_dst);
      if (!log) {
        // dx = scale * y * (dy - sum(dy * y))
        const acc_t dot = at::vec::map2_reduce_all<acc_t>(
            [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, g, p, N);
        at::vec::map2([dot, scale](Vec a, Vec b) { return b * (a - Vec(dot)) * Vec(scale); }, d, g, p, N);
      } else {
        // dx = scale * (dy - exp(y) * sum(dy)). With a mask, a masked position's -inf is a
        // constant, so its incoming gradient is left out of the sum (as in the reference).
        const acc_t s = masked ? at::vec::map2_reduce_all<acc_t>(
                                     [ninf](Vec a, Vec b) { return Vec::blendv(a, Vec(acc_t(0)), b == Vec(ninf)); },
                                     [](Vec a, Vec b) { return a + b; }, g, p, N)
                               : vec_sum(g, N);
        if (masked) {
          // A fully masked row was written as zeros: exp(0) sums to N > 1 there,
          // while any real log-softmax row sums to 1.
          const acc_t total = at::vec::map_reduce_all<acc_t>(
              [](Vec a) { return a.exp_u20(); }, [](Vec a, Vec b) { return a + b; }, p, N);
          if (N > 1 && total > acc_t(1.5)) {
            std::fill(d, d + N, acc_t(0));
            dx_out.finish(dx_dst, d);
            continue;
          }
        }
        // exp, not exp_u20: the fast one maps a NaN output (a row torch also poisons) to inf,
        // which gave -inf gradients where torch gives NaN
        at::vec::map2([s, scale](Vec a, Vec b) { return (a - b.exp() * Vec(s)) * Vec(scale); }, d, g, p, N);
        if (masked) {
          for (int64_t j = 0; j < N; ++j) d[j] = p[j] == ninf ? acc_t(0) : d[j];
        }
      }
      dx_out.finish(dx_dst, d);
    }
    stream.fence();
  });
}

Tensor softmax_fwd(const Tensor& input, double scale, const std::optional<Tensor>& mask, bool is_causal, bool log) {
  constexpr const char* op = "llmfast::softmax_fwd";
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(), op, ": input must be a contiguous [A, B, L, N] tensor");
  check_float(op, "input", input);
  std::optional<MaskView> mv;
  if (defined(mask)) {
    check_mask(op, *mask, input.sizes(), input);
    mv.emplace(*mask);
  }
  Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "llmfast_softmax_fwd_cpu", [&] {
    softmax_fwd_rows<scalar_t>(input, out, scale, mv ? &*mv : nullptr, is_causal, log);
  });
  return out;
}

Tensor softmax_bwd(const Tensor& grad_out, const Tensor& out, double scale, bool log, bool masked) {
  constexpr const char* op = "llmfast::softmax_bwd";
  check_float(op, "out", out);
  check_like(op, "grad_out", grad_out, out);
  const Tensor dy = grad_out.contiguous(), y = out.contiguous();
  Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "llmfast_softmax_bwd_cpu", [&] {
    softmax_bwd_rows<scalar_t>(dy, y, dx, scale, log, masked);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace llmfast::cpu
