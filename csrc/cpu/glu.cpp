// Gated activations (SwiGLU, GeGLU) on the CPU, forward and backward: one kernel, the
// activation a compile-time switch (ACT), the maths of kernels/glu.py:
//
//   out = act(a) * b;   da = dout * b * act'(a),  db = dout * act(a)
//   silu (0):       q = 1 / (1 + exp(-a)),               act = a*q,  act' = q (1 + a (1 - q))
//   gelu tanh (1):  q = 1 / (1 + exp(-2u)), u = sqrt(2/pi) (a + 0.044715 a^3),  act = a*q
//                   (= 0.5 a (1 + tanh u): no 1 + tanh cancellation), act' = q + 2 a q (1 - q) u'
//   gelu erf (2):   Phi = 0.5 (1 + erf(a / sqrt 2)),      act = a*Phi, act' = Phi + a exp(-a^2/2) / sqrt(2 pi)
//
// gate a, up b: [M, N] with unit column stride and any row stride (the packed form's halves are
// two views of one [M, 2N] row); outputs are contiguous rows (the packed gradient: both halves
// of one [M, 2N] tensor). Memory-bound: one read of each input and one write of each output.
// The exp is at::vec's Sleef exp (1 ulp) and the erf torch's own vectorised one, so the
// accuracy is torch's silu/gelu; the math is fp32 for fp16/bf16 (fp64 for double), converted
// in registers, and each output is rounded once. Work is cut into (row, 2048-column chunk)
// units spread over threads, so both many short rows and a few long ones keep every thread
// busy; outputs larger than the last-level cache are streamed (stream.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cpu/row.h"
#include "cpu/stream.h"

namespace llmfast::cpu {
namespace {

using at::Tensor;

constexpr int kSilu = 0, kGeluTanh = 1, kGelu = 2;

// act(a) into y, and with GRAD act'(a) into d.
template <int ACT, bool GRAD, typename T>
inline void activation(const Vectorized<T>& a, Vectorized<T>& y, Vectorized<T>& d) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  if constexpr (ACT == kGelu) {
    const Vec phi = Vec(T(0.5)) * (one + (a * Vec(T(0.70710678118654752))).erf());
    y = a * phi;
    if constexpr (GRAD) d = phi + a * (Vec(T(-0.5)) * a * a).exp() * Vec(T(0.39894228040143268));
  } else {
    Vec z = a;
    if constexpr (ACT == kGeluTanh) z = Vec(T(1.5957691216057308)) * (a + Vec(T(0.044715)) * a * a * a);  // 2u
    const Vec e = z.neg().exp();
    const Vec q = one / (one + e);
    y = a * q;
    if constexpr (GRAD) {
      // 1 - q = e q, computed as such where q > 1/2: there 1 - q cancels, and its rounding
      // (eps absolute, times a·2u' ~ 20 at a = 4) made the tanh-GELU gradient 2.7x
      // torch's fp32 error. Where q <= 1/2, 1 - q is exact enough and e q may be inf·0.
      const Vec one_minus_q = Vec::blendv(e * q, one - q, e > one);
      if constexpr (ACT == kGeluTanh) {
        d = q + Vec(T(1.5957691216057308)) * a * q * one_minus_q * (one + Vec(T(0.134145)) * a * a);
      } else {
        d = q * (one + a * one_minus_q);
      }
    }
  }
}

// Loads and stores of up to one Vectorized<scalar_t> of elements as acc_t vectors: one for
// float/double, two fp32 halves for fp16/bf16 (converted in registers).
template <typename scalar_t>
struct Lanes {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  static constexpr int kParts = kSame ? 1 : 2;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();

  static inline void load(const scalar_t* p, int64_t cnt, Vec* v) {
    if constexpr (kSame) {
      v[0] = Vec::loadu(p, cnt);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, cnt));
      v[0] = lo;
      v[1] = hi;
    }
  }
  static inline void store(scalar_t* p, int64_t cnt, const Vec* v) {
    if constexpr (kSame) {
      v[0].store(p, cnt);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, cnt);
    }
  }
};

template <int ACT, typename scalar_t>
inline void fwd_span(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using L = Lanes<scalar_t>;
  typename L::Vec va[L::kParts], vb[L::kParts], vo[L::kParts], unused;
  for (int64_t j = 0; j < n; j += L::kStep) {
    const int64_t cnt = std::min(L::kStep, n - j);
    L::load(a + j, cnt, va);
    L::load(b + j, cnt, vb);
    for (int p = 0; p < L::kParts; ++p) {
      typename L::Vec y;
      activation<ACT, false>(va[p], y, unused);
      vo[p] = y * vb[p];
    }
    L::store(out + j, cnt, vo);
  }
}

template <int ACT, typename scalar_t>
inline void bwd_span(const scalar_t* g, const scalar_t* a, const scalar_t* b, scalar_t* da, scalar_t* db,
                     int64_t n) {
  using L = Lanes<scalar_t>;
  typename L::Vec vg[L::kParts], va[L::kParts], vb[L::kParts], vda[L::kParts], vdb[L::kParts];
  for (int64_t j = 0; j < n; j += L::kStep) {
    const int64_t cnt = std::min(L::kStep, n - j);
    L::load(g + j, cnt, vg);
    L::load(a + j, cnt, va);
    L::load(b + j, cnt, vb);
    for (int p = 0; p < L::kParts; ++p) {
      typename L::Vec y, d;
      activation<ACT, true>(va[p], y, d);
      vda[p] = vg[p] * vb[p] * d;
      vdb[p] = vg[p] * y;
    }
    L::store(da + j, cnt, vda);
    L::store(db + j, cnt, vdb);
  }
}

// Columns per work unit: the chunk's 3 (forward) to 5 (backward) rows stay in L1.
constexpr int64_t kChunk = 2048;

// One output of a thread's run of chunks: where to write each chunk (the tensor, or an L1
// scratch row that is then streamed out), and the fresh pages mapped ahead of the writes,
// 1 MB at a time (stream.h: first-touch faults cost more than the copy here).
template <typename scalar_t>
class ChunkOut {
 public:
  ChunkOut(const OutputStream& stream, scalar_t* base, int64_t numel)
      : stream_(stream), end_(reinterpret_cast<char*>(base + numel)), scratch_(stream.on ? kChunk : 0) {}

  scalar_t* buffer(scalar_t* dst, int64_t n) {
    if (!stream_.on) return dst;
    char* const upto = reinterpret_cast<char*>(dst + n);
    if (mapped_ == nullptr) mapped_ = reinterpret_cast<char*>(dst);
    while (mapped_ < upto) {
      const int64_t bytes = std::min<int64_t>(int64_t(1) << 20, end_ - mapped_);
      stream_.prepare(mapped_, bytes);
      mapped_ += bytes;
    }
    return scratch_.data();
  }
  void flush(scalar_t* dst, int64_t n) const {
    if (stream_.on) stream_.write(dst, scratch_.data(), n * static_cast<int64_t>(sizeof(scalar_t)));
  }

 private:
  const OutputStream& stream_;
  char* end_;
  char* mapped_ = nullptr;
  std::vector<scalar_t> scratch_;
};

// Every (row, column chunk) unit of an [M, N] problem, in order, spread over threads: each
// thread calls make_body() once (its scratch rows live in the returned mutable lambda), then
// body(row, c0, n) per chunk, then fences its streaming stores.
template <typename F>
inline void for_chunks(int64_t M, int64_t N, const OutputStream& stream, F&& make_body) {
  const int64_t per_row = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, M * per_row, std::max<int64_t>(1, 32768 / std::min(N, kChunk)), [&](int64_t b, int64_t e) {
    auto body = make_body();
    for (int64_t t = b; t < e; ++t) {
      const int64_t row = t / per_row, c0 = (t % per_row) * kChunk;
      body(row, c0, std::min(kChunk, N - c0));
    }
    stream.fence();
  });
}

// f(std::integral_constant<int, ACT>{}) for the runtime activation id.
template <typename F>
inline void with_act(int64_t act, F&& f) {
  if (act == kSilu) {
    f(std::integral_constant<int, kSilu>{});
  } else if (act == kGeluTanh) {
    f(std::integral_constant<int, kGeluTanh>{});
  } else {
    f(std::integral_constant<int, kGelu>{});
  }
}

Tensor glu_fwd(const Tensor& gate, const std::optional<Tensor>& up, int64_t act) {
  constexpr const char* op = "llmfast::glu_fwd";
  const int64_t N = check_glu(op, gate, up, act);
  const int64_t M = gate.size(0);
  Tensor out = at::empty({M, N}, gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return out;
  const int64_t sa = gate.stride(0), sb = defined(up) ? up->stride(0) : sa;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "llmfast_glu_fwd_cpu", [&] {
    const scalar_t* ap = gate.const_data_ptr<scalar_t>();
    const scalar_t* bp = defined(up) ? up->const_data_ptr<scalar_t>() : ap + N;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const OutputStream stream(M, N * static_cast<int64_t>(sizeof(scalar_t)));
    with_act(act, [&](auto kind) {
      constexpr int ACT = decltype(kind)::value;
      for_chunks(M, N, stream, [&] {
        return [&, o = ChunkOut<scalar_t>(stream, op_, M * N)](int64_t row, int64_t c0, int64_t n) mutable {
          scalar_t* dst = op_ + row * N + c0;
          fwd_span<ACT>(ap + row * sa + c0, bp + row * sb + c0, o.buffer(dst, n), n);
          o.flush(dst, n);
        };
      });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> glu_bwd(const Tensor& grad_out, const Tensor& gate, const std::optional<Tensor>& up,
                                   int64_t act) {
  constexpr const char* op = "llmfast::glu_bwd";
  const int64_t N = check_glu(op, gate, up, act, &grad_out);
  const int64_t M = gate.size(0);
  const bool packed = !defined(up);
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  // packed: one [M, 2N] gradient, da in columns [0, N) and db in [N, 2N), like the input
  Tensor dgate = at::empty({M, packed ? 2 * N : N}, opts);
  Tensor dup = packed ? at::empty({0}, opts) : at::empty({M, N}, opts);
  if (M == 0 || N == 0) return {dgate, dup};
  const int64_t sg = grad_out.stride(0), sa = gate.stride(0), sb = packed ? sa : up->stride(0);
  const int64_t sd = dgate.stride(0);  // row stride of both outputs: 2N packed, N otherwise
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "llmfast_glu_bwd_cpu", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* ap = gate.const_data_ptr<scalar_t>();
    const scalar_t* bp = packed ? ap + N : up->const_data_ptr<scalar_t>();
    scalar_t* dap = dgate.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = packed ? dap + N : dup.mutable_data_ptr<scalar_t>();
    const OutputStream stream(M, N * static_cast<int64_t>(sizeof(scalar_t)), 2);
    with_act(act, [&](auto kind) {
      constexpr int ACT = decltype(kind)::value;
      for_chunks(M, N, stream, [&] {
        return [&, oa = ChunkOut<scalar_t>(stream, dap, dgate.numel()),
                ob = ChunkOut<scalar_t>(stream, dbp, packed ? dgate.numel() - N : dup.numel())](
                   int64_t row, int64_t c0, int64_t n) mutable {
          scalar_t* da = dap + row * sd + c0;
          scalar_t* db = dbp + row * sd + c0;
          bwd_span<ACT>(gp + row * sg + c0, ap + row * sa + c0, bp + row * sb + c0, oa.buffer(da, n),
                        ob.buffer(db, n), n);
          oa.flush(da, n);
          ob.flush(db, n);
        };
      });
    });
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
}

}  // namespace llmfast::cpu
