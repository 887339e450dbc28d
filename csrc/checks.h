// Host-side argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) bindings.
//
// llmfast.nn.functional checks user input with torch's messages; these TORCH_CHECKs guard
// direct calls of the torch.ops.llmfast.* kernels (and the op layer's own canonical forms),
// so a wrong call raises a RuntimeError naming the op and the argument instead of reading
// out of bounds. Device placement of the first input is the dispatcher's business (it picks
// the kernel from it); every other tensor is checked against that one.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <utility>

namespace llmfast {

using at::Tensor;

// The accumulation dtype of the kernels: double for double inputs, float otherwise.
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool defined(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

template <typename T>
inline const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

inline void check_dtype(const char* op, const char* arg, const Tensor& t, std::initializer_list<at::ScalarType> ok) {
  for (at::ScalarType s : ok)
    if (t.scalar_type() == s) return;
  TORCH_CHECK(false, op, ": ", arg, " has unsupported dtype ", t.scalar_type());
}

// The floating dtypes a kernel takes: float32, float16, bfloat16, and float64 on the CPU.
inline void check_float(const char* op, const char* arg, const Tensor& t) {
  if (t.is_cpu()) {
    check_dtype(op, arg, t, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  } else {
    check_dtype(op, arg, t, {at::kFloat, at::kHalf, at::kBFloat16});
  }
}

inline void check_device(const char* op, const char* arg, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", arg, " is on ", t.device(), ", expected ", like.device());
}

// t has like's shape, dtype and device.
inline void check_like(const char* op, const char* arg, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", arg, " has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  check_device(op, arg, t, like);
}

// A row view: [M, N] with unit stride along N (any stride along M), a float dtype.
inline void check_rows(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", arg, " must be 2-D [M, N], got ", t.dim(), "-D");
  check_float(op, arg, t);
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", arg, " must have unit stride along its last dim, got ",
              "strides ", t.strides());
}

// A row view like `like` (same shape, dtype, device).
inline void check_rows_like(const char* op, const char* arg, const Tensor& t, const Tensor& like) {
  check_rows(op, arg, t);
  check_like(op, arg, t, like);
}

// A 1-D tensor of n elements of dtype `dt` on like's device (statistics, targets, ...).
inline void check_vector(const char* op, const char* arg, const Tensor& t, int64_t n, at::ScalarType dt,
                         const Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dt, op, ": ", arg, " must be a [", n, "] ", dt,
              " tensor, got ", t.scalar_type(), " ", t.sizes());
  check_device(op, arg, t, like);
}

// A per-column parameter of x [M, N] (weight, bias): [N], x's dtype or float32 (float32
// parameters with half inputs, as torch allows). Returned as a contiguous tensor in the
// accumulation dtype, the form the kernels read.
inline Tensor acc_param(const char* op, const char* arg, const std::optional<Tensor>& p, const Tensor& x) {
  if (!defined(p)) return Tensor();
  const Tensor& t = *p;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", arg, " must have shape [", x.size(1), "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (t.scalar_type() == at::kFloat && x.scalar_type() != at::kDouble),
              op, ": ", arg, " has dtype ", t.scalar_type(), ", expected the input's (", x.scalar_type(),
              ") or float32");
  check_device(op, arg, t, x);
  return t.to(acc_scalar_type(x.scalar_type())).contiguous();
}

// An attention / softmax mask view: `sizes` exactly (broadcast dims have stride 0), bool or
// float32, on like's device.
inline void check_mask(const char* op, const Tensor& mask, at::IntArrayRef sizes, const Tensor& like) {
  TORCH_CHECK(mask.sizes() == sizes, op, ": mask must be viewed as ", sizes, ", got ", mask.sizes());
  check_dtype(op, "mask", mask, {at::kBool, at::kFloat});
  check_device(op, "mask", mask, like);
}

// Attention's options beyond SDPA (llmfast/ops/attention.py): window bounds >= -1 (-1 =
// unbounded), softcap >= 0 and finite, sinks None or [H] float32 on q's device.
inline void check_attention_options(const char* op, const Tensor& q, int64_t window_left, int64_t window_right,
                                    double softcap, const std::optional<Tensor>& sinks) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window bounds must be >= -1 (-1 = unbounded), got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and >= 0, got ", softcap);
  if (defined(sinks)) check_vector(op, "sinks", *sinks, q.size(1), at::kFloat, q);
}

// norm_fwd's arguments (llmfast/ops/norm.py): input [M, N] rows; residual None or like input;
// weight, bias None or per-column parameters, bias only when centered (LayerNorm). Returns
// (weight, bias) as acc_param does.
inline std::pair<Tensor, Tensor> check_norm_fwd(const char* op, const Tensor& input,
                                                const std::optional<Tensor>& residual,
                                                const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& bias, bool centered) {
  check_rows(op, "input", input);
  if (defined(residual)) check_rows_like(op, "residual", *residual, input);
  TORCH_CHECK(centered || !defined(bias), op, ": bias is a LayerNorm parameter (centered=True)");
  return {acc_param(op, "weight", weight, input), acc_param(op, "bias", bias, input)};
}

// norm_add_'s (the in-place variant): input, residual and out [M, N] rows of one dtype and
// device (residual and out optional); the parameters as for norm_fwd.
inline std::pair<Tensor, Tensor> check_norm_add(const char* op, const Tensor& input,
                                                const std::optional<Tensor>& residual,
                                                const std::optional<Tensor>& out,
                                                const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& bias, bool centered) {
  if (defined(out)) check_rows_like(op, "out", *out, input);
  return check_norm_fwd(op, input, residual, weight, bias, centered);
}

// norm_bwd's: x [M, N] rows; grad_out like x; grad_summed None, empty or like x; mean [M]
// (centered) and rstd [M] in the accumulation dtype; bias_grad only when centered. Returns the
// weight as acc_param does.
inline Tensor check_norm_bwd(const char* op, const Tensor& grad_out, const std::optional<Tensor>& grad_summed,
                             const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
                             const Tensor& rstd, bool centered, bool bias_grad) {
  check_rows(op, "x", x);
  check_rows_like(op, "grad_out", grad_out, x);
  if (defined(grad_summed) && grad_summed->numel() > 0) check_rows_like(op, "grad_summed", *grad_summed, x);
  TORCH_CHECK(centered || !bias_grad, op, ": bias_grad needs centered=True (RMSNorm has no bias)");
  const at::ScalarType acc = acc_scalar_type(x.scalar_type());
  if (centered) check_vector(op, "mean", mean, x.size(0), acc, x);
  check_vector(op, "rstd", rstd, x.size(0), acc, x);
  return acc_param(op, "weight", weight, x);
}

// Cross-entropy's canonical arguments (llmfast/ops/cross_entropy.py): logits [N, C] contiguous in a
// float dtype; target [N] int64 (any stride); weight None or [C] contiguous in the accumulation
// dtype; label_smoothing in [0, 1].
inline void check_cross_entropy(const char* op, const Tensor& logits, const Tensor& target,
                                const std::optional<Tensor>& weight, double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous [N, C] tensor, got ",
              "shape ", logits.sizes(), " strides ", logits.strides());
  check_float(op, "logits", logits);
  check_vector(op, "target", target, logits.size(0), at::kLong, logits);
  if (defined(weight)) {
    check_vector(op, "weight", *weight, logits.size(1), acc_scalar_type(logits.scalar_type()), logits);
    TORCH_CHECK(weight->is_contiguous(), op, ": weight must be contiguous");
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

// The backward's grad_loss [N] and lse [N, 2] (hi, lo), both in the accumulation dtype.
inline void check_cross_entropy_bwd(const char* op, const Tensor& grad_loss, const Tensor& lse, const Tensor& logits) {
  const at::ScalarType acc = acc_scalar_type(logits.scalar_type());
  check_vector(op, "grad_loss", grad_loss, logits.size(0), acc, logits);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == logits.size(0) && lse.size(1) == 2 && lse.scalar_type() == acc, op,
              ": lse must be a [", logits.size(0), ", 2] ", acc, " tensor, got ", lse.scalar_type(), " ", lse.sizes());
  check_device(op, "lse", lse, logits);
}

// glu_fwd / glu_bwd's arguments (llmfast/ops/glu.py): gate [M, K] rows; up None (packed: K = 2N,
// gate = columns [0, N), up = [N, 2N)) or rows like gate (K = N); act 0 (silu), 1 (gelu tanh) or
// 2 (gelu); grad_out, for the backward, [M, N] rows of gate's dtype. Returns N, the output width.
inline int64_t check_glu(const char* op, const Tensor& gate, const std::optional<Tensor>& up, int64_t act,
                         const Tensor* grad_out = nullptr) {
  check_rows(op, "gate", gate);
  TORCH_CHECK(act >= 0 && act <= 2, op, ": act must be 0 (silu), 1 (gelu tanh) or 2 (gelu), got ", act);
  int64_t N = gate.size(1);
  if (defined(up)) {
    check_rows_like(op, "up", *up, gate);
  } else {
    TORCH_CHECK(N % 2 == 0, op, ": a packed gate (up=None) must have an even last dim, got ", N);
    N /= 2;
  }
  if (grad_out != nullptr) {
    check_rows(op, "grad_out", *grad_out);
    TORCH_CHECK(grad_out->size(0) == gate.size(0) && grad_out->size(1) == N, op, ": grad_out has shape ",
                grad_out->sizes(), ", expected [", gate.size(0), ", ", N, "]");
    TORCH_CHECK(grad_out->scalar_type() == gate.scalar_type(), op, ": grad_out has dtype ", grad_out->scalar_type(),
                ", expected ", gate.scalar_type());
    check_device(op, "grad_out", *grad_out, gate);
  }
  return N;
}

// kvcache_fwd's canonical problem (llmfast/ops/kvcache.py): q [B, Sq, Hq, D]; k_pages, v_pages
// [NB, P, Hkv, D] in q's dtype; all three with a contiguous last dim (other strides free);
// block_table [B, MP] int32 contiguous; seqlens [B] int32; kv_start None or [B] int32; alibi None
// or [B, Hq] float32 contiguous; Hq % Hkv == 0. The values of block_table and seqlens are the
// caller's (checked by llmfast.flash_attn before anything is written).
struct KVCacheDims {
  int64_t B, Sq, Hq, D, NB, P, Hkv, MP;
};

inline KVCacheDims check_kvcache(const char* op, const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                                 const Tensor& block_table, const Tensor& seqlens,
                                 const std::optional<Tensor>& kv_start, const std::optional<Tensor>& alibi,
                                 int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, Sq, Hq, D], got ", q.sizes());
  TORCH_CHECK(k_pages.dim() == 4, op, ": k_pages must be [num_pages, page_size, Hkv, D], got ", k_pages.sizes());
  check_float(op, "q", q);
  TORCH_CHECK(q.scalar_type() != at::kDouble, op, ": q has unsupported dtype ", q.scalar_type());
  check_like(op, "v_pages", v_pages, k_pages);
  TORCH_CHECK(k_pages.scalar_type() == q.scalar_type(), op, ": k_pages has dtype ", k_pages.scalar_type(),
              ", expected q's ", q.scalar_type());
  check_device(op, "k_pages", k_pages, q);
  const KVCacheDims d{q.size(0), q.size(1), q.size(2), q.size(3), k_pages.size(0), k_pages.size(1), k_pages.size(2),
                      block_table.dim() == 2 ? block_table.size(1) : 0};
  TORCH_CHECK(k_pages.size(3) == d.D, op, ": k_pages has head dim ", k_pages.size(3), ", expected q's ", d.D);
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, op, ": q's ", d.Hq, " heads must be a multiple of the ", d.Hkv,
              " kv heads");
  TORCH_CHECK(d.P > 0, op, ": page_size must be >= 1");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k_pages", &k_pages},
                                {"v_pages", &v_pages}})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, op, ": ", name, " must have a contiguous last dim, got strides ",
                t->strides());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == d.B && block_table.scalar_type() == at::kInt &&
                  block_table.is_contiguous(),
              op, ": block_table must be a contiguous [", d.B, ", max_pages] int32 tensor, got ",
              block_table.scalar_type(), " ", block_table.sizes());
  check_device(op, "block_table", block_table, q);
  check_vector(op, "seqlens", seqlens, d.B, at::kInt, q);
  TORCH_CHECK(seqlens.is_contiguous(), op, ": seqlens must be contiguous");
  if (defined(kv_start)) {
    check_vector(op, "kv_start", *kv_start, d.B, at::kInt, q);
    TORCH_CHECK(kv_start->is_contiguous(), op, ": kv_start must be contiguous");
  }
  if (defined(alibi)) {
    TORCH_CHECK(alibi->dim() == 2 && alibi->size(0) == d.B && alibi->size(1) == d.Hq &&
                    alibi->scalar_type() == at::kFloat && alibi->is_contiguous(),
                op, ": alibi must be a contiguous [", d.B, ", ", d.Hq, "] float32 tensor, got ", alibi->scalar_type(),
                " ", alibi->sizes());
    check_device(op, "alibi", *alibi, q);
  }
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0, got ", num_splits);
  return d;
}

// rope_fwd / rope_bwd's canonical problem (llmfast/ops/rope.py): q [B, S, Hq, D] and k None or
// [B, S, Hk, D] of q's dtype and device, both with unit stride along D (other strides free);
// cos, sin [B, S, W] of one dtype (q's or float32), unit stride along W; rotary_dim R even,
// 2 <= R <= D, and W = R (one value per feature) or R / 2 (one angle per pair).
inline void check_rope(const char* op, const Tensor& q, const std::optional<Tensor>& k, const Tensor& cos,
                       const Tensor& sin, int64_t rotary_dim) {
  auto unit_last = [&](const char* arg, const Tensor& t) {
    TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg, " must have unit stride along its last dim, ",
                "got strides ", t.strides());
  };
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, S, H, D], got ", q.dim(), "-D");
  check_float(op, "q", q);
  unit_last("q", q);
  if (defined(k)) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == q.size(0) && k->size(1) == q.size(1) && k->size(3) == q.size(3), op,
                ": k must be [", q.size(0), ", ", q.size(1), ", Hk, ", q.size(3), "], got ", k->sizes());
    TORCH_CHECK(k->scalar_type() == q.scalar_type(), op, ": k has dtype ", k->scalar_type(), ", expected ",
                q.scalar_type());
    check_device(op, "k", *k, q);
    unit_last("k", *k);
  }
  const int64_t D = q.size(3);
  TORCH_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= D, op, ": rotary_dim must be even and in [2, ",
              D, "], got ", rotary_dim);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == q.size(0) && cos.size(1) == q.size(1) &&
                  (cos.size(2) == rotary_dim || cos.size(2) == rotary_dim / 2),
              op, ": cos must be [", q.size(0), ", ", q.size(1), ", ", rotary_dim, " or ", rotary_dim / 2, "], got ",
              cos.sizes());
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat, op, ": cos has dtype ",
              cos.scalar_type(), ", expected q's (", q.scalar_type(), ") or float32");
  check_device(op, "cos", cos, q);
  check_like(op, "sin", sin, cos);
  unit_last("cos", cos);
  unit_last("sin", sin);
}

}  // namespace llmfast
