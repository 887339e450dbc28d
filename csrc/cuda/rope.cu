// Rotary position embedding (RoPE) for llmfast::rope_fwd / rope_bwd (CUDA): one kernel, the maths
// of kernels/rope.py. Element e of a head's first R features, p its pair partner (NeoX: e +- R/2;
// interleaved GPT-J: e ^ 1), sign -1 for the pair's first element and +1 for its second:
//
//   forward:  out[e] = x[e] * cos[ci(e)] + sign(e) * x[p] * sin[ci(e)]
//   backward: dx[e]  = g[e] * cos[ci(e)] - sign(e) * g[p] * sin[ci(p)]     (CONJ: the transpose)
//
// ci(e) = the pair index for cos/sin [.., R/2] (one angle per pair: the backward is the rotation
// by -theta), e itself for [.., R] (Hugging Face's per-feature layout). Features R..D pass through.
//
// x [B, S, H, D] (unit stride along D, any other strides); out [B, S, H, D] contiguous; cos/sin
// [B, S, W] (stride 0 along B when shared), in x's dtype or fp32. One block per (b, s) row (and
// chunk of its H * D elements): consecutive threads take consecutive features, so loads and
// stores coalesce; the partner's load and the row's cos/sin hit L1. fp32 math, one rounding.
#include <algorithm>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

constexpr int kThreads = 256;

struct RopeParams {
  const void* x = nullptr;    // [B, S, H, D] at strides sxb, sxs, sxh
  void* out = nullptr;        // [B, S, H, D] contiguous
  const void* cos = nullptr;  // [B, S, W] at strides scb, scs
  const void* sin = nullptr;  // [B, S, W] at strides ssb, sss
  int64_t S = 0, H = 0, D = 0, R = 0, sxb = 0, sxs = 0, sxh = 0, scb = 0, scs = 0, ssb = 0, sss = 0;
  bool per_feature = false;  // W == R
  bool conj = false;         // the backward (transpose)
};

// Block (row, chunk): row = b * S + s; the chunk's threads stride over the row's H * D elements.
template <typename T, typename C, bool INTERLEAVED>
__global__ void _rope_kernel(const RopeParams p) {
  const int64_t row = blockIdx.x, b = row / p.S, s = row % p.S, h = p.R / 2;
  const T* x = static_cast<const T*>(p.x) + b * p.sxb + s * p.sxs;
  T* out = static_cast<T*>(p.out) + row * p.H * p.D;
  const C* cp = static_cast<const C*>(p.cos) + b * p.scb + s * p.scs;
  const C* sp = static_cast<const C*>(p.sin) + b * p.ssb + s * p.sss;
  const float conj_sign = p.conj ? -1.f : 1.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < p.H * p.D;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t hh = i / p.D, e = i - hh * p.D;
    const T* xh = x + hh * p.sxh;
    float v = to_float(xh[e]);
    if (e < p.R) {
      bool first;
      int64_t j, partner;
      if constexpr (INTERLEAVED) {
        first = (e & 1) == 0, j = e >> 1, partner = e ^ 1;
      } else {
        first = e < h, j = first ? e : e - h, partner = first ? e + h : e - h;
      }
      const int64_t ci = p.per_feature ? e : j;
      const int64_t si = p.per_feature ? (p.conj ? partner : e) : j;
      const float sign = (first ? -1.f : 1.f) * conj_sign;
      v = v * to_float(cp[ci]) + sign * to_float(xh[partner]) * to_float(sp[si]);
    }
    out[i] = from_float<T>(v);
  }
}

// (grid, block) for B * S rows of n = H * D elements: one block per row, more when a row is long.
inline void geometry(int64_t rows, int64_t n, dim3& grid, dim3& block) {
  block = dim3(kThreads);
  const int64_t chunks = std::min<int64_t>(65535, (n + kThreads - 1) / kThreads);
  grid = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
}

// x of storage type dt rotated into out, with cos/sin of type angles (dt or float).
inline cudaError_t rope_launch(const RopeParams& p, int64_t B, bool interleaved, DType dt, DType angles,
                               cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto ctag) {
      using C = decltype(ctag);
      dim3 grid, block;
      geometry(B * p.S, p.H * p.D, grid, block);
      return interleaved ? launch(_rope_kernel<T, C, true>, grid, block, 0, stream, p)
                         : launch(_rope_kernel<T, C, false>, grid, block, 0, stream, p);
    };
    return angles == dt ? go(T{}) : go(float{});
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

std::tuple<Tensor, Tensor> rope(const char* op, const Tensor& q, const std::optional<Tensor>& k, const Tensor& cos,
                                const Tensor& sin, int64_t rotary_dim, bool interleaved, bool conj) {
  check_on_device(op, "q", q);
  check_rope(op, q, k, cos, sin, rotary_dim);
  const DType dt = dtype_of(op, "q", q), angles = dtype_of(op, "cos", cos);
  const int64_t B = q.size(0), S = q.size(1);
  TORCH_CHECK(B * S < (int64_t(1) << 31), op, ": at most 2^31 - 1 (batch, position) rows");
  const DeviceGuard guard(q.device());
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor qo = at::empty(q.sizes(), opts);
  Tensor ko = defined(k) ? at::empty(k->sizes(), opts) : at::empty({0}, opts);
  if (B * S == 0) return {qo, ko};
  RopeParams p;
  p.cos = cos.const_data_ptr(), p.scb = cos.stride(0), p.scs = cos.stride(1);
  p.sin = sin.const_data_ptr(), p.ssb = sin.stride(0), p.sss = sin.stride(1);
  p.S = S, p.D = q.size(3), p.R = rotary_dim, p.per_feature = cos.size(2) == rotary_dim, p.conj = conj;
  for (const auto& [x, out] : {std::pair<const Tensor*, Tensor*>{&q, &qo}, {defined(k) ? &*k : nullptr, &ko}}) {
    if (x == nullptr || x->numel() == 0) continue;
    p.x = x->const_data_ptr(), p.out = out->mutable_data_ptr(), p.H = x->size(2);
    p.sxb = x->stride(0), p.sxs = x->stride(1), p.sxh = x->stride(2);
    check_launch(rope_launch(p, B, interleaved, dt, angles, current_stream()));
  }
  return {qo, ko};
}

// llmfast::rope_fwd (CONJ false) and llmfast::rope_bwd (CONJ true: the transpose, for the gradients).
template <bool CONJ>
std::tuple<Tensor, Tensor> rope_entry(const Tensor& q, const std::optional<Tensor>& k, const Tensor& cos,
                                      const Tensor& sin, int64_t rotary_dim, bool interleaved) {
  return rope(CONJ ? "llmfast::rope_bwd" : "llmfast::rope_fwd", q, k, cos, sin, rotary_dim, interleaved, CONJ);
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("rope_fwd", &rope_entry<false>);
  m.impl("rope_bwd", &rope_entry<true>);
}

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
