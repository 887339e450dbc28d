// Fused cross-entropy for llmfast::cross_entropy_fwd / _bwd / _fwd_grad (CUDA), class-index targets.
//
// logits x: [N, C] contiguous (fp32/fp16/bf16, C up to 256K and beyond); target: [N]
// int64; weight w: none or [C] fp32; eps = label smoothing. Per row (t = target):
//
//   loss = (1-eps) w_t (lse - x_t) + eps/C Σ_c w_c (lse - x_c)        (0 if t == ignore_index)
//   dx_c = g [ p_c ((1-eps) w_t + eps/C W) - eps/C w_c - (1-eps) w_t [c == t] ],  p_c = exp(x_c - lse)
//
// One thread block per row. Each thread streams its share of the row with 16-byte
// vector loads (float4 / 8 halves) when the row is 16-byte aligned, keeping an online
// (max, Σ exp(x - max)) pair — the sum is rescaled only when a pack raises the max, so
// an element costs one exp — and, for label smoothing, Σ w (x - max) kept relative to
// the running max (no cancellation at |x| ~ 1e4). Thread states merge by warp shuffles,
// then across warps through shared memory. lse is returned as hi + lo (TwoSum), so the
// backward's exp((x - hi) - lo) is as accurate as torch's log_softmax even where fp32
// rounds lse itself by 5e-4. Bytes: forward reads N*C*s once; backward reads and
// writes N*C*s; fwd_grad (fused linear + CE) reads, then re-reads (mostly L2) and
// writes. Offsets are int64: N*C may pass 2^31. __expf/__logf (ex2/lg2.approx) are a
// few ulp: plenty next to the 1e-5 fp32 tolerance.
//
// A target outside [0, C) that is not ignore_index sets an error flag and gives NaN;
// cross_entropy_fwd reads the flag back (one host sync) and raises IndexError.
//
// The scratch program csrc/dev/cross_entropy_dev.cu checks the kernels against a float64
// CPU reference, on a GPU or through the warp emulator.
#include <cmath>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

constexpr int kCeMaxThreads = 512;

// Everything a kernel reads or writes.
struct CeParams {
  void* x;                // [N, C] logits (fwd, fwd_grad: overwritten by the gradient)
  const int64_t* target;  // [N]
  const float* w;         // [C] or nullptr
  const float* w_total;   // device scalar Σ w (nullptr without weights)
  float* loss;            // [N]       (fwd)
  float* lse;             // [N, 2]    (fwd writes, bwd reads): hi, lo
  int* err;               // device flag (fwd)
  const float* g;         // [N]       (bwd)
  void* dx;               // [N, C]    (bwd)
  int64_t C;
  int64_t ignore_index;
  float eps;
};

// One thread's (then the block's) view of a row.
struct RowState {
  float m;    // running max
  float s;    // Σ exp(x - m)
  float S;    // Σ w (x - m) over finite x (smoothing only)
  float wf;   // Σ w over finite x (smoothing only)
  int flags;  // 1: a -inf logit (smoothing term is +inf); 2: a NaN logit
};

__device__ __forceinline__ RowState identity_state() { return {-INFINITY, 0.f, 0.f, 0.f, 0}; }

// a and b merged. A state at m = -inf has s = 0 and wf = 0: exp(-inf) = 0 and the
// wf != 0 guards keep 0 * inf out.
struct Merge {
  __device__ __forceinline__ RowState operator()(RowState a, const RowState& b) const {
    const float m = fmaxf(a.m, b.m);
    if (m != -INFINITY) {
      a.s = a.s * __expf(a.m - m) + b.s * __expf(b.m - m);
      const float sa = a.wf != 0.f ? a.S - a.wf * (m - a.m) : a.S;
      const float sb = b.wf != 0.f ? b.S - b.wf * (m - b.m) : b.S;
      a.S = sa + sb;
    }
    a.wf += b.wf;
    a.flags |= b.flags;
    a.m = m;
    return a;
  }
};

// Fold a pack of VEC logits (as fp32) into a thread's state.
template <int VEC>
__device__ __forceinline__ void absorb(RowState& st, const float (&x)[VEC], const float* w, bool smooth) {
  float vm = -INFINITY;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (x[k] != x[k]) st.flags |= 2;
    vm = fmaxf(vm, x[k]);
  }
  if (vm > st.m) {  // rescale to the new max (st.m = -inf: s is 0 and exp(-inf) = 0)
    st.s *= __expf(st.m - vm);
    if (st.wf != 0.f) st.S -= st.wf * (vm - st.m);
    st.m = vm;
  }
  if (st.m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) st.s += __expf(x[k] - st.m);
  }
  if (smooth) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (x[k] == -INFINITY) {
        st.flags |= 1;
      } else {
        const float wk = w ? w[k] : 1.f;
        st.S += wk * (x[k] - st.m);
        st.wf += wk;
      }
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&x)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) x[k] = to_float(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&x)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_float<T>(x[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// dr[c] = g dloss/dx_c for one row; dr may alias xr (each pack is read, then written, by one thread).
template <typename T, int VEC>
__device__ __forceinline__ void row_grad(const T* xr, T* dr, const float* w, int64_t C, int64_t t, float hi,
                                         float lo, float coef, float a, float b) {
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < C; j += static_cast<int64_t>(blockDim.x) * VEC) {
    float x[VEC];
    load_pack<T, VEC>(xr + j, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float d = __expf((x[k] - hi) - lo) * coef;
      if (a != 0.f) d -= a * (w ? w[j + k] : 1.f);
      if (j + k == t) d -= b;
      x[k] = d;
    }
    store_pack<T, VEC>(dr + j, x);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void row_fill(T* dr, int64_t C, float value) {
  float v[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = value;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < C; j += static_cast<int64_t>(blockDim.x) * VEC) {
    store_pack<T, VEC>(dr + j, v);
  }
}

// One block per row: loss[row], lse[row] = (hi, lo); WRITE_GRAD also writes
// d(Σ loss)/dx over the row of x.
template <typename T, int VEC, bool WRITE_GRAD>
__global__ void _cross_entropy_fwd_kernel(const CeParams p) {
  __shared__ RowState smem[32];
  const int64_t row = blockIdx.x, C = p.C;
  T* xr = static_cast<T*>(p.x) + row * C;
  const int64_t t = p.target[row];
  const float eps = p.eps;
  if (t == p.ignore_index || t < 0 || t >= C) {
    const bool bad = t != p.ignore_index;
    if (threadIdx.x == 0) {
      const float v = bad ? NAN : 0.f;
      p.loss[row] = v;
      p.lse[2 * row] = v;
      p.lse[2 * row + 1] = v;
      if (bad) *p.err = 1;
    }
    if (WRITE_GRAD) row_fill<T, VEC>(xr, C, bad ? NAN : 0.f);
    return;
  }
  const bool smooth = eps != 0.f;
  RowState st = identity_state();
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < C; j += static_cast<int64_t>(blockDim.x) * VEC) {
    float xv[VEC];
    load_pack<T, VEC>(xr + j, xv);
    absorb<VEC>(st, xv, p.w ? p.w + j : nullptr, smooth);
  }
  st = block_reduce(st, Merge{}, identity_state(), smem);

  // Every thread derives the same row results from the shared state.
  float hi, lo, ls;
  if (st.flags & 2) {  // a NaN anywhere poisons the row, as in torch
    hi = lo = ls = NAN;
  } else {
    ls = __logf(st.s);
    // lse = hi + lo exactly (Knuth's TwoSum; no products, so fma contraction can't touch it)
    hi = st.m + ls;
    const float bb = hi - st.m;
    lo = isfinite(hi) ? (st.m - (hi - bb)) + (ls - bb) : 0.f;
  }
  const float wt = p.w ? p.w[t] : 1.f;
  if (threadIdx.x == 0) {
    const float xt = to_float(xr[t]);
    float l = (1.f - eps) * wt * ((st.m - xt) + ls);  // lse - x_t, exact when x_t is the max
    if (smooth) l += eps / static_cast<float>(C) * ((st.flags & 1) ? INFINITY : st.wf * ls - st.S);
    p.loss[row] = (st.flags & 2) ? NAN : l;
    p.lse[2 * row] = hi;
    p.lse[2 * row + 1] = lo;
  }
  if (WRITE_GRAD) {
    __syncthreads();  // thread 0 read x[t] above; the gradient overwrites it
    const float W = p.w ? *p.w_total : static_cast<float>(C);
    const float coef = (1.f - eps) * wt + eps / static_cast<float>(C) * W;
    row_grad<T, VEC>(xr, xr, p.w, C, t, hi, lo, coef, eps / static_cast<float>(C), (1.f - eps) * wt);
  }
}

// One block per row: dx[row] = g[row] dloss_row/dx[row] from (x, lse).
template <typename T, int VEC>
__global__ void _cross_entropy_bwd_kernel(const CeParams p) {
  const int64_t row = blockIdx.x, C = p.C;
  const int64_t t = p.target[row];
  T* dr = static_cast<T*>(p.dx) + row * C;
  if (t == p.ignore_index || t < 0 || t >= C) {  // the forward raised on bad targets; never index with them
    row_fill<T, VEC>(dr, C, 0.f);
    return;
  }
  const float g = p.g[row], eps = p.eps;
  const float wt = p.w ? p.w[t] : 1.f;
  const float W = p.w ? *p.w_total : static_cast<float>(C);
  const float coef = g * ((1.f - eps) * wt + eps / static_cast<float>(C) * W);
  row_grad<T, VEC>(static_cast<const T*>(p.x) + row * C, dr, p.w, C, t, p.lse[2 * row], p.lse[2 * row + 1], coef,
                   g * eps / static_cast<float>(C), g * (1.f - eps) * wt);
}

// ------------------------------------------------------------------------------------------
// Launchers over `rows` (>= 1) rows. Vector loads when every row starts 16-byte aligned.
// ------------------------------------------------------------------------------------------

// Threads per row: enough 16-byte packs in flight to cover the row, at most 512.
inline int threads_for(int64_t C, int vec) {
  int threads = 32;
  while (threads < kCeMaxThreads && static_cast<int64_t>(threads) * vec < C) threads *= 2;
  return threads;
}

inline cudaError_t cross_entropy_fwd_launch(const CeParams& p, DType dt, int64_t rows, bool write_grad,
                                            cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackVec<T>;
    const bool vec = aligned16(p.x) && p.C % kVec == 0;
    auto* kernel = write_grad
                       ? (vec ? _cross_entropy_fwd_kernel<T, kVec, true> : _cross_entropy_fwd_kernel<T, 1, true>)
                       : (vec ? _cross_entropy_fwd_kernel<T, kVec, false> : _cross_entropy_fwd_kernel<T, 1, false>);
    return launch(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads_for(p.C, vec ? kVec : 1)), 0, stream, p);
  });
}

inline cudaError_t cross_entropy_bwd_launch(const CeParams& p, DType dt, int64_t rows, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackVec<T>;
    const bool vec = aligned16(p.x) && aligned16(p.dx) && p.C % kVec == 0;
    auto* kernel = vec ? _cross_entropy_bwd_kernel<T, kVec> : _cross_entropy_bwd_kernel<T, 1>;
    return launch(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads_for(p.C, vec ? kVec : 1)), 0, stream, p);
  });
}

}  // namespace
}  // namespace llmfast::cuda

#ifndef LLMFAST_CUDA_KERNELS_ONLY
// =============================================================================================
// torch binding
// =============================================================================================
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include "cuda/binding.h"

namespace llmfast::cuda {
namespace {

// Checks the arguments and fills p's common fields; the returned tensors (contiguous target,
// the weights' total) must outlive the launch.
std::tuple<Tensor, Tensor> set_params(CeParams& p, const char* op, const Tensor& x, const Tensor& target,
                                      const std::optional<Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing) {
  check_on_device(op, "logits", x);
  check_cross_entropy(op, x, target, weight, label_smoothing);
  dtype_of(op, "logits", x);
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": at most 2^31 - 1 rows per call (one block per row)");
  Tensor t = target.contiguous(), w_total;
  p.target = t.const_data_ptr<int64_t>();
  if (defined(weight)) {
    w_total = weight->sum();
    p.w = weight->const_data_ptr<float>();
    p.w_total = w_total.const_data_ptr<float>();
  }
  p.C = x.size(1);
  p.ignore_index = ignore_index;
  p.eps = static_cast<float>(label_smoothing);
  return {t, w_total};
}

std::tuple<Tensor, Tensor> fwd(const char* op, Tensor& x, const Tensor& target, const std::optional<Tensor>& weight,
                               int64_t ignore_index, double label_smoothing, bool write_grad) {
  CeParams p{};
  const auto keep = set_params(p, op, x, target, weight, ignore_index, label_smoothing);
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor loss = at::empty({N}, f32), lse = at::empty({N, 2}, f32);
  if (N == 0) return {loss, lse};
  TORCH_CHECK(C > 0, op, ": logits have 0 classes");
  Tensor err = at::zeros({1}, x.options().dtype(at::kInt));
  p.x = x.data_ptr();
  p.loss = loss.mutable_data_ptr<float>();
  p.lse = lse.mutable_data_ptr<float>();
  p.err = err.mutable_data_ptr<int>();
  check_launch(cross_entropy_fwd_launch(p, dtype_of(op, "logits", x), N, write_grad, current_stream()));
  if (!write_grad) {
    // One host sync per call buys a clear error instead of a device assert or garbage.
    // fwd_grad skips it: its caller (the fused linear + CE) checks targets once up front.
    TORCH_CHECK_INDEX(err.item<int>() == 0, "cross_entropy: a target is out of bounds for ", C,
                      " classes (targets must be in [0, ", C, ") or equal ignore_index=", ignore_index, ")");
  }
  return {loss, lse};
}

Tensor cross_entropy_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                         const std::optional<Tensor>& weight, const Tensor& lse, int64_t ignore_index,
                         double label_smoothing) {
  constexpr const char* op = "llmfast::cross_entropy_bwd";
  CeParams p{};
  const auto keep = set_params(p, op, logits, target, weight, ignore_index, label_smoothing);
  check_cross_entropy_bwd(op, grad_loss, lse, logits);
  const DeviceGuard guard(logits.device());
  Tensor dx = at::empty_like(logits);
  if (logits.numel() == 0) return dx;
  const Tensor g = grad_loss.contiguous(), e = lse.contiguous();
  p.x = const_cast<void*>(logits.const_data_ptr());  // read only in the backward kernel
  p.lse = const_cast<float*>(e.const_data_ptr<float>());
  p.g = g.const_data_ptr<float>();
  p.dx = dx.data_ptr();
  check_launch(cross_entropy_bwd_launch(p, dtype_of(op, "logits", logits), logits.size(0), current_stream()));
  return dx;
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("cross_entropy_fwd", [](const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                                 int64_t ignore_index, double label_smoothing) {
    Tensor x = logits;  // not written: write_grad is false
    return fwd("llmfast::cross_entropy_fwd", x, target, weight, ignore_index, label_smoothing, false);
  });
  m.impl("cross_entropy_fwd_grad", [](Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                                      int64_t ignore_index, double label_smoothing) {
    return fwd("llmfast::cross_entropy_fwd_grad", logits, target, weight, ignore_index, label_smoothing, true);
  });
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
}

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
