// Decode attention over a paged KV cache on the CPU (flash-decoding), FlashAttention 2's
// semantics (bottom-right causal); the problem is spelled out in llmfast/ops/kvcache.py.
//
//   q: [B, Sq, Hq, D]   k_pages, v_pages: [NB, P, Hkv, D]   block_table: [B, MP] int32
//   seqlens, kv_start: [B] int32   alibi: [B, Hq] fp32   out: [B, Sq, Hq, D]   lse: [B, Hq, Sq]
//
// Decoding is memory bound: each step reads the whole cache, 2·S·Hkv·D elements per batch
// row, for only 4·G·Sq·D flops per key row (G = Hq / Hkv). So the work is cut to read every
// K/V row exactly once and from as many cores as possible:
//   * one task = (batch row, kv head, split): its M = Sq·G query rows (all query heads of the
//     kv head) are scored against each K row while it is in L1, and each V row is added into
//     the M accumulators while it is in L1;
//   * split-KV: the visible key range of a (b, kv head) is cut into `splits` chunks so that
//     B·Hkv·splits tasks fill the threads even at B = 1; each chunk keeps its own running
//     max / sum (online softmax) and a second pass combines the chunks with the log-sum-exp
//     trick (a chunk with no visible key has lse = -inf and weight 0);
//   * keys are walked page by page (any page size), in blocks of at most BN keys.
// fp16/bf16 caches are read as they are and converted one row at a time; all math is fp32.
// Masked keys get probability exactly 0 and are never multiplied into V, and keys outside
// [kv_start, seqlens) are never read, so garbage (NaN) in unused cache slots cannot leak.
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

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y[0:n] += a · x[0:n]
void axpy(float a, const float* x, float* y, int64_t n) {
  const Vec av(a);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] += a * x[d];
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

// Task (b, h, s) over keys [j0, j1): normalised partial output o [M, D] and its lse [M].
template <typename scalar_t>
void attend_split(const Problem& pr, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t b, int64_t h,
                  int64_t j0, int64_t j1, float* o, float* lse, std::vector<float>& buf) {
  const int64_t D = pr.d.D, M = pr.M, G = pr.G;
  buf.resize(M * D + M * BN + 2 * BN * D + 2 * M);
  float* qs = buf.data();           // [M, D] q · scale
  float* s = qs + M * D;            // [M, BN] scores, then probabilities
  float* kb = s + M * BN;           // [BN, D] fp32 K rows (fp16/bf16 caches)
  float* vb = kb + BN * D;          // [BN, D] fp32 V rows
  float* mx = vb + BN * D;          // [M] running max
  float* sum = mx + M;              // [M] running sum
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = m / G, hq = h * G + m % G;
    const scalar_t* qr = q + b * pr.sqb + i * pr.sqs + hq * pr.sqh;
    for (int64_t e = 0; e < D; ++e) qs[m * D + e] = static_cast<float>(qr[e]) * pr.scale;
    mx[m] = kNegInf;
    sum[m] = 0.f;
  }
  std::fill(o, o + M * D, 0.f);
  const bool masked = pr.wl >= 0 || pr.wr >= 0;
  for (int64_t j = j0; j < j1;) {
    const int64_t page = pr.bt[b * pr.d.MP + j / pr.d.P], slot = j % pr.d.P;
    const int64_t n = std::min({BN, pr.d.P - slot, j1 - j});
    const scalar_t* kr = k + page * pr.skb + slot * pr.skp + h * pr.skh;
    const scalar_t* vr = v + page * pr.svb + slot * pr.svp + h * pr.svh;
    for (int64_t t = 0; t < n; ++t) {
      const float* krow = load_row<scalar_t, float>(kr + t * pr.skp, D, kb + t * D);
      for (int64_t m = 0; m < M; ++m) s[m * BN + t] = dot(qs + m * D, krow, D);
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = m / G;
      float* sr = s + m * BN;
      float bm = kNegInf;
      const float slope = pr.alibi ? pr.alibi[b * pr.d.Hq + h * G + m % G] : 0.f;
      const int64_t p = pr.seqlens[b] - pr.d.Sq + i;
      for (int64_t t = 0; t < n; ++t) {
        float x = sr[t];
        if (pr.softcap > 0) x = pr.softcap * std::tanh(x / pr.softcap);
        if (pr.alibi) x -= slope * static_cast<float>(std::abs(p - (j + t)));
        if (masked && !pr.visible(b, i, j + t)) x = kNegInf;
        sr[t] = x;
        bm = std::max(bm, x);
      }
      if (bm == kNegInf) {  // nothing visible in this block for this row
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      const float nm = std::max(mx[m], bm);
      const float corr = std::exp(mx[m] - nm);  // exp(-inf) = 0 on the first visible block
      if (corr != 1.f) {
        for (int64_t e = 0; e < D; ++e) o[m * D + e] *= corr;
      }
      float add = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        sr[t] = std::exp(sr[t] - nm);  // masked: exp(-inf) = 0
        add += sr[t];
      }
      sum[m] = sum[m] * corr + add;
      mx[m] = nm;
    }
    for (int64_t t = 0; t < n; ++t) {
      const float* vrow = load_row<scalar_t, float>(vr + t * pr.svp, D, vb + t * D);
      for (int64_t m = 0; m < M; ++m) {
        const float pm = s[m * BN + t];
        if (pm != 0.f) axpy(pm, vrow, o + m * D, D);  // masked keys never touch V (0 · NaN = NaN)
      }
    }
    j += n;
  }
  for (int64_t m = 0; m < M; ++m) {
    if (sum[m] == 0.f) {
      lse[m] = kNegInf;
      continue;  // o stays 0
    }
    const float inv = 1.f / sum[m];
    for (int64_t e = 0; e < D; ++e) o[m * D + e] *= inv;
    lse[m] = mx[m] + std::log(sum[m]);
  }
}

// Splits per (b, kv head) when the caller passes 0: enough tasks for every thread twice
// over, but no split shorter than ~256 keys (each split costs a partial-output write and a
// combine read of M·D floats).
int64_t auto_splits(int64_t tasks, int64_t max_len) {
  const int64_t threads = at::get_num_threads();
  const int64_t want = (2 * threads + tasks - 1) / std::max<int64_t>(tasks, 1);
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
  at::parallel_for(0, B * Hkv * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task % splits, h = (task / splits) % Hkv, b = task / (splits * Hkv);
      const auto [lo, hi] = pr.range(b);
      const int64_t chunk = (hi - lo + splits - 1) / splits;
      const int64_t j0 = std::min(hi, lo + s * chunk), j1 = std::min(hi, j0 + chunk);
      attend_split<scalar_t>(pr, qd, kd, vd, b, h, j0, j1, po.data() + task * M * D, pl.data() + task * M, buf);
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
  const int64_t splits = num_splits > 0 ? num_splits : auto_splits(d.B * d.Hkv, max_len);
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
