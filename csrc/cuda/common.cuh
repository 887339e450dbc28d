// What every CUDA kernel file shares: element types, packed loads, warp/block reductions, the
// dtype dispatch and the launch. ATen-free, so that each csrc/cuda/<op>.cu compiles three ways:
//   nvcc                  the CUDA kernels of llmfast._C (their torch binding at the end of the file),
//   g++ -DLLMFAST_EMU     the same kernels on the CPU warp emulator (csrc/dev/cuda_emu.h): llmfast._emu,
//   -DLLMFAST_CUDA_KERNELS_ONLY   kernels and launchers without the binding (csrc/dev scratch programs).
// Everything CUDA in llmfast lives in namespace llmfast::cuda; each .cu keeps its kernels,
// helpers and binding in an anonymous namespace inside it, so same-named helpers of two files
// never meet at link time.
#pragma once
#ifdef LLMFAST_EMU
#include "dev/cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// Dynamic shared memory, 16-byte aligned: `LLMFAST_DYN_SMEM(smem);` declares `char* smem`-like
// storage of the launch's smem bytes.
#ifdef LLMFAST_EMU
#define LLMFAST_DYN_SMEM(name) EMU_DYNAMIC_SMEM(char, name)
#else
#define LLMFAST_DYN_SMEM(name) extern __shared__ __align__(16) char name[]
#endif

namespace llmfast::cuda {

constexpr float kNegInf = -__builtin_huge_valf();

// ---------------------------------------------------------------------------------------------
// Element types: storage T in {float, __half, __nv_bfloat16}, arithmetic in fp32.
// ---------------------------------------------------------------------------------------------
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

// VEC elements of T in one aligned struct: 16 bytes is the widest load a thread issues.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int kPackVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte pack

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// Reductions. The xor butterfly leaves the result in every lane, and the fixed order of the
// shuffles and of the warps makes it independent of timing (bitwise reproducible).
// ---------------------------------------------------------------------------------------------

// __shfl_xor_sync of any trivially copyable value, one 32-bit word at a time.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, int> || std::is_same_v<T, unsigned>) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
  } else {
    static_assert(sizeof(T) % 4 == 0 && std::is_trivially_copyable_v<T>, "shuffle whole 32-bit words");
    uint32_t w[sizeof(T) / 4];
    memcpy(w, &v, sizeof(T));
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], lane_mask);
    memcpy(&v, w, sizeof(T));
    return v;
  }
}

// op(a, b) folded over the 32 lanes of the warp.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  return v;
}

// op folded over the block (a 1-D block of whole warps); every thread gets the result.
// `smem` holds >= 32 T. Call it from every thread of the block.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_reduce(lane < nwarps ? smem[lane] : identity, op);
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Sum2 {  // (a, b) pairs, summed component-wise
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const { return make_float2(a.x + b.x, a.y + b.y); }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, Max{}); }
__device__ __forceinline__ float block_sum(float v, float* smem) { return block_reduce(v, Sum{}, 0.f, smem); }

// ---------------------------------------------------------------------------------------------
// Dtype dispatch and launch
// ---------------------------------------------------------------------------------------------
enum class DType { kFloat, kHalf, kBFloat16 };

inline int elem_bytes(DType dt) { return dt == DType::kFloat ? 4 : 2; }

// f(T{}) with T the storage type of dt; returns what f returns.
template <typename F>
inline decltype(auto) dispatch(DType dt, F&& f) {
  if (dt == DType::kHalf) return f(__half{});
  if (dt == DType::kBFloat16) return f(__nv_bfloat16{});
  return f(float{});
}

// kernel<<<grid, block, smem, stream>>>(args...) on a GPU, the warp emulator under LLMFAST_EMU.
// Returns the launch's error (emulated launches throw emu::Error instead).
template <typename... P, typename... A>
inline cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          A&&... args) {
#ifdef LLMFAST_EMU
  (void)stream;
  ::emu::launch(kernel, grid, block, smem, static_cast<A&&>(args)...);
  return cudaSuccess;
#else
  if (smem > 48 * 1024) {  // more than 48 KB of dynamic shared memory is opted into per kernel
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<A&&>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace llmfast::cuda
