// Scratch bench for the CPU kernels' vectorised exp (llm.c style: variants side by side,
// checked against a double reference, timed). Kept: ATen's exp_u20 (issue 14 suspected it
// of the fp32 cross-entropy error at 32001 classes; measured, it is not the cause).
//
// Results (AMD EPYC, AVX-512, a loaded 2-core VM), x in [-30, 0]:
//   exp_u20  max 1.94 ulp  mean +0.190 ulp  row-sum rel err 2.3e-08  0.53 ns/elem
//   sleef    max 0.68 ulp  mean +0.001 ulp  row-sum rel err 6.1e-09  0.61 ns/elem
//   exp_acc  max 0.68 ulp  mean -0.006 ulp  row-sum rel err 6.3e-09  0.54 ns/elem
// exp_u20's bias does not average out over a row, but it moves a 32001-term log-sum-exp
// by ~2e-8, while rounding a loss of ~10 to fp32 costs up to 5e-7: the per-row loss was
// already within torch's error (the 'sum' gap was the fp32 sum over rows, fixed
// in llmfast/ops/cross_entropy.py). In the real kernel exp_acc made the cross-entropy
// forward ~18% slower (cpu time, 1 thread, N=1024 V=32000: 12.0-13.0 -> 14.6-15.2 ms),
// with no accuracy change measurable at the output, so it stays here.
//
//   P=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
//   g++ -O3 -std=c++20 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -DCPU_CAPABILITY=AVX512 \
//     -DCPU_CAPABILITY_AVX512 -Icsrc -I$P/include csrc/dev/exp_cpu_dev.cpp -o /tmp/exp_dev \
//     -L$P/lib -ltorch_cpu -lc10 -Wl,-rpath,$P/lib && /tmp/exp_dev
//
// Prints, per variant, the max and mean signed relative error (in fp32 ulps at 1.0) over
// x in [-30, 0] (the range exp(x - max) sees), the relative error of sum(exp(x)) over
// 32001 N(0, 4) logits minus their max (what a cross-entropy row adds up), and ns per element.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/row.h"

using at::vec::Vectorized;
using Vec = Vectorized<float>;

// The candidate: exp(x) to ~1 ulp with exp_u20's shape (one polynomial, no table, no
// Sleef call), unbiased where exp_u20 is biased by +0.19 ulp.
//
// This is Cephes' expf: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, ln2 split
// in two (Cody-Waite: n * C1 is exact for |n| < 2^9), exp(r) = 1 + r + r^2 P(r) with
// Cephes' degree-5 P (relative error < 2^-23 on the interval); 2^n is added to the
// exponent bits of exp(r) in [2^-0.5, 2^0.5]. x < ln(FLT_MIN) gives 0 (as exp_u20; torch
// would give a denormal), x > ln(FLT_MAX) gives +inf, NaN stays NaN (exp_u20 gave inf).
// Doubles use Sleef (Vec<double>::exp(), 1 ulp): there is no fast path to protect.
template <typename T>
inline Vectorized<T> exp_acc(const Vectorized<T>& x) {
  if constexpr (!std::is_same_v<T, float>) {
    return x.exp();
  } else {
    using Vec = Vectorized<float>;
    using IVec = Vectorized<int32_t>;
    const Vec n = (x * Vec(1.44269504088896341f)).round();  // round half to even
    Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);       // x - n * C1, exact
    r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);          // - n * C2 (C1 + C2 = ln2)
    Vec p(1.9875691500e-4f);
    p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
    p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
    p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
    p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
    p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
    const Vec er = at::vec::fmadd(p, r * r, r) + Vec(1.0f);
    // n in [-126, 128] wherever the result is kept, so the exponent field stays in [1, 254]
    const IVec bits = at::vec::cast<int32_t>(er) + (at::vec::convert_to_int_of_same_size(n) << IVec(23));
    Vec y = at::vec::cast<float>(bits);
    y = Vec::blendv(y, Vec(0.0f), x < Vec(-87.3365447505531f));                              // ln(FLT_MIN)
    return Vec::blendv(y, Vec(std::numeric_limits<float>::infinity()), x > Vec(88.7228391116729f));  // ln(FLT_MAX)
  }
}

template <typename F>
void report(const char* name, F f) {
  constexpr int64_t n = 1 << 20;
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) x[i] = -30.0f * static_cast<float>(i) / n;
  at::vec::map(f, y.data(), x.data(), n);
  double max_rel = 0, mean_rel = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double ref = std::exp(static_cast<double>(x[i]));
    const double rel = (y[i] - ref) / ref;
    max_rel = std::max(max_rel, std::abs(rel));
    mean_rel += rel / n;
  }
  // a cross-entropy row: 32001 logits, sum of exp(x - max), fp32 vs double
  std::mt19937 gen(0);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  constexpr int64_t C = 32001;
  std::vector<float> row(C), e(C);
  double worst_sum = 0;
  for (int rep = 0; rep < 20; ++rep) {
    float mx = -INFINITY;
    for (auto& v : row) mx = std::max(mx, v = nd(gen));
    for (auto& v : row) v -= mx;
    at::vec::map(f, e.data(), row.data(), C);
    double s = 0, ref = 0;
    for (int64_t i = 0; i < C; ++i) s += e[i], ref += std::exp(static_cast<double>(row[i]));
    worst_sum = std::max(worst_sum, std::abs(s - ref) / ref);
  }
  const auto t0 = std::chrono::steady_clock::now();
  constexpr int reps = 200;
  for (int r = 0; r < reps; ++r) at::vec::map(f, y.data(), x.data(), n);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%-10s max %.2f ulp  mean %+.3f ulp  row-sum rel err %.2e  %.3f ns/elem\n", name, max_rel / 0x1p-23,
              mean_rel / 0x1p-23, worst_sum, ns / (double(reps) * n));
}

int main() {
  report("exp_u20", [](Vec v) { return v.exp_u20(); });
  report("sleef", [](Vec v) { return v.exp(); });
  report("exp_acc", [](Vec v) { return exp_acc(v); });
  return 0;
}
