// Pieces shared by the LayerNorm and RMSNorm CPU kernels (csrc/cpu/layer_norm.cpp,
// csrc/cpu/rms_norm.cpp): argument checks, the fused residual add, cascaded row sums and
// the deterministic weight-gradient reduction.
//
// Layout: x, residual, grad_out, grad_summed are [M, N] with unit column stride and any
// row stride; every output is contiguous. Rows are independent and spread over threads.
#pragma once
#include <ATen/Parallel.h>

#include <optional>

#include "cpu/row.h"
#include "cpu/stream.h"

namespace llmfast::cpu {

using at::Tensor;

// ---------------------------------------------------------------------------------
// Argument checks (the Python layer checks user input; these guard direct op calls)

inline bool is_norm_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A row view: [M, N] with unit stride along N (any stride along M).
inline void check_rows(const char* op, const char* arg, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.dim() == 2, op, ": ", arg, " must be 2-D [M, N], got ", t.dim(), "-D");
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", arg, " has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " dtype ", t.scalar_type(),
              " != input dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", arg, " is on ", t.device(), ", input on ", like.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", arg, " must have unit stride along its last dim");
}

inline void check_input(const char* op, const Tensor& x) {
  TORCH_CHECK(x.dim() == 2, op, ": input must be 2-D [M, N], got ", x.dim(), "-D");
  TORCH_CHECK(is_norm_dtype(x.scalar_type()), op, ": input must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": input must have unit stride along its last dim");
}

// weight/bias: [N], input's dtype or float32 (float32 parameters with half inputs, as torch
// allows). Returned as a contiguous tensor of the accumulation type for the kernels.
inline Tensor acc_param(const char* op, const char* arg, const std::optional<Tensor>& p, const Tensor& x) {
  if (!p.has_value() || !p->defined()) return Tensor();
  const Tensor& t = *p;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", arg, " must have shape [", x.size(1), "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (t.scalar_type() == at::kFloat && x.scalar_type() != at::kDouble),
              op, ": ", arg, " dtype ", t.scalar_type(), " must be the input's (", x.scalar_type(), ") or float32");
  TORCH_CHECK(t.device() == x.device(), op, ": ", arg, " is on ", t.device(), ", input on ", x.device());
  return t.to(acc_scalar_type(x.scalar_type())).contiguous();
}

template <typename T>
inline const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

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

// The forward's row loop, shared by LayerNorm and RMSNorm. Rows are spread over threads;
// row m's input (x, or s = x + r, which is also written to `s`) is handed as acc_t to
// normalize(m, in, out), which writes the normalised row to `out`. Outputs larger than
// the last-level cache are streamed (stream.h).
template <typename scalar_t, typename F>
void norm_fwd_rows(const Tensor& x, const Tensor& r, Tensor& y, Tensor& s, F&& normalize) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const int64_t sx = x.stride(0), sr = r.defined() ? r.stride(0) : 0;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sp = r.defined() ? s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const OutputStream stream(M, N * static_cast<int64_t>(sizeof(scalar_t)), sp ? 2 : 1);
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in_buf(same ? 0 : N), in_buf2(same || !rp ? 0 : N);
    RowOut<scalar_t> y_out(stream, N), s_out(stream, sp ? N : 0);
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* const y_dst = yp + m * N;
      scalar_t* const s_dst = sp ? sp + m * N : nullptr;
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

template <typename T>
inline T row_sum(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec total(T(0));
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    int64_t j = c;
    for (; j + 4 * V <= e; j += 4 * V) {
      a0 = a0 + Vec::loadu(x + j);
      a1 = a1 + Vec::loadu(x + j + V);
      a2 = a2 + Vec::loadu(x + j + 2 * V);
      a3 = a3 + Vec::loadu(x + j + 3 * V);
    }
    for (; j + V <= e; j += V) a0 = a0 + Vec::loadu(x + j);
    if (j < e) a1 = a1 + Vec::loadu(x + j, e - j);  // lanes past the row load as 0
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
    const T m0 = row_sum(x + c, len) / nb;
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

template <typename T>
inline T row_sumsq(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec total(T(0));
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    int64_t j = c;
    for (; j + 4 * V <= e; j += 4 * V) {
      const Vec v0 = Vec::loadu(x + j), v1 = Vec::loadu(x + j + V);
      const Vec v2 = Vec::loadu(x + j + 2 * V), v3 = Vec::loadu(x + j + 3 * V);
      a0 = at::vec::fmadd(v0, v0, a0);
      a1 = at::vec::fmadd(v1, v1, a1);
      a2 = at::vec::fmadd(v2, v2, a2);
      a3 = at::vec::fmadd(v3, v3, a3);
    }
    for (; j < e; j += V) {
      const Vec v = Vec::loadu(x + j, std::min<int64_t>(V, e - j));
      a0 = at::vec::fmadd(v, v, a0);
    }
    total = total + ((a0 + a1) + (a2 + a3));
  }
  return hsum(total);
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
  // input (<= 4M elements per parameter unless every thread needs its own block).
  const int64_t cap = std::max<int64_t>(at::get_num_threads(), std::min<int64_t>(128, (int64_t(1) << 22) / std::max<int64_t>(N, 1)));
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

}  // namespace llmfast::cpu
