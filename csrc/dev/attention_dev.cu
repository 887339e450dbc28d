// Scratch program for the CUDA attention kernels (llm.c style; not part of the extension).
//
// It includes the kernels of csrc/cuda/attention.cu (without the torch binding), runs them on
// random problems, compares out / lse / dq / dk / dv with a float64 CPU reference and, on a GPU,
// times them.
//
//   GPU:       nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -Icsrc \
//                   csrc/dev/attention_dev.cu -o /tmp/attention_dev && /tmp/attention_dev [check|bench]
//   emulator:  g++ -std=c++17 -O2 -fno-strict-aliasing -Wno-unknown-pragmas -DLLMFAST_EMU -x c++ -Icsrc \
//                   -I/usr/local/cuda/include csrc/dev/attention_dev.cu -o /tmp/attention_emu && /tmp/attention_emu [quick|check]
// The emulator (csrc/dev/cuda_emu.h) runs every CUDA thread as a fiber and re-implements
// ldmatrix / mma.sync / cp.async / shuffles from the PTX ISA tables, so the kernels' index math,
// masking, pipelining and synchronisation are exercised without a GPU (slowly: small shapes).
//
// Variants: the kernels in attention.cu are the only variant so far (FA2 forward with
// single-buffered K/V cp.async prefetch; backward = delta pre-pass + dK/dV pass + separate
// deterministic dQ pass). Alternatives worth timing on a GPU later: double-buffered K in the
// forward, 128-row query tiles for D <= 64, atomic-dQ fused into the dK/dV pass. Since the band,
// softcap and sinks landed, ptxas gives the fp16/bf16 HD=64 forward 151-154 registers (3 CTAs of
// 128 threads per SM; before: 128, 4 CTAs); __launch_bounds__(NT, 4) brings it back to 128 with an
// 8-byte spill. Which is faster is for a GPU to say.
#define LLMFAST_CUDA_KERNELS_ONLY
#include "cuda/attention.cu"
#include "dev/harness.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

using namespace llmfast::cuda;

// ------------------------------------------------------------------------------------------
// A problem: shapes, flags and layout choices.
// ------------------------------------------------------------------------------------------
struct Problem {
  int B = 1, H = 2, Hkv = 2, L = 64, S = 64, D = 64, Dv = 64;
  bool causal = false;
  int mask_kind = 0;                   // 0 none, 1 bool, 2 float additive
  bool mask_bcast_b = false, mask_bcast_h = true;  // broadcast (stride 0) mask dims
  bool masked_rows = false;            // some query rows see no key at all
  double dropout_p = 0.0;
  uint64_t seed = 1234;
  int layout = 0;  // 0 contiguous [B,H,L,D]; 1 [B,L,H,D] views with padded rows; 2 misaligned base (+1 element)
  DType dt = DType::kHalf;
};

static const char* dt_name(DType d) { return d == DType::kHalf ? "fp16" : (d == DType::kBFloat16 ? "bf16" : "fp32"); }

template <typename T>
static float round_to(float x) {
  return to_float(from_float<T>(x));
}

static float round_dt(DType dt, float x) {
  if (dt == DType::kHalf) return round_to<__half>(x);
  if (dt == DType::kBFloat16) return round_to<__nv_bfloat16>(x);
  return x;
}

// A [B, H, N, E] tensor as the kernels see it: element (b, h, n, e) at base + b*sb + h*sh + n*sn + e.
struct Strided {
  int64_t sb, sh, sn, numel_alloc, offset;
};

static Strided make_layout(int layout, int B, int H, int N, int E) {
  if (layout == 1) {
    // [B, N, H, Epad] storage viewed as [B, H, N, E]: rows of a "packed" projection output.
    const int Ep = E + 8;
    return {static_cast<int64_t>(N) * H * Ep, Ep, static_cast<int64_t>(H) * Ep, static_cast<int64_t>(B) * N * H * Ep, 0};
  }
  const int64_t sn = E, sh = static_cast<int64_t>(N) * E, sb = sh * H;
  return {sb, sh, sn, sb * B + (layout == 2 ? 1 : 0), layout == 2 ? 1 : 0};
}

struct HostTensors {
  std::vector<float> q, k, v, dout, mask;  // logical [B,H,L,D] etc., already rounded to the dtype
  std::vector<uint8_t> maskb;
};

// ------------------------------------------------------------------------------------------
// float64 reference.
// ------------------------------------------------------------------------------------------
struct RefOut {
  std::vector<double> out, lse, dq, dk, dv;
};

static RefOut reference(const Problem& P, const HostTensors& X) {
  const int B = P.B, H = P.H, Hkv = P.Hkv, L = P.L, S = P.S, D = P.D, Dv = P.Dv, G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  AttnParams dp;
  set_dropout(dp, P.dropout_p, P.seed);
  RefOut r;
  r.out.assign(static_cast<size_t>(B) * H * L * Dv, 0.0);
  r.lse.assign(static_cast<size_t>(B) * H * L, 0.0);
  r.dq.assign(static_cast<size_t>(B) * H * L * D, 0.0);
  r.dk.assign(static_cast<size_t>(B) * Hkv * S * D, 0.0);
  r.dv.assign(static_cast<size_t>(B) * Hkv * S * Dv, 0.0);
  std::vector<double> x(S), pr(S), z(S), dP(S);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int hk = h / G;
      for (int i = 0; i < L; ++i) {
        const float* qi = &X.q[((static_cast<size_t>(b) * H + h) * L + i) * D];
        double mx = -INFINITY;
        for (int j = 0; j < S; ++j) {
          const float* kj = &X.k[((static_cast<size_t>(b) * Hkv + hk) * S + j) * D];
          double s = 0;
          for (int d = 0; d < D; ++d) s += static_cast<double>(qi[d]) * kj[d];
          s *= scale;
          const size_t mi = ((static_cast<size_t>(b) * H + h) * L + i) * S + j;
          if (P.causal && j > i) s = -INFINITY;
          if (P.mask_kind == 1 && !X.maskb[mi]) s = -INFINITY;
          if (P.mask_kind == 2) s += X.mask[mi];
          x[j] = s;
          mx = std::max(mx, s);
        }
        const size_t row = (static_cast<size_t>(b) * H + h) * L + i;
        if (mx == -INFINITY) {
          r.lse[row] = -INFINITY;
          continue;  // out, dq stay 0, and the row adds nothing to dk, dv
        }
        double sum = 0;
        for (int j = 0; j < S; ++j) sum += std::exp(x[j] - mx);
        const double lse = mx + std::log(sum);
        r.lse[row] = lse;
        const DropKey rk = dropout_row_key(P.seed, static_cast<uint32_t>(b * H + h), static_cast<uint32_t>(i));
        for (int j = 0; j < S; ++j) {
          pr[j] = std::exp(x[j] - lse);
          z[j] = 1.0;
          if (dp.has_dropout)
            z[j] = dropout_bits(rk, static_cast<uint32_t>(j)) >= dp.drop_threshold ? 1.0 / (1.0 - P.dropout_p) : 0.0;
        }
        const float* doi = &X.dout[row * Dv];
        for (int j = 0; j < S; ++j) {
          const float* vj = &X.v[((static_cast<size_t>(b) * Hkv + hk) * S + j) * Dv];
          double dpj = 0;
          for (int d = 0; d < Dv; ++d) {
            r.out[row * Dv + d] += z[j] * pr[j] * vj[d];
            dpj += static_cast<double>(doi[d]) * vj[d];
          }
          dP[j] = z[j] * dpj;
        }
        double delta = 0;
        for (int j = 0; j < S; ++j) delta += pr[j] * dP[j];
        for (int j = 0; j < S; ++j) {
          const double ds = pr[j] * (dP[j] - delta);
          const float* kj = &X.k[((static_cast<size_t>(b) * Hkv + hk) * S + j) * D];
          const size_t kvrow = (static_cast<size_t>(b) * Hkv + hk) * S + j;
          for (int d = 0; d < D; ++d) {
            r.dq[row * D + d] += scale * ds * kj[d];
            r.dk[kvrow * D + d] += scale * ds * qi[d];
          }
          for (int d = 0; d < Dv; ++d) r.dv[kvrow * Dv + d] += z[j] * pr[j] * doi[d];
        }
      }
    }
  return r;
}

// ------------------------------------------------------------------------------------------
// Running the kernels.
// ------------------------------------------------------------------------------------------
struct DevTensor {
  void* base = nullptr;
  Strided st{};
  size_t elt = 2;
  void* ptr() const { return static_cast<char*>(base) + st.offset * elt; }
};

template <typename T>
static DevTensor upload(const std::vector<float>& logical, int layout, int B, int H, int N, int E) {
  DevTensor t;
  t.st = make_layout(layout, B, H, N, E);
  t.elt = sizeof(T);
  std::vector<T> host(static_cast<size_t>(t.st.numel_alloc), from_float<T>(0.f));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int n = 0; n < N; ++n)
        for (int e = 0; e < E; ++e)
          host[t.st.offset + b * t.st.sb + h * t.st.sh + n * t.st.sn + e] =
              from_float<T>(logical[((static_cast<size_t>(b) * H + h) * N + n) * E + e]);
  t.base = dev_alloc(host.size() * sizeof(T));
  to_dev(t.base, host.data(), host.size() * sizeof(T));
  return t;
}

template <typename T>
static std::vector<float> download(const DevTensor& t, int B, int H, int N, int E) {
  std::vector<T> host(static_cast<size_t>(t.st.numel_alloc));
  to_host(host.data(), t.base, host.size() * sizeof(T));
  std::vector<float> out(static_cast<size_t>(B) * H * N * E);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int n = 0; n < N; ++n)
        for (int e = 0; e < E; ++e)
          out[((static_cast<size_t>(b) * H + h) * N + n) * E + e] =
              to_float(host[t.st.offset + b * t.st.sb + h * t.st.sh + n * t.st.sn + e]);
  return out;
}

struct KernelOut {
  std::vector<float> out, lse, dq, dk, dv;
};

struct Run {
  AttnParams p;
  DevTensor q, k, v, o, dout, dq, dk, dv;
  void* mask = nullptr;
  float* lse = nullptr;
  float* delta = nullptr;
};

template <typename T>
static Run setup(const Problem& P, const HostTensors& X) {
  Run R;
  AttnParams& p = R.p;
  const int B = P.B, H = P.H, Hkv = P.Hkv, L = P.L, S = P.S, D = P.D, Dv = P.Dv;
  R.q = upload<T>(X.q, P.layout, B, H, L, D);
  R.k = upload<T>(X.k, P.layout, B, Hkv, S, D);
  R.v = upload<T>(X.v, P.layout, B, Hkv, S, Dv);
  R.dout = upload<T>(X.dout, P.layout, B, H, L, Dv);
  std::vector<float> zeros_o(static_cast<size_t>(B) * H * L * Dv, 0.f);
  R.o = upload<T>(zeros_o, 0, B, H, L, Dv);
  std::vector<float> zq(static_cast<size_t>(B) * H * L * D, 0.f), zk(static_cast<size_t>(B) * Hkv * S * D, 0.f),
      zv(static_cast<size_t>(B) * Hkv * S * Dv, 0.f);
  R.dq = upload<T>(zq, 0, B, H, L, D);
  R.dk = upload<T>(zk, 0, B, Hkv, S, D);
  R.dv = upload<T>(zv, 0, B, Hkv, S, Dv);
  R.lse = static_cast<float*>(dev_alloc(sizeof(float) * B * H * L));
  R.delta = static_cast<float*>(dev_alloc(sizeof(float) * B * H * L));

  p.q = R.q.ptr(), p.k = R.k.ptr(), p.v = R.v.ptr();
  p.q_sb = R.q.st.sb, p.q_sh = R.q.st.sh, p.q_sl = R.q.st.sn;
  p.k_sb = R.k.st.sb, p.k_sh = R.k.st.sh, p.k_ss = R.k.st.sn;
  p.v_sb = R.v.st.sb, p.v_sh = R.v.st.sh, p.v_ss = R.v.st.sn;
  p.out = R.o.ptr(), p.o_sb = R.o.st.sb, p.o_sh = R.o.st.sh, p.o_sl = R.o.st.sn;
  p.dout = R.dout.ptr(), p.do_sb = R.dout.st.sb, p.do_sh = R.dout.st.sh, p.do_sl = R.dout.st.sn;
  p.dq = R.dq.ptr(), p.dq_sb = R.dq.st.sb, p.dq_sh = R.dq.st.sh, p.dq_sl = R.dq.st.sn;
  p.dk = R.dk.ptr(), p.dk_sb = R.dk.st.sb, p.dk_sh = R.dk.st.sh, p.dk_ss = R.dk.st.sn;
  p.dv = R.dv.ptr(), p.dv_sb = R.dv.st.sb, p.dv_sh = R.dv.st.sh, p.dv_ss = R.dv.st.sn;
  p.lse = R.lse;
  p.delta = R.delta;
  p.B = B, p.H = H, p.Hkv = Hkv, p.group = H / Hkv, p.L = L, p.S = S, p.D = D, p.Dv = Dv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  set_options(p, P.causal, -1, -1, false, scale, 0.0);  // plain or top-left causal
  set_dropout(p, P.dropout_p, P.seed);
  // cp.async legality, as the torch launcher decides it
  const int64_t ch = 16 / static_cast<int64_t>(sizeof(T));
  auto ok = [&](const DevTensor& t) {
    return reinterpret_cast<uintptr_t>(t.ptr()) % 16 == 0 && t.st.sb % ch == 0 && t.st.sh % ch == 0 &&
           t.st.sn % ch == 0;
  };
  p.aligned = ok(R.q) && ok(R.k) && ok(R.v) && ok(R.dout);
  if (P.mask_kind != 0) {
    // The kernels read the mask through broadcast strides; the host copy is the full [B,H,L,S].
    const int mB = P.mask_bcast_b ? 1 : B, mH = P.mask_bcast_h ? 1 : H;
    const size_t n = static_cast<size_t>(mB) * mH * L * S;
    const size_t elt = P.mask_kind == 1 ? 1 : 4;
    std::vector<char> host(n * elt);
    for (int b = 0; b < mB; ++b)
      for (int h = 0; h < mH; ++h)
        for (int i = 0; i < L; ++i)
          for (int j = 0; j < S; ++j) {
            const size_t src = ((static_cast<size_t>(b) * H + h) * L + i) * S + j;
            const size_t dst = ((static_cast<size_t>(b) * mH + h) * L + i) * S + j;
            if (P.mask_kind == 1)
              host[dst] = static_cast<char>(X.maskb[src]);
            else
              std::memcpy(&host[dst * 4], &X.mask[src], 4);
          }
    R.mask = dev_alloc(host.size());
    to_dev(R.mask, host.data(), host.size());
    p.mask = R.mask;
    p.mask_kind = P.mask_kind;
    p.m_ss = 1, p.m_sl = S, p.m_sh = P.mask_bcast_h ? 0 : static_cast<int64_t>(L) * S;
    p.m_sb = P.mask_bcast_b ? 0 : static_cast<int64_t>(mH) * L * S;
  }
  return R;
}

static void teardown(Run& R) {
  for (DevTensor* t : {&R.q, &R.k, &R.v, &R.o, &R.dout, &R.dq, &R.dk, &R.dv}) dev_free(t->base);
  dev_free(R.lse);
  dev_free(R.delta);
  if (R.mask) dev_free(R.mask);
}

static void run_fwd(const Run& R, DType dt) { check(attention_fwd_launch(R.p, dt, nullptr), "fwd launch"); }
static void run_bwd(const Run& R, DType dt) {
  check(attention_bwd_delta_launch(R.p, dt, nullptr), "delta launch");
  check(attention_bwd_dkdv_launch(R.p, dt, nullptr), "dkdv launch");
  check(attention_bwd_dq_launch(R.p, dt, nullptr), "dq launch");
}

template <typename T>
static KernelOut run_kernels(const Problem& P, const HostTensors& X) {
  Run R = setup<T>(P, X);
  run_fwd(R, P.dt);
#ifndef LLMFAST_EMU
  check(cudaGetLastError(), "fwd kernel");
#endif
  dev_sync();
  run_bwd(R, P.dt);
#ifndef LLMFAST_EMU
  check(cudaGetLastError(), "bwd kernels");
#endif
  dev_sync();
  KernelOut o;
  const int B = P.B, H = P.H, Hkv = P.Hkv, L = P.L, S = P.S, D = P.D, Dv = P.Dv;
  o.out = download<T>(R.o, B, H, L, Dv);
  o.lse.resize(static_cast<size_t>(B) * H * L);
  to_host(o.lse.data(), R.lse, o.lse.size() * 4);
  o.dq = download<T>(R.dq, B, H, L, D);
  o.dk = download<T>(R.dk, B, Hkv, S, D);
  o.dv = download<T>(R.dv, B, Hkv, S, Dv);
  teardown(R);
  return o;
}

// ------------------------------------------------------------------------------------------
// Inputs and comparison.
// ------------------------------------------------------------------------------------------
static HostTensors make_inputs(const Problem& P) {
  std::mt19937 rng(static_cast<uint32_t>(P.L * 131 + P.S * 7 + P.D + P.Dv * 3 + P.H + P.causal + P.mask_kind * 17));
  std::normal_distribution<float> nd(0.f, 1.f);
  HostTensors X;
  auto fill = [&](std::vector<float>& t, size_t n, float s) {
    t.resize(n);
    for (auto& x : t) x = round_dt(P.dt, s * nd(rng));
  };
  const size_t B = P.B, H = P.H, Hkv = P.Hkv, L = P.L, S = P.S;
  // q scaled up a little so the softmax is not flat
  fill(X.q, B * H * L * P.D, 1.5f);
  fill(X.k, B * Hkv * S * P.D, 1.f);
  fill(X.v, B * Hkv * S * P.Dv, 1.f);
  fill(X.dout, B * H * L * P.Dv, 1.f);
  if (P.mask_kind != 0) {
    const size_t n = B * H * L * S;
    X.maskb.assign(n, 1);
    X.mask.assign(n, 0.f);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    const int mB = P.mask_bcast_b ? 1 : P.B, mH = P.mask_bcast_h ? 1 : P.H;
    std::vector<uint8_t> mb(static_cast<size_t>(mB) * mH * L * S);
    std::vector<float> mf(mb.size());
    for (size_t e = 0; e < mb.size(); ++e) {
      const bool keep = u(rng) > 0.3f;
      mb[e] = keep;
      mf[e] = keep ? round_dt(DType::kFloat, u(rng) * 2.f - 1.f) : -INFINITY;
    }
    if (P.masked_rows) {
      for (int b = 0; b < mB; ++b)
        for (int h = 0; h < mH; ++h)
          for (size_t i = 0; i < L; i += 3)  // every third row sees nothing
            for (size_t j = 0; j < S; ++j) {
              const size_t e = ((static_cast<size_t>(b) * mH + h) * L + i) * S + j;
              mb[e] = 0;
              mf[e] = -INFINITY;
            }
    }
    for (int b = 0; b < P.B; ++b)
      for (int h = 0; h < P.H; ++h)
        for (size_t i = 0; i < L; ++i)
          for (size_t j = 0; j < S; ++j) {
            const size_t dst = ((static_cast<size_t>(b) * P.H + h) * L + i) * S + j;
            const size_t src = ((static_cast<size_t>(P.mask_bcast_b ? 0 : b) * mH + (P.mask_bcast_h ? 0 : h)) * L + i) * S + j;
            X.maskb[dst] = mb[src];
            X.mask[dst] = mf[src];
          }
  }
  return X;
}

// max |a - ref| / max(1, max |ref|): indexing bugs give O(1), rounding gives ~dtype epsilon.
static double rel_err(const std::vector<float>& a, const std::vector<double>& ref, bool* nan) {
  double m = 0, mr = 1;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) *nan = true;
    m = std::max(m, std::fabs(a[i] - ref[i]));
    mr = std::max(mr, std::fabs(ref[i]));
  }
  return m / mr;
}

static double lse_err(const std::vector<float>& a, const std::vector<double>& ref, bool* bad) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(ref[i]) || std::isinf(a[i])) {
      if (!(std::isinf(ref[i]) && std::isinf(a[i]) && a[i] < 0)) *bad = true;
      continue;
    }
    if (std::isnan(a[i])) *bad = true;
    m = std::max(m, std::fabs(a[i] - ref[i]));
  }
  return m;
}

static bool run_case(const Problem& P) {
  const HostTensors X = make_inputs(P);
  const auto t0 = std::chrono::steady_clock::now();
  KernelOut o = P.dt == DType::kHalf       ? run_kernels<__half>(P, X)
                : P.dt == DType::kBFloat16 ? run_kernels<__nv_bfloat16>(P, X)
                                           : run_kernels<float>(P, X);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const RefOut r = reference(P, X);
  bool nan = false, lse_bad = false;
  const double e_out = rel_err(o.out, r.out, &nan), e_dq = rel_err(o.dq, r.dq, &nan), e_dk = rel_err(o.dk, r.dk, &nan),
               e_dv = rel_err(o.dv, r.dv, &nan), e_lse = lse_err(o.lse, r.lse, &lse_bad);
  // Rounding budget: inputs are exact in the dtype; P (and dS) are rounded to it before the
  // second GEMM on tensor cores, outputs are rounded once.
  const double tol = P.dt == DType::kFloat ? 2e-5 : (P.dt == DType::kHalf ? 1e-2 : 6e-2);
  const bool ok = !nan && !lse_bad && e_out < tol && e_dq < tol && e_dk < tol && e_dv < tol && e_lse < tol * 10;
  std::printf("%s %s B%d H%d/%d L%-4d S%-4d D%-3d Dv%-3d causal=%d mask=%d%s drop=%.2f layout=%d | out %.2e lse %.2e "
              "dq %.2e dk %.2e dv %.2e%s | %.1fs\n",
              ok ? "PASS" : "FAIL", dt_name(P.dt), P.B, P.H, P.Hkv, P.L, P.S, P.D, P.Dv, P.causal, P.mask_kind,
              P.masked_rows ? "+rows" : "", P.dropout_p, P.layout, e_out, e_lse, e_dq, e_dk, e_dv,
              nan ? " NaN!" : (lse_bad ? " lse-inf-mismatch!" : ""), secs);
  std::fflush(stdout);
  return ok;
}

// Dropout sanity: the keep fraction of the hash is 1 - p and the bits look uniform per column.
static bool check_dropout_hash() {
  AttnParams p;
  set_dropout(p, 0.3, 42);
  int64_t kept = 0, n = 0;
  for (uint32_t bh = 0; bh < 4; ++bh)
    for (uint32_t i = 0; i < 256; ++i) {
      const DropKey rk = dropout_row_key(42, bh, i);
      for (uint32_t j = 0; j < 256; ++j, ++n) kept += dropout_bits(rk, j) >= p.drop_threshold;
    }
  const double frac = static_cast<double>(kept) / n;
  const bool ok = std::fabs(frac - 0.7) < 0.005;
  std::printf("%s dropout hash keep fraction %.4f (expect 0.7000)\n", ok ? "PASS" : "FAIL", frac);
  return ok;
}

static std::vector<Problem> cases(bool quick) {
  std::vector<Problem> v;
  auto add = [&](Problem p) { v.push_back(p); };
  const DType dts[] = {DType::kHalf, DType::kBFloat16, DType::kFloat};
  for (DType dt : dts) {
    Problem p;
    p.dt = dt;
    // head-dim buckets, ragged lengths, L != S
    const int lsd[4][3] = {{1, 1, 64}, {1, 129, 40}, {113, 203, 80}, {70, 45, 256}};
    for (const auto& c : lsd) {
      p.L = c[0], p.S = c[1], p.D = p.Dv = c[2];
      for (int causal = 0; causal < 2; ++causal) {
        p.causal = causal;
        add(p);
        if (quick) break;
      }
    }
    if (quick) continue;
    p = Problem{};
    p.dt = dt;
    // GQA 4:2 with D != Dv, causal
    p.H = 4, p.Hkv = 2, p.L = 77, p.S = 130, p.D = 96, p.Dv = 40, p.causal = true;
    add(p);
    p.H = 4, p.Hkv = 1, p.L = 64, p.S = 64, p.D = 16, p.Dv = 16, p.causal = false;
    add(p);
    // masks: bool with fully masked rows, float broadcast over batch as well
    p = Problem{};
    p.dt = dt;
    p.B = 2, p.L = 50, p.S = 70, p.D = p.Dv = 64, p.mask_kind = 1, p.masked_rows = true;
    add(p);
    p.mask_kind = 2, p.mask_bcast_b = true, p.mask_bcast_h = false, p.causal = true;
    add(p);
    // per-head mask under GQA: the dK/dV pass must read the mask of the query head
    p.H = 4, p.Hkv = 2, p.B = 1, p.mask_kind = 1, p.mask_bcast_b = false, p.causal = false, p.D = p.Dv = 128;
    add(p);
    // several query and key tiles in every bucket
    p = Problem{};
    p.dt = dt;
    p.B = 2, p.H = 8, p.Hkv = 2, p.L = 150, p.S = 140, p.D = p.Dv = 256, p.causal = true;
    add(p);
    p.H = 2, p.Hkv = 2, p.L = 200, p.S = 260, p.D = p.Dv = 128, p.causal = false;
    add(p);
    // strided views / misaligned base (plain-load fallback), odd head dim
    p = Problem{};
    p.dt = dt;
    p.L = 67, p.S = 90, p.D = p.Dv = 72, p.layout = 1;
    add(p);
    p.layout = 2, p.D = p.Dv = 33, p.causal = true;
    add(p);
    // dropout, with and without causal
    p = Problem{};
    p.dt = dt;
    p.L = 80, p.S = 100, p.D = p.Dv = 64, p.dropout_p = 0.25;
    add(p);
    p.causal = true, p.D = p.Dv = 160, p.dropout_p = 0.5, p.H = 2, p.Hkv = 1;
    add(p);
  }
  return v;
}

// ------------------------------------------------------------------------------------------
// Timing (GPU only): median of cudaEvent timings; standard FLOP counts (fwd 4*B*H*L*S*D, halved
// for causal; bwd 2.5x fwd).
// ------------------------------------------------------------------------------------------
#ifndef LLMFAST_EMU
static void bench() {
  struct Shape {
    int B, H, L, D;
    bool causal;
    DType dt;
  };
  const Shape shapes[] = {{4, 16, 2048, 64, false, DType::kHalf},   {4, 16, 2048, 64, true, DType::kHalf},
                          {4, 16, 2048, 128, false, DType::kHalf},  {4, 16, 2048, 128, true, DType::kBFloat16},
                          {2, 16, 2048, 256, false, DType::kHalf},  {1, 8, 2048, 64, false, DType::kFloat},
                          {1, 8, 2048, 64, true, DType::kFloat}};
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (const Shape& s : shapes) {
    Problem P;
    P.B = s.B, P.H = P.Hkv = s.H, P.L = P.S = s.L, P.D = P.Dv = s.D, P.causal = s.causal, P.dt = s.dt;
    HostTensors X = make_inputs(P);
    Run R = s.dt == DType::kHalf       ? setup<__half>(P, X)
            : s.dt == DType::kBFloat16 ? setup<__nv_bfloat16>(P, X)
                                       : setup<float>(P, X);
    auto time = [&](auto fn) {
      std::vector<float> ms;
      for (int it = 0; it < 13; ++it) {
        cudaEventRecord(e0);
        fn();
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float t;
        cudaEventElapsedTime(&t, e0, e1);
        if (it >= 3) ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      return ms[ms.size() / 2];
    };
    const double flops = 4.0 * s.B * s.H * static_cast<double>(s.L) * s.L * s.D * (s.causal ? 0.5 : 1.0);
    const float tf = time([&] { run_fwd(R, s.dt); });
    const float tb = time([&] { run_bwd(R, s.dt); });
    check(cudaGetLastError(), "bench");
    std::printf("%s B%d H%d L=S=%d D%d causal=%d | fwd %.3f ms %.1f TFLOP/s | bwd %.3f ms %.1f TFLOP/s\n",
                dt_name(s.dt), s.B, s.H, s.L, s.D, s.causal, tf, flops / tf * 1e-9, tb, 2.5 * flops / tb * 1e-9);
    teardown(R);
  }
}
#endif

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "bench") {
#ifdef LLMFAST_EMU
    std::printf("bench needs a GPU build\n");
    return 0;
#else
    bench();
    return 0;
#endif
  }
  // optional second argument: skip cases with more than this many B*H*L*S*max(D,Dv) MACs
  // (keeps sanitizer runs of the emulator short)
  const double max_work = argc > 2 ? std::atof(argv[2]) : 1e300;
  bool ok = check_dropout_hash();
  int fails = 0, n = 0;
  for (const Problem& P : cases(mode == "quick")) {
    if (static_cast<double>(P.B) * P.H * P.L * P.S * std::max(P.D, P.Dv) > max_work) continue;
    ++n;
    if (!run_case(P)) ++fails;
  }
  std::printf("%d/%d cases passed\n", n - fails, n);
  return (ok && fails == 0) ? 0 : 1;
}
