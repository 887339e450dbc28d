// Every llmfast schema, in one place (the extension-cpp / FlashAttention-3 layout):
// the CPU kernels live in csrc/cpu/<op>.cpp, the CUDA ones in csrc/cuda/<op>.cu, and
// the fake (meta) implementations and autograd formulas in llmfast/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(llmfast, m) {
  // softmax / log_softmax over the last dim of input: [A, B, L, N] (contiguous).
  // mask: None, or bool (True = keep) / float32 (additive), viewed as [A, B, L, N]
  // with any strides (0 for broadcast dims). is_causal keeps column j <= row l.
  m.def("softmax_fwd(Tensor input, float scale, Tensor? mask, bool is_causal, bool log) -> Tensor");
  // grad_input from (grad_out, out); `masked` says positions at -inf / fully masked
  // rows came from a mask and get zero gradient.
  m.def("softmax_bwd(Tensor grad_out, Tensor out, float scale, bool log, bool masked) -> Tensor");

  // Attention softmax(q k^T * scale + mask) v, tile by tile with an online softmax.
  // q: [B, H, L, D], k: [B, Hkv, S, D], v: [B, Hkv, S, Dv]; H % Hkv == 0 (GQA: query
  // head h reads kv head h / (H / Hkv)). Last dims contiguous, other strides free.
  // mask: None, or bool (True = attend) / float32 (additive) viewed as [B, H, L, S]
  // with any strides. is_causal keeps key j <= query i (top-left, torch.tril).
  // dropout_p > 0 drops probabilities with a counter-based RNG keyed by `seed`, so
  // backward regenerates the same mask. The draw is the same on every backend: element
  // (b, h, i, j) is kept iff word 0 of Philox4x32-10 with counter (j, i, b*H + h, 0)
  // and key (seed & 0xffffffff, seed >> 32) is >= floor(dropout_p * 2^32) (uint32
  // compare), and kept probabilities are scaled by 1 / (1 - dropout_p); lse is that of
  // the undropped softmax (llmfast.reference.dropout_keep is the executable spec).
  // Callers handle dropout_p >= 1. Returns out [B, H, L, Dv] (contiguous, input
  // dtype) and lse [B, H, L] (float32; -inf for a row with no visible key, whose out
  // is zeros and whose gradients are zero).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv) shaped like q, k, v (dk/dv summed over each GQA group).
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "float scale, bool is_causal, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
}

// A Python module with no functions: importing it loads the library above and the
// kernels registered by the other translation units. Build facts are attributes.
static struct PyModuleDef llmfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&llmfast_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "cpu_isa", LLMFAST_CPU_ISA);
  PyModule_AddStringConstant(mod, "cuda_archs", LLMFAST_CUDA_ARCHS);
#ifdef LLMFAST_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
