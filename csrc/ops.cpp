// Every llmfast schema, in one place (the extension-cpp / FlashAttention-3 layout):
// the CPU kernels live in csrc/cpu/<op>.cpp, the CUDA ones in csrc/cuda/<op>.cu, and
// the fake (meta) implementations and autograd formulas in llmfast/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/stream.h"

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

  // LayerNorm / RMSNorm over the last dim of input: [M, N], unit column stride, any row
  // stride (a view of the caller's [..., *normalized_shape] tensor). residual: None or
  // [M, N] of input's dtype; with it the kernels normalise s = input + residual, rounded
  // to input's dtype (so the output is exactly the norm of the returned s), and return s
  // as `summed` [M, N]; without it `summed` is an empty tensor. weight/bias: None or [N],
  // input's dtype or float32. Statistics mean/rstd: [M], float32 (float64 for double).
  // Outputs are contiguous, in input's dtype.
  m.def("layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor out, Tensor summed, Tensor mean, Tensor rstd)");
  // x: the tensor the forward normalised (input, or summed). grad_summed: the gradient
  // reaching `summed`, added to grad_input (it is also the residual's gradient).
  // Returns (grad_input [M, N] in x's dtype, grad_weight [N], grad_bias [N]); the last two
  // are float32 (float64 for double), summed over rows deterministically (per-block
  // partial sums, then one ordered sum), and empty unless weight_grad / bias_grad.
  m.def("layer_norm_bwd(Tensor grad_out, Tensor? grad_summed, Tensor x, Tensor? weight, Tensor mean, "
        "Tensor rstd, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // y = x * rsqrt(mean(x^2) + eps) * weight, same layout rules as layer_norm_fwd.
  m.def("rms_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, float eps) "
        "-> (Tensor out, Tensor summed, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor? grad_summed, Tensor x, Tensor? weight, Tensor rstd, "
        "bool weight_grad) -> (Tensor, Tensor)");
  // Cross-entropy with class-index targets, one row per token (torch's definition,
  // label smoothing included; the reduction over rows is done by the caller).
  // logits: [N, C] contiguous, fp32/fp16/bf16 (fp64 on CPU); target: [N] int64, each
  // in [0, C) or == ignore_index (anything else raises); weight: None or [C] in the
  // accumulation dtype (fp32; fp64 for fp64 logits). Returns (loss [N], lse [N, 2]), both
  // in the accumulation dtype: loss_i = (1-eps) w_t (lse_i - x_it) + eps/C Σ_c w_c
  // (lse_i - x_ic) with eps = label_smoothing; lse_i = lse[i, 0] + lse[i, 1] (hi = the
  // rounded log-sum-exp, lo = its rounding error, which the backward needs to keep
  // exp(x - lse) accurate at |x| ~ 1e4). loss and lse are 0 on ignored rows.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing) -> (Tensor, Tensor)");
  // grad_logits [N, C] (logits dtype) = grad_loss[i] * dloss_i/dlogits[i], recomputing
  // the probabilities from (logits, lse [N, 2]) in one pass; grad_loss: [N] accumulation dtype.
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
        "int ignore_index, float label_smoothing) -> Tensor");
  // cross_entropy_fwd that also overwrites logits with d(Σ_i loss_i)/dlogits: the loss
  // half of the fused linear + cross-entropy, where a chunk's logits buffer is reused
  // for its gradient. CUDA/Triton do not check targets here (the caller does, once).
  m.def("cross_entropy_fwd_grad(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing) -> (Tensor, Tensor)");
}

// A Python module with no functions: importing it loads the library above and the
// kernels registered by the other translation units. Build facts are attributes.
static struct PyModuleDef llmfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&llmfast_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "cpu_isa", LLMFAST_CPU_ISA);
  PyModule_AddStringConstant(mod, "cuda_archs", LLMFAST_CUDA_ARCHS);
  PyModule_AddIntConstant(mod, "cpu_stream_bytes", static_cast<long>(llmfast::cpu::stream_min_bytes()));
#ifdef LLMFAST_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
