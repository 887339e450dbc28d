// Scratch program for the CUDA cross-entropy kernels (llm.c style; not part of the extension).
//
// It includes the kernels of csrc/cuda/cross_entropy.cu (without the torch binding), runs the
// forward, the in-place forward+gradient and the backward on small random problems (every dtype,
// vector and scalar paths, a misaligned base, ignored rows, peaked / +-1e4 / -inf logits, class
// weights, label smoothing, an out-of-range target) and compares loss, lse = hi + lo and the
// gradients with a float64 CPU reference. On a GPU it also times the kernels at N=4096, V=32000.
//
//   emulator:  g++ -std=c++17 -O2 -fno-strict-aliasing -Wno-unknown-pragmas -DLLMFAST_EMU -x c++ -Icsrc \
//                   -I/usr/local/cuda/include csrc/dev/cross_entropy_dev.cu -o /tmp/xent_emu && /tmp/xent_emu
//   GPU:       nvcc -std=c++17 -O3 -arch=sm_90 --use_fast_math --expt-relaxed-constexpr -Icsrc \
//                   csrc/dev/cross_entropy_dev.cu -o /tmp/xent_dev && /tmp/xent_dev [bench]
//
// Variants: one so far (block per row, online (max, sum) per thread, shuffle + shared-memory
// merge). Worth timing on a GPU later: several rows per block for small vocabularies, and a
// split of very long rows over several blocks (a second pass merging partial states).
#define LLMFAST_CUDA_KERNELS_ONLY
#include "cuda/cross_entropy.cu"
#include "dev/harness.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace llmfast::cuda;

// Host values stored in a dtype, as raw 16/32-bit words, plus their exact value as double.
struct HostRow {
  std::vector<double> v;
};

static uint32_t store_word(DType dt, float f) {
  if (dt == DType::kFloat) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  }
  if (dt == DType::kHalf) {
    __half h = __float2half_rn(f);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __nv_bfloat16 b = __float2bfloat16_rn(f);
  uint16_t u;
  std::memcpy(&u, &b, 2);
  return u;
}

static float load_word(DType dt, const char* base, int64_t i) {
  if (dt == DType::kFloat) {
    float f;
    std::memcpy(&f, base + 4 * i, 4);
    return f;
  }
  uint16_t u;
  std::memcpy(&u, base + 2 * i, 2);
  if (dt == DType::kHalf) {
    __half h;
    std::memcpy(&h, &u, 2);
    return __half2float(h);
  }
  __nv_bfloat16 b;
  std::memcpy(&b, &u, 2);
  return __bfloat162float(b);
}

static void put(DType dt, char* base, int64_t i, float f) {
  const uint32_t u = store_word(dt, f);
  std::memcpy(base + elem_bytes(dt) * i, &u, elem_bytes(dt));
}

struct Case {
  DType dt;
  int64_t C;
  bool weighted;
  float eps;
  bool misalign;  // base pointer one element past a 16-byte boundary: the scalar path
};

static const char* dt_name(DType dt) { return dt == DType::kFloat ? "fp32" : (dt == DType::kHalf ? "fp16" : "bf16"); }

static int failures = 0;

static void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    if (failures < 40) std::printf("  FAIL %s\n", what.c_str());
  }
}

static bool close(double got, double ref, double atol, double rtol) {
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  return std::fabs(got - ref) <= atol + rtol * std::fabs(ref);
}

static void run_case(const Case& cs, std::mt19937& rng) {
  const int64_t N = 7, C = cs.C;
  const DType dt = cs.dt;
  const int es = elem_bytes(dt);
  const int64_t off = cs.misalign ? 1 : 0;
  std::normal_distribution<float> nd(0.f, 2.f);
  std::uniform_int_distribution<int64_t> cls(0, C - 1);
  std::vector<char> hx((N * C + off) * es);
  std::vector<int64_t> ht(N);
  for (int64_t i = 0; i < N; ++i) {
    ht[i] = cls(rng);
    for (int64_t c = 0; c < C; ++c) {
      float v = nd(rng);
      if (i == 2) v = -30.f;                                                    // peaked row
      if (i == 4) v = std::uniform_real_distribution<float>(-1e4f, 1e4f)(rng);  // huge logits
      put(dt, hx.data(), off + i * C + c, v);
    }
  }
  ht[1] = -100;                                   // ignored
  put(dt, hx.data(), off + 2 * C + ht[2], 30.f);  // the peak on the target
  ht[3] = C - 1;                                  // the last class
  if (C > 2) {                                    // row 5: some -inf logits (masked vocabulary)
    ht[5] = 0;
    for (int64_t c = 1; c < C; c += 3) put(dt, hx.data(), off + 5 * C + c, -INFINITY);
  }
  std::vector<float> hw(C, 1.f), hg(N);
  double W = static_cast<double>(C);
  if (cs.weighted) {
    W = 0;
    for (auto& w : hw) W += (w = std::uniform_real_distribution<float>(0.25f, 2.f)(rng));
  }
  const float w_total = static_cast<float>(W);
  for (auto& g : hg) g = std::normal_distribution<float>(0.f, 1.f)(rng);

  // float64 reference from the stored (rounded) inputs
  std::vector<double> rl(N, 0), rlse(N, 0), rd(N * C, 0), rd1(N * C, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = ht[i];
    if (t == -100) continue;
    double m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(load_word(dt, hx.data(), off + i * C + c)));
    double s = 0, sm = 0;
    bool neg = false;
    for (int64_t c = 0; c < C; ++c) {
      const double x = load_word(dt, hx.data(), off + i * C + c);
      s += std::exp(x - m);
      if (x == -INFINITY) neg = true;
      else sm += hw[c] * (m - x);
    }
    const double lse = m + std::log(s), eps = cs.eps, wt = hw[t];
    const double xt = load_word(dt, hx.data(), off + i * C + t);
    double smooth = neg ? INFINITY : sm + W * (lse - m);
    rl[i] = (1 - eps) * wt * (lse - xt) + (eps > 0 ? eps / C * smooth : 0.0);
    rlse[i] = lse;
    for (int64_t c = 0; c < C; ++c) {
      const double x = load_word(dt, hx.data(), off + i * C + c);
      const double p = std::exp(x - lse);
      double d = p * ((1 - eps) * wt + eps / C * W) - eps / C * hw[c] - (c == t ? (1 - eps) * wt : 0.0);
      rd1[i * C + c] = d;
      rd[i * C + c] = hg[i] * d;
    }
  }

  // device buffers
  char* dx = static_cast<char*>(dev_alloc(hx.size()));
  char* ddx = static_cast<char*>(dev_alloc(hx.size()));
  int64_t* dt_ = static_cast<int64_t*>(dev_alloc(N * 8));
  float* dw = static_cast<float*>(dev_alloc(C * 4));
  float* dwt = static_cast<float*>(dev_alloc(4));
  float* dl = static_cast<float*>(dev_alloc(N * 4));
  float* dlse = static_cast<float*>(dev_alloc(N * 8));
  float* dg = static_cast<float*>(dev_alloc(N * 4));
  int* derr = static_cast<int*>(dev_alloc(4));
  to_dev(dx, hx.data(), hx.size());
  to_dev(dt_, ht.data(), N * 8);
  to_dev(dw, hw.data(), C * 4);
  to_dev(dwt, &w_total, 4);
  to_dev(dg, hg.data(), N * 4);
  const int zero = 0;
  to_dev(derr, &zero, 4);

  CeParams p{};
  p.x = dx + off * es;
  p.target = dt_;
  p.w = cs.weighted ? dw : nullptr;
  p.w_total = cs.weighted ? dwt : nullptr;
  p.loss = dl;
  p.lse = dlse;
  p.err = derr;
  p.g = dg;
  p.dx = ddx + off * es;
  p.C = C;
  p.ignore_index = -100;
  p.eps = cs.eps;

  char tag[128];
  std::snprintf(tag, sizeof tag, "%s C=%lld w=%d eps=%.1f misalign=%d", dt_name(dt), static_cast<long long>(C),
                cs.weighted, cs.eps, cs.misalign);
  const double g_tol = dt == DType::kFloat ? 0.0 : (dt == DType::kHalf ? 1.0 / 1024 : 1.0 / 128);

  // forward
  check(cross_entropy_fwd_launch(p, dt, N, false, nullptr), "launch");
  dev_sync();
  std::vector<float> hl(N), hlse(2 * N);
  int herr = -1;
  to_host(hl.data(), dl, N * 4);
  to_host(hlse.data(), dlse, N * 8);
  to_host(&herr, derr, 4);
  expect(herr == 0, std::string(tag) + ": error flag set without a bad target");
  for (int64_t i = 0; i < N; ++i) {
    // fp32 math over C terms, relative to the row's magnitude (|x| ~ 1e4 in row 4)
    const double scale = i == 4 ? 1e4 : 30.0;
    expect(close(hl[i], rl[i], 2e-6 * scale, 1e-5), std::string(tag) + ": loss row " + std::to_string(i) + " got " +
                                                        std::to_string(hl[i]) + " ref " + std::to_string(rl[i]));
    if (ht[i] != -100)
      expect(close(static_cast<double>(hlse[2 * i]) + hlse[2 * i + 1], rlse[i], 1e-6, 1e-7),
             std::string(tag) + ": lse row " + std::to_string(i));
  }

  // backward
  check(cross_entropy_bwd_launch(p, dt, N, nullptr), "launch");
  dev_sync();
  std::vector<char> hd(hx.size());
  to_host(hd.data(), ddx, hd.size());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const double ref = rd[i * C + c], got = load_word(dt, hd.data(), off + i * C + c);
      if (!close(got, ref, 2e-6, 2e-5 + g_tol)) {
        expect(false, std::string(tag) + ": bwd row " + std::to_string(i) + " col " + std::to_string(c) + " got " +
                          std::to_string(got) + " ref " + std::to_string(ref));
        break;
      }
    }

  // forward + gradient in place (unit row weights)
  check(cross_entropy_fwd_launch(p, dt, N, true, nullptr), "launch");
  dev_sync();
  to_host(hd.data(), dx, hd.size());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const double ref = rd1[i * C + c], got = load_word(dt, hd.data(), off + i * C + c);
      if (!close(got, ref, 2e-6, 2e-5 + g_tol)) {
        expect(false, std::string(tag) + ": fwd_grad row " + std::to_string(i) + " col " + std::to_string(c) +
                          " got " + std::to_string(got) + " ref " + std::to_string(ref));
        break;
      }
    }

  // an out-of-range target: flag set, NaN loss, no out-of-bounds access
  std::vector<int64_t> bad = ht;
  bad[0] = C;
  to_dev(dt_, bad.data(), N * 8);
  to_dev(dx, hx.data(), hx.size());
  to_dev(derr, &zero, 4);
  check(cross_entropy_fwd_launch(p, dt, N, false, nullptr), "launch");
  dev_sync();
  to_host(&herr, derr, 4);
  to_host(hl.data(), dl, N * 4);
  expect(herr == 1 && std::isnan(hl[0]), std::string(tag) + ": bad target not flagged");

  for (void* q : {static_cast<void*>(dx), static_cast<void*>(ddx), static_cast<void*>(dt_), static_cast<void*>(dw),
                  static_cast<void*>(dwt), static_cast<void*>(dl), static_cast<void*>(dlse), static_cast<void*>(dg),
                  static_cast<void*>(derr)})
    dev_free(q);
}

#ifndef LLMFAST_EMU
static void bench() {
  const int64_t N = 4096, C = 32000;
  for (DType dt : {DType::kFloat, DType::kBFloat16}) {
    const size_t bytes = N * C * elem_bytes(dt);
    void *x = dev_alloc(bytes), *dx = dev_alloc(bytes);
    std::vector<int64_t> ht(N);
    for (int64_t i = 0; i < N; ++i) ht[i] = (i * 7919) % C;
    int64_t* t = static_cast<int64_t*>(dev_alloc(N * 8));
    to_dev(t, ht.data(), N * 8);
    check(cudaMemset(x, 0, bytes), "memset");
    float *l = static_cast<float*>(dev_alloc(N * 4)), *lse = static_cast<float*>(dev_alloc(N * 8));
    float* g = static_cast<float*>(dev_alloc(N * 4));
    check(cudaMemset(g, 0, N * 4), "memset");
    int* err = static_cast<int*>(dev_alloc(4));
    CeParams p{};
    p.x = x, p.target = t, p.loss = l, p.lse = lse, p.err = err, p.g = g, p.dx = dx, p.C = C, p.ignore_index = -100;
    auto time = [&](auto fn) {
      for (int i = 0; i < 3; ++i) fn();
      dev_sync();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 20; ++i) fn();
      dev_sync();
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20;
    };
    const double f = time([&] { cross_entropy_fwd_launch(p, dt, N, false, nullptr); });
    const double b = time([&] { cross_entropy_bwd_launch(p, dt, N, nullptr); });
    std::printf("%s N=%lld V=%lld: fwd %.3f ms (%.0f GB/s), bwd %.3f ms (%.0f GB/s)\n", dt_name(dt),
                static_cast<long long>(N), static_cast<long long>(C), f, bytes / f / 1e6, b, 2 * bytes / b / 1e6);
    for (void* q : {x, dx, static_cast<void*>(t), static_cast<void*>(l), static_cast<void*>(lse),
                    static_cast<void*>(g), static_cast<void*>(err)})
      dev_free(q);
  }
}
#endif

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
#ifndef LLMFAST_EMU
  if (mode == "bench") {
    bench();
    return 0;
  }
#endif
  std::mt19937 rng(0);
  int n = 0;
  for (DType dt : {DType::kFloat, DType::kHalf, DType::kBFloat16})
    for (int64_t C : {2, 37, 1000, 4104, 4099})
      for (bool weighted : {false, true})
        for (float eps : {0.f, 0.1f})
          for (bool misalign : {false, true}) {
            if (misalign && C % (16 / elem_bytes(dt)) != 0) continue;  // already the scalar path
            run_case({dt, C, weighted, eps, misalign}, rng);
            ++n;
          }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures ? 1 : 0;
}
