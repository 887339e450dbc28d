// Gated activations (SwiGLU, GeGLU) for llmfast::glu_fwd / glu_bwd (CUDA). One kernel per
// direction, the activation a template argument (ACT), the maths of kernels/glu.py:
//
//   out = act(a) * b;   da = dout * b * act'(a),  db = dout * act(a)
//   silu (0):       q = 1 / (1 + exp(-a)),  act = a*q,  act' = q (1 + a (1 - q))
//   gelu tanh (1):  q = 1 / (1 + exp(-2u)), u = sqrt(2/pi) (a + 0.044715 a^3), act = a*q
//                   (= 0.5 a (1 + tanh u)),  act' = q + 2 a q (1 - q) u'
//   gelu erf (2):   Phi = 0.5 (1 + erf(a / sqrt 2)),  act = a*Phi,  act' = Phi + a exp(-a^2/2) / sqrt(2 pi)
//
// gate a, up b: [M, N], unit column stride, row strides sa / sb (the packed form's halves are
// two views of one [M, 2N] row, sa == sb); outputs at row stride so (N, or 2N for the packed
// gradient's halves). Elementwise and memory-bound: a 2-D block of threads covers a tile of
// rows x packs (16-byte packs when N, the strides and the pointers allow, else one element per
// thread); short rows share a block, so N = 64 still fills the warps. fp32 math for every
// storage type; each output rounded once.
#include <algorithm>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

constexpr int kThreads = 256;

// act(a), and act'(a) into d when GRAD.
template <int ACT, bool GRAD>
__device__ __forceinline__ float activation(float a, float& d) {
  if constexpr (ACT == 2) {
    const float phi = 0.5f * (1.f + erff(a * 0.70710678118654752f));
    if constexpr (GRAD) d = phi + a * expf(-0.5f * a * a) * 0.39894228040143268f;
    return a * phi;
  } else {
    const float z = ACT == 1 ? 1.5957691216057308f * (a + 0.044715f * a * a * a) : a;  // 2u, or a
    const float q = 1.f / (1.f + expf(-z));
    if constexpr (GRAD) {
      d = ACT == 1 ? q + 1.5957691216057308f * a * q * (1.f - q) * (1.f + 0.134145f * a * a)
                   : q * (1.f + a * (1.f - q));
    }
    return a * q;
  }
}

struct GluParams {
  const void* g = nullptr;  // dout [M, N], row stride sg (bwd)
  const void* a = nullptr;  // gate [M, N], row stride sa
  const void* b = nullptr;  // up [M, N], row stride sb
  void* out = nullptr;      // fwd: out; bwd: da (both at row stride so)
  void* db = nullptr;       // bwd: db, row stride so
  int64_t M = 0, N = 0, sg = 0, sa = 0, sb = 0, so = 0;
};

// Thread (x, y) of block (bx, by): row bx * blockDim.y + y, pack by * blockDim.x + x.
template <typename T, int ACT, int VEC>
__global__ void _glu_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t M,
                                int64_t N, int64_t sa, int64_t sb, int64_t so) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (row >= M || c >= N) return;
  const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a + row * sa + c);
  const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b + row * sb + c);
  Pack<T, VEC> po;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float unused;
    po.v[v] = from_float<T>(activation<ACT, false>(to_float(pa.v[v]), unused) * to_float(pb.v[v]));
  }
  *reinterpret_cast<Pack<T, VEC>*>(out + row * so + c) = po;
}

template <typename T, int ACT, int VEC>
__global__ void _glu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                                T* __restrict__ da, T* __restrict__ db, int64_t M, int64_t N, int64_t sg, int64_t sa,
                                int64_t sb, int64_t so) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (row >= M || c >= N) return;
  const Pack<T, VEC> pg = *reinterpret_cast<const Pack<T, VEC>*>(g + row * sg + c);
  const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a + row * sa + c);
  const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b + row * sb + c);
  Pack<T, VEC> pda, pdb;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float d;
    const float gv = to_float(pg.v[v]);
    const float y = activation<ACT, true>(to_float(pa.v[v]), d);
    pda.v[v] = from_float<T>(gv * to_float(pb.v[v]) * d);
    pdb.v[v] = from_float<T>(gv * y);
  }
  *reinterpret_cast<Pack<T, VEC>*>(da + row * so + c) = pda;
  *reinterpret_cast<Pack<T, VEC>*>(db + row * so + c) = pdb;
}

// f(std::integral_constant<int, ACT>{}, std::integral_constant<int, VEC>{}) for the storage type T.
template <typename T, typename F>
inline cudaError_t with_act_vec(int act, bool packs, F&& f) {
  constexpr int V = kPackVec<T>;
  auto by_vec = [&](auto a) {
    return packs ? f(a, std::integral_constant<int, V>{}) : f(a, std::integral_constant<int, 1>{});
  };
  if (act == 0) return by_vec(std::integral_constant<int, 0>{});
  if (act == 1) return by_vec(std::integral_constant<int, 1>{});
  return by_vec(std::integral_constant<int, 2>{});
}

// 16-byte packs when every row start of every tensor is 16-byte aligned.
inline bool can_pack(const GluParams& p, int vec, bool bwd) {
  bool ok = p.N % vec == 0 && p.sa % vec == 0 && p.sb % vec == 0 && p.so % vec == 0 && aligned16(p.a) &&
            aligned16(p.b) && aligned16(p.out);
  if (bwd) ok = ok && p.sg % vec == 0 && aligned16(p.g) && aligned16(p.db);
  return ok;
}

// (grid, block) for [M, N] in packs of vec: blockDim.x threads along a row (a multiple of 32 up
// to 256), blockDim.y rows; grid.y column tiles.
inline void geometry(int64_t M, int64_t N, int vec, dim3& grid, dim3& block) {
  const int64_t packs = (N + vec - 1) / vec;
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, (packs + 31) / 32 * 32));
  const int ty = kThreads / tx;
  block = dim3(tx, ty);
  grid = dim3(static_cast<unsigned>((M + ty - 1) / ty), static_cast<unsigned>((packs + tx - 1) / tx));
}

// The forward (BWD false: out = act(a) * b) or backward kernel for p, in packs when allowed.
template <bool BWD>
inline cudaError_t glu_launch(const GluParams& p, int act, DType dt, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    return with_act_vec<T>(act, can_pack(p, kPackVec<T>, BWD), [&](auto a, auto v) {
      constexpr int ACT = decltype(a)::value, VEC = decltype(v)::value;
      dim3 grid, block;
      geometry(p.M, p.N, VEC, grid, block);
      const T* ap = static_cast<const T*>(p.a);
      const T* bp = static_cast<const T*>(p.b);
      if constexpr (BWD) {
        return launch(_glu_bwd_kernel<T, ACT, VEC>, grid, block, 0, stream, static_cast<const T*>(p.g), ap, bp,
                      static_cast<T*>(p.out), static_cast<T*>(p.db), p.M, p.N, p.sg, p.sa, p.sb, p.so);
      } else {
        return launch(_glu_fwd_kernel<T, ACT, VEC>, grid, block, 0, stream, ap, bp, static_cast<T*>(p.out), p.M,
                      p.N, p.sa, p.sb, p.so);
      }
    });
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

// The grid's limits: rows on x (2^31 - 1 blocks), column tiles on y (65535).
void check_grid(const char* op, int64_t M, int64_t N) {
  TORCH_CHECK(M < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows");
  TORCH_CHECK(N <= int64_t(65535) * kThreads, op, ": rows longer than ", int64_t(65535) * kThreads,
              " are not supported");
}

Tensor glu_fwd(const Tensor& gate, const std::optional<Tensor>& up, int64_t act) {
  constexpr const char* op = "llmfast::glu_fwd";
  check_on_device(op, "gate", gate);
  const int64_t N = check_glu(op, gate, up, act);
  const DType dt = dtype_of(op, "gate", gate);
  const int64_t M = gate.size(0);
  check_grid(op, M, N);
  const DeviceGuard guard(gate.device());
  Tensor out = at::empty({M, N}, gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return out;
  GluParams p;
  p.a = gate.const_data_ptr();
  p.sa = gate.stride(0);
  p.b = defined(up) ? up->const_data_ptr() : static_cast<const char*>(p.a) + N * gate.element_size();
  p.sb = defined(up) ? up->stride(0) : p.sa;
  p.out = out.mutable_data_ptr();
  p.M = M, p.N = N, p.so = N;
  check_launch(glu_launch<false>(p, static_cast<int>(act), dt, current_stream()));
  return out;
}

std::tuple<Tensor, Tensor> glu_bwd(const Tensor& grad_out, const Tensor& gate, const std::optional<Tensor>& up,
                                   int64_t act) {
  constexpr const char* op = "llmfast::glu_bwd";
  check_on_device(op, "gate", gate);
  const int64_t N = check_glu(op, gate, up, act, &grad_out);
  const DType dt = dtype_of(op, "gate", gate);
  const int64_t M = gate.size(0);
  check_grid(op, M, N);
  const DeviceGuard guard(gate.device());
  const bool packed = !defined(up);
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  // packed: one [M, 2N] gradient, da in columns [0, N) and db in [N, 2N), like the input
  Tensor dgate = at::empty({M, packed ? 2 * N : N}, opts);
  Tensor dup = packed ? at::empty({0}, opts) : at::empty({M, N}, opts);
  if (M == 0 || N == 0) return {dgate, dup};
  const int64_t es = gate.element_size();
  GluParams p;
  p.g = grad_out.const_data_ptr(), p.sg = grad_out.stride(0);
  p.a = gate.const_data_ptr(), p.sa = gate.stride(0);
  p.b = packed ? static_cast<const char*>(p.a) + N * es : up->const_data_ptr();
  p.sb = packed ? p.sa : up->stride(0);
  p.out = dgate.mutable_data_ptr();
  p.db = packed ? static_cast<char*>(p.out) + N * es : dup.mutable_data_ptr();
  p.M = M, p.N = N, p.so = dgate.stride(0);
  check_launch(glu_launch<true>(p, static_cast<int>(act), dt, current_stream()));
  return {dgate, dup};
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
}

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
