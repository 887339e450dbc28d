// Rotary position embedding (RoPE) on the CPU: llmfast::rope_fwd / rope_bwd, one kernel (the
// maths of kernels/rope.py and llmfast/ops/rope.py). For each pair (x1, x2) of a head's first R
// features (NeoX: e, e + R/2; interleaved GPT-J: 2i, 2i + 1):
//
//   o1 = x1 * c1 + x2 * s1,   o2 = x2 * c2 + x1 * s2
//   forward:  c1 = cos[i1], c2 = cos[i2], s1 = -sin[i1], s2 = sin[i2]
//   backward: the transpose, s1 = sin[i2], s2 = -sin[i1] (the rotation by -theta when i1 = i2)
//
// with i1, i2 the pair index j (cos/sin [.., R/2], one angle per pair) or the two features' own
// indices (cos/sin [.., R], Hugging Face's layout). Features R..D pass through unchanged.
//
// q [B, S, Hq, D] and k [B, S, Hk, D] (unit stride along D, any other strides) in one parallel
// pass over the (b, s) rows: a row's coefficients (c1, c2, s1, s2: four [R/2] fp32 vectors) are
// built once from cos/sin [B, S, W] and applied to all Hq + Hk heads of that position, so the
// angles cost 1/(Hq + Hk) of the traffic and nothing but the two outputs is allocated. Each
// head row is at::vec fmadds over the halves (NeoX) or over deinterleaved pairs (GPT-J), math
// in fp32 for fp16/bf16 (fp64 for double), each output rounded once. Outputs are contiguous;
// those larger than the last-level cache are streamed (stream.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/row.h"
#include "cpu/stream.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;

// The coefficients of one position, pair-major: coef[0..h) = c1, [h..2h) = c2, [2h..3h) = s1,
// [3h..4h) = s2 (h = R/2 pairs); cp, sp: that position's cos/sin row of W = R or R/2 values.
template <typename acc_t, typename cos_t>
inline void row_coefficients(const cos_t* cp, const cos_t* sp, int64_t h, bool per_feature, bool interleaved,
                             bool conj, acc_t* coef) {
  for (int64_t j = 0; j < h; ++j) {
    const int64_t i1 = !per_feature ? j : (interleaved ? 2 * j : j);
    const int64_t i2 = !per_feature ? j : (interleaved ? 2 * j + 1 : j + h);
    coef[j] = static_cast<acc_t>(cp[i1]);
    coef[h + j] = static_cast<acc_t>(cp[i2]);
    const acc_t sin1 = static_cast<acc_t>(sp[i1]), sin2 = static_cast<acc_t>(sp[i2]);
    coef[2 * h + j] = conj ? sin2 : -sin1;
    coef[3 * h + j] = conj ? -sin1 : sin2;
  }
}

// out[0, 2h) = the rotated pairs of x[0, 2h) (acc_t rows).
template <typename acc_t>
inline void rotate(const acc_t* x, acc_t* out, const acc_t* coef, int64_t h, bool interleaved) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t *c1 = coef, *c2 = coef + h, *s1 = coef + 2 * h, *s2 = coef + 3 * h;
  int64_t j = 0;
  if (interleaved) {
    for (; j + V <= h; j += V) {
      auto [x1, x2] = at::vec::deinterleave2(Vec::loadu(x + 2 * j), Vec::loadu(x + 2 * j + V));
      const Vec o1 = at::vec::fmadd(x1, Vec::loadu(c1 + j), x2 * Vec::loadu(s1 + j));
      const Vec o2 = at::vec::fmadd(x2, Vec::loadu(c2 + j), x1 * Vec::loadu(s2 + j));
      auto [lo, hi] = at::vec::interleave2(o1, o2);
      lo.store(out + 2 * j);
      hi.store(out + 2 * j + V);
    }
    for (; j < h; ++j) {
      const acc_t x1 = x[2 * j], x2 = x[2 * j + 1];
      out[2 * j] = x1 * c1[j] + x2 * s1[j];
      out[2 * j + 1] = x2 * c2[j] + x1 * s2[j];
    }
  } else {
    for (; j + V <= h; j += V) {
      const Vec x1 = Vec::loadu(x + j), x2 = Vec::loadu(x + h + j);
      at::vec::fmadd(x1, Vec::loadu(c1 + j), x2 * Vec::loadu(s1 + j)).store(out + j);
      at::vec::fmadd(x2, Vec::loadu(c2 + j), x1 * Vec::loadu(s2 + j)).store(out + h + j);
    }
    for (; j < h; ++j) {
      const acc_t x1 = x[j], x2 = x[h + j];
      out[j] = x1 * c1[j] + x2 * s1[j];
      out[h + j] = x2 * c2[j] + x1 * s2[j];
    }
  }
}

// One input (q or k) of the pass: its data and strides, its output and the output's stream.
template <typename scalar_t>
struct Side {
  const scalar_t* x = nullptr;
  scalar_t* out = nullptr;
  int64_t H = 0, sb = 0, ss = 0, sh = 0;
};

template <typename scalar_t, typename cos_t>
void rope_kernel(const Side<scalar_t> (&sides)[2], const Tensor& cos, const Tensor& sin, int64_t B, int64_t S,
                 int64_t D, int64_t R, bool interleaved, bool conj) {
  using acc_t = acc_type<scalar_t>;
  const int64_t h = R / 2;
  const bool per_feature = cos.size(2) == R;
  const cos_t* cp = cos.const_data_ptr<cos_t>();
  const cos_t* sp = sin.const_data_ptr<cos_t>();
  const int64_t cb = cos.stride(0), cs = cos.stride(1), sb = sin.stride(0), ss = sin.stride(1);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const OutputStream streams[2] = {OutputStream(B * S * sides[0].H, row_bytes),
                                   OutputStream(B * S * sides[1].H, row_bytes)};
  const int64_t heads = sides[0].H + sides[1].H;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, heads * D));
  at::parallel_for(0, B * S, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> coef(4 * h), xin(std::is_same_v<scalar_t, acc_t> ? 0 : D);
    RowOut<scalar_t> outs[2] = {RowOut<scalar_t>(streams[0], D), RowOut<scalar_t>(streams[1], D)};
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / S, s = r % S;
      row_coefficients(cp + b * cb + s * cs, sp + b * sb + s * ss, h, per_feature, interleaved, conj, coef.data());
      for (int t = 0; t < 2; ++t) {
        const Side<scalar_t>& side = sides[t];
        for (int64_t hh = 0; hh < side.H; ++hh) {
          const scalar_t* x = side.x + b * side.sb + s * side.ss + hh * side.sh;
          scalar_t* dst = side.out + (r * side.H + hh) * D;
          streams[t].prepare_rows(dst, (r - r0) * side.H + hh, (r1 - r) * side.H - hh);
          const acc_t* xa = load_row<scalar_t, acc_t>(x, D, xin.data());
          acc_t* oa = outs[t].acc_row(dst);
          rotate(xa, oa, coef.data(), h, interleaved);
          if (R < D) std::memcpy(oa + R, xa + R, (D - R) * sizeof(acc_t));  // exact: acc_t holds every scalar_t
          outs[t].finish(dst, oa);
        }
      }
    }
    streams[0].fence();
    streams[1].fence();
  });
}

// The kernel's one entry: rotate q (and k) forward, or by the transpose (conj).
std::tuple<Tensor, Tensor> rope(const char* op, const Tensor& q, const std::optional<Tensor>& k, const Tensor& cos,
                                const Tensor& sin, int64_t rotary_dim, bool interleaved, bool conj) {
  check_rope(op, q, k, cos, sin, rotary_dim);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor qo = at::empty(q.sizes(), opts);
  Tensor ko = defined(k) ? at::empty(k->sizes(), opts) : at::empty({0}, opts);
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3);
  if (B * S == 0) return {qo, ko};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "llmfast_rope_cpu", [&] {
    Side<scalar_t> sides[2];
    sides[0] = {q.const_data_ptr<scalar_t>(), qo.mutable_data_ptr<scalar_t>(), q.size(2), q.stride(0), q.stride(1),
                q.stride(2)};
    if (defined(k)) {
      sides[1] = {k->const_data_ptr<scalar_t>(), ko.mutable_data_ptr<scalar_t>(), k->size(2), k->stride(0),
                  k->stride(1), k->stride(2)};
    }
    if (cos.scalar_type() == q.scalar_type()) {
      rope_kernel<scalar_t, scalar_t>(sides, cos, sin, B, S, D, rotary_dim, interleaved, conj);
    } else {  // float32 angles (check_rope allows no other mix)
      rope_kernel<scalar_t, float>(sides, cos, sin, B, S, D, rotary_dim, interleaved, conj);
    }
  });
  return {qo, ko};
}

// llmfast::rope_fwd (CONJ false) and llmfast::rope_bwd (CONJ true: the transpose, for the gradients).
template <bool CONJ>
std::tuple<Tensor, Tensor> rope_entry(const Tensor& q, const std::optional<Tensor>& k, const Tensor& cos,
                                      const Tensor& sin, int64_t rotary_dim, bool interleaved) {
  return rope(CONJ ? "llmfast::rope_bwd" : "llmfast::rope_fwd", q, k, cos, sin, rotary_dim, interleaved, CONJ);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("rope_fwd", &rope_entry<false>);
  m.impl("rope_bwd", &rope_entry<true>);
}

}  // namespace llmfast::cpu
