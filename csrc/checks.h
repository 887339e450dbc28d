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

#include <initializer_list>
#include <optional>

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

}  // namespace llmfast
