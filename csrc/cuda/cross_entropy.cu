// Fused cross-entropy on CUDA, forward and backward, for class-index targets.
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
// writes. Offsets are int64: N*C may pass 2^31.
//
// A target outside [0, C) that is not ignore_index sets an error flag and gives NaN;
// cross_entropy_fwd reads the flag back (one host sync) and raises IndexError.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace llmfast::cuda {
namespace {

using at::Tensor;

constexpr int kMaxThreads = 512;

// fp32 / fp16 / bf16 only (no fp64 instantiations: fewer kernels to compile).
#define LLMFAST_DISPATCH_F32_F16_BF16(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
constexpr unsigned kFull = 0xffffffffu;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One thread's (then the block's) view of a row.
struct RowState {
  float m;      // running max
  float s;      // Σ exp(x - m)
  float S;      // Σ w (x - m) over finite x (smoothing only)
  float wf;     // Σ w over finite x (smoothing only)
  int flags;    // 1: a -inf logit (smoothing term is +inf); 2: a NaN logit
};

__device__ __forceinline__ RowState identity_state() { return {-INFINITY, 0.f, 0.f, 0.f, 0}; }

// b folded into a. A state at m = -inf has s = 0 and wf = 0: exp(-inf) = 0 and the
// wf != 0 guards keep 0 * inf out.
__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
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
}

__device__ __forceinline__ RowState shfl_xor(const RowState& st, int off) {
  return {__shfl_xor_sync(kFull, st.m, off), __shfl_xor_sync(kFull, st.s, off), __shfl_xor_sync(kFull, st.S, off),
          __shfl_xor_sync(kFull, st.wf, off), __shfl_xor_sync(kFull, st.flags, off)};
}

// Every thread returns the merged state of the block (blockDim.x a multiple of 32).
__device__ RowState block_reduce(RowState st) {
  __shared__ RowState warp_states[32];
  __shared__ RowState result;
  for (int off = 16; off > 0; off >>= 1) merge(st, shfl_xor(st, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < (blockDim.x >> 5) ? warp_states[lane] : identity_state();
    for (int off = 16; off > 0; off >>= 1) merge(st, shfl_xor(st, off));
    if (lane == 0) result = st;
  }
  __syncthreads();
  return result;
}

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

template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_pack(const scalar_t* p, float (&x)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) x[k] = static_cast<float>(pk.v[k]);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* p, const float (&x)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<scalar_t>(x[k]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// dr[c] = g dloss/dx_c for one row; dr may alias xr (each pack is read, then written, by one thread).
template <typename scalar_t, int VEC>
__device__ void row_grad(const scalar_t* xr, scalar_t* dr, const float* w, int64_t C, int64_t t, float hi, float lo,
                         float coef, float a, float b) {
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < C; j += static_cast<int64_t>(blockDim.x) * VEC) {
    float x[VEC];
    load_pack<scalar_t, VEC>(xr + j, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float d = __expf((x[k] - hi) - lo) * coef;
      if (a != 0.f) d -= a * (w ? w[j + k] : 1.f);
      if (j + k == t) d -= b;
      x[k] = d;
    }
    store_pack<scalar_t, VEC>(dr + j, x);
  }
}

template <typename scalar_t, int VEC>
__device__ void row_fill(scalar_t* dr, int64_t C, float value) {
  float v[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = value;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < C; j += static_cast<int64_t>(blockDim.x) * VEC) {
    store_pack<scalar_t, VEC>(dr + j, v);
  }
}

// x: [N, C]; loss: [N]; lse: [N, 2] (hi, lo); grid = N blocks. WRITE_GRAD also writes
// d(Σ loss)/dx over x. w_total: device scalar Σ w (nullptr without weights).
template <typename scalar_t, int VEC, bool WRITE_GRAD>
__global__ void cross_entropy_fwd_kernel(scalar_t* x, const int64_t* __restrict__ target, const float* __restrict__ w,
                                         const float* __restrict__ w_total, float* __restrict__ loss,
                                         float* __restrict__ lse, int* __restrict__ err, int64_t C,
                                         int64_t ignore_index, float eps) {
  const int64_t row = blockIdx.x;
  scalar_t* xr = x + row * C;
  const int64_t t = target[row];
  if (t == ignore_index || t < 0 || t >= C) {
    const bool bad = t != ignore_index;
    if (threadIdx.x == 0) {
      const float v = bad ? NAN : 0.f;
      loss[row] = v;
      lse[2 * row] = v;
      lse[2 * row + 1] = v;
      if (bad) *err = 1;
    }
    if (WRITE_GRAD) row_fill<scalar_t, VEC>(xr, C, bad ? NAN : 0.f);
    return;
  }
  const bool smooth = eps != 0.f;
  RowState st = identity_state();
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < C; j += static_cast<int64_t>(blockDim.x) * VEC) {
    float xv[VEC];
    load_pack<scalar_t, VEC>(xr + j, xv);
    absorb<VEC>(st, xv, w ? w + j : nullptr, smooth);
  }
  st = block_reduce(st);

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
  const float wt = w ? w[t] : 1.f;
  if (threadIdx.x == 0) {
    const float xt = static_cast<float>(xr[t]);
    float l = (1.f - eps) * wt * ((st.m - xt) + ls);  // lse - x_t, exact when x_t is the max
    if (smooth) l += eps / static_cast<float>(C) * ((st.flags & 1) ? INFINITY : st.wf * ls - st.S);
    loss[row] = (st.flags & 2) ? NAN : l;
    lse[2 * row] = hi;
    lse[2 * row + 1] = lo;
  }
  if (WRITE_GRAD) {
    __syncthreads();  // thread 0 read x[t] above; the gradient overwrites it
    const float W = w ? *w_total : static_cast<float>(C);
    const float coef = (1.f - eps) * wt + eps / static_cast<float>(C) * W;
    row_grad<scalar_t, VEC>(xr, xr, w, C, t, hi, lo, coef, eps / static_cast<float>(C), (1.f - eps) * wt);
  }
}

// g: [N] fp32; lse: [N, 2] fp32; x, dx: [N, C]; grid = N blocks.
template <typename scalar_t, int VEC>
__global__ void cross_entropy_bwd_kernel(const float* __restrict__ g, const scalar_t* __restrict__ x,
                                         const int64_t* __restrict__ target, const float* __restrict__ w,
                                         const float* __restrict__ w_total, const float* __restrict__ lse,
                                         scalar_t* __restrict__ dx, int64_t C, int64_t ignore_index, float eps) {
  const int64_t row = blockIdx.x;
  const int64_t t = target[row];
  scalar_t* dr = dx + row * C;
  if (t == ignore_index || t < 0 || t >= C) {  // the forward raised on bad targets; never index with them
    row_fill<scalar_t, VEC>(dr, C, 0.f);
    return;
  }
  const float gr = g[row];
  const float wt = w ? w[t] : 1.f;
  const float W = w ? *w_total : static_cast<float>(C);
  const float coef = gr * ((1.f - eps) * wt + eps / static_cast<float>(C) * W);
  row_grad<scalar_t, VEC>(x + row * C, dr, w, C, t, lse[2 * row], lse[2 * row + 1], coef,
                          gr * eps / static_cast<float>(C), gr * (1.f - eps) * wt);
}

// ----------------------------------------------------------------------------------
// Launchers

int threads_for(int64_t C, int vec) {
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * vec < C) threads *= 2;
  return threads;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void check_inputs(const char* name, const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight,
                  double label_smoothing) {
  TORCH_CHECK(x.is_cuda(), name, ": logits must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, ": logits must be a contiguous [N, C] tensor, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              name, ": logits must be float32/float16/bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) <= INT32_MAX, name, ": at most 2^31-1 rows per call");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              name, ": target must be contiguous int64 of shape [", x.size(0), "], got ", target.scalar_type(), " ",
              target.sizes());
  TORCH_CHECK(target.device() == x.device(), name, ": target is on ", target.device(), ", logits on ", x.device());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(1) && weight->is_contiguous() &&
                    weight->scalar_type() == at::kFloat,
                name, ": weight must be a contiguous float32 [", x.size(1), "] tensor, got ", weight->scalar_type(),
                " ", weight->sizes());
    TORCH_CHECK(weight->device() == x.device(), name, ": weight is on ", weight->device(), ", logits on ",
                x.device());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, name, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

std::tuple<Tensor, Tensor> fwd_impl(const char* name, Tensor& x, const Tensor& target,
                                    const std::optional<Tensor>& weight, int64_t ignore_index,
                                    double label_smoothing, bool write_grad) {
  check_inputs(name, x, target, weight, label_smoothing);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor loss = at::empty({N}, f32), lse = at::empty({N, 2}, f32);
  if (N == 0) return {loss, lse};
  TORCH_CHECK(C > 0, name, ": logits have 0 classes");
  Tensor err = at::zeros({1}, x.options().dtype(at::kInt));
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  Tensor w_total;
  if (weight.has_value()) w_total = weight->sum();
  const float* wt_ptr = weight.has_value() ? w_total.const_data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  LLMFAST_DISPATCH_F32_F16_BF16(x.scalar_type(), "llmfast_cross_entropy_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && C % kVec == 0;
    const int threads = threads_for(C, vec ? kVec : 1);
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(N), threads, 0, stream>>>(xp, target.const_data_ptr<int64_t>(), w, wt_ptr,
                                                               loss.mutable_data_ptr<float>(),
                                                               lse.mutable_data_ptr<float>(),
                                                               err.mutable_data_ptr<int>(), C, ignore_index,
                                                               static_cast<float>(label_smoothing));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (write_grad) {
      vec ? launch(cross_entropy_fwd_kernel<scalar_t, kVec, true>) : launch(cross_entropy_fwd_kernel<scalar_t, 1, true>);
    } else {
      vec ? launch(cross_entropy_fwd_kernel<scalar_t, kVec, false>)
          : launch(cross_entropy_fwd_kernel<scalar_t, 1, false>);
    }
  });
  if (!write_grad) {
    // One host sync per call buys a clear error instead of a device assert or garbage.
    // fwd_grad skips it: its caller (the fused linear + CE) checks targets once up front.
    TORCH_CHECK_INDEX(err.item<int>() == 0, "cross_entropy: a target is out of bounds for ", C,
                      " classes (targets must be in [0, ", C, ") or equal ignore_index=", ignore_index, ")");
  }
  return {loss, lse};
}

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& target,
                                             const std::optional<Tensor>& weight, int64_t ignore_index,
                                             double label_smoothing) {
  Tensor x = logits;  // not written: write_grad is false
  return fwd_impl("llmfast::cross_entropy_fwd", x, target, weight, ignore_index, label_smoothing, false);
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_grad(Tensor& logits, const Tensor& target,
                                                  const std::optional<Tensor>& weight, int64_t ignore_index,
                                                  double label_smoothing) {
  return fwd_impl("llmfast::cross_entropy_fwd_grad", logits, target, weight, ignore_index, label_smoothing, true);
}

Tensor cross_entropy_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                         const std::optional<Tensor>& weight, const Tensor& lse, int64_t ignore_index,
                         double label_smoothing) {
  const char* name = "llmfast::cross_entropy_bwd";
  check_inputs(name, logits, target, weight, label_smoothing);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == logits.size(0) && grad_loss.scalar_type() == at::kFloat &&
                  grad_loss.is_contiguous() && grad_loss.device() == logits.device(),
              name, ": grad_loss must be contiguous float32 [", logits.size(0), "] on ", logits.device());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == logits.size(0) && lse.size(1) == 2 &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == logits.device(),
              name, ": lse must be contiguous float32 [", logits.size(0), ", 2] on ", logits.device());
  c10::cuda::CUDAGuard guard(logits.device());
  Tensor dx = at::empty_like(logits);
  const int64_t N = logits.size(0), C = logits.size(1);
  if (logits.numel() == 0) return dx;
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  Tensor w_total;
  if (weight.has_value()) w_total = weight->sum();
  const float* wt_ptr = weight.has_value() ? w_total.const_data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  LLMFAST_DISPATCH_F32_F16_BF16(logits.scalar_type(), "llmfast_cross_entropy_bwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && aligned16(dp) && C % kVec == 0;
    const int threads = threads_for(C, vec ? kVec : 1);
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(N), threads, 0, stream>>>(
          grad_loss.const_data_ptr<float>(), xp, target.const_data_ptr<int64_t>(), w, wt_ptr,
          lse.const_data_ptr<float>(), dp, C, ignore_index, static_cast<float>(label_smoothing));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    vec ? launch(cross_entropy_bwd_kernel<scalar_t, kVec>) : launch(cross_entropy_bwd_kernel<scalar_t, 1>);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad);
}

}  // namespace llmfast::cuda
