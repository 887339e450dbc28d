// Decode attention over a paged KV cache (flash-decoding) for llmfast::kvcache_fwd (CUDA),
// FlashAttention 2's semantics; the problem is spelled out in llmfast/ops/kvcache.py.
//
//   q: [B, Sq, Hq, D]   k_pages, v_pages: [NB, P, Hkv, D]   block_table: [B, MP] int32
//   seqlens, kv_start: [B] int32   alibi: [B, Hq] fp32   out: [B, Sq, Hq, D]   lse: [B, Hq, Sq]
//
// Decoding reads the whole visible cache once per step and does ~4·G·Sq flops per K/V
// element: memory bound. Two kernels:
//  * _kvcache_split_kernel, one CTA of kWarps warps per (split, kv head × row tile, batch row).
//    Its rows are up to kRows of the M = Sq·G queries that read this kv head (row m = i·G + g,
//    GQA: a K/V row is loaded once for all of them), held in registers, pre-scaled. Warp w
//    takes keys j0 + w, j0 + w + kWarps, ...; lanes cover the head dim (d = e·32 + lane, so a
//    warp's load of a row is coalesced), each key's score is a warp_sum, and each warp keeps an
//    online softmax (max, sum, acc) per row. The warps then merge through shared memory and the
//    CTA writes its split's normalised partial output and lse (-inf when it saw no key).
//  * _kvcache_combine_kernel, one warp per (b, kv head, row): the log-sum-exp merge of the
//    splits (weight exp(lse_s - max), 0 for an empty split); no visible key at all gives zeros
//    and lse = -inf.
// Keys outside [lo, seqlens) are never loaded and masked keys never touch V, so garbage (NaN)
// in unused cache slots cannot reach the output. Math in fp32 for every storage dtype.
#include <algorithm>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxRows = 8;   // query rows per CTA: 4 (decode with Hq/Hkv <= 4) or 8
constexpr int kMaxLane = 8;   // head-dim elements per lane (EPL = 1, 2, 4, 8): D <= 256

struct KVArgs {
  const void *q, *k, *v;
  const int32_t *bt, *seqlens, *kv_start;
  const float* alibi;
  float *po, *pl;  // partials [B, Hkv, splits, M, D] and [B, Hkv, splits, M]
  int64_t sqb, sqs, sqh, skn, skp, skh, svn, svp, svh;
  int B, Sq, Hq, Hkv, G, M, D, P, MP, splits, row_tiles;
  float scale, softcap;
  int wl, wr;  // window sides, -1 = unbounded; causal folded into wr = 0
};

template <typename T, int kRows, int kLane>
__global__ void _kvcache_split_kernel(KVArgs a) {
  const int split = blockIdx.x, h = blockIdx.y / a.row_tiles, tile = blockIdx.y % a.row_tiles, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m0 = tile * kRows, rows = std::min(kRows, a.M - m0);
  const int n = a.seqlens[b];
  int lo = a.kv_start ? std::max(a.kv_start[b], 0) : 0;
  if (a.wl >= 0) lo = std::max(lo, n - a.Sq - a.wl);  // the first query's left edge
  lo = std::min(lo, n);
  const int chunk = (n - lo + a.splits - 1) / a.splits;
  const int j0 = std::min(n, lo + split * chunk), j1 = std::min(n, j0 + chunk);

  const T* q = static_cast<const T*>(a.q);
  float qr[kRows][kLane], acc[kRows][kLane], mx[kRows], sum[kRows], slope[kRows];
  int pos[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int m = m0 + std::min(r, rows - 1), i = m / a.G, hq = h * a.G + m % a.G;
    const T* qp = q + b * a.sqb + i * a.sqs + hq * a.sqh;
#pragma unroll
    for (int e = 0; e < kLane; ++e) {
      const int d = e * 32 + lane;
      qr[r][e] = d < a.D ? to_float(qp[d]) * a.scale : 0.f;
      acc[r][e] = 0.f;
    }
    mx[r] = kNegInf;
    sum[r] = 0.f;
    pos[r] = n - a.Sq + i;
    slope[r] = a.alibi ? a.alibi[b * a.Hq + hq] : 0.f;
  }
  const T* kb = static_cast<const T*>(a.k) + h * a.skh;
  const T* vb = static_cast<const T*>(a.v) + h * a.svh;
  for (int j = j0 + warp; j < j1; j += kWarps) {  // warp-uniform loop: every lane shuffles together
    const int64_t page = a.bt[static_cast<int64_t>(b) * a.MP + j / a.P], slot = j % a.P;
    const T* kr = kb + page * a.skn + slot * a.skp;
    float kv[kLane];
#pragma unroll
    for (int e = 0; e < kLane; ++e) kv[e] = e * 32 + lane < a.D ? to_float(kr[e * 32 + lane]) : 0.f;
    float p[kRows];
    bool any = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < kLane; ++e) s += qr[r][e] * kv[e];
      s = warp_sum(s);  // the same value in every lane (xor butterfly)
      if (a.softcap > 0.f) s = a.softcap * tanhf(s / a.softcap);
      if (a.alibi) s -= slope[r] * fabsf(static_cast<float>(pos[r] - j));
      const bool vis = r < rows && (a.wl < 0 || j >= pos[r] - a.wl) && (a.wr < 0 || j <= pos[r] + a.wr);
      p[r] = 0.f;
      if (vis) {
        const float nm = fmaxf(mx[r], s);
        const float corr = __expf(mx[r] - nm);  // 0 on the first visible key (mx = -inf)
        p[r] = __expf(s - nm);
        sum[r] = sum[r] * corr + p[r];
        mx[r] = nm;
#pragma unroll
        for (int e = 0; e < kLane; ++e) acc[r][e] *= corr;
        any = true;
      }
    }
    if (!any) continue;  // masked keys never touch V (0 · NaN = NaN)
    const T* vr = vb + page * a.svn + slot * a.svp;
#pragma unroll
    for (int e = 0; e < kLane; ++e) {
      const float x = e * 32 + lane < a.D ? to_float(vr[e * 32 + lane]) : 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r][e] += p[r] * x;
    }
  }

  // Merge the warps: smem holds each warp's (max, sum) per row and acc [kWarps][kRows][D].
  LLMFAST_DYN_SMEM(smem_raw);
  float* s_acc = reinterpret_cast<float*>(smem_raw);
  float* s_mx = s_acc + kWarps * kRows * a.D;
  float* s_sum = s_mx + kWarps * kRows;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int e = 0; e < kLane; ++e) {
      const int d = e * 32 + lane;
      if (d < a.D) s_acc[(warp * kRows + r) * a.D + d] = acc[r][e];
    }
    if (lane == 0) {
      s_mx[warp * kRows + r] = mx[r];
      s_sum[warp * kRows + r] = sum[r];
    }
  }
  __syncthreads();
  const int64_t part = ((static_cast<int64_t>(b) * a.Hkv + h) * a.splits + split) * a.M;
  for (int idx = threadIdx.x; idx < rows * a.D; idx += blockDim.x) {
    const int r = idx / a.D, d = idx % a.D;
    float top = kNegInf;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, s_mx[w * kRows + r]);
    float o = 0.f, l = 0.f;
    if (top != kNegInf) {
      for (int w = 0; w < kWarps; ++w) {
        const float mw = s_mx[w * kRows + r];
        if (mw == kNegInf) continue;  // a warp that saw no visible key: its acc is 0, weight 0
        const float c = __expf(mw - top);
        l += s_sum[w * kRows + r] * c;
        o += s_acc[(w * kRows + r) * a.D + d] * c;
      }
      o /= l;
    }
    a.po[(part + m0 + r) * a.D + d] = o;
    if (d == 0) a.pl[part + m0 + r] = top == kNegInf ? kNegInf : top + __logf(l);
  }
}

// One warp per (b, kv head, row m): out[b, i, hq] and lse[b, hq, i] from the splits' partials.
template <typename T>
__global__ void _kvcache_combine_kernel(const float* __restrict__ po, const float* __restrict__ pl,
                                        T* __restrict__ out, float* __restrict__ lse, int64_t rows_total, int Hkv,
                                        int M, int G, int Sq, int Hq, int D, int splits) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows_total) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const int m = static_cast<int>(row % M);
  const int64_t bh = row / M;
  const int h = static_cast<int>(bh % Hkv);
  const int64_t b = bh / Hkv;
  const int i = m / G, hq = h * G + m % G;
  const float* plr = pl + bh * splits * M + m;
  float top = kNegInf;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, plr[s * M]);
  float total = 0.f;
  if (top != kNegInf) {
    for (int s = 0; s < splits; ++s) total += plr[s * M] == kNegInf ? 0.f : __expf(plr[s * M] - top);
  }
  T* orow = out + ((b * Sq + i) * Hq + hq) * D;
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    if (top != kNegInf) {
      for (int s = 0; s < splits; ++s) {
        const float l = plr[s * M];
        if (l != kNegInf) o += __expf(l - top) * po[((bh * splits + s) * M + m) * D + d];
      }
      o /= total;
    }
    orow[d] = from_float<T>(o);
  }
  if (lane == 0) lse[(b * Hq + hq) * Sq + i] = top == kNegInf ? kNegInf : top + __logf(total);
}

cudaError_t kvcache_fwd_launch(const KVArgs& a, void* out, float* lse, DType dt, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const int rows = a.M <= 4 ? 4 : kMaxRows;  // as the binding's row_tiles
    const size_t smem = (static_cast<size_t>(kWarps) * rows * a.D + 2 * kWarps * rows) * sizeof(float);
    const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.Hkv * a.row_tiles),
                    static_cast<unsigned>(a.B));
    const int lanes = a.D <= 32 ? 1 : a.D <= 64 ? 2 : a.D <= 128 ? 4 : 8;
    auto go = [&](auto kernel) { return launch(kernel, grid, dim3(32 * kWarps), smem, stream, a); };
    cudaError_t err;
    if (rows == 4) {
      err = lanes == 1 ? go(_kvcache_split_kernel<T, 4, 1>) : lanes == 2 ? go(_kvcache_split_kernel<T, 4, 2>)
            : lanes == 4 ? go(_kvcache_split_kernel<T, 4, 4>) : go(_kvcache_split_kernel<T, 4, 8>);
    } else {
      err = lanes == 1 ? go(_kvcache_split_kernel<T, 8, 1>) : lanes == 2 ? go(_kvcache_split_kernel<T, 8, 2>)
            : lanes == 4 ? go(_kvcache_split_kernel<T, 8, 4>) : go(_kvcache_split_kernel<T, 8, 8>);
    }
    if (err != cudaSuccess) return err;
    const int64_t total = static_cast<int64_t>(a.B) * a.Hkv * a.M;
    return launch(_kvcache_combine_kernel<T>, dim3(static_cast<unsigned>((total + kWarps - 1) / kWarps)),
                  dim3(32 * kWarps), 0, stream, static_cast<const float*>(a.po), static_cast<const float*>(a.pl),
                  static_cast<T*>(out), lse, total, a.Hkv, a.M, a.G, a.Sq, a.Hq, a.D, a.splits);
  });
}

}  // namespace
}  // namespace llmfast::cuda

#ifndef LLMFAST_CUDA_KERNELS_ONLY
// =============================================================================================
// torch binding
// =============================================================================================
#include <ATen/ops/empty.h>

#include "cuda/binding.h"

namespace llmfast::cuda {
namespace {

std::tuple<Tensor, Tensor> kvcache_fwd(const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                                       const Tensor& block_table, const Tensor& seqlens,
                                       const std::optional<Tensor>& kv_start, const std::optional<Tensor>& alibi,
                                       double scale, bool causal, int64_t window_left, int64_t window_right,
                                       double softcap, int64_t num_splits) {
  constexpr const char* op = "llmfast::kvcache_fwd";
  check_on_device(op, "q", q);
  const KVCacheDims d = check_kvcache(op, q, k_pages, v_pages, block_table, seqlens, kv_start, alibi, num_splits);
  const DType dt = dtype_of(op, "q", q);
  const DeviceGuard guard(q.device());
  TORCH_CHECK(d.D <= 32 * kMaxLane, op, " (cuda): head dim ", d.D, " > ", 32 * kMaxLane, " is not supported");
  TORCH_CHECK(d.MP * d.P < (int64_t(1) << 31) && d.B <= 65535, op, " (cuda): the problem is too large for one launch");
  KVArgs a{};
  a.q = q.const_data_ptr(), a.k = k_pages.const_data_ptr(), a.v = v_pages.const_data_ptr();
  a.bt = block_table.const_data_ptr<int32_t>(), a.seqlens = seqlens.const_data_ptr<int32_t>();
  a.kv_start = defined(kv_start) ? kv_start->const_data_ptr<int32_t>() : nullptr;
  a.alibi = defined(alibi) ? alibi->const_data_ptr<float>() : nullptr;
  a.sqb = q.stride(0), a.sqs = q.stride(1), a.sqh = q.stride(2);
  a.skn = k_pages.stride(0), a.skp = k_pages.stride(1), a.skh = k_pages.stride(2);
  a.svn = v_pages.stride(0), a.svp = v_pages.stride(1), a.svh = v_pages.stride(2);
  a.B = static_cast<int>(d.B), a.Sq = static_cast<int>(d.Sq), a.Hq = static_cast<int>(d.Hq);
  a.Hkv = static_cast<int>(d.Hkv), a.G = a.Hq / a.Hkv, a.M = a.Sq * a.G, a.D = static_cast<int>(d.D);
  a.P = static_cast<int>(d.P), a.MP = static_cast<int>(d.MP);
  const int rows_per_cta = a.M <= 4 ? 4 : kMaxRows;
  a.row_tiles = (a.M + rows_per_cta - 1) / rows_per_cta;
  a.scale = static_cast<float>(scale), a.softcap = static_cast<float>(softcap);
  a.wl = static_cast<int>(window_left), a.wr = causal ? 0 : static_cast<int>(window_right);
  if (num_splits > 0) {
    a.splits = static_cast<int>(num_splits);
  } else {
    // Two waves of CTAs over the SMs, no split under ~512 keys (the bound uses the cache
    // capacity: reading seqlens would synchronise with the device).
    const int64_t ctas = d.B * d.Hkv * a.row_tiles;
    const int64_t want = (2 * sm_count() + ctas - 1) / ctas;
    a.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, (d.MP * d.P + 511) / 512, 128})));
  }
  Tensor out = at::empty({d.B, d.Sq, d.Hq, d.D}, q.options());
  Tensor lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  if (a.M == 0 || d.B == 0 || d.D == 0) return {out, lse};
  Tensor po = at::empty({d.B * d.Hkv * a.splits * a.M * d.D}, q.options().dtype(at::kFloat));
  Tensor pl = at::empty({d.B * d.Hkv * a.splits * a.M}, q.options().dtype(at::kFloat));
  a.po = po.mutable_data_ptr<float>(), a.pl = pl.mutable_data_ptr<float>();
  check_launch(kvcache_fwd_launch(a, out.mutable_data_ptr(), lse.mutable_data_ptr<float>(), dt, current_stream()));
  return {out, lse};
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) { m.impl("kvcache_fwd", &kvcache_fwd); }

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
