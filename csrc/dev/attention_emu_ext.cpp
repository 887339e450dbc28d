// Dev only (never part of the extension): csrc/cuda/attention.cu's kernels *and* its torch
// binding compiled for the CPU, with the kernels running through the warp emulator of
// csrc/dev/cuda_emu.h. It registers llmfast::attention_fwd/bwd for the CPU dispatch key, so
// tests/test_attention_cuda.py can run on CPU tensors (see attention_emu_pytest.py).
#define LLMFAST_EMU
#include "cuda/attention.cu"
