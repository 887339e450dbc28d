// The torch side of a csrc/cuda/<op>.cu file: what differs between the real build (llmfast._C,
// CUDA tensors) and the emulated one (llmfast._emu, -DLLMFAST_EMU: the same kernels run on CPU
// tensors through csrc/dev/cuda_emu.h, registered as llmfast_emu::<op> for the CPU key, so the
// op layer's `cuda` backend and its tests run them without a GPU). A binding reads
//
//   TORCH_CHECK(on_device(x), ...);  const DeviceGuard guard(x.device());
//   check_launch(<op>_launch(..., dtype_of(op, "x", x), current_stream()));
//   LLMFAST_CUDA_LIBRARY_IMPL(m) { m.impl("<op>", &<op>); }
//
// and argument checks come from csrc/checks.h, shared with the CPU kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#ifndef LLMFAST_EMU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "checks.h"
#include "cuda/common.cuh"

namespace llmfast::cuda {

using at::Tensor;

#ifndef LLMFAST_EMU
#define LLMFAST_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(llmfast, CUDA, m)
constexpr const char* kDeviceName = "CUDA";
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const Tensor& t) { return t.is_cuda(); }
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int smem_optin() { return static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin); }
inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }
#else
#define LLMFAST_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(llmfast_emu, CPU, m)
constexpr const char* kDeviceName = "CPU (emulated CUDA)";
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline bool on_device(const Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream() { return nullptr; }
// A small GPU: loops over "teams" of rows (grid-stride loops, partial-sum rows) get several trips.
inline int sm_count() { return 4; }
inline int smem_optin() { return 227 * 1024; }  // an H100's
inline void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "emulated CUDA launch failed"); }
#endif

// The kernels' storage type for t; anything but float32/float16/bfloat16 is an error naming op and arg.
inline DType dtype_of(const char* op, const char* arg, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, " (cuda): ", arg, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The first input: it picked the kernel, so it is on this build's device unless called directly.
inline void check_on_device(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(on_device(t), op, " (cuda): ", arg, " must be a ", kDeviceName, " tensor, got ", t.device());
}

}  // namespace llmfast::cuda
