// What the csrc/dev scratch programs share: device memory that is real on a GPU and plain host
// memory under the warp emulator (-DLLMFAST_EMU), so one program validates kernels in both.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"

#ifdef LLMFAST_EMU
static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s failed\n", what);
    std::exit(1);
  }
}
static void* dev_alloc(size_t bytes) {
  void* p = std::malloc(bytes ? bytes : 1);
  std::memset(p, 0xFF, bytes ? bytes : 1);  // NaN-fill: unwritten outputs show
  return p;
}
static void dev_free(void* p) { std::free(p); }
static void to_dev(void* d, const void* h, size_t n) { std::memcpy(d, h, n); }
static void to_host(void* h, const void* d, size_t n) { std::memcpy(h, d, n); }
static void dev_sync() {}
#else
static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
static void* dev_alloc(size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");
  check(cudaMemset(p, 0xFF, bytes ? bytes : 1), "cudaMemset");  // NaN-fill: unwritten outputs show
  return p;
}
static void dev_free(void* p) { cudaFree(p); }
static void to_dev(void* d, const void* h, size_t n) { check(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice), "H2D"); }
static void to_host(void* h, const void* d, size_t n) { check(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost), "D2H"); }
static void dev_sync() { check(cudaDeviceSynchronize(), "sync"); }
#endif
