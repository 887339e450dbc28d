// Decode attention over a paged KV cache on the CPU (flash-decoding), FlashAttention 2's
// semantics (bottom-right causal); the problem is spelled out in llmfast/ops/kvcache.py.
//
//   q: [B, Sq, Hq, D]   k_pages, v_pages: [NB, P, Hkv, D]   block_table: [B, MP] int32
//   seqlens, kv_start: [B] int32   alibi: [B, Hq] fp32   out: [B, Sq, Hq, D]   lse: [B, Hq, Sq]
//
// Decoding is memory bound: each step reads the whole cache, 2·S·Hkv·D elements per batch
// row, for only 4·G·Sq·D flops per key row (G = Hq / Hkv). So the work is cut to read every
// K/V row exactly once and from as many cores as possible:
//   * one task = (batch row, split) over all kv heads (or one kv head when the cache's keys,
//     not its heads, are adjacent in memory): keys are walked in memory order; the M = Sq·G
//     query rows of a kv head (all its query heads) are scored against each K row while it
//     is in L1, and each V row is added into their M accumulators while it is in L1;
//   * split-KV: the visible key range of a (b, kv head) is cut into `splits` chunks so that
//     B·splits tasks fill the threads even at B = 1; each chunk keeps its own running
//     max / sum (online softmax) and a second pass combines the chunks with the log-sum-exp
//     trick (a chunk with no visible key has lse = -inf and weight 0);
//   * keys are walked page by page (any page size), in blocks of at most BN keys;
//   * the inner loops are register-blocked (dots / accumulate): one K vector load feeds the
//     FMAs of MB query rows, and the p·V update keeps MB keys in registers, so each fp32
//     accumulator vector is loaded and stored once per MB keys instead of once per key
//     (measured with csrc/dev-style variants, one thread, CPU time, B=1 S=32768 Hkv=8 D=128:
//     53 -> 32 ms fp32, 51 -> 26 ms bf16); the block's exp is vectorised (exp_u20).
// fp16/bf16 caches are read as they are and widened in registers; all math is fp32.
// Masked keys get probability exactly 0, and keys outside [kv_start, seqlens) (the only
// slots that may be unwritten) are never read, so garbage (NaN) there cannot leak.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/row.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;
using Vec = Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t BN = 32;  // keys per block: BN·D fp32 K and V rows stay in L1
constexpr int64_t MB = 4;  // query rows per pass over a K/V row: one load feeds MB FMAs

// Vector of the n <= Vec::size() elements at x as fp32, zero-filled past n (D need not be a
// multiple of the vector width). fp16/bf16 are widened in registers (at::vec::load_to_float):
// a cache row is read once from memory and never stored back converted.
template <typename T>
inline Vec load(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == Vec::size() ? Vec::loadu(x) : Vec::loadu(x, n);
  } else {
    Vec out;
    if (n == Vec::size()) {
      at::vec::load_to_float<T>(x, out);
    } else {
      float tail[Vec::size()] = {};
      for (int64_t e = 0; e < n; ++e) tail[e] = static_cast<float>(x[e]);
      out = Vec::loadu(tail);
    }
    return out;
  }
}
inline void store(float* x, const Vec& v, int64_t n) { n == Vec::size() ? v.store(x) : v.store(x, n); }

// s[i·ss] = q_i · k for the mb query rows q_i = qs + i·D (fp32) and one K row k: one pass over
// k, mb accumulators (one horizontal reduction per row, not per D/Vec chunk).
template <int mb, typename scalar_t>
void dots(const float* qs, const scalar_t* k, int64_t D, float* s, int64_t ss) {
  Vec acc[mb];
  for (int i = 0; i < mb; ++i) acc[i] = Vec(0.f);
  for (int64_t d = 0; d < D; d += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), D - d);
    const Vec kv = load(k + d, n);
    for (int i = 0; i < mb; ++i) acc[i] = at::vec::fmadd(load(qs + i * D + d, n), kv, acc[i]);
  }
  for (int i = 0; i < mb; ++i) s[i * ss] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[i]);
}

// o_i += sum_t p[i·ps + t] · v_t for the mb fp32 accumulator rows o_i = o + i·D and the
// nt <= MB V rows v_t: each accumulator vector is loaded and stored once per nt keys, each V
// vector loaded once for all mb rows.
template <int mb, typename scalar_t>
void accumulate(float* o, int64_t D, const scalar_t* const* v, int64_t nt, const float* p, int64_t ps) {
  Vec pv[mb][MB];  // broadcast once: the stores into o could alias p as far as the compiler knows
  for (int i = 0; i < mb; ++i)
    for (int64_t t = 0; t < nt; ++t) pv[i][t] = Vec(p[i * ps + t]);
  for (int64_t d = 0; d < D; d += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), D - d);
    Vec vv[MB];
    for (int64_t t = 0; t < nt; ++t) vv[t] = load(v[t] + d, n);
    for (int i = 0; i < mb; ++i) {
      Vec a = load(o + i * D + d, n);
      for (int64_t t = 0; t < nt; ++t) a = at::vec::fmadd(pv[i][t], vv[t], a);
      store(o + i * D + d, a, n);
    }
  }
}

// y[0:n] += a · x[0:n]
void axpy(float a, const float* x, float* y, int64_t n) {
  const Vec av(a);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] += a * x[d];
}

// Row blocks of at most MB rows: f.template operator()<mb>(first row) for each.
template <typename F>
void in_row_blocks(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + MB <= M; m += MB) f.template operator()<MB>(m);
  switch (M - m) {
    case 3: f.template operator()<3>(m); break;
    case 2: f.template operator()<2>(m); break;
    case 1: f.template operator()<1>(m); break;
    default: break;
  }
}

struct Problem {
  KVCacheDims d;
  int64_t G, M;  // query heads per kv head; query rows per task (Sq·G, row m = i·G + g)
  float scale, softcap;
  int64_t wl, wr;  // window sides (-1: unbounded); causal is folded into wr = 0 (FlashAttention)
  const int32_t *bt, *seqlens, *kv_start;
  const float* alibi;
  int64_t sqb, sqs, sqh, skb, skp, skh, svb, svp, svh;

  // Keys that some query of row b may see: [lo, hi).
  std::pair<int64_t, int64_t> range(int64_t b) const {
    const int64_t n = seqlens[b];
    int64_t lo = kv_start ? std::max<int64_t>(kv_start[b], 0) : 0, hi = n;
    if (wl >= 0) lo = std::max(lo, n - d.Sq - wl);            // first query's left edge
    if (wr >= 0) hi = std::min(hi, n - 1 + wr + 1);           // last query's right edge
    return {lo, std::max(lo, hi)};
  }
  bool visible(int64_t b, int64_t i, int64_t j) const {
    const int64_t p = seqlens[b] - d.Sq + i;
    return (wl < 0 || j >= p - wl) && (wr < 0 || j <= p + wr);
  }
};

// Task (b, heads h0 .. h0 + H - 1, split) over keys [j0, j1): for each head, the normalised
// partial output o_h [M, D] and its lse [M]. The heads of a task are walked together, key
// by key, so a cache whose heads are adjacent in memory ([.., P, Hkv, D]) is read as one
// sequential stream: one head at a time would stride by Hkv·D elements per key, defeating
// the hardware prefetcher (measured: 1.4 GB/s instead of ~20 on one core).
template <typename scalar_t>
void attend_split(const Problem& pr, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t b, int64_t h0,
                  int64_t H, int64_t j0, int64_t j1, float* const* o_of, float* const* lse_of,
                  std::vector<float>& buf) {
  const int64_t D = pr.d.D, M = pr.M, G = pr.G, R = H * M;  // R rows: head-major, row m = i·G + g
  buf.resize(R * D + R * BN + 2 * R);
  float* qs = buf.data();           // [R, D] q · scale
  float* s = qs + R * D;            // [R, BN] scores, then probabilities
  float* mx = s + R * BN;           // [R] running max
  float* sum = mx + R;              // [R] running sum
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hh = h0 + r / M, m = r % M, i = m / G, hq = hh * G + m % G;
    const scalar_t* qr = q + b * pr.sqb + i * pr.sqs + hq * pr.sqh;
    for (int64_t e = 0; e < D; ++e) qs[r * D + e] = static_cast<float>(qr[e]) * pr.scale;
    mx[r] = kNegInf;
    sum[r] = 0.f;
  }
  for (int64_t hi = 0; hi < H; ++hi) std::fill(o_of[hi], o_of[hi] + M * D, 0.f);
  const bool masked = pr.wl >= 0 || pr.wr >= 0;
  for (int64_t j = j0; j < j1;) {
    const int64_t page = pr.bt[b * pr.d.MP + j / pr.d.P], slot = j % pr.d.P;
    const int64_t n = std::min({BN, pr.d.P - slot, j1 - j});
    const scalar_t* kr = k + page * pr.skb + slot * pr.skp + h0 * pr.skh;
    const scalar_t* vr = v + page * pr.svb + slot * pr.svp + h0 * pr.svh;
    // scores s[r, t]: keys in memory order (every head of key t, then key t + 1), each K row
    // scored against the M query rows of its head in MB-row passes
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t hi = 0; hi < H; ++hi) {
        const scalar_t* krow = kr + t * pr.skp + hi * pr.skh;
        in_row_blocks(M, [&]<int mb>(int64_t m) {
          dots<mb>(qs + (hi * M + m) * D, krow, D, s + (hi * M + m) * BN + t, BN);
        });
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t hi = r / M, m = r % M, i = m / G;
      float* o = o_of[hi] + m * D;
      float* sr = s + r * BN;
      if (pr.softcap > 0 || pr.alibi || masked) {
        const float slope = pr.alibi ? pr.alibi[b * pr.d.Hq + (h0 + hi) * G + m % G] : 0.f;
        const int64_t p = pr.seqlens[b] - pr.d.Sq + i;
        for (int64_t t = 0; t < n; ++t) {
          float x = sr[t];
          if (pr.softcap > 0) x = pr.softcap * std::tanh(x / pr.softcap);
          if (pr.alibi) x -= slope * static_cast<float>(std::abs(p - (j + t)));
          if (masked && !pr.visible(b, i, j + t)) x = kNegInf;
          sr[t] = x;
        }
      }
      const float bm = vec_max(sr, n);
      if (bm == kNegInf) {  // nothing visible in this block for this row
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      const float nm = std::max(mx[r], bm);
      const float corr = std::exp(mx[r] - nm);  // exp(-inf) = 0 on the first visible block
      if (corr != 1.f) {
        at::vec::map([corr](Vec x) { return x * Vec(corr); }, o, o, D);
      }
      // p = exp(s - max), exactly 0 where s = -inf (a masked key)
      const Vec vm(nm), ninf(kNegInf), zero(0.f);
      Vec add(0.f);
      for (int64_t t = 0; t < n; t += Vec::size()) {
        const int64_t c = std::min<int64_t>(Vec::size(), n - t);
        const Vec x = load(sr + t, c);
        const Vec e = Vec::blendv((x - vm).exp_u20(), zero, x == ninf);
        store(sr + t, e, c);
        add += c == Vec::size() ? e : Vec::set(zero, e, c);
      }
      sum[r] = sum[r] * corr + at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, add);
      mx[r] = nm;
    }
    // o += p · V, MB keys at a time, keys in memory order as for K
    for (int64_t t = 0; t < n; t += MB) {
      const int64_t nt = std::min(MB, n - t);
      for (int64_t hi = 0; hi < H; ++hi) {
        const scalar_t* vt[MB];
        for (int64_t u = 0; u < nt; ++u) vt[u] = vr + (t + u) * pr.svp + hi * pr.svh;
        in_row_blocks(M, [&]<int mb>(int64_t m) {
          accumulate<mb>(o_of[hi] + m * D, D, vt, nt, s + (hi * M + m) * BN + t, BN);
        });
      }
    }
    j += n;
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hi = r / M, m = r % M;
    if (sum[r] == 0.f) {
      lse_of[hi][m] = kNegInf;
      continue;  // o stays 0
    }
    const float inv = 1.f / sum[r];
    float* o = o_of[hi] + m * D;
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, o, o, D);
    lse_of[hi][m] = mx[r] + std::log(sum[r]);
  }
}

// Heads adjacent in memory: walking all of them key by key is one forward stream.
bool heads_together(const Problem& pr) {
  return pr.d.Hkv > 1 && pr.skh <= pr.skp && pr.svh <= pr.svp;
}

// Splits per (b, kv head) when the caller passes 0: about kSplitTasks tasks in all, but no
// split shorter than ~256 keys (each split costs a partial-output write and a combine read
// of M·D floats). A fixed task count, not one per thread: the splits decide the order in
// which the output is summed, so a thread-count-dependent choice made the output's bits
// depend on torch.get_num_threads() (tests/test_determinism.py). 16 tasks keep up to 8
// threads busy twice over.
constexpr int64_t kSplitTasks = 16;

int64_t auto_splits(int64_t tasks, int64_t max_len) {
  const int64_t want = (kSplitTasks + tasks - 1) / std::max<int64_t>(tasks, 1);
  return std::max<int64_t>(1, std::min<int64_t>({want, (max_len + 255) / 256, 128}));
}

template <typename scalar_t>
void kvcache_fwd_impl(const Problem& pr, const Tensor& q, const Tensor& kp, const Tensor& vp, int64_t splits,
                      Tensor& out, Tensor& lse) {
  const int64_t B = pr.d.B, Hkv = pr.d.Hkv, M = pr.M, D = pr.d.D, G = pr.G, Sq = pr.d.Sq;
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = kp.const_data_ptr<scalar_t>();
  const scalar_t* vd = vp.const_data_ptr<scalar_t>();
  // partial outputs [B, Hkv, splits, M, D] and lse [B, Hkv, splits, M]
  std::vector<float> po(B * Hkv * splits * M * D), pl(B * Hkv * splits * M);
  // A task takes every kv head of its (b, split) when heads are adjacent in memory (the
  // FlashAttention layouts), one head when keys are (e.g. a [.., Hkv, S, D] view).
  const int64_t group = heads_together(pr) ? Hkv : 1;
  const int64_t groups = Hkv / group;
  at::parallel_for(0, B * groups * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    std::vector<float*> o_of(group), lse_of(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task % splits, h0 = (task / splits) % groups * group, b = task / (splits * groups);
      const auto [lo, hi] = pr.range(b);
      const int64_t chunk = (hi - lo + splits - 1) / splits;
      const int64_t j0 = std::min(hi, lo + s * chunk), j1 = std::min(hi, j0 + chunk);
      for (int64_t g = 0; g < group; ++g) {  // partials of (b, h0 + g, s)
        const int64_t at = (b * Hkv + h0 + g) * splits + s;
        o_of[g] = po.data() + at * M * D;
        lse_of[g] = pl.data() + at * M;
      }
      attend_split<scalar_t>(pr, qd, kd, vd, b, h0, group, j0, j1, o_of.data(), lse_of.data(), buf);
    }
  });
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  float* ld = lse.mutable_data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const float* pob = po.data() + bh * splits * M * D;
      const float* plb = pl.data() + bh * splits * M;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t i = m / G, hq = h * G + m % G;
        float top = kNegInf;
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, plb[s * M + m]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float total = 0.f;
        if (top != kNegInf) {
          for (int64_t s = 0; s < splits; ++s) {
            const float l = plb[s * M + m];
            if (l == kNegInf) continue;  // an empty split: weight 0, and its o is never read
            const float w = std::exp(l - top);
            total += w;
            axpy(w, pob + (s * M + m) * D, acc.data(), D);
          }
          const float inv = 1.f / total;
          for (int64_t e = 0; e < D; ++e) acc[e] *= inv;
        }
        ld[(b * pr.d.Hq + hq) * Sq + i] = top == kNegInf ? kNegInf : top + std::log(total);
        scalar_t* orow = od + ((b * Sq + i) * pr.d.Hq + hq) * D;
        for (int64_t e = 0; e < D; ++e) orow[e] = static_cast<scalar_t>(acc[e]);
      }
    }
  });
}

std::tuple<Tensor, Tensor> kvcache_fwd(const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                                       const Tensor& block_table, const Tensor& seqlens,
                                       const std::optional<Tensor>& kv_start, const std::optional<Tensor>& alibi,
                                       double scale, bool causal, int64_t window_left, int64_t window_right,
                                       double softcap, int64_t num_splits) {
  constexpr const char* op = "llmfast::kvcache_fwd";
  Problem pr{check_kvcache(op, q, k_pages, v_pages, block_table, seqlens, kv_start, alibi, num_splits)};
  const KVCacheDims& d = pr.d;
  pr.G = d.Hq / d.Hkv;
  pr.M = d.Sq * pr.G;
  pr.scale = static_cast<float>(scale);
  pr.softcap = static_cast<float>(softcap);
  pr.wl = window_left;
  pr.wr = causal ? 0 : window_right;
  pr.bt = block_table.const_data_ptr<int32_t>();
  pr.seqlens = seqlens.const_data_ptr<int32_t>();
  pr.kv_start = defined(kv_start) ? kv_start->const_data_ptr<int32_t>() : nullptr;
  pr.alibi = defined(alibi) ? alibi->const_data_ptr<float>() : nullptr;
  pr.sqb = q.stride(0), pr.sqs = q.stride(1), pr.sqh = q.stride(2);
  pr.skb = k_pages.stride(0), pr.skp = k_pages.stride(1), pr.skh = k_pages.stride(2);
  pr.svb = v_pages.stride(0), pr.svp = v_pages.stride(1), pr.svh = v_pages.stride(2);
  // The pages a row reads must exist: cheap to check here (B·MP ints), and a direct call of
  // the op with a bad table would otherwise read out of bounds.
  int64_t max_len = 0;
  for (int64_t b = 0; b < d.B; ++b) {
    TORCH_CHECK(pr.seqlens[b] >= 0 && pr.seqlens[b] <= d.MP * d.P, op, ": seqlens[", b, "] = ", pr.seqlens[b],
                " is outside [0, ", d.MP * d.P, "] (block_table's pages)");
    const auto [lo, hi] = pr.range(b);
    for (int64_t p = lo / d.P; p * d.P < hi; ++p) {
      const int32_t id = pr.bt[b * d.MP + p];
      TORCH_CHECK(id >= 0 && id < d.NB, op, ": block_table[", b, ", ", p, "] = ", id, " is outside [0, ", d.NB, ")");
    }
    max_len = std::max(max_len, hi - lo);
  }
  const int64_t splits = num_splits > 0 ? num_splits : auto_splits(d.B * (heads_together(pr) ? 1 : d.Hkv), max_len);
  Tensor out = at::empty({d.B, d.Sq, d.Hq, d.D}, q.options());
  Tensor lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  switch (q.scalar_type()) {  // check_kvcache admits these three
    case at::kFloat: kvcache_fwd_impl<float>(pr, q, k_pages, v_pages, splits, out, lse); break;
    case at::kHalf: kvcache_fwd_impl<at::Half>(pr, q, k_pages, v_pages, splits, out, lse); break;
    default: kvcache_fwd_impl<at::BFloat16>(pr, q, k_pages, v_pages, splits, out, lse); break;
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) { m.impl("kvcache_fwd", &kvcache_fwd); }

}  // namespace llmfast::cpu
