// Fused attention on the CPU, FlashAttention-2 style: out = softmax(q kᵀ·scale + mask) v
// computed one [BM, BN] tile of scores at a time with an online softmax, so the L×S
// score matrix never exists; extra memory is O((L + S)·D) (packed, transposed copies
// of k and v, and fp32 copies of fp16/bf16 inputs) plus O(BM·BN) per thread.
//
//   q: [B, H, L, D]   k: [B, Hkv, S, D]   v: [B, Hkv, S, Dv]   (last dim contiguous,
//   other strides free, e.g. views of a packed [B, L, 3, H, D] tensor); query head h
//   reads kv head h / (H / Hkv) (GQA). mask: bool (True = attend) or fp32 (additive)
//   viewed as [B, H, L, S] with any strides. out: [B, H, L, Dv] contiguous; lse:
//   [B, H, L] fp32, -inf for a row that sees no key (its out and gradients are 0).
//
// All math is fp32 (fp16/bf16 inputs are converted once); every matrix product runs
// through one register-blocked micro-kernel, C[M, N] (+)= A[M, K]·B[K, N], which
// broadcasts A elements (so A may be read transposed for free) and streams B rows
// with full-width vector loads. Tiles are arranged so that B is always row-major:
//   forward   S = (Q·scale)·Kᵀ  (A = the task's q tile, packed as fp32 × scale;
//                                 B = kᵀ, packed once per kv block as [D, BN])
//             O += P·V          (B = v rows)
//   backward  S = Q·Kᵀ, dP = dO·Vᵀ (B = packed kᵀ, vᵀ), dS = P∘(dP − Δ),
//             dV += Pᵀ·dO, dK += dSᵀ·Q (A read transposed), dQ += dS·K
// with Q pre-multiplied by the softmax scale once (so S, and dK, come out scaled).
//
// Banding (causal, bottom-right causal, sliding window): query i sees the keys of one
// interval [lo(i), hi(i)), both ends non-decreasing in i (Band below). Each [BM, BN] tile
// sees the intersection of that interval with its block, and tiles wholly outside the
// band are never computed: a window of W keys costs O(L·W), not O(L·S). softcap c > 0
// replaces each scaled score s by c·tanh(s/c) (before the mask); its backward multiplies
// dS by 1 - tanh². sinks [H] join each row's softmax denominator: lse includes exp(sink)
// and dsink_h = -Σ_{b,i} exp(sink_h - lse)·Δ, Δ_i = Σ_j P_ij·dP_ij = dO_i·O_i.
//
// Dropout (dropout_p > 0) is fused: element (b, h, i, j) is kept iff word 0 of
// Philox4x32-10 with counter (j, i, b·H + h, 0) and key (seed lo, seed hi) is
// >= floor(p·2^32) — the same draw as the Triton kernel and llmfast.reference —
// so backward regenerates the forward's mask from the seed.
#include <ATen/Parallel.h>

#include <atomic>
#include <torch/library.h>

#include "checks.h"
#include "cpu/row.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;
using Vec = Vectorized<float>;
constexpr int64_t VL = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------
// GEMM micro-kernel

// Register tile: MR rows × NV vectors of accumulators. AVX-512 has 32 zmm: 6×4 = 24
// accumulators + 4 B vectors + 1 broadcast. AVX2 has 16 ymm: 6×2 = 12 + 2 + 1.
constexpr int MR = 6;
constexpr int NV = VL >= 16 ? 4 : 2;

// C[MR_, NV_·VL] (+)= A[MR_, K]·B[K, NV_·VL]; A[m][k] = A[TA ? k·lda + m : m·lda + k].
// TAIL: the last vector holds only `last` valid columns (masked loads/stores).
template <int MR_, int NV_, bool TAIL, bool ACC, bool TA>
void micro(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
           float* __restrict C, int64_t ldc, int64_t last) {
  Vec acc[MR_][NV_];
#pragma GCC unroll 8
  for (int m = 0; m < MR_; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV_; ++v) {
      if constexpr (ACC) {
        acc[m][v] = (TAIL && v == NV_ - 1) ? Vec::loadu(C + m * ldc + v * VL, last) : Vec::loadu(C + m * ldc + v * VL);
      } else {
        acc[m][v] = Vec(0.f);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    Vec bv[NV_];
#pragma GCC unroll 4
    for (int v = 0; v < NV_; ++v) bv[v] = (TAIL && v == NV_ - 1) ? Vec::loadu(b + v * VL, last) : Vec::loadu(b + v * VL);
#pragma GCC unroll 8
    for (int m = 0; m < MR_; ++m) {
      const Vec a(TA ? A[k * lda + m] : A[m * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV_; ++v) acc[m][v] = at::vec::fmadd(a, bv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR_; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV_; ++v) {
      if (TAIL && v == NV_ - 1) {
        acc[m][v].store(C + m * ldc + v * VL, last);
      } else {
        acc[m][v].store(C + m * ldc + v * VL);
      }
    }
  }
}

using MicroFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

// acc[0, n) += tile[0, n). Accumulating a long sum (O over S keys, dK/dV over L queries,
// dQ over S keys) as gemm<true> calls continues one FMA chain per element through every
// block, and chain rounding grows with the chain's length: the fp32 output was 3.4x
// torch's error (non-causal, L = S = 4096, D = 64) and dK/dV 5.5x (causal). A fresh
// product per block, added here, makes it a two-level sum (block length + block count),
// as torch's BLAS does, for one [block, D] add per block product: within the noise of a
// loaded 2-core VM (fp32 [1, 4, 2048, 64], 1 thread, cpu time: forward 50-51 -> 48-52 ms,
// forward+backward 175-180 -> 171-196 ms).
inline void add_block(float* acc, const float* tile, int64_t n) {
  at::vec::map2([](Vec a, Vec b) { return a + b; }, acc, acc, tile, n);
}

template <bool ACC, bool TA>
struct MicroTable {
  MicroFn fn[MR + 1][NV + 1][2] = {};
  template <int M, int N>
  void fill_one() {
    fn[M][N][0] = &micro<M, N, false, ACC, TA>;
    fn[M][N][1] = &micro<M, N, true, ACC, TA>;
  }
  template <int M, int... Ns>
  void fill_row(std::integer_sequence<int, Ns...>) {
    (fill_one<M, Ns + 1>(), ...);
  }
  template <int... Ms>
  void fill(std::integer_sequence<int, Ms...>) {
    (fill_row<Ms + 1>(std::make_integer_sequence<int, NV>{}), ...);
  }
  MicroTable() { fill(std::make_integer_sequence<int, MR>{}); }
};

// C[M, N] (+)= A[M, K]·B[K, N] (row-major, leading dims lda/ldb/ldc; A transposed
// when TA). N runs in panels of NV vectors outermost so one B panel (K × 64 floats)
// stays in L1 while every MR-row strip of A passes over it.
template <bool ACC, bool TA = false>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc) {
  static const MicroTable<ACC, TA> table;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if constexpr (!ACC) {
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
    }
    return;
  }
  constexpr int64_t NP = NV * VL;
  for (int64_t n0 = 0; n0 < N; n0 += NP) {
    const int64_t nb = std::min(NP, N - n0);
    const int64_t nv = (nb + VL - 1) / VL;
    const int64_t last = nb - (nv - 1) * VL;
    const int tail = last != VL;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int64_t mb = std::min<int64_t>(MR, M - m0);
      const float* a = TA ? A + m0 : A + m0 * lda;
      table.fn[mb][nv][tail](K, a, lda, B + n0, ldb, C + m0 * ldc + n0, ldc, last);
    }
  }
}

// ---------------------------------------------------------------------------------
// Dropout: Philox4x32-10 (Salmon et al. 2011), word 0 of counter (j, i, bh, 0).

inline uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint64_t seed) {
  uint32_t c3 = 0, k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

struct Dropout {
  bool on = false;
  uint32_t threshold = 0;  // drop iff draw < threshold = floor(p·2^32)
  float keep_scale = 1.f;  // 1 / (1 - p)
  uint64_t seed = 0;
  // z[j] = keep(b·H + h, i, j0 + j) ? keep_scale : 0 for j < n
  void factors(float* z, int64_t n, int64_t bh, int64_t i, int64_t j0) const {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t r = philox_word0(static_cast<uint32_t>(j0 + j), static_cast<uint32_t>(i), static_cast<uint32_t>(bh), seed);
      z[j] = r >= threshold ? keep_scale : 0.f;
    }
  }
};

Dropout make_dropout(double p, int64_t seed) {
  Dropout d;
  if (p > 0) {
    TORCH_CHECK(p < 1, "llmfast::attention: dropout_p must be < 1 (the caller handles p = 1), got ", p);
    d.on = true;
    d.threshold = static_cast<uint32_t>(std::min<double>(std::floor(p * 4294967296.0), 4294967295.0));
    d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
    d.seed = static_cast<uint64_t>(seed);
  }
  return d;
}

// ---------------------------------------------------------------------------------
// Problem description

// An fp32 [B, Hx, N, E] view with a contiguous last dim.
struct View {
  const float* ptr = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
  const float* at(int64_t b, int64_t h, int64_t n) const { return ptr + b * sb + h * sh + n * sn; }
};

View view_of(const Tensor& t) { return {t.const_data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

// fp32 with a contiguous last dim: the tensor itself when it already is, else a copy.
Tensor as_f32(const Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.stride(-1) == 1) return t;
  return t.to(at::kFloat).contiguous();
}

// q·scale in fp32, contiguous [B, H, L, D]: the score GEMM then yields scaled scores
// directly (no pass over each score tile), and in backward dK = dSᵀ·(q·scale) needs no
// extra scaling either. One O(L·D) copy, made in parallel by ATen.
Tensor scaled_f32(const Tensor& q, double scale) {
  Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  out.copy_(q);
  out.mul_(scale);
  return out;
}

// Varlen (flash_attn_varlen_func): packed segments, the queries [cu_q[s], cu_q[s+1]) of
// segment s against the keys [cu_k[s], cu_k[s+1]), each pair bottom-right aligned (FA2).
// In packed coordinates that is the band rule below with off = cu_k[s+1] - cu_q[s+1] (the
// segment's last query lines up with its last key) and every interval clamped to the
// segment's keys; rows past cu_q[-1] see no key. Both ends stay non-decreasing across
// segments (each is clamped to its segment, and segments follow one another), so one
// [1, H, total, D] problem runs every segment with the tiling unchanged, and the tiles
// outside every segment's block (most of the total² square) are skipped.
struct Segments {
  int64_t n = 0;                    // segments; row index n stands for "past cu_q[-1]"
  std::vector<int32_t> of_row;      // [L]: each query row's segment
  std::vector<int64_t> k0, k1, off; // [n + 1]: the keys [k0, k1) and off of each segment (entry n: no key)
};

// The visible interval of each query row (FlashAttention 2's rule, llmfast.reference.band_keep):
// with off = S - L when bottom-right aligned (else 0), key j is visible to query i iff
// i + off - left <= j (left >= 0) and j <= i + off + right, right = 0 for causal, and
// unbounded (-1) sides drop out; within a varlen segment (Segments above) the same with
// the segment's off, clamped to its keys.
struct Band {
  int64_t S = 0, off = 0, left = -1, right = -1;  // right: -1 = unbounded
  const Segments* seg = nullptr;                  // varlen, else one segment [0, S)
  // (k0, k1, off) of row i's segment
  std::tuple<int64_t, int64_t, int64_t> keys(int64_t i) const {
    if (!seg) return {0, S, off};
    const int32_t s = seg->of_row[i];
    return {seg->k0[s], seg->k1[s], seg->off[s]};
  }
  int64_t lo(int64_t i) const {
    const auto [k0, k1, o] = keys(i);
    return left >= 0 ? std::clamp<int64_t>(i + o - left, k0, k1) : k0;
  }
  int64_t hi(int64_t i) const {
    const auto [k0, k1, o] = keys(i);
    return right >= 0 ? std::clamp<int64_t>(i + o + right + 1, k0, k1) : k1;
  }
  // False for a varlen row past cu_q[-1]: no segment, so no sink either (its lse is -inf)
  bool seated(int64_t i) const { return !seg || seg->of_row[i] < seg->n; }
  // The visible part [a, b) of block [j0, j0 + nb) for row i, relative to j0 (a == b: none).
  std::pair<int64_t, int64_t> span(int64_t i, int64_t j0, int64_t nb) const {
    const int64_t a = std::clamp<int64_t>(lo(i) - j0, 0, nb), b = std::clamp<int64_t>(hi(i) - j0, 0, nb);
    return {a, std::max(a, b)};
  }
  // Rows [first, last) that see some key of block [j0, j0 + nb), within [0, L).
  std::pair<int64_t, int64_t> rows(int64_t j0, int64_t nb, int64_t L) const {
    if (seg) {  // lo and hi are non-decreasing in i: the first row with hi > j0, the first with lo >= j0 + nb
      const auto first_where = [L](const auto& pred) {
        int64_t a = 0, b = L;
        while (a < b) {
          const int64_t m = a + (b - a) / 2;
          if (pred(m)) b = m; else a = m + 1;
        }
        return a;
      };
      const int64_t first = first_where([&](int64_t i) { return hi(i) > j0; });
      const int64_t last = first_where([&](int64_t i) { return lo(i) >= j0 + nb; });
      return {first, std::max(first, last)};
    }
    const int64_t first = right >= 0 ? std::clamp<int64_t>(j0 - off - right, 0, L) : 0;
    const int64_t last = left >= 0 ? std::clamp<int64_t>(j0 + nb - off + left, 0, L) : L;
    return {first, std::max(first, last)};
  }
};

struct Problem {
  int64_t B, H, Hkv, G, L, S, D, Dv;
  float scale;
  bool causal;
  Band band;
  float softcap;         // 0 = off
  const float* sinks;    // [H] fp32, or nullptr
  std::optional<MaskView> mask;
  Dropout drop;
};

// tanh(x) = 1 - 2 / (exp(2x) + 1) on one exp_u20 (the forward's own exp) and a division:
// Sleef's tanh (Vectorized::tanh) made a softcap forward+backward ~1.4x plain attention's
// time; this 1.05x (fp32, D = 64, S = 2048, llmfast bench on a loaded 2-core machine).
// exp_u20 clamps its argument, so |x| >> 1 gives exactly ±1 (no inf/inf). Its absolute
// error, ~1e-7 near 0 (cancellation in 1 - 2/(e + 1)), is that of the fp32 score itself
// once multiplied by c.
inline Vec fast_tanh(Vec x) { return Vec(1.f) - Vec(2.f) / ((x + x).exp_u20() + Vec(1.f)); }

// z[0, n) = c·tanh(z/c) in place (c = softcap > 0); g[0, n) = 1 - tanh² when g is given
// (the backward's chain factor). tanh saturates, so no score overflows.
inline void cap_scores(float* z, float* g, int64_t n, float c) {
  const float inv = 1.f / c;
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    const Vec t = fast_tanh(Vec::loadu(z + j) * Vec(inv));
    (t * Vec(c)).store(z + j);
    if (g) (Vec(1.f) - t * t).store(g + j);
  }
  if (j < n) {
    const Vec t = fast_tanh(Vec::loadu(z + j, n - j) * Vec(inv));
    (t * Vec(c)).store(z + j, n - j);
    if (g) (Vec(1.f) - t * t).store(g + j, n - j);
  }
}

// Block sizes, measured on Zen 4 (fp32, D = 64, L = S = 2048; tiles from 32×512 to
// 128×128 are within ~5% of each other). Forward: BM = 64 query rows per task (B·H·L/64
// tasks to spread over threads) × BN = 256 keys per score tile (64 KiB, in L2), which
// halves the per-tile softmax bookkeeping of BN = 128. Backward: 64 × 64 tiles keep
// the two [BM, BN] fp32 tiles (P, dS) and the dK/dV accumulators in L1/L2.
constexpr int64_t BM = 64;
constexpr int64_t BN = 256;
constexpr int64_t BM_BWD = 64;
constexpr int64_t BN_BWD = 64;
// (b, kv head, dQ chunk) tasks the backward aims for when B·Hkv is small (bwd_impl): 8
// keep 4 threads busy twice over (8 once) for at most 8 fp32 dQ partial slices; more
// threads than tasks only help when B·Hkv alone exceeds 8.
constexpr int64_t kDqTasks = 8;
// Keys per forward tile: BN, or BN_WINDOW under a sliding window. A BM-row tile sees
// W + BM - 1 keys of a window of W; the BN-aligned blocks that cover them hold up to
// W + BM - 1 + 2·(BN - 1) keys: with BN = 256 about 2x the visible ones at W = 512, with
// 64 about 1.25x. Measured (fp32, D = 64, W = 512, S = 8192, 2 threads, a shared machine):
// BN = 64 and 128 both ~34 ms per forward, BN = 256 ~2x slower (73 ms).
constexpr int64_t BN_WINDOW = 64;

inline int64_t fwd_block_n(const Problem& P) { return P.band.left >= 0 ? BN_WINDOW : BN; }

// Key blocks of at most bn keys: block t is keys [start(t), end(t)). A fixed grid from key 0,
// or, for varlen, a grid that restarts at each segment's first key (then at the keys past
// cu_k[-1]), so that no block holds keys of two segments: on the fixed grid a tile's first
// block began up to bn - 1 keys before its segment, computed for nothing (BN = 256 against
// ~1100-key segments: ~12% of a non-causal forward's CPU time, more under causal).
struct Blocks {
  int64_t bn = 0, n = 0, S = 0;
  std::vector<int64_t> starts;  // varlen: [n + 1], the block starts then S; empty: the fixed grid
  int64_t start(int64_t t) const { return starts.empty() ? t * bn : starts[t]; }
  int64_t end(int64_t t) const { return starts.empty() ? std::min(S, (t + 1) * bn) : starts[t + 1]; }
  // the block holding key j; n for j = S
  int64_t of_key(int64_t j) const {
    if (starts.empty()) return j / bn;
    return std::upper_bound(starts.begin(), starts.end(), j) - starts.begin() - 1;
  }
};

Blocks blocks_of(const Problem& P, int64_t bn) {
  Blocks bl;
  bl.bn = bn;
  bl.S = P.S;
  if (!P.band.seg) {
    bl.n = (P.S + bn - 1) / bn;
    return bl;
  }
  const Segments& g = *P.band.seg;
  for (int64_t s = 0; s <= g.n; ++s) {  // entry g.n: the keys past cu_k[-1] (never visible; their dK, dV are 0)
    const int64_t k0 = g.k0[s], k1 = s < g.n ? g.k1[s] : P.S;
    for (int64_t j = k0; j < k1; j += bn) bl.starts.push_back(j);
  }
  bl.n = static_cast<int64_t>(bl.starts.size());
  bl.starts.push_back(P.S);
  return bl;
}

// Pack x [B, Hkv, S, E] (rows) into fp32 blocks xt [B·Hkv, nblk, E, bn]: block t holds
// x[.., start(t) : end(t), :]ᵀ, zero padded. Blocks keep B-panel rows 4·bn bytes apart
// (a row stride of 4·S bytes would map all E rows to a few L1 sets when S = 2^k).
template <typename scalar_t>
Tensor pack_transposed(const Tensor& x, const Blocks& bl) {
  const int64_t B = x.size(0), Hx = x.size(1), E = x.size(3);
  const int64_t nblk = bl.n, bn = bl.bn;
  Tensor out = at::empty({B * Hx, nblk, E, bn}, x.options().dtype(at::kFloat));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), ss = x.stride(2);
  at::parallel_for(0, B * Hx * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk, bh = t / nblk, b = bh / Hx, h = bh % Hx;
      const int64_t n0 = bl.start(blk), nb = bl.end(blk) - n0;
      float* dst = op + t * E * bn;
      const scalar_t* src = xp + b * sb + h * sh + n0 * ss;
      for (int64_t e = 0; e < E; ++e) {
        float* d = dst + e * bn;
        for (int64_t n = 0; n < nb; ++n) d[n] = static_cast<float>(src[n * ss + e]);
        std::fill(d + nb, d + bn, 0.f);
      }
    }
  });
  return out;
}

// Run `worker(next)` once on each at::parallel_for thread; next() hands out task ids
// 0 .. n-1 one at a time from a shared counter (-1 when none are left). Unlike
// parallel_for's static split into n/threads chunks, a thread that is descheduled (a
// shared machine) or draws the expensive causal tiles delays only its current task.
// Every task writes its own outputs, so results do not depend on who ran which task.
template <typename Worker>
void parallel_tasks(int64_t n, const Worker& worker) {
  if (n <= 0) return;
  std::atomic<int64_t> counter{0};
  const auto next = [&counter, n]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

// ---------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void fwd_impl(const Problem& P, const Tensor& q, const Tensor& kT, const View& v, Tensor& out, Tensor& lse,
              const Blocks& bl) {
  const int64_t B = P.B, H = P.H, L = P.L, D = P.D, Dv = P.Dv, bn = bl.bn;
  const int64_t nmt = (L + BM - 1) / BM, nblk = bl.n;
  const float* ktp = kT.const_data_ptr<float>();
  scalar_t* outp = out.mutable_data_ptr<scalar_t>();
  float* lsep = lse.mutable_data_ptr<float>();
  const scalar_t* qptr = q.const_data_ptr<scalar_t>();
  const int64_t sqb = q.stride(0), sqh = q.stride(1), sql = q.stride(2);
  constexpr bool direct = std::is_same_v<scalar_t, float>;  // accumulate straight into out

  const int64_t BH = B * H;
  parallel_tasks(BH * nmt, [&](const auto& next) {
    std::vector<float> qbuf(BM * D), sbuf(BM * bn), obuf(direct ? 0 : BM * Dv), pvbuf(BM * Dv), mrow(BM), lrow(BM),
        zdrop(P.drop.on ? bn : 0);
    for (int64_t t; (t = next()) >= 0;) {
      // causal (no left bound): the costliest query tiles (they see the most keys) go first,
      // so the tasks left at the end are short; otherwise neighbouring tasks share a kv head
      const bool triangle = P.band.right >= 0 && P.band.left < 0;  // later rows see more keys
      const int64_t bh = triangle ? t % BH : t / nmt;
      const int64_t mt = triangle ? nmt - 1 - t / BH : t % nmt;
      const int64_t b = bh / H, h = bh % H, hk = h / P.G;
      const int64_t i0 = mt * BM, mb = std::min(BM, L - i0);
      // q tile [mb, D] as fp32 times the softmax scale: the score GEMM then yields scaled
      // scores, and the A panel is contiguous whatever q's strides (packed QKV views)
      for (int64_t r = 0; r < mb; ++r) {
        const scalar_t* src = qptr + b * sqb + h * sqh + (i0 + r) * sql;
        float* dst = qbuf.data() + r * D;
        if constexpr (direct) {
          std::copy(src, src + D, dst);
        } else {
          at::vec::convert(src, dst, D);
        }
        const float sc = P.scale;
        at::vec::map([sc](Vec x) { return x * Vec(sc); }, dst, dst, D);
      }
      const float* qp = qbuf.data();
      float* O;
      if constexpr (direct) {
        O = outp + (bh * L + i0) * Dv;
      } else {
        O = obuf.data();
      }
      std::fill(mrow.begin(), mrow.end(), kNegInf);
      std::fill(lrow.begin(), lrow.end(), 0.f);
      // the tile's rows see keys [lo(i0), hi(i0 + mb - 1)) at most: blocks outside are skipped
      const int64_t s_end = mb > 0 ? P.band.hi(i0 + mb - 1) : 0;
      bool first = true;
      for (int64_t t = bl.of_key(P.band.lo(i0)); t < nblk && bl.start(t) < s_end; ++t) {
        const int64_t j0 = bl.start(t), nb = std::min(bl.end(t), s_end) - j0;
        const float* ktb = ktp + ((b * P.Hkv + hk) * nblk + t) * D * bn;
        float* Sb = sbuf.data();
        gemm<false>(mb, nb, D, qp, D, ktb, bn, Sb, bn);  // S = Q Kᵀ·scale: [mb, nb]
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t i = i0 + r;
          const auto [a, e] = P.band.span(i, j0, nb);
          float* z = Sb + r * bn + a;  // the visible keys [a, e) of this block
          const int64_t nv = e - a;
          std::fill(Sb + r * bn, z, 0.f);
          if (P.softcap > 0.f) cap_scores(z, nullptr, nv, P.softcap);
          if (P.mask) apply_mask(z, nv, *P.mask, b, h, i, j0 + a);
          const float bmax = nv > 0 ? vec_max(z, nv) : kNegInf;
          const float m_old = mrow[r], m_new = std::max(m_old, bmax);
          if (m_new == kNegInf) {  // nothing visible so far: p = 0, state unchanged
            std::fill(z, Sb + r * bn + nb, 0.f);
            continue;
          }
          // p = exp(z - m_new) over the visible keys, summed (before dropout: lse is
          // the softmax's normaliser); invisible keys get p = 0.
          const Vec vm(m_new);
          Vec vs(0.f);
          int64_t j = 0;
          for (; j + VL <= nv; j += VL) {
            const Vec e = (Vec::loadu(z + j) - vm).exp_u20();
            e.store(z + j);
            vs = vs + e;
          }
          if (j < nv) {
            const Vec e = (Vec::loadu(z + j, nv - j) - vm).exp_u20();
            e.store(z + j, nv - j);
            vs = vs + Vec::set(Vec(0.f), e, nv - j);
          }
          std::fill(z + nv, Sb + r * bn + nb, 0.f);
          const float bsum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vs);
          const float alpha = std::exp(m_old - m_new);  // 0 when m_old = -inf
          lrow[r] = lrow[r] * alpha + bsum;
          mrow[r] = m_new;
          if (P.drop.on) {
            P.drop.factors(zdrop.data(), nv, bh, i, j0 + a);
            at::vec::map2([](Vec x, Vec f) { return x * f; }, z, z, zdrop.data(), nv);
          }
          if (!first && alpha != 1.f) {
            float* o = O + r * Dv;
            at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, o, o, Dv);
          }
        }
        const float* vb = v.at(b, hk, j0);
        if (first) {
          gemm<false>(mb, Dv, nb, Sb, bn, vb, v.sn, O, Dv);  // O = P V
        } else {
          // O += P V as a block sum added to O, not an FMA chain continued through O (see
          // add_block): O's rows are contiguous, [mb, Dv]
          gemm<false>(mb, Dv, nb, Sb, bn, vb, v.sn, pvbuf.data(), Dv);
          add_block(O, pvbuf.data(), mb * Dv);
        }
        first = false;
      }
      if (first) {  // no key block at all (S = 0): zeros
        for (int64_t r = 0; r < mb; ++r) std::fill(O + r * Dv, O + r * Dv + Dv, 0.f);
      }
      float* lrow_out = lsep + bh * L + i0;
      for (int64_t r = 0; r < mb; ++r) {
        float* o = O + r * Dv;
        float l = lrow[r], m = mrow[r], keep = 1.f;
        if (P.sinks && P.band.seated(i0 + r)) {
          // the sink column joins the denominator at a common maximum (no exp overflow
          // for a large sink); its probability is dropped, so O only rescales
          const float sink = P.sinks[h], mf = std::max(m, sink);
          if (mf != kNegInf) {
            keep = l > 0.f ? std::exp(m - mf) : 0.f;
            l = l * keep + std::exp(sink - mf);
            m = mf;
          }
        }
        if (l > 0.f) {
          const float inv = keep / l;
          at::vec::map([inv](Vec x) { return x * Vec(inv); }, o, o, Dv);
          lrow_out[r] = m + std::log(l);
        } else {  // the row saw no key
          std::fill(o, o + Dv, 0.f);
          lrow_out[r] = kNegInf;
        }
        if constexpr (!direct) {
          at::vec::convert(o, outp + (bh * L + i0 + r) * Dv, Dv);
        }
      }
    }
  });
}

std::optional<MaskView> mask_view(const std::optional<Tensor>& mask, const Tensor& q, int64_t S, const char* who) {
  if (!defined(mask)) return std::nullopt;
  check_mask(who, *mask, {q.size(0), q.size(1), q.size(2), S}, q);
  return MaskView(*mask);
}

// The checked problem of attention_fwd / attention_bwd (the mask view stays valid while `mask` lives).
Problem check_problem(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                      double scale, bool is_causal, double dropout_p, int64_t seed, int64_t window_left,
                      int64_t window_right, bool bottom_right, double softcap, const std::optional<Tensor>& sinks,
                      const char* who) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who, ": q, k, v must be 4-D [B, H, L, D], got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), who,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), who, ": q, k, v must be on one device");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1, who,
              ": the last dim of q, k, v must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D, who,
              ": shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              " do not match q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, who, ": the number of query heads (", H,
              ") must be a multiple of the number of key/value heads (", Hkv, ")");
  check_attention_options(who, q, window_left, window_right, softcap, sinks);
  Band band;
  band.S = S;
  band.off = bottom_right ? S - L : 0;
  band.left = window_left;
  band.right = is_causal ? 0 : window_right;  // causal: j <= i + off; a right bound >= 0 adds nothing
  return {B, H, Hkv, H / Hkv, L, S, D, Dv, static_cast<float>(scale), is_causal, band, static_cast<float>(softcap),
          defined(sinks) ? sinks->const_data_ptr<float>() : nullptr, mask_view(mask, q, S, who),
          make_dropout(dropout_p, seed)};
}

// (out [B, H, L, Dv], lse [B, H, L]) of a checked problem
std::tuple<Tensor, Tensor> run_fwd(const Problem& P, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const char* who) {
  Tensor out = at::empty({P.B, P.H, P.L, P.Dv}, q.options());
  Tensor lse = at::empty({P.B, P.H, P.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "llmfast_attention_fwd_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, who, ": float64 runs on the torch backend");
    } else {
      const Tensor v32 = as_f32(v);
      const Blocks bl = blocks_of(P, fwd_block_n(P));
      const Tensor kT = pack_transposed<scalar_t>(k, bl);
      fwd_impl<scalar_t>(P, q, kT, view_of(v32), out, lse, bl);
    }
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& mask, double scale, bool is_causal,
                                         double dropout_p, int64_t seed, int64_t window_left, int64_t window_right,
                                         bool bottom_right, double softcap, const std::optional<Tensor>& sinks) {
  const char* who = "llmfast::attention_fwd";
  const Problem P = check_problem(q, k, v, mask, scale, is_causal, dropout_p, seed, window_left, window_right,
                                  bottom_right, softcap, sinks, who);
  return run_fwd(P, q, k, v, who);
}

// ---------------------------------------------------------------------------------
// Backward

// p[0, nv) = exp(cap(s) (+ mask) - lse) in place: the forward's probabilities from the
// scaled scores of one backward tile row (keys j0 .. j0 + nv); g[0, nv) = 1 - tanh² with a
// softcap (g may be null when only p is needed). Shared by the Δ pre-pass and the backward
// proper, so both see bit-identical p (same GEMM calls, same tiles, same exp).
inline void bwd_probs_row(const Problem& P, float* p, float* g, int64_t nv, float lse_i, int64_t b, int64_t h,
                          int64_t i, int64_t j0) {
  if (P.softcap > 0.f) cap_scores(p, g, nv, P.softcap);
  if (P.mask) apply_mask(p, nv, *P.mask, b, h, i, j0);
  at::vec::map([lse_i](Vec x) { return (x - Vec(lse_i)).exp_u20(); }, p, p, nv);
}

// Δ[b, h, i] = Σ_j p_ij·z_ij·dP_ij (fp32), z the dropout factors (1 without dropout): the
// same value as Σ_d dO·O for the exact (dropped-out) output, computed from the p and dP
// the backward itself uses. Why not Σ_d dO·O from the stored output: for fp16/bf16 the
// stored O is rounded to 8 (bf16) or 11 (fp16) bits, and with peaked softmaxes (inputs
// like OpInfo's, uniform in [-9, 9], |s| ~ 100) the true dS = p∘(dP − Δ) is far smaller
// than dO·(rounding error of O); dQ/dK then came out 2-10x less accurate than torch's
// fp32-internal computation. Here Σ_j dS_ij = 0 up to fp32 rounding, as it should.
// Cost: one extra pass of S = Q Kᵀ and dP = dO Vᵀ (2 of the backward's 5 GEMMs), so
// only fp16/bf16 take it; extra memory is Δ itself, O(L), plus O(BM·BN) per thread.
// Tasks are (b·H + h, query tile); each writes only its own rows, in a fixed order.
void delta_from_probs(const Problem& P, const Blocks& bl, const View& q, const View& dO, const Tensor& kT,
                      const Tensor& vT, const Tensor& lse, Tensor& delta) {
  const int64_t H = P.H, L = P.L, D = P.D, Dv = P.Dv;
  const int64_t nkt = bl.n, nmt = (L + BM_BWD - 1) / BM_BWD;
  const float* ktp = kT.const_data_ptr<float>();
  const float* vtp = vT.const_data_ptr<float>();
  const float* lsep = lse.const_data_ptr<float>();
  float* dlp = delta.mutable_data_ptr<float>();
  parallel_tasks(P.B * H * nmt, [&](const auto& next) {
    std::vector<float> pbuf(BM_BWD * BN_BWD), dpbuf(BM_BWD * BN_BWD), zdrop(P.drop.on ? BN_BWD : 0);
    for (int64_t t; (t = next()) >= 0;) {
      const int64_t bh = t / nmt, mt = t % nmt, b = bh / H, h = bh % H, bk = b * P.Hkv + h / P.G;
      // i0 on the BM_BWD grid, as in bwd_impl: the GEMMs below then give its exact S, dP
      const int64_t i0 = mt * BM_BWD, mb = std::min(BM_BWD, L - i0);
      float* d = dlp + bh * L + i0;
      std::fill(d, d + mb, 0.f);
      // bwd_impl's kv tiles (bl), from the band of the tile's rows
      const int64_t s_end = mb > 0 ? P.band.hi(i0 + mb - 1) : 0;
      for (int64_t tile = bl.of_key(P.band.lo(i0)); tile < nkt && bl.start(tile) < s_end; ++tile) {
        const int64_t j0 = bl.start(tile), nb = bl.end(tile) - j0;
        const float* ktb = ktp + (bk * nkt + tile) * D * BN_BWD;
        const float* vtb = vtp + (bk * nkt + tile) * Dv * BN_BWD;
        float* Pb = pbuf.data();
        float* dPb = dpbuf.data();
        gemm<false>(mb, nb, D, q.at(b, h, i0), q.sn, ktb, BN_BWD, Pb, BN_BWD);      // S = Q Kᵀ
        gemm<false>(mb, nb, Dv, dO.at(b, h, i0), dO.sn, vtb, BN_BWD, dPb, BN_BWD);  // dP = dO Vᵀ
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t i = i0 + r;
          const float lse_i = lsep[bh * L + i];
          const auto [a, e] = P.band.span(i, j0, nb);
          const int64_t nv = lse_i == kNegInf ? 0 : e - a;
          if (nv == 0) continue;
          float* p = Pb + r * BN_BWD + a;
          float* dp = dPb + r * BN_BWD + a;
          bwd_probs_row(P, p, nullptr, nv, lse_i, b, h, i, j0 + a);
          if (P.drop.on) {
            float* z = zdrop.data();
            P.drop.factors(z, nv, bh, i, j0 + a);
            at::vec::map2([](Vec x, Vec f) { return x * f; }, p, p, z, nv);
          }
          d[r] += at::vec::map2_reduce_all<float>([](Vec a, Vec c) { return a * c; },
                                                  [](Vec a, Vec c) { return a + c; }, p, dp, nv);
        }
      }
    }
  });
}

// Δ[b, h, i] = Σ_d dO·O (fp32), the softmax-backward row term, from the stored output.
// Used for fp32 inputs only: for fp16/bf16 the stored O is rounded (see delta_from_probs).
template <typename scalar_t>
Tensor row_dot(const Tensor& dout, const Tensor& out) {
  const int64_t Dv = out.size(-1), rows = out.numel() / std::max<int64_t>(Dv, 1);
  Tensor delta = at::empty(out.sizes().slice(0, 3), out.options().dtype(at::kFloat));
  const scalar_t* a = dout.const_data_ptr<scalar_t>();
  const scalar_t* o = out.const_data_ptr<scalar_t>();
  float* dp = delta.mutable_data_ptr<float>();
  at::parallel_for(0, rows, grain_for(Dv), [&](int64_t begin, int64_t end) {
    std::vector<float> ba(Dv), bo(Dv);
    for (int64_t r = begin; r < end; ++r) {
      const float* x = load_row<scalar_t, float>(a + r * Dv, Dv, ba.data());
      const float* y = load_row<scalar_t, float>(o + r * Dv, Dv, bo.data());
      dp[r] = at::vec::map2_reduce_all<float>([](Vec p, Vec w) { return p * w; },
                                              [](Vec p, Vec w) { return p + w; }, x, y, Dv);
    }
  });
  return delta;
}

template <typename scalar_t>
void bwd_impl(const Problem& P, const Blocks& bl, const View& q, const View& k, const View& dO, const Tensor& kT,
              const Tensor& vT, const Tensor& lse, const Tensor& delta, float* dq_acc, int64_t chunks, Tensor& dk,
              Tensor& dv) {
  const int64_t B = P.B, H = P.H, Hkv = P.Hkv, L = P.L, S = P.S, D = P.D, Dv = P.Dv;
  const int64_t nkt = bl.n;
  const float* ktp = kT.const_data_ptr<float>();
  const float* vtp = vT.const_data_ptr<float>();
  const float* lsep = lse.const_data_ptr<float>();
  const float* dlp = delta.const_data_ptr<float>();
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();

  // Task (b, kv head, chunk c) owns dK/dV of its kv tiles (chunk c takes tiles c, 2C-1-c,
  // 2C+c, ... so causal chunks cost alike) and writes dQ of the group's heads into its
  // own fp32 slice dq_acc[c]: no two threads write the same element, and the slices are
  // summed in a fixed order afterwards, so the result does not depend on scheduling.
  parallel_tasks(B * Hkv * chunks, [&](const auto& next) {
    std::vector<float> pbuf(BM_BWD * BN_BWD), dsbuf(BM_BWD * BN_BWD), dkb(BN_BWD * D), dvb(BN_BWD * Dv),
        tilebuf(std::max(BM_BWD, BN_BWD) * std::max(D, Dv)), zdrop(P.drop.on ? BN_BWD : 0),
        gcap(P.softcap > 0.f ? BN_BWD : 0);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t c = task % chunks, bk = task / chunks, b = bk / Hkv, hk = bk % Hkv;
      float* dqc = dq_acc + c * B * H * L * D;
      for (int64_t u = 0;; ++u) {
        // zigzag over rounds of 2C tiles: c, 2C-1-c, then the next round
        const int64_t round = u / 2, tile = round * 2 * chunks + ((u & 1) ? 2 * chunks - 1 - c : c);
        if (round * 2 * chunks >= nkt) break;
        if (tile >= nkt) continue;
        const int64_t j0 = bl.start(tile), nb = bl.end(tile) - j0;
        const float* ktb = ktp + (bk * nkt + tile) * D * BN_BWD;
        const float* vtb = vtp + (bk * nkt + tile) * Dv * BN_BWD;
        const float* kb = k.at(b, hk, j0);
        std::fill(dkb.begin(), dkb.end(), 0.f);
        std::fill(dvb.begin(), dvb.end(), 0.f);
        for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
          const int64_t bh = b * H + h;
          // only the rows of the band that reach this tile's keys (query tiles on the BM_BWD grid)
          const auto [i_first, i_last] = P.band.rows(j0, nb, L);
          for (int64_t i0 = i_first / BM_BWD * BM_BWD; i0 < i_last; i0 += BM_BWD) {
            const int64_t mb = std::min(BM_BWD, L - i0);
            float* Pb = pbuf.data();
            float* dSb = dsbuf.data();
            gemm<false>(mb, nb, D, q.at(b, h, i0), q.sn, ktb, BN_BWD, Pb, BN_BWD);      // S = Q Kᵀ
            gemm<false>(mb, nb, Dv, dO.at(b, h, i0), dO.sn, vtb, BN_BWD, dSb, BN_BWD);  // dP = dO Vᵀ
            for (int64_t r = 0; r < mb; ++r) {
              const int64_t i = i0 + r;
              const float lse_i = lsep[bh * L + i];
              const auto [a, e] = P.band.span(i, j0, nb);
              const int64_t nv = lse_i == kNegInf ? 0 : e - a;
              float* p = Pb + r * BN_BWD + a;  // the visible keys [a, a + nv) of this tile
              float* ds = dSb + r * BN_BWD + a;
              std::fill(Pb + r * BN_BWD, p, 0.f);
              std::fill(dSb + r * BN_BWD, ds, 0.f);
              if (nv > 0) {
                // p = exp(cap(s) (+ mask) - lse), s already scaled: the forward's probabilities
                float* g = P.softcap > 0.f ? gcap.data() : nullptr;
                bwd_probs_row(P, p, g, nv, lse_i, b, h, i, j0 + a);
                const float d_i = dlp[bh * L + i];
                if (P.drop.on) {
                  // dS = p∘(z∘dP − Δ) and dV takes p∘z, z = keep/(1 − p_drop); the
                  // softmax scale is in q·scale (dK) and applied to dQ at the end
                  float* z = zdrop.data();
                  P.drop.factors(z, nv, bh, i, j0 + a);
                  for (int64_t j = 0; j < nv; ++j) {
                    ds[j] = p[j] * (z[j] * ds[j] - d_i);
                    p[j] *= z[j];
                  }
                } else {
                  at::vec::map2([d_i](Vec pp, Vec dp) { return pp * (dp - Vec(d_i)); }, ds, p, ds, nv);
                }
                // softcap: d(c·tanh(s/c))/ds = 1 - tanh²
                if (g) at::vec::map2([](Vec x, Vec f) { return x * f; }, ds, ds, g, nv);
              }
              std::fill(p + nv, Pb + r * BN_BWD + nb, 0.f);
              std::fill(ds + nv, dSb + r * BN_BWD + nb, 0.f);
            }
            // each product into a fresh tile, then added (add_block): dV, dK sum over L
            // queries and dQ over S keys, too long for one FMA chain
            float* tb = tilebuf.data();
            gemm<false, true>(nb, Dv, mb, Pb, BN_BWD, dO.at(b, h, i0), dO.sn, tb, Dv);  // dV += Pᵀ dO
            add_block(dvb.data(), tb, nb * Dv);
            gemm<false, true>(nb, D, mb, dSb, BN_BWD, q.at(b, h, i0), q.sn, tb, D);  // dK += dSᵀ Q·scale
            add_block(dkb.data(), tb, nb * D);
            gemm<false>(mb, D, nb, dSb, BN_BWD, kb, k.sn, tb, D);  // dQ += dS K
            add_block(dqc + (bh * L + i0) * D, tb, mb * D);
          }
        }
        // dk, dv: [B, Hkv, S, D/Dv] contiguous; rows j0 .. j0 + nb belong to this task alone
        scalar_t* dk_rows = dkp + (bk * S + j0) * D;
        scalar_t* dv_rows = dvp + (bk * S + j0) * Dv;
        if constexpr (std::is_same_v<scalar_t, float>) {
          std::copy(dkb.data(), dkb.data() + nb * D, dk_rows);
          std::copy(dvb.data(), dvb.data() + nb * Dv, dv_rows);
        } else {
          at::vec::convert(dkb.data(), dk_rows, nb * D);
          at::vec::convert(dvb.data(), dv_rows, nb * Dv);
        }
      }
    }
  });
}

// (dq, dk, dv, dsinks) of a checked problem
std::tuple<Tensor, Tensor, Tensor, Tensor> run_bwd(const Problem& P, const Tensor& grad_out, const Tensor& q,
                                                   const Tensor& k, const Tensor& v, const Tensor& out,
                                                   const Tensor& lse, double scale,
                                                   const std::optional<Tensor>& sinks, const char* who) {
  // dsinks [H] fp32 with sinks (zeros where nothing flows back), else an empty [0]
  Tensor dsinks = defined(sinks) ? at::zeros({P.H}, q.options().dtype(at::kFloat))
                                 : at::empty({0}, q.options().dtype(at::kFloat));
  TORCH_CHECK(out.sizes() == at::IntArrayRef({P.B, P.H, P.L, P.Dv}) && grad_out.sizes() == out.sizes(), who,
              ": out and grad_out must be [B, H, L, Dv] = [", P.B, ", ", P.H, ", ", P.L, ", ", P.Dv, "], got ",
              out.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type(), who,
              ": out and grad_out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({P.B, P.H, P.L}) && lse.scalar_type() == at::kFloat, who,
              ": lse must be float32 [B, H, L]");
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv, dsinks};
  if (P.L == 0 || P.S == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dsinks};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "llmfast_attention_bwd_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, who, ": float64 runs on the torch backend");
    } else {
      const Tensor go = grad_out.contiguous(), lse_c = lse.contiguous();
      const Tensor qs = scaled_f32(q, scale), k32 = as_f32(k), go32 = as_f32(go);
      const Blocks bl = blocks_of(P, BN_BWD);
      const Tensor kT = pack_transposed<scalar_t>(k, bl), vT = pack_transposed<scalar_t>(v, bl);
      // Δ: from the stored output for fp32 (exact enough, one cheap pass); from p and dP
      // for fp16/bf16, whose stored output is rounded (see delta_from_probs)
      Tensor delta;
      if constexpr (std::is_same_v<scalar_t, float>) {
        delta = row_dot<scalar_t>(go, out.contiguous());
      } else {
        delta = at::empty({P.B, P.H, P.L}, q.options().dtype(at::kFloat));
        delta_from_probs(P, bl, view_of(qs), view_of(go32), kT, vT, lse_c, delta);
      }
      // About kDqTasks (b, kv head, chunk) tasks; each chunk beyond the first costs a
      // [B, H, L, D] fp32 dQ slice. The chunks fix the order of dQ's sum over key tiles,
      // so their count must not follow the thread count (it did: 2 per thread), or dQ's
      // bits would depend on torch.get_num_threads() (tests/test_determinism.py).
      const int64_t nkt = bl.n;
      const int64_t want = kDqTasks;
      const int64_t chunks = std::clamp<int64_t>((want + P.B * P.Hkv - 1) / (P.B * P.Hkv), 1, nkt);
      const bool direct = std::is_same_v<scalar_t, float> && chunks == 1;
      Tensor acc = direct ? dq : at::empty({chunks, P.B, P.H, P.L, P.D}, q.options().dtype(at::kFloat));
      acc.zero_();
      bwd_impl<scalar_t>(P, bl, view_of(qs), view_of(k32), view_of(go32), kT, vT, lse_c, delta,
                         acc.mutable_data_ptr<float>(), chunks, dk, dv);
      if (defined(sinks)) {
        // dsink_h = -Σ_{b,i} p_sink·Δ with p_sink = exp(sink_h - lse): O(B·H·L), deterministic ATen sums
        // (a row with lse = -inf has no sink term: a varlen row past cu_q[-1]; exp(inf)·0 would be NaN)
        const Tensor psink = (sinks->view({1, P.H, 1}) - lse_c).exp().masked_fill_(lse_c == kNegInf, 0.0);
        dsinks.copy_((psink * delta).sum(at::IntArrayRef{0, 2}).neg_());
      }
      // dQ = scale·Σ_j dS K: the scale is applied once here
      if (direct) {
        dq.mul_(scale);
      } else {
        dq.copy_((chunks == 1 ? acc[0] : acc.sum(0)).mul_(scale));
      }
    }
  });
  return {dq, dk, dv, dsinks};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& out, const Tensor& lse,
                                                         const std::optional<Tensor>& mask, double scale,
                                                         bool is_causal, double dropout_p, int64_t seed,
                                                         int64_t window_left, int64_t window_right, bool bottom_right,
                                                         double softcap, const std::optional<Tensor>& sinks) {
  const char* who = "llmfast::attention_bwd";
  const Problem P = check_problem(q, k, v, mask, scale, is_causal, dropout_p, seed, window_left, window_right,
                                  bottom_right, softcap, sinks, who);
  return run_bwd(P, grad_out, q, k, v, out, lse, scale, sinks, who);
}

// ---------------------------------------------------------------------------------
// Varlen: packed [total, H, D] tensors as one [1, H, total, D] problem (views, no copy)
// whose Band holds the segments.

Tensor as_problem(const Tensor& x) { return x.transpose(0, 1).unsqueeze(0); }  // [T, H, D] -> [1, H, T, D]
Tensor as_packed(const Tensor& x) { return x[0].transpose(0, 1).contiguous(); }  // [1, H, T, D] -> [T, H, D]

// The segments of cu_seqlens_q / cu_seqlens_k (int32 [n + 1], from 0, non-decreasing, within
// the L queries / S keys: the Python layer checks them too, with FlashAttention's messages).
Segments make_segments(const Tensor& cu_q, const Tensor& cu_k, int64_t L, int64_t S, const char* who) {
  for (const auto& [name, cu, total] : {std::tuple{"cu_seqlens_q", &cu_q, L}, std::tuple{"cu_seqlens_k", &cu_k, S}}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() >= 1 && cu->device().is_cpu(), who,
                ": ", name, " must be a 1-D int32 CPU tensor [batch + 1], got ", cu->scalar_type(), " ", cu->sizes());
    const Tensor c = cu->contiguous();
    const int32_t* p = c.const_data_ptr<int32_t>();
    TORCH_CHECK(p[0] == 0, who, ": ", name, " must start at 0, got ", p[0]);
    for (int64_t s = 1; s < c.numel(); ++s) {
      TORCH_CHECK(p[s] >= p[s - 1], who, ": ", name, " must be non-decreasing");
    }
    TORCH_CHECK(p[c.numel() - 1] <= total, who, ": ", name, "[-1] = ", p[c.numel() - 1],
                " is beyond the packed buffer of ", total, " tokens");
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), who, ": cu_seqlens_q and cu_seqlens_k must have one length, got ",
              cu_q.numel(), " and ", cu_k.numel());
  const Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* q = cq.const_data_ptr<int32_t>();
  const int32_t* k = ck.const_data_ptr<int32_t>();
  Segments seg;
  seg.n = cq.numel() - 1;
  seg.of_row.assign(L, static_cast<int32_t>(seg.n));
  for (int64_t s = 0; s < seg.n; ++s) {
    std::fill(seg.of_row.begin() + q[s], seg.of_row.begin() + q[s + 1], static_cast<int32_t>(s));
    seg.k0.push_back(k[s]);
    seg.k1.push_back(k[s + 1]);
    seg.off.push_back(int64_t(k[s + 1]) - q[s + 1]);
  }
  seg.k0.push_back(k[seg.n]);  // rows past cu_q[-1]: an empty interval at the end (keeps lo, hi monotone)
  seg.k1.push_back(k[seg.n]);
  seg.off.push_back(0);
  return seg;
}

// q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] (last dim contiguous); causal and the window as in
// flash_attn_varlen_func (bottom-right within each segment). Returns out [Tq, H, Dv] (contiguous)
// and lse [H, Tq] fp32 (-inf for rows that see no key and rows past cu_q[-1]).
std::tuple<Tensor, Tensor> attention_varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, double scale,
                                                bool is_causal, int64_t window_left, int64_t window_right,
                                                double softcap, const std::optional<Tensor>& sinks) {
  const char* who = "llmfast::attention_varlen_fwd";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, who, ": q, k, v must be 3-D [total, H, D], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const Tensor q4 = as_problem(q), k4 = as_problem(k), v4 = as_problem(v);
  Problem P = check_problem(q4, k4, v4, std::nullopt, scale, is_causal, 0.0, 0, window_left, window_right, true,
                            softcap, sinks, who);
  const Segments seg = make_segments(cu_seqlens_q, cu_seqlens_k, P.L, P.S, who);
  P.band.seg = &seg;
  auto [out, lse] = run_fwd(P, q4, k4, v4, who);
  return {as_packed(out), lse[0]};
}

// grad_out, out [Tq, H, Dv], lse [H, Tq] as attention_varlen_fwd returned them; returns
// (dq, dk, dv) packed like q, k, v (contiguous) and dsinks [H] fp32 ([0] without sinks).
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_varlen_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, double scale, bool is_causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<Tensor>& sinks) {
  const char* who = "llmfast::attention_varlen_bwd";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3 && grad_out.dim() == 3 &&
              lse.dim() == 2, who, ": q, k, v, out, grad_out must be 3-D [total, H, D] and lse 2-D [H, total]");
  const Tensor q4 = as_problem(q), k4 = as_problem(k), v4 = as_problem(v);
  Problem P = check_problem(q4, k4, v4, std::nullopt, scale, is_causal, 0.0, 0, window_left, window_right, true,
                            softcap, sinks, who);
  const Segments seg = make_segments(cu_seqlens_q, cu_seqlens_k, P.L, P.S, who);
  P.band.seg = &seg;
  auto [dq, dk, dv, dsinks] = run_bwd(P, as_problem(grad_out), q4, k4, v4, as_problem(out), lse.unsqueeze(0), scale,
                                      sinks, who);
  return {as_packed(dq), as_packed(dk), as_packed(dv), dsinks};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

}  // namespace llmfast::cpu
