// Row helpers shared by the CPU kernels: load a row of any float dtype as the
// accumulation type (fp32, or fp64 for double), and store it back.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace llmfast::cpu {

using at::vec::Vectorized;

// acc_t is double for double inputs, float otherwise (fp16/bf16 math happens in fp32).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Pointer to the row as acc_t: the row itself when it already is, else `scratch`.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* src, int64_t n, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, scratch, n);
    return scratch;
  }
}

// Where to write an acc_t row that ends up in `dst`: dst itself or `scratch`.
template <typename scalar_t, typename acc_t>
inline acc_t* row_buffer(scalar_t* dst, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return scratch;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    at::vec::convert(buf, dst, n);
  }
}

template <typename T>
inline T vec_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
  T m = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; j < n; ++j) m = std::isnan(x[j]) ? x[j] : std::max(m, x[j]);
  return m;
}

template <typename T>
inline T vec_sum(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = acc + Vec::loadu(x + j);
  T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) s += x[j];
  return s;
}

// A bool (true = keep) or float32 (additive) mask viewed as 4-D with any strides (0 where it
// broadcasts): softmax's [A, B, L, N], attention's [B, H, L, S].
struct MaskView {
  const void* ptr = nullptr;
  bool is_bool = false;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  explicit MaskView(const at::Tensor& m)
      : ptr(m.const_data_ptr()), is_bool(m.scalar_type() == at::kBool), s0(m.stride(0)), s1(m.stride(1)),
        s2(m.stride(2)), s3(m.stride(3)) {}
};

// Columns [j0, j0 + n) of mask row (i0, i1, i2) applied to z[0, n): the additive mask added,
// or -inf where the bool mask is false.
template <typename acc_t>
inline void apply_mask(acc_t* z, int64_t n, const MaskView& mk, int64_t i0, int64_t i1, int64_t i2, int64_t j0 = 0) {
  const int64_t off = i0 * mk.s0 + i1 * mk.s1 + i2 * mk.s2 + j0 * mk.s3;
  if (mk.is_bool) {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const bool* m = static_cast<const bool*>(mk.ptr) + off;
    for (int64_t j = 0; j < n; ++j) z[j] = m[j * mk.s3] ? z[j] : ninf;
    return;
  }
  const float* m = static_cast<const float*>(mk.ptr) + off;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (mk.s3 == 1) {
      at::vec::map2([](Vectorized<float> a, Vectorized<float> c) { return a + c; }, z, z, m, n);
      return;
    }
  }
  for (int64_t j = 0; j < n; ++j) z[j] += static_cast<acc_t>(m[j * mk.s3]);
}

// Rows handed to one thread: enough work per task to amortise the scheduling.
inline int64_t grain_for(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

}  // namespace llmfast::cpu
