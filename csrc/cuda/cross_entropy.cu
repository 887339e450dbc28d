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
//
// The kernel half compiles on its own (LLMFAST_CROSS_ENTROPY_STANDALONE): the scratch
// program csrc/dev/cross_entropy_dev.cu includes it to check the kernels against a
// float64 CPU reference, on a GPU or (g++ -DLLMFAST_EMU) through the warp-level
// emulator csrc/dev/cuda_emu.h, which runs every thread as a fiber in a random order
// between barriers and starts shared memory as NaN.

#ifdef LLMFAST_EMU
#include "dev/cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace llmfast::xent {

constexpr int kMaxThreads = 512;

// Everything a kernel reads or writes; one struct so the emulator can launch it too.
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

__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__host__ __device__ __forceinline__ T from_float(float x);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ------------------------------------------------------------------------------------------
// Device primitives; the emulator build gets CPU versions with the same semantics.
// ------------------------------------------------------------------------------------------
#ifdef LLMFAST_EMU
inline float fast_exp(float x) { return std::exp(x); }
inline float fast_log(float x) { return std::log(x); }
inline bool is_finite(float x) { return std::isfinite(x); }
inline void block_sync() { ::emu::cta_barrier(); }
inline float shfl_xor_f(float v, int m) {
  ::emu::Slot s{};
  s.f = v;
  return ::emu::exchange(s)[(::emu::me().tid % 32) ^ static_cast<unsigned>(m)].f;
}
inline int shfl_xor_i(int v, int m) {
  ::emu::Slot s{};
  s.u[0] = static_cast<uint32_t>(v);
  return static_cast<int>(::emu::exchange(s)[(::emu::me().tid % 32) ^ static_cast<unsigned>(m)].u[0]);
}
#else
// __expf/__logf (ex2/lg2.approx): a few ulp, plenty next to the 1e-5 fp32 tolerance.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ float fast_log(float x) { return __logf(x); }
__device__ __forceinline__ bool is_finite(float x) { return isfinite(x); }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ float shfl_xor_f(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ int shfl_xor_i(int v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
#ifndef LLMFAST_DYN_SMEM
#define LLMFAST_DYN_SMEM(name) extern __shared__ __align__(16) char name[]
#endif
#endif

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One thread's (then the block's) view of a row.
struct RowState {
  float m;    // running max
  float s;    // Σ exp(x - m)
  float S;    // Σ w (x - m) over finite x (smoothing only)
  float wf;   // Σ w over finite x (smoothing only)
  int flags;  // 1: a -inf logit (smoothing term is +inf); 2: a NaN logit
};

// Dynamic shared memory of the forward kernel: 32 warp states and the block's result.
constexpr int kFwdSmem = 33 * static_cast<int>(sizeof(RowState));

__device__ __forceinline__ RowState identity_state() { return {-INFINITY, 0.f, 0.f, 0.f, 0}; }

// b folded into a. A state at m = -inf has s = 0 and wf = 0: exp(-inf) = 0 and the
// wf != 0 guards keep 0 * inf out.
__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m != -INFINITY) {
    a.s = a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m);
    const float sa = a.wf != 0.f ? a.S - a.wf * (m - a.m) : a.S;
    const float sb = b.wf != 0.f ? b.S - b.wf * (m - b.m) : b.S;
    a.S = sa + sb;
  }
  a.wf += b.wf;
  a.flags |= b.flags;
  a.m = m;
}

__device__ __forceinline__ RowState shfl_state(const RowState& st, int off) {
  RowState o;
  o.m = shfl_xor_f(st.m, off);
  o.s = shfl_xor_f(st.s, off);
  o.S = shfl_xor_f(st.S, off);
  o.wf = shfl_xor_f(st.wf, off);
  o.flags = shfl_xor_i(st.flags, off);
  return o;
}

// Every thread returns the merged state of the block (blockDim.x a multiple of 32).
__device__ __forceinline__ RowState block_reduce(RowState st, RowState* smem) {
  RowState* warp_states = smem;  // [32]
  RowState* result = smem + 32;
  for (int off = 16; off > 0; off >>= 1) merge(st, shfl_state(st, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_states[warp] = st;
  block_sync();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x >> 5) ? warp_states[lane] : identity_state();
    for (int off = 16; off > 0; off >>= 1) merge(st, shfl_state(st, off));
    if (lane == 0) *result = st;
  }
  block_sync();
  return *result;
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
    st.s *= fast_exp(st.m - vm);
    if (st.wf != 0.f) st.S -= st.wf * (vm - st.m);
    st.m = vm;
  }
  if (st.m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) st.s += fast_exp(x[k] - st.m);
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
      float d = fast_exp((x[k] - hi) - lo) * coef;
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
// d(Σ loss)/dx over the row of x. Dynamic shared memory: kFwdSmem bytes.
template <typename T, int VEC, bool WRITE_GRAD>
__global__ void _cross_entropy_fwd_kernel(const CeParams p) {
  LLMFAST_DYN_SMEM(smem_raw);
  RowState* smem = reinterpret_cast<RowState*>(smem_raw);
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
  st = block_reduce(st, smem);

  // Every thread derives the same row results from the shared state.
  float hi, lo, ls;
  if (st.flags & 2) {  // a NaN anywhere poisons the row, as in torch
    hi = lo = ls = NAN;
  } else {
    ls = fast_log(st.s);
    // lse = hi + lo exactly (Knuth's TwoSum; no products, so fma contraction can't touch it)
    hi = st.m + ls;
    const float bb = hi - st.m;
    lo = is_finite(hi) ? (st.m - (hi - bb)) + (ls - bb) : 0.f;
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
    block_sync();  // thread 0 read x[t] above; the gradient overwrites it
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
// Launchers (shared by the torch binding and the dev program)
// ------------------------------------------------------------------------------------------
enum class DType { kFloat, kHalf, kBFloat16 };

inline int elem_bytes(DType dt) { return dt == DType::kFloat ? 4 : 2; }

// Threads per row: enough 16-byte packs in flight to cover the row, at most 512.
inline int threads_for(int64_t C, int vec) {
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * vec < C) threads *= 2;
  return threads;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename Kernel>
inline void launch(Kernel kernel, int64_t rows, int threads, int smem, cudaStream_t stream, const CeParams& p) {
#ifdef LLMFAST_EMU
  (void)stream;
  ::emu::launch(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads), smem, p);
#else
  kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(p);
#endif
}

template <typename F>
inline void dispatch(DType dt, F&& f) {
  if (dt == DType::kHalf) return f(__half{});
  if (dt == DType::kBFloat16) return f(__nv_bfloat16{});
  return f(float{});
}

// Forward over `rows` rows (>= 1). Vector loads when every row starts 16-byte aligned.
inline void cross_entropy_fwd_launch(const CeParams& p, DType dt, int64_t rows, bool write_grad, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = aligned16(p.x) && p.C % kVec == 0;
    const int threads = threads_for(p.C, vec ? kVec : 1);
    if (write_grad) {
      vec ? launch(_cross_entropy_fwd_kernel<T, kVec, true>, rows, threads, kFwdSmem, stream, p)
          : launch(_cross_entropy_fwd_kernel<T, 1, true>, rows, threads, kFwdSmem, stream, p);
    } else {
      vec ? launch(_cross_entropy_fwd_kernel<T, kVec, false>, rows, threads, kFwdSmem, stream, p)
          : launch(_cross_entropy_fwd_kernel<T, 1, false>, rows, threads, kFwdSmem, stream, p);
    }
  });
}

inline void cross_entropy_bwd_launch(const CeParams& p, DType dt, int64_t rows, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = aligned16(p.x) && aligned16(p.dx) && p.C % kVec == 0;
    const int threads = threads_for(p.C, vec ? kVec : 1);
    vec ? launch(_cross_entropy_bwd_kernel<T, kVec>, rows, threads, 0, stream, p)
        : launch(_cross_entropy_bwd_kernel<T, 1>, rows, threads, 0, stream, p);
  });
}

}  // namespace llmfast::xent

#ifndef LLMFAST_CROSS_ENTROPY_STANDALONE
// ------------------------------------------------------------------------------------------
// torch binding
// ------------------------------------------------------------------------------------------
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace llmfast::xent {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat;
  }
}

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

// Fills the weight fields of p; the returned tensor (Σ w) must outlive the launch.
Tensor set_weight(CeParams& p, const std::optional<Tensor>& weight) {
  if (!weight.has_value()) return Tensor();
  Tensor total = weight->sum();
  p.w = weight->const_data_ptr<float>();
  p.w_total = total.const_data_ptr<float>();
  return total;
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
  CeParams p{};
  p.x = x.data_ptr();
  p.target = target.const_data_ptr<int64_t>();
  const Tensor w_total = set_weight(p, weight);
  p.loss = loss.mutable_data_ptr<float>();
  p.lse = lse.mutable_data_ptr<float>();
  p.err = err.mutable_data_ptr<int>();
  p.C = C;
  p.ignore_index = ignore_index;
  p.eps = static_cast<float>(label_smoothing);
  cross_entropy_fwd_launch(p, dtype_of(x), N, write_grad, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (logits.numel() == 0) return dx;
  CeParams p{};
  p.x = const_cast<void*>(logits.const_data_ptr());  // read only in the backward kernel
  p.target = target.const_data_ptr<int64_t>();
  const Tensor w_total = set_weight(p, weight);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only in the backward kernel
  p.g = grad_loss.const_data_ptr<float>();
  p.dx = dx.data_ptr();
  p.C = logits.size(1);
  p.ignore_index = ignore_index;
  p.eps = static_cast<float>(label_smoothing);
  cross_entropy_bwd_launch(p, dtype_of(logits), logits.size(0), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad);
}

}  // namespace llmfast::xent
#endif  // LLMFAST_CROSS_ENTROPY_STANDALONE
