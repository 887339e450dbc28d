// LayerNorm and RMSNorm with an optional fused residual add, forward and backward, on the
// CPU: one kernel, the norm kind a compile-time switch (CENTERED).
//
//   s     = x + r                      (when a residual is given; stored, rounded to x's dtype)
//   LayerNorm (CENTERED):  mean = sum(s) / N,  var = sum((s - mean)^2) / N,
//                          rstd = 1 / sqrt(var + eps),  x_hat = (s - mean) * rstd
//   RMSNorm:               rstd = 1 / sqrt(sum(s^2) / N + eps),  x_hat = s * rstd
//   y = x_hat * w (+ b, LayerNorm only)
// backward, with g = dy * w:
//   dx = rstd * (g - [CENTERED: mean(g)] - x_hat * mean(g * x_hat)) (+ d_summed),
//   dw = sum_rows dy * x_hat,  db = sum_rows dy
//
// x: [M, N] (unit column stride, any row stride); every output is contiguous. The forward
// spreads rows over threads; the backward spreads fixed blocks of rows (RowBlocks) so the
// dw/db partial sums need no atomics. A row is read from memory once: the statistics take
// vectorised passes per 8 KB chunk while it is in L1 (row_mean_var / row_sum), the output
// one more pass from L1/L2. fp16/bf16 rows are widened to fp32 scratch rows first. With
// fresh outputs of this size (8192 x 4096 fp32 = 128 MB) most of the time goes to the
// kernel faulting and zeroing the output pages, the same for torch's kernels (stream.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/row.h"
#include "cpu/stream.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------
// Row helpers

// The row the norm sees: x, or s = x + r rounded to scalar_t and written to `s_out`.
// Normalising the rounded s (not the fp32 sum) keeps out == norm(summed) exactly, which
// backward relies on: it recomputes x_hat from the saved `summed`.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline const acc_t* norm_input_row(const scalar_t* x, const scalar_t* r, scalar_t* s_out, int64_t n, acc_t* buf,
                                   acc_t* buf2) {
  using Vec = Vectorized<acc_t>;
  if (r == nullptr) return load_row<scalar_t, acc_t>(x, n, buf);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    at::vec::map2([](Vec a, Vec b) { return a + b; }, s_out, x, r, n);
    return s_out;
  } else {
    at::vec::convert(x, buf, n);
    at::vec::convert(r, buf2, n);
    at::vec::map2([](Vec a, Vec b) { return a + b; }, buf, buf, buf2, n);
    at::vec::convert(buf, s_out, n);
    at::vec::convert(s_out, buf, n);
    return buf;
  }
}

// The forward's row loop. Rows are spread over threads;
// row m's input (x, or s = x + r, which is also written to `s`) is handed as acc_t to
// normalize(m, in, out), which writes the normalised row to `out`. y and s are [M, N] rows
// at their own row strides; the in-place variant passes s = r (the sum overwrites the
// residual) and y = x or another buffer: each row is read before its element j is written,
// and no two rows share memory. Outputs larger than the last-level cache are streamed
// (stream.h).
template <typename scalar_t, typename F>
void norm_rows(const Tensor& x, const Tensor& r, Tensor& y, Tensor& s, F&& normalize) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const int64_t sx = x.stride(0), sr = r.defined() ? r.stride(0) : 0;
  const int64_t sy = y.stride(0), ss = r.defined() ? s.stride(0) : 0;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sp = r.defined() ? s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const OutputStream stream(M, N * static_cast<int64_t>(sizeof(scalar_t)), sp ? 2 : 1);
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in_buf(same ? 0 : N), in_buf2(same || !rp ? 0 : N);
    RowOut<scalar_t> y_out(stream, N), s_out(stream, sp ? N : 0);
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* const y_dst = yp + m * sy;
      scalar_t* const s_dst = sp ? sp + m * ss : nullptr;
      stream.prepare_rows(y_dst, m - begin, end - m);
      if (s_dst) stream.prepare_rows(s_dst, m - begin, end - m);
      const acc_t* in = norm_input_row<scalar_t, acc_t>(xp + m * sx, rp ? rp + m * sr : nullptr,
                                                        s_dst ? s_out.row(s_dst) : nullptr, N, in_buf.data(),
                                                        in_buf2.data());
      if (s_dst) s_out.flush(s_dst);
      acc_t* out = y_out.acc_row(y_dst);
      normalize(m, in, out);
      y_out.finish(y_dst, out);
    }
    stream.fence();
  });
}

// Runs body(j, cnt) over [0, n) in vectors of V: full vectors two at a time, then one
// masked tail. Inlined, cnt is the constant V in the main loop, so Vectorized's
// loadu/store(ptr, cnt) fold to plain full-width accesses there.
template <int64_t V, typename F>
inline void for_vectors(int64_t begin, int64_t end, F&& body) {
  int64_t j = begin;
  for (; j + 2 * V <= end; j += 2 * V) {
    body(j, V);
    body(j + V, V);
  }
  for (; j + V <= end; j += V) body(j, V);
  if (j < end) body(j, end - j);
}

// Calls f(std::bool_constant<a>{}, std::bool_constant<b>{}): per-row flags become
// template arguments, so inner loops carry no branches.
template <typename F>
inline void with_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{}); else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{}); else f(std::false_type{}, std::false_type{});
  }
}

// Sums run in chunks of kChunk elements, each with its own vector accumulators, and the
// chunk totals are added in a second level: fp32 rounding error then grows with
// kChunk / lanes + N / kChunk instead of N / lanes (rows reach 131072 and beyond).
constexpr int64_t kChunk = 2048;

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// sum(x) (or sum(x^2) with SQUARE) of a row: four independent vector accumulators per
// chunk (one add/fma chain would cost its full latency per vector).
template <bool SQUARE, typename T>
inline T row_sum(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  auto add = [](const Vec& v, const Vec& acc) { return SQUARE ? at::vec::fmadd(v, v, acc) : acc + v; };
  Vec total(T(0));
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    int64_t j = c;
    for (; j + 4 * V <= e; j += 4 * V) {
      a0 = add(Vec::loadu(x + j), a0);
      a1 = add(Vec::loadu(x + j + V), a1);
      a2 = add(Vec::loadu(x + j + 2 * V), a2);
      a3 = add(Vec::loadu(x + j + 3 * V), a3);
    }
    for (; j + V <= e; j += V) a0 = add(Vec::loadu(x + j), a0);
    if (j < e) a1 = add(Vec::loadu(x + j, e - j), a1);  // lanes past the row load as 0
    total = total + ((a0 + a1) + (a2 + a3));
  }
  return hsum(total);
}

// sum(x - shift) and sum((x - shift)^2). With shift = a first estimate of the mean, the
// variance needs no E[x^2] - E[x]^2 cancellation (rows like 1000 + noise stay accurate),
// and a constant row gives exactly mean = x, var = 0.
template <typename T>
inline void row_shifted_moments(const T* x, int64_t n, T shift, T& s1, T& s2) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec vs(shift), zero(T(0));
  Vec t1(T(0)), t2(T(0));
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    // four independent accumulator pairs: an fma chain on one register would cost its
    // full latency per vector
    Vec a1(T(0)), a2(T(0)), b1(T(0)), b2(T(0)), c1(T(0)), c2(T(0)), d1(T(0)), d2(T(0));
    int64_t j = c;
    for (; j + 4 * V <= e; j += 4 * V) {
      const Vec p = Vec::loadu(x + j) - vs, q = Vec::loadu(x + j + V) - vs;
      const Vec u = Vec::loadu(x + j + 2 * V) - vs, v = Vec::loadu(x + j + 3 * V) - vs;
      a1 = a1 + p;
      a2 = at::vec::fmadd(p, p, a2);
      b1 = b1 + q;
      b2 = at::vec::fmadd(q, q, b2);
      c1 = c1 + u;
      c2 = at::vec::fmadd(u, u, c2);
      d1 = d1 + v;
      d2 = at::vec::fmadd(v, v, d2);
    }
    for (; j < e; j += V) {
      const int64_t cnt = std::min<int64_t>(V, e - j);
      const Vec d = Vec::set(zero, Vec::loadu(x + j, cnt) - vs, cnt);  // blank lanes past the row
      a1 = a1 + d;
      a2 = at::vec::fmadd(d, d, a2);
    }
    t1 = t1 + ((a1 + b1) + (c1 + d1));
    t2 = t2 + ((a2 + b2) + (c2 + d2));
  }
  s1 = hsum(t1);
  s2 = hsum(t2);
}

// Mean and (biased) variance of a row. Each kChunk-element chunk is summed, then its
// moments are taken about that chunk mean while the chunk is still in L1; chunks merge
// with Chan's pairwise formula. So a row longer than L1 (32768 fp32 = 128 KB) is read
// from memory once for its statistics, the variance has no E[x^2] - E[x]^2 cancellation
// (rows like 1000 + noise), and a constant row gives exactly mean = x, var = 0.
template <typename T>
inline void row_mean_var(const T* x, int64_t n, T& mean, T& var) {
  T cnt = 0, mu = 0, m2 = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    const T nb = static_cast<T>(len);
    const T m0 = row_sum<false>(x + c, len) / nb;
    T d1, d2;
    row_shifted_moments(x + c, len, m0, d1, d2);
    const T dm = d1 / nb;
    const T mb = m0 + dm;                      // the chunk mean (exact for a constant chunk)
    const T m2b = std::max(d2 - d1 * dm, T(0));  // sum((x - mb)^2)
    const T tot = cnt + nb;
    const T delta = mb - mu;
    mu = mu + delta * (nb / tot);
    m2 = m2 + m2b + delta * delta * (cnt * nb / tot);
    cnt = tot;
  }
  mean = mu;
  var = m2 / cnt;
}

// ---------------------------------------------------------------------------------
// Deterministic weight/bias gradients: rows are cut into K fixed blocks; block k sums its
// rows into partial[k, :] (one thread owns a block, so no atomics), then partials are
// added in the order k = 0..K-1. The cut depends on M, N and the thread count only, so a
// rerun gives the same bits.
//
// Accuracy: dw_j = sum over M rows of terms ~1 (65537 rows in the tests). Inside a block,
// rows are first summed in groups of kGroup into a scratch row, and each group total is
// added to the block's partial; the final sum over blocks runs in double. The fp32 error
// then stays near a pairwise sum's instead of growing with the rows per block.

constexpr int64_t kGroup = 16;
static_assert(kGroup % 2 == 0, "the LayerNorm backward takes rows in pairs inside a group");

struct RowBlocks {
  int64_t K = 0, M = 0;
  int64_t begin(int64_t k) const { return k * M / K; }
  int64_t end(int64_t k) const { return (k + 1) * M / K; }
};

inline RowBlocks row_blocks(int64_t M, int64_t N) {
  // Enough blocks to balance threads, few enough that partials stay small next to the
  // input (<= 4M elements per parameter, but at least 16 blocks). Never a function of the
  // thread count: the blocks fix the order of the dw/db sums, so the gradients are the
  // same bits on 1 thread or 64 (tests/test_determinism.py).
  const int64_t cap = std::max<int64_t>(16, std::min<int64_t>(128, (int64_t(1) << 22) / std::max<int64_t>(N, 1)));
  return {std::max<int64_t>(1, std::min(M, cap)), M};
}

// dst[j] += src[j]
template <typename acc_t>
inline void add_row(acc_t* dst, const acc_t* src, int64_t n) {
  using Vec = Vectorized<acc_t>;
  at::vec::map2([](Vec a, Vec b) { return a + b; }, dst, dst, src, n);
}

// out[j] = sum_k part[k, j], k in order, accumulated in double.
template <typename acc_t>
inline void sum_partials(const acc_t* part, int64_t K, int64_t N, acc_t* out) {
  constexpr int64_t C = 256;  // columns per task: a double row chunk that stays in L1
  at::parallel_for(0, (N + C - 1) / C, std::max<int64_t>(1, 8192 / std::max<int64_t>(K * C, 1)), [&](int64_t b, int64_t e) {
    double acc[C];
    for (int64_t c = b; c < e; ++c) {
      const int64_t j0 = c * C, n = std::min<int64_t>(C, N - j0);
      std::fill(acc, acc + n, 0.0);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* p = part + k * N + j0;
        for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(p[j]);
      }
      for (int64_t j = 0; j < n; ++j) out[j0 + j] = static_cast<acc_t>(acc[j]);
    }
  });
}


// ---------------------------------------------------------------------------------
// Forward

template <bool CENTERED, typename scalar_t>
void norm_fwd_rows(const Tensor& x, const Tensor& r, const Tensor& w, const Tensor& b, double eps_d, Tensor& y,
                   Tensor& s, Tensor& mean_t, Tensor& rstd_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = x.size(1);
  const acc_t* wp = ptr_or_null<acc_t>(w);
  const acc_t* bp = ptr_or_null<acc_t>(b);
  // statistics are optional (the in-place variant keeps none)
  acc_t* mp = CENTERED && mean_t.defined() ? mean_t.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* rsp = rstd_t.defined() ? rstd_t.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);

  with_flags(wp != nullptr, bp != nullptr, [&](auto has_w, auto has_b) {
    constexpr bool HW = decltype(has_w)::value, HB = CENTERED && decltype(has_b)::value;
    norm_rows<scalar_t>(x, r, y, s, [&](int64_t m, const acc_t* xr, acc_t* yr) {
      acc_t mu = 0, rs;
      if constexpr (CENTERED) {
        acc_t var;
        row_mean_var(xr, N, mu, var);
        rs = acc_t(1) / std::sqrt(var + eps);
        if (mp) mp[m] = mu;
      } else {
        rs = acc_t(1) / std::sqrt(row_sum<true>(xr, N) * inv_n + eps);
      }
      if (rsp) rsp[m] = rs;
      const Vec vmu(mu), vrs(rs);
      for_vectors<V>(0, N, [&](int64_t j, int64_t cnt) {
        Vec v = Vec::loadu(xr + j, cnt);
        v = CENTERED ? (v - vmu) * vrs : v * vrs;  // centre first: x*rs - mu*rs would cancel
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

// ---------------------------------------------------------------------------------
// Backward

template <bool CENTERED, typename scalar_t>
void norm_bwd_rows(const Tensor& dy, const Tensor& ds, const Tensor& x, const Tensor& w, const Tensor& mean_t,
                   const Tensor& rstd_t, Tensor& dx, acc_type<scalar_t>* dw_part, acc_type<scalar_t>* db_part,
                   const RowBlocks& blocks) {
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
  const acc_t* mp = CENTERED ? mean_t.const_data_ptr<acc_t>() : nullptr;
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
      // The current group's dw/db sums (LayerNorm keeps both when either is needed: db
      // costs one add).
      std::vector<acc_t> gdw(HP ? N : 0), gdb(HP && CENTERED ? N : 0);
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
          vmu[r] = Vec(CENTERED ? mp[m + r] : acc_t(0));
          vrs[r] = Vec(rsp[m + r]);
        }
        auto x_hat = [&](int r, int64_t j, int64_t cnt) {
          const Vec v = Vec::loadu(xr[r] + j, cnt);
          return CENTERED ? (v - vmu[r]) * vrs[r] : v * vrs[r];
        };
        // pass 1: sum(g) (LayerNorm), sum(g * x_hat) per row, and the group's dw/db sums.
        // Masked tail lanes load dy = 0, so every product there is 0. Two accumulator sets
        // (u) break the add/fma dependency chains.
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
              if constexpr (CENTERED) db_acc = Vec::loadu(pdb + j, cnt);
            }
            for (int r = 0; r < R; ++r) {
              const Vec xh = x_hat(r, j, cnt);
              const Vec d = Vec::loadu(gr[r] + j, cnt);
              const Vec g = HW ? d * wv : d;
              if constexpr (CENTERED) sa[u][r] = sa[u][r] + g;
              sb[u][r] = at::vec::fmadd(g, xh, sb[u][r]);
              if constexpr (HP) {
                dw_acc = at::vec::fmadd(d, xh, dw_acc);
                if constexpr (CENTERED) db_acc = db_acc + d;
              }
            }
            if constexpr (HP) {
              dw_acc.store(pdw + j, cnt);
              if constexpr (CENTERED) db_acc.store(pdb + j, cnt);
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
          const acc_t* g_r = gr[r];
          const Vec rs = vrs[r];
          const acc_t* dsr = dsp ? load_row<scalar_t, acc_t>(dsp + (m + r) * sds, N, bds.data()) : nullptr;
          scalar_t* const dx_dst = dxp + (m + r) * N;
          acc_t* dxr = dx_out.acc_row(dx_dst);
          auto out = [&](int64_t j, int64_t cnt) {
            Vec g = Vec::loadu(g_r + j, cnt);
            if constexpr (HW) g = g * Vec::loadu(wp + j, cnt);
            // LayerNorm over one feature: x_hat = 0 and g = mean(g), so dx is exactly 0 (NaN
            // when x, dy or rstd is not finite, as in torch); the formula would give rs * (one
            // rounding of d * w): the compiler contracts d * w - c1 into an fma here but not in
            // pass 1's sum (1.5e-5 at eps = 1e-5)
            if (CENTERED && N == 1) return (x_hat(r, j, cnt) + g) * Vec(acc_t(0));
            return at::vec::fnmadd(x_hat(r, j, cnt), c2, CENTERED ? g - c1 : g) * rs;
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
            std::fill(gdw.begin(), gdw.end(), acc_t(0));
            std::fill(gdb.begin(), gdb.end(), acc_t(0));
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

// ---------------------------------------------------------------------------------
// Bindings

template <typename F>
void with_kind(bool centered, F&& f) {
  if (centered) f(std::true_type{}); else f(std::false_type{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& input, const std::optional<Tensor>& residual,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, double eps, bool centered) {
  constexpr const char* op = "llmfast::norm_fwd";
  const auto [w, b] = check_norm_fwd(op, input, residual, weight, bias, centered);
  const bool has_res = defined(residual);
  const int64_t M = input.size(0), N = input.size(1);
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor y = at::empty({M, N}, opts);
  Tensor s = has_res ? at::empty({M, N}, opts) : at::empty({0}, opts);
  const auto stat_opts = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor mean = at::empty({centered ? M : 0}, stat_opts), rstd = at::empty({M}, stat_opts);
  if (M == 0) return {y, s, mean, rstd};
  TORCH_CHECK(N > 0, op, ": rows must have at least one element");
  const Tensor r = has_res ? *residual : Tensor();
  with_kind(centered, [&](auto kind) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "llmfast_norm_fwd_cpu", [&] {
      norm_fwd_rows<decltype(kind)::value, scalar_t>(input, r, w, b, eps, y, s, mean, rstd);
    });
  });
  return {y, s, mean, rstd};
}

void norm_add_(const Tensor& input, const std::optional<Tensor>& residual, const std::optional<Tensor>& out,
               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, bool centered) {
  constexpr const char* op = "llmfast::norm_add_";
  const auto [w, b] = check_norm_add(op, input, residual, out, weight, bias, centered);
  if (input.size(0) == 0) return;
  TORCH_CHECK(input.size(1) > 0, op, ": rows must have at least one element");
  Tensor y = defined(out) ? *out : input;
  Tensor s = defined(residual) ? *residual : Tensor();
  Tensor none;
  with_kind(centered, [&](auto kind) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "llmfast_norm_add_cpu", [&] {
      norm_fwd_rows<decltype(kind)::value, scalar_t>(input, s, w, b, eps, y, s, none, none);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& grad_out, const std::optional<Tensor>& grad_summed,
                                            const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
                                            const Tensor& rstd, bool centered, bool weight_grad, bool bias_grad) {
  constexpr const char* op = "llmfast::norm_bwd";
  const Tensor w = check_norm_bwd(op, grad_out, grad_summed, x, weight, mean, rstd, centered, bias_grad);
  const bool has_ds = defined(grad_summed) && grad_summed->numel() > 0;
  const int64_t M = x.size(0), N = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
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
  with_kind(centered, [&](auto kind) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "llmfast_norm_bwd_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      acc_t* pw = weight_grad ? dw_part.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* pb = bias_grad ? db_part.mutable_data_ptr<acc_t>() : nullptr;
      norm_bwd_rows<decltype(kind)::value, scalar_t>(grad_out, ds, x, w, mean_c, rstd_c, dx, pw, pb, blocks);
      if (pw) sum_partials(pw, blocks.K, N, dw.mutable_data_ptr<acc_t>());
      if (pb) sum_partials(pb, blocks.K, N, db.mutable_data_ptr<acc_t>());
    });
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("norm_add_", &norm_add_);
}

}  // namespace llmfast::cpu
