// FlashAttention-2 forward and backward for llmfast::attention_fwd / attention_bwd (CUDA).
//
// Maths (per batch b and query head h; kv head hk = h / (H / Hkv)):
//   s_ij  = scale * q_i . k_j, or c * tanh(scale * q_i . k_j / c) with softcap c > 0
//   x_ij  = s_ij  (+ mask_ij | -inf where masked, outside the band, j >= S)
//   lse_i = log (sum_j exp(x_ij) + exp(sink_h))  (no sink term without sinks; -inf when row i
//                                                 sees neither a key nor a sink)
//   P_ij  = exp(x_ij - lse_i);   Z_ij = keep_ij / (1 - p)  (dropout; Z = 1 without)
//   out_i = sum_j Z_ij P_ij v_j                  (the sink has no value row)
// The band (llmfast/ops/attention.py): with off = S - L when bottom-right aligned, else 0, key j
// is visible to query i iff (not causal or j <= i + off) and i + off - wl <= j <= i + off + wr
// (window bounds; -1 = unbounded).
// Backward, with dO = grad_out and delta_i = dO_i . out_i:
//   dV_j = sum_i Z_ij P_ij dO_i          dP_ij = Z_ij dO_i . v_j
//   dS_ij = P_ij (dP_ij - delta_i) (* (1 - tanh^2) under softcap)
//   dQ_i = scale sum_j dS_ij k_j         dK_j = scale sum_i dS_ij q_i  (dK/dV summed over a GQA group)
//   dsink_h = -sum_{b,i} exp(sink_h - lse_i) delta_i
// Memory: forward reads q, k, v once per (query tile, key tile) pair and writes out + lse;
// it never materialises the L x S matrix (O(L) extra memory).
//
// Kernels (FlashAttention-2 structure, all tiles in shared memory, fp32 accumulation):
//   _attention_fwd_kernel        one CTA per (b*h, 64-query tile); loops over key tiles with an
//                                online softmax; only the key tiles in the tile's band are visited
//                                (a window of W keys costs O(L*W)), and only those crossing a band
//                                edge (or the end of the keys, or with a mask) test each element.
//   _attention_bwd_delta_kernel  delta = rowsum(dO * out), one warp per row.
//   _attention_bwd_dsinks_kernel dsinks (with sinks): one CTA per head, deterministic.
//   _attention_bwd_dkdv_kernel   one CTA per (b*hkv, key tile); loops over the group's query heads
//                                and the query tiles in the band, dK/dV accumulate in registers
//                                (deterministic).
//   _attention_bwd_dq_kernel     one CTA per (b*h, query tile); loops over the forward's key tiles,
//                                dQ in registers (deterministic: no atomics anywhere). This
//                                recomputes QK^T and dO V^T once more than FA2's atomic-dQ variant
//                                (7 instead of 5 GEMMs in the backward) in exchange for
//                                bitwise-reproducible gradients, which the house rules ask for.
//
// Tensor cores: fp16/bf16 use mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix from padded
// shared tiles; P (and dS in the dQ pass) stay in registers as the A operand of the next MMA,
// exactly in the mma C-fragment layout. float32 uses the same kernels with a SIMT "warp GEMM" that
// computes the same C-fragment layout with FFMA from shared memory (no TF32: the result must be
// as accurate as torch's fp32 attention).
//
// Head dims are padded to a bucket HD in {64, 128, 256} (>= max(D, Dv)); padded columns are
// zero in shared memory and the k-steps / n-blocks past D or Dv are skipped at run time, so a
// small head dim costs registers, not FLOPs. 3 dtypes x 3 buckets x 3 tiled kernels = 27
// instantiations (+3 delta kernels): that keeps the sm_80 + sm_90 build to a few minutes.
//
// Registers (ptxas -v, CUDA 13.0): no kernel spills, except the fp16/bf16 HD=128 forward on sm_80:
// ptxas keeps it at 168 registers (3 CTAs per SM) and spills 32 bytes of loop invariants instead,
// reloaded from L1 once per key tile; without the per-tile mask test it takes 184 (2 CTAs per SM).
//
// Shared-memory rows are padded by one 16-byte chunk: with a row pitch of 16 B mod 128 B the 8
// row addresses of one ldmatrix (and the 8 rows a SIMT quad-group reads) fall in distinct banks.
//
// The scratch program csrc/dev/attention_dev.cu validates the kernels against a float64 CPU
// reference and times them on a GPU. Under the warp emulator (csrc/dev/cuda_emu.h) ldmatrix,
// mma.sync and cp.async come from its PTX-table models; everything else is the same code.
#include <cmath>

#include "cuda/common.cuh"

namespace llmfast::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------
// Parameters: one struct for every kernel (passed by value, ~350 B of kernel parameters).
// Strides are in elements; the last dim of every tensor is contiguous (stride 1).
// ------------------------------------------------------------------------------------------
struct AttnParams {
  const void* q = nullptr;  // [B, H, L, D]
  const void* k = nullptr;  // [B, Hkv, S, D]
  const void* v = nullptr;  // [B, Hkv, S, Dv]
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  // mask viewed as [B, H, L, S], any strides (0 where broadcast); kind 0 none, 1 bool, 2 float.
  const void* mask = nullptr;
  int mask_kind = 0;
  int64_t m_sb = 0, m_sh = 0, m_sl = 0, m_ss = 0;
  void* out = nullptr;  // [B, H, L, Dv]: written by the forward, read (as O) by the backward
  int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  float* lse = nullptr;  // [B, H, L] contiguous, natural log
  // backward only
  const void* dout = nullptr;  // [B, H, L, Dv]
  int64_t do_sb = 0, do_sh = 0, do_sl = 0;
  float* delta = nullptr;  // [B, H, L] contiguous scratch
  void* dq = nullptr;      // [B, H, L, D]
  int64_t dq_sb = 0, dq_sh = 0, dq_sl = 0;
  void* dk = nullptr;  // [B, Hkv, S, D]
  int64_t dk_sb = 0, dk_sh = 0, dk_ss = 0;
  void* dv = nullptr;  // [B, Hkv, S, Dv]
  int64_t dv_sb = 0, dv_sh = 0, dv_ss = 0;

  int B = 0, H = 0, Hkv = 0, group = 1, L = 0, S = 0, D = 0, Dv = 0;
  float scale = 1.f;       // natural scale of q.k
  float scale_log2 = 1.f;  // scale * log2(e): scores live in the log2 domain (exp2 is one MUFU op)
  // Visibility (llmfast/ops/attention.py): with band set (causal or a window), key j is visible
  // to query i iff -wl <= j - i - off <= wr; off = S - L when bottom-right aligned, else 0;
  // causal caps wr at 0; an unbounded side is L + S + 1, past every key (int32 arithmetic).
  int band = 0;
  int off = 0, wl = 0, wr = 0;
  // softcap c > 0: the score s = scale*q.k becomes c*tanh(s/c); cap_inv = scale / c,
  // cap_log2 = c * log2(e) (scores live in the log2 domain).
  int has_cap = 0;
  float cap_inv = 0.f, cap_log2 = 0.f;
  const float* sinks = nullptr;  // [H] fp32 logits joining every row's denominator, or null
  float* dsinks = nullptr;       // [H] fp32 (backward, with sinks)
  int has_dropout = 0;
  uint32_t drop_threshold = 0;  // keep iff 32 random bits >= threshold = round(p * 2^32)
  float rp_keep = 1.f;          // 1 / (1 - p)
  uint64_t seed = 0;
  int aligned = 0;  // every tile row starts 16 B-aligned: cp.async 16 B copies are legal
};

// ------------------------------------------------------------------------------------------
// Dropout: the draw csrc/ops.cpp pins for every backend (llmfast.reference.dropout_keep is
// the executable spec): element (b, h, i, j) is kept iff word 0 of Philox4x32-10 with
// counter (j, i, b*H + h, 0) and key (seed lo, seed hi) is >= floor(p * 2^32). Counter-based,
// so the backward regenerates the forward's mask from the indices alone; the same seed
// gives the same mask on the cpu, triton and cuda backends.
// ------------------------------------------------------------------------------------------
struct DropKey {
  uint32_t k0 = 0, k1 = 0, bh = 0, i = 0;  // the per-row part of key and counter
};

__host__ __device__ __forceinline__ DropKey dropout_row_key(uint64_t seed, uint32_t bh, uint32_t i) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), bh, i};
}

__host__ __device__ __forceinline__ uint32_t dropout_bits(const DropKey& r, uint32_t j) {
  uint32_t c0 = j, c1 = r.i, c2 = r.bh, c3 = 0u, k0 = r.k0, k1 = r.k1;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// ------------------------------------------------------------------------------------------
// Packing two values into one mma operand register.
// ------------------------------------------------------------------------------------------
// (lo, hi) -> one .b32 register holding two 16-bit values, lo in the low half (the element with
// the smaller column index, as mma fragments expect).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------
// Tensor-core and async-copy instructions (PTX). The emulator models them from the PTX ISA's
// fragment tables.
// ------------------------------------------------------------------------------------------
#ifdef LLMFAST_EMU
using ::emu::ptx::cp_async_16;
using ::emu::ptx::cp_async_commit;
using ::emu::ptx::cp_async_wait;
using ::emu::ptx::ldmatrix_x4;
using ::emu::ptx::ldmatrix_x4_trans;
using ::emu::ptx::mma_16816;
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m; register m of lane l
// receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix m (of its transpose with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulate. Fragments (g = lane/4, t = lane%4):
// a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..); b0:(k 2t..2t+1, n g)
// b1:(k 2t+8.., n g); c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy that bypasses L1; bytes [src_bytes, 16) of dst are zero-filled
// (src_bytes = 0 zero-fills the chunk: used for padding rows and columns).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // LLMFAST_EMU

// ------------------------------------------------------------------------------------------
// Global -> shared tile copy: ROWS x HD elements into a [ROWS][ld_s] tile. Rows >= rows_valid
// and columns >= cols_valid are zero-filled, so padded rows/columns contribute nothing to any
// dot product and padded V rows never inject NaN/Inf into P.V. Asynchronous (cp.async) when every
// row start is 16 B-aligned (`aligned`), else plain loads; the caller commits/waits and syncs.
// ------------------------------------------------------------------------------------------
template <typename T, int ROWS, int HD, int NT>
__device__ __forceinline__ void load_tile(T* s, int ld_s, const T* g, int64_t ld_g, int rows_valid, int cols_valid,
                                          bool aligned) {
  constexpr int CH = 16 / static_cast<int>(sizeof(T));  // elements per 16 B chunk
  constexpr int CPR = HD / CH;                          // chunks per row
  const int tid = threadIdx.x;
#pragma unroll 4
  for (int c = tid; c < ROWS * CPR; c += NT) {
    const int r = c / CPR, cc = (c % CPR) * CH;
    T* dst = s + r * ld_s + cc;
    const bool row_ok = r < rows_valid;
    if (aligned) {
      int nbytes = 0;
      const T* src = g;  // any valid address when nothing is read
      if (row_ok && cc < cols_valid) {
        src = g + r * ld_g + cc;
        nbytes = imin(CH, cols_valid - cc) * static_cast<int>(sizeof(T));
      }
      cp_async_16(dst, src, nbytes);
    } else {
#pragma unroll
      for (int e = 0; e < CH; ++e)
        dst[e] = (row_ok && cc + e < cols_valid) ? g[r * ld_g + cc + e] : from_float<T>(0.f);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Warp GEMMs. acc[NB][4] is the warp's 16 x (8*NB) fp32 tile in the mma C layout.
//   A: 16 x K, element (m, k) at sA[m * lda + k]
//   B: K x 8*NB, B_KN=false: element (k, n) at sB[n * ldb + k] (k contiguous: K for Q K^T)
//                B_KN=true:  element (k, n) at sB[k * ldb + n] (n contiguous: V for P V)
// Only k < k_valid (rounded up to 16 on tensor cores) and n-blocks starting below n_valid are
// computed; the bounds are warp-uniform so every lane runs the same ldmatrix/mma sequence.
// ------------------------------------------------------------------------------------------
// Tensor cores, one 16-wide k-step ks: acc[n-block] += a * B[ks*16.., n-block] for the n-block
// pairs starting below n_valid. `a` is the warp's A fragment of that k-step; B as in warp_gemm_ss.
template <typename T, int NB, bool B_KN>
__device__ __forceinline__ void mma_k_step(float (&acc)[NB][4], const uint32_t (&a)[4], const T* sB, int ldb, int ks,
                                           int n_valid) {
  static_assert(NB % 2 == 0, "tensor-core warp tiles are 16 columns wide");
  const int lane = threadIdx.x & 31, mi = lane >> 3;  // mi: the 8x8 matrix this lane addresses in an ldmatrix.x4
#pragma unroll
  for (int nb2 = 0; nb2 < NB / 2; ++nb2) {
    if (nb2 * 16 < n_valid) {
      uint32_t b[4];
      if constexpr (B_KN) {
        // matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), transposed
        ldmatrix_x4_trans(b, sB + (ks * 16 + (mi & 1) * 8 + (lane & 7)) * ldb + nb2 * 16 + (mi >> 1) * 8);
      } else {
        // matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        ldmatrix_x4(b, sB + (nb2 * 16 + (mi >> 1) * 8 + (lane & 7)) * ldb + ks * 16 + (mi & 1) * 8);
      }
      mma_16816<T>(acc[2 * nb2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * nb2 + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int NB, int KMAX, bool B_KN>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[NB][4], const T* sA, int lda, const T* sB, int ldb,
                                             int k_valid, int n_valid) {
  const int lane = threadIdx.x & 31;
  if constexpr (std::is_same_v<T, float>) {
    // SIMT: the same C layout, one FFMA per output per k, operands straight from shared memory.
    const int g = lane >> 2, t = lane & 3;
    const float* a0p = sA + g * lda;
    const float* a1p = sA + (g + 8) * lda;
#pragma unroll 2
    for (int k = 0; k < k_valid; ++k) {
      const float a0 = a0p[k], a1 = a1p[k];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        if (nb * 8 < n_valid) {
          float b0, b1;
          if constexpr (B_KN) {
            const float2 bb = *reinterpret_cast<const float2*>(sB + k * ldb + nb * 8 + 2 * t);
            b0 = bb.x;
            b1 = bb.y;
          } else {
            b0 = sB[(nb * 8 + 2 * t) * ldb + k];
            b1 = sB[(nb * 8 + 2 * t + 1) * ldb + k];
          }
          acc[nb][0] = fmaf(a0, b0, acc[nb][0]);
          acc[nb][1] = fmaf(a0, b1, acc[nb][1]);
          acc[nb][2] = fmaf(a1, b0, acc[nb][2]);
          acc[nb][3] = fmaf(a1, b1, acc[nb][3]);
        }
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < KMAX / 16; ++ks) {
      if (ks * 16 < k_valid) {
        uint32_t a[4];
        // matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        ldmatrix_x4(a, sA + (lane & 15) * lda + ks * 16 + (lane >> 4) * 8);
        mma_k_step<T, NB, B_KN>(acc, a, sB, ldb, ks, n_valid);
      }
    }
  }
}

// acc += A B with A = the warp's 16 x (16*KB) fp32 tile `pa` in the C layout (P or dS), rounded
// to T for the tensor cores. The C layout of two adjacent n-blocks is exactly an A fragment, so
// no data moves between lanes. The SIMT path stages A through the warp's fp32 scratch
// [16][16*KB + 4] in shared memory instead.
template <typename T, int NB, int KB, bool B_KN>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[NB][4], const float (&pa)[2 * KB][4], const T* sB,
                                             int ldb, int k_valid, int n_valid, float* scratch) {
  const int lane = threadIdx.x & 31;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int LDA = 16 * KB + 4;
    const int g = lane >> 2, t = lane & 3;
    __syncwarp();  // every lane is done reading the previous contents
#pragma unroll
    for (int nb = 0; nb < 2 * KB; ++nb) {
      scratch[g * LDA + nb * 8 + 2 * t] = pa[nb][0];
      scratch[g * LDA + nb * 8 + 2 * t + 1] = pa[nb][1];
      scratch[(g + 8) * LDA + nb * 8 + 2 * t] = pa[nb][2];
      scratch[(g + 8) * LDA + nb * 8 + 2 * t + 1] = pa[nb][3];
    }
    __syncwarp();
    warp_gemm_ss<float, NB, 16 * KB, B_KN>(acc, scratch, LDA, sB, ldb, k_valid, n_valid);
  } else {
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      if (kb * 16 < k_valid) {
        uint32_t a[4];
        a[0] = pack2<T>(pa[2 * kb][0], pa[2 * kb][1]);
        a[1] = pack2<T>(pa[2 * kb][2], pa[2 * kb][3]);
        a[2] = pack2<T>(pa[2 * kb + 1][0], pa[2 * kb + 1][1]);
        a[3] = pack2<T>(pa[2 * kb + 1][2], pa[2 * kb + 1][3]);
        mma_k_step<T, NB, B_KN>(acc, a, sB, ldb, kb, n_valid);
      }
    }
  }
}

// Row half r (row g or g+8 of the lane) of a warp's 16 x (8*NB) fp32 tile in the C layout,
// times `mul`, to columns c0 + nb*8 + 2t + e (those below `cols`) of the row `dst`.
template <typename T, int NB>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[NB][4], int r, float mul, int c0, int cols) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = c0 + nb * 8 + 2 * t + e;
      if (c < cols) dst[c] = from_float<T>(acc[nb][2 * r + e] * mul);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Scores, shared by the forward and both backward passes so that they agree bit for bit.
// ------------------------------------------------------------------------------------------
// tanh in fp32 from e = exp(-2|x|) in (0, 1]: no overflow for any |x| (the Triton kernel's
// formula). Near 0, 1 - e cancels (relative error ~2^-22 / 2|x|, from exp2's own error); there
// the odd Taylor series to x^11 is used instead (relative error < 1e-7 for |x| < 0.4), so a
// softcapped score is as accurate as torch's tanh gives it. Both are computed: no divergence.
__device__ __forceinline__ float tanh_from_exp(float x) {
  const float a = fabsf(x);
  const float e = exp2f(a * -2.8853900817779268f);  // exp(-2|x|) = exp2(-2 log2(e) |x|)
  float th = (1.f - e) / (1.f + e);
  const float a2 = a * a;
  const float series =
      a * (1.f + a2 * (-1.f / 3 + a2 * (2.f / 15 + a2 * (-17.f / 315 + a2 * (62.f / 2835 + a2 * (-1382.f / 155925))))));
  if (a < 0.4f) th = series;
  return x < 0.f ? -th : th;
}

// A raw dot product q.k -> its score in the log2 domain: scale*log2(e)*q.k, or under softcap c
// c*log2(e)*tanh(scale*q.k / c), with the tanh in *th for the backward's chain factor 1 - tanh^2.
__device__ __forceinline__ float logit(float qk, const AttnParams& p, float* th = nullptr) {
  if (p.has_cap) {
    const float t = tanh_from_exp(qk * p.cap_inv);
    if (th) *th = t;
    return t * p.cap_log2;
  }
  return qk * p.scale_log2;
}

// x is a logit; returns -inf for invisible keys (past L/S, outside the band, masked out), else
// x + log2(e)*mask.
__device__ __forceinline__ float mask_score(float x, int i, int j, const AttnParams& p, int b, int h) {
  if (i >= p.L || j >= p.S) return -INFINITY;
  if (p.band) {
    const int d = j - i - p.off;
    if (d < -p.wl || d > p.wr) return -INFINITY;
  }
  if (p.mask_kind != 0) {
    const int64_t off = b * p.m_sb + h * p.m_sh + static_cast<int64_t>(i) * p.m_sl + static_cast<int64_t>(j) * p.m_ss;
    if (p.mask_kind == 1) {
      if (static_cast<const uint8_t*>(p.mask)[off] == 0) return -INFINITY;
    } else {
      x += static_cast<const float*>(p.mask)[off] * kLog2e;
    }
  }
  return x;
}

// Band-bounded loops: work proportional to what is visible. [lo, hi) with lo a multiple of the
// tile size and hi <= the length; lo >= hi: nothing visible. Without a band: everything.
struct Range {
  int lo, hi;
};

// The keys that some query row of [i0, i1] can see.
__device__ __forceinline__ Range key_range(const AttnParams& p, int i0, int i1, int bn) {
  if (!p.band) return {0, p.S};
  const int lo = imax(i0 + p.off - p.wl, 0) / bn * bn;
  return {lo, imax(imin(i1 + p.off + p.wr + 1, p.S), lo)};
}

// The query rows that can see some key of [j0, j1].
__device__ __forceinline__ Range query_range(const AttnParams& p, int j0, int j1, int bm) {
  if (!p.band) return {0, p.L};
  const int lo = imax(j0 - p.off - p.wr, 0) / bm * bm;
  return {lo, imax(imin(j1 - p.off + p.wl + 1, p.L), lo)};
}

// Does the tile (query rows [i0, i1], keys [j0, j0 + bn)) need mask_score? Not when it is wholly
// inside the band and the keys, without an explicit mask (uniform over the CTA). Query rows past L
// may skip it: their Q (or, in the backward, P = exp2(x - inf)) is zero and they are never stored.
__device__ __forceinline__ bool tile_needs_mask(const AttnParams& p, int i0, int i1, int j0, int bn) {
  if (p.mask_kind != 0 || j0 + bn > p.S) return true;
  return p.band && (j0 - i1 - p.off < -p.wl || j0 + bn - 1 - i0 - p.off > p.wr);
}

// ------------------------------------------------------------------------------------------
// Tile configurations. BM/BN: query/key rows per tile; NW warps; HD: padded head-dim bucket.
// Row pitches add one 16 B chunk (PAD elements) for conflict-free shared-memory access.
// ------------------------------------------------------------------------------------------
template <typename T, int HD_>
struct FwdCfg {
  static constexpr int HD = HD_;
  static constexpr bool kSimt = std::is_same_v<T, float>;
  static constexpr int NW = 4, NT = NW * 32;
  static constexpr int BM = 16 * NW;              // each warp owns 16 query rows
  static constexpr int BN = HD >= 256 ? 32 : 64;  // HD=256: 128 fp32 O accumulators per thread
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));
  static constexpr int LD = HD + PAD;  // sQ, sK, sV
  static constexpr int LDP = BN + 4;   // SIMT P scratch (fp32)
  static constexpr int kSmem = (BM + 2 * BN) * LD * static_cast<int>(sizeof(T)) + (kSimt ? NW * 16 * LDP * 4 : 0);
};

template <typename T, int HD_>
struct BwdKVCfg {
  static constexpr int HD = HD_;
  static constexpr bool kSimt = std::is_same_v<T, float>;
  // fp32 tiles are twice as large in shared memory: smaller BM/BN keep them under ~140 KB.
  static constexpr int NW = (kSimt && HD >= 256) ? 4 : 8, NT = NW * 32;
  static constexpr int BN = (kSimt && HD >= 256) ? 32 : 64;  // keys per CTA
  static constexpr int BM = (kSimt && HD >= 128) ? 32 : 64;  // queries per inner step
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));
  static constexpr int LD = HD + PAD;  // sK, sV, sQ, sdO
  static constexpr int LDS = BM + PAD;  // sP, sdS: [BN][BM] (keys x queries)
  // Phase A (S^T, dP^T: BN x BM) and phase B (dK, dV: BN x HD) both give each warp 16 key rows;
  // the remaining warps split the queries (A) or the head dim (B).
  static constexpr int WN = BN / 16;
  static constexpr int WM = NW / WN;
  static constexpr int QW = BM / WM;  // queries per warp in phase A
  static constexpr int DW = HD / WM;  // head-dim columns per warp in phase B
  static_assert(NW % WN == 0 && QW % 16 == 0 && DW % 16 == 0, "bad backward tiling");
  static constexpr int kSmem =
      (2 * BN + 2 * BM) * LD * static_cast<int>(sizeof(T)) + 2 * BN * LDS * static_cast<int>(sizeof(T)) + 2 * BM * 4;
};

template <typename T, int HD_>
struct BwdQCfg {
  static constexpr int HD = HD_;
  static constexpr bool kSimt = std::is_same_v<T, float>;
  static constexpr int NW = (kSimt && HD >= 256) ? 2 : 4, NT = NW * 32;
  static constexpr int BM = 16 * NW;
  // S, dP (BN/2 fp32 each) and dQ (HD/2) are all live at once: BN = 64 spills at HD = 128.
  static constexpr int BN = HD >= 128 ? 32 : 64;
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));
  static constexpr int LD = HD + PAD;  // sQ, sdO, sK, sV
  static constexpr int LDP = BN + 4;   // SIMT dS scratch
  static constexpr int kSmem = (2 * BM + 2 * BN) * LD * static_cast<int>(sizeof(T)) + (kSimt ? NW * 16 * LDP * 4 : 0);
};

// ------------------------------------------------------------------------------------------
// Forward. grid (B*H, ceil(L/BM)), NT threads. Warp w owns query rows m0+16w .. m0+16w+15;
// lane (g, t) owns rows g and g+8 of that slab and, in every 8-wide column block, columns 2t, 2t+1.
// ------------------------------------------------------------------------------------------
template <typename T, int HD>
__global__ void __launch_bounds__(FwdCfg<T, HD>::NT) _attention_fwd_kernel(const AttnParams p) {
  using C = FwdCfg<T, HD>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, NT = C::NT;
  LLMFAST_DYN_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BM * LD;                     // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]
  float* scratch = reinterpret_cast<float*>(sV + BN * LD);  // SIMT only: [NW][16][LDP]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // heaviest (causal) tiles are scheduled first
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + static_cast<int64_t>(m0) * p.q_sl;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const bool aligned = p.aligned != 0;

  // Band (causal, window, either alignment): only the key tiles some row of this tile can see.
  const Range keys = key_range(p, m0, imin(m0 + BM, p.L) - 1, BN);

  // Pipeline (single-buffered K and V): V(n) loads while S = Q K(n)^T runs, K(n+1) while the
  // softmax and P V(n) run. cp.async groups in flight: {Q, K0}, then per tile {V(n)}, {K(n+1)}.
  load_tile<T, BM, HD, NT>(sQ, LD, q, p.q_sl, imin(BM, p.L - m0), p.D, aligned);
  if (keys.lo < keys.hi)
    load_tile<T, BN, HD, NT>(sK, LD, k + static_cast<int64_t>(keys.lo) * p.k_ss, p.k_ss, imin(BN, p.S - keys.lo), p.D,
                             aligned);
  cp_async_commit();

  float acc_o[HD / 8][4];
#pragma unroll
  for (int nb = 0; nb < HD / 8; ++nb) acc_o[nb][0] = acc_o[nb][1] = acc_o[nb][2] = acc_o[nb][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY};  // running row max (log2 domain)
  float l_i[2] = {0.f, 0.f};              // running row sum, this lane's columns only
  const int i_row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  DropKey rkey[2] = {};
  if (p.has_dropout) {
    rkey[0] = dropout_row_key(p.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i_row[0]));
    rkey[1] = dropout_row_key(p.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i_row[1]));
  }

  for (int n0 = keys.lo; n0 < keys.hi; n0 += BN) {
    const int rows_kv = imin(BN, p.S - n0);
    load_tile<T, BN, HD, NT>(sV, LD, v + static_cast<int64_t>(n0) * p.v_ss, p.v_ss, rows_kv, p.Dv, aligned);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's Q and K(n) copies have landed ...
    __syncthreads();          // ... and everyone's are visible

    float acc_s[BN / 8][4];
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) acc_s[nb][0] = acc_s[nb][1] = acc_s[nb][2] = acc_s[nb][3] = 0.f;
    warp_gemm_ss<T, BN / 8, HD, false>(acc_s, sQ + warp * 16 * LD, LD, sK, LD, p.D, rows_kv);
    __syncthreads();  // every warp is done with sK: prefetch the next key tile into it
    if (n0 + BN < keys.hi)
      load_tile<T, BN, HD, NT>(sK, LD, k + static_cast<int64_t>(n0 + BN) * p.k_ss, p.k_ss,
                               imin(BN, p.S - n0 - BN), p.D, aligned);
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait<1> below

    // Masking is needed on the ragged last tile, on tiles crossing a band edge and with an
    // explicit mask; the test is uniform over the CTA. (Rows past L count as rows of the band
    // here: fewer live registers than the last real row, at the cost of a few masked tiles.)
    const bool need_mask = tile_needs_mask(p, m0, m0 + BM - 1, n0, BN);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = logit(acc_s[nb][2 * r + e], p);
          if (need_mask) x = mask_score(x, i_row[r], n0 + nb * 8 + 2 * t + e, p, b, h);
          acc_s[nb][2 * r + e] = x;
          mx = fmaxf(mx, x);
        }
      }
      // the 4 lanes of a quad hold one row between them
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float m_new = fmaxf(m_i[r], mx);
      // A row that has seen only masked keys keeps m = -inf; exponentiate against 0 then so that
      // exp2(-inf - -inf) never makes a NaN (every p is 0 and alpha = exp2(-inf) = 0).
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_i[r] - m_use);
      m_i[r] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float pe = exp2f(acc_s[nb][2 * r + e] - m_use);
          rs += pe;  // the normaliser l sums the probabilities before dropout
          if (p.has_dropout &&
              dropout_bits(rkey[r], static_cast<uint32_t>(n0 + nb * 8 + 2 * t + e)) < p.drop_threshold)
            pe = 0.f;
          acc_s[nb][2 * r + e] = pe;
        }
      }
      l_i[r] = l_i[r] * alpha + rs;
#pragma unroll
      for (int nb = 0; nb < HD / 8; ++nb) {
        acc_o[nb][2 * r] *= alpha;
        acc_o[nb][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<1>();  // V(n) has landed (only K(n+1) may still be in flight)
    __syncthreads();
    warp_gemm_rs<T, HD / 8, BN / 16, true>(acc_o, acc_s, sV, LD, rows_kv, p.Dv, scratch + warp * 16 * C::LDP);
    __syncthreads();  // every warp is done with sV before the next tile's copy into it
  }
  cp_async_wait<0>();

  // Epilogue: out = acc / l (times 1/(1-p) under dropout); lse = ln 2 * (m + log2 l). A sink's
  // exp joins l at the common maximum (no overflow for a large sink); it has no value row, so
  // acc only rescales (alpha), and lse includes it: the backward's P needs nothing more.
  const float sink2 = p.sinks ? p.sinks[h] * kLog2e : -INFINITY;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    float m = m_i[r], alpha = 1.f;
    if (p.sinks) {
      const float m_new = fmaxf(m, sink2);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha = exp2f(m - m_use);
      l = l * alpha + exp2f(sink2 - m_use);
      m = m_new;
    }
    const int i = i_row[r];
    const bool seen = l > 0.f;  // l >= 1 as soon as one key (or the sink) was visible: its p is exp2(0)
    const float inv = seen ? alpha * p.rp_keep / l : 0.f;
    if (i < p.L) {
      if (t == 0) p.lse[static_cast<int64_t>(bh) * p.L + i] = seen ? (m + log2f(l)) * kLn2 : -INFINITY;
      T* o = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + static_cast<int64_t>(i) * p.o_sl;
      store_row(o, acc_o, r, inv, 0, p.Dv);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward pre-pass: delta[b, h, i] = sum_d dO[i, d] * out[i, d] in fp32. One warp per row,
// grid ceil(B*H*L / 4), 128 threads.
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(128) _attention_bwd_delta_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;
  if (row >= rows) return;  // whole warps leave together
  const int i = static_cast<int>(row % p.L);
  const int bh = static_cast<int>(row / p.L), b = bh / p.H, h = bh % p.H;
  const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + static_cast<int64_t>(i) * p.do_sl;
  const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + static_cast<int64_t>(i) * p.o_sl;
  float acc = 0.f;
  for (int d = lane; d < p.Dv; d += 32) acc += to_float(dO[d]) * to_float(o[d]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// ------------------------------------------------------------------------------------------
// Backward with sinks, after the delta pass: dsinks[h] = -sum_{b,i} p_sink[b,h,i] * delta[b,h,i],
// p_sink = exp(sink_h - lse) (lse includes the sink). Derivation: the sink column has no value
// row, so dP_sink = 0 and its dS = p_sink (0 - delta). One CTA of 256 threads per head: a fixed
// partition of the B*L rows and a fixed reduction tree, so deterministic (no float atomics); it
// reads 8 bytes per row, nothing next to the tiled passes. grid H.
// ------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(256) _attention_bwd_dsinks_kernel(const AttnParams p) {
  __shared__ float red[32];
  const int h = blockIdx.x;
  const float sink2 = p.sinks[h] * kLog2e;
  float acc = 0.f;
  for (int b = 0; b < p.B; ++b) {
    const int64_t base = (static_cast<int64_t>(b) * p.H + h) * p.L;
    for (int i = threadIdx.x; i < p.L; i += 256) {
      const float lse = p.lse[base + i];  // -inf only with a -inf sink and no visible key: p_sink = 0
      if (lse != -INFINITY) acc += exp2f(sink2 - lse * kLog2e) * p.delta[base + i];
    }
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) p.dsinks[h] = -acc;
}

// ------------------------------------------------------------------------------------------
// Backward dK/dV. grid (B*Hkv, ceil(S/BN)), NT threads. The CTA keeps K, V (BN keys) in shared
// memory and loops over the query heads of its GQA group and their query tiles:
//   phase A: warp (wn, wm) computes S^T and dP^T for keys wn*16.. x queries wm*QW.. and writes
//            Z*P^T and dS^T (rounded to T) to shared memory;
//   phase B: warp (wn, wm) accumulates dV += (Z P)^T dO and dK += dS^T Q for keys wn*16.. and
//            head-dim columns wm*DW.. in registers.
// ------------------------------------------------------------------------------------------
template <typename T, int HD>
__global__ void __launch_bounds__(BwdKVCfg<T, HD>::NT) _attention_bwd_dkdv_kernel(const AttnParams p) {
  using C = BwdKVCfg<T, HD>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, LDS = C::LDS, NT = C::NT, WN = C::WN, QW = C::QW,
                DW = C::DW;
  LLMFAST_DYN_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]
  T* sQ = sV + BN * LD;                     // [BM][LD]
  T* sdO = sQ + BM * LD;                    // [BM][LD]
  T* sP = sdO + BM * LD;                    // [BN][LDS]: Z * P^T
  T* sdS = sP + BN * LDS;                   // [BN][LDS]: dS^T
  float* sLse2 = reinterpret_cast<float*>(sdS + BN * LDS);  // [BM]: lse * log2(e), +inf = no key
  float* sDelta = sLse2 + BM;                                // [BM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, wm = warp / WN;
  const int bhk = blockIdx.x, b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int n0 = blockIdx.y * BN;  // the early key tiles carry the most causal work: launched first
  const int rows_kv = imin(BN, p.S - n0);
  const bool aligned = p.aligned != 0;

  load_tile<T, BN, HD, NT>(sK, LD, static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + static_cast<int64_t>(n0) * p.k_ss,
                           p.k_ss, rows_kv, p.D, aligned);
  load_tile<T, BN, HD, NT>(sV, LD, static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + static_cast<int64_t>(n0) * p.v_ss,
                           p.v_ss, rows_kv, p.Dv, aligned);
  cp_async_commit();

  float acc_dk[DW / 8][4], acc_dv[DW / 8][4];
#pragma unroll
  for (int nb = 0; nb < DW / 8; ++nb) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_dk[nb][c] = acc_dv[nb][c] = 0.f;
  }
  const int j_row[2] = {n0 + wn * 16 + g, n0 + wn * 16 + g + 8};  // this lane's keys in phase A and B
  // Band: only the query tiles with a row that sees one of these keys.
  const Range rows = query_range(p, n0, n0 + rows_kv - 1, BM);

  for (int hq = hk * p.group; hq < (hk + 1) * p.group; ++hq) {
    const int bh = b * p.H + hq;
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh;
    const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + hq * p.do_sh;
    for (int m0 = rows.lo; m0 < rows.hi; m0 += BM) {
      const int rows_q = imin(BM, p.L - m0);
      __syncthreads();  // the previous step's phase B is done with sQ, sdO, sP, sdS, sLse2, sDelta
      load_tile<T, BM, HD, NT>(sQ, LD, q + static_cast<int64_t>(m0) * p.q_sl, p.q_sl, rows_q, p.D, aligned);
      load_tile<T, BM, HD, NT>(sdO, LD, dO + static_cast<int64_t>(m0) * p.do_sl, p.do_sl, rows_q, p.Dv, aligned);
      cp_async_commit();
      for (int x = tid; x < BM; x += NT) {
        const int i = m0 + x;
        float lse2 = INFINITY, dl = 0.f;  // padding rows: P = exp2(x - inf) = 0
        if (i < p.L) {
          const float lse = p.lse[static_cast<int64_t>(bh) * p.L + i];
          lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;  // a row with no key has P = 0
          dl = p.delta[static_cast<int64_t>(bh) * p.L + i];
        }
        sLse2[x] = lse2;
        sDelta[x] = dl;
      }
      cp_async_wait<0>();
      __syncthreads();

      // ---- phase A: S^T = K Q^T and dP^T = V dO^T, 16 keys x QW queries per warp
      const int q_off = wm * QW;
      float st[QW / 8][4], dpt[QW / 8][4];
#pragma unroll
      for (int nb = 0; nb < QW / 8; ++nb) {
#pragma unroll
        for (int c = 0; c < 4; ++c) st[nb][c] = dpt[nb][c] = 0.f;
      }
      warp_gemm_ss<T, QW / 8, HD, false>(st, sK + wn * 16 * LD, LD, sQ + q_off * LD, LD, p.D, rows_q - q_off);
      warp_gemm_ss<T, QW / 8, HD, false>(dpt, sV + wn * 16 * LD, LD, sdO + q_off * LD, LD, p.Dv, rows_q - q_off);

      const bool need_mask = tile_needs_mask(p, m0, m0 + rows_q - 1, n0, BN);
#pragma unroll
      for (int nb = 0; nb < QW / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int il = q_off + nb * 8 + 2 * t + e;  // query within the tile (a column of S^T)
          const int i = m0 + il;
          const float lse2 = sLse2[il], dl = sDelta[il];
          const DropKey rkey = p.has_dropout ? dropout_row_key(p.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i)) : DropKey{};
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int j = j_row[r];
            float th = 0.f;
            float x = logit(st[nb][2 * r + e], p, &th);
            if (need_mask) x = mask_score(x, i, j, p, b, hq);
            const float pr = exp2f(x - lse2);
            float dp = dpt[nb][2 * r + e];
            float pd = pr;
            if (p.has_dropout) {
              const bool keep = dropout_bits(rkey, static_cast<uint32_t>(j)) >= p.drop_threshold;
              pd = keep ? pr * p.rp_keep : 0.f;
              dp = keep ? dp * p.rp_keep : 0.f;
            }
            float ds = pr * (dp - dl);
            if (p.has_cap) ds *= 1.f - th * th;  // d(c tanh(s/c))/ds
            const int row = wn * 16 + g + 8 * r;
            sP[row * LDS + il] = from_float<T>(pd);
            sdS[row * LDS + il] = from_float<T>(ds);
          }
        }
      }
      __syncthreads();

      // ---- phase B: dV += (Z P)^T dO, dK += dS^T Q; 16 keys x DW columns per warp
      const int d_off = wm * DW;
      warp_gemm_ss<T, DW / 8, BM, true>(acc_dv, sP + wn * 16 * LDS, LDS, sdO + d_off, LD, rows_q, p.Dv - d_off);
      warp_gemm_ss<T, DW / 8, BM, true>(acc_dk, sdS + wn * 16 * LDS, LDS, sQ + d_off, LD, rows_q, p.D - d_off);
    }
  }
  cp_async_wait<0>();

  // Epilogue: keys j_row[r], columns wm*DW.. . Keys no query sees (causal, L == 0) get exact zeros.
  const int d_off = wm * DW;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j_row[r];
    if (j >= p.S) continue;
    store_row(static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh + static_cast<int64_t>(j) * p.dk_ss, acc_dk, r,
              p.scale, d_off, p.D);
    store_row(static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh + static_cast<int64_t>(j) * p.dv_ss, acc_dv, r, 1.f,
              d_off, p.Dv);
  }
}

// ------------------------------------------------------------------------------------------
// Backward dQ. grid (B*H, ceil(L/BM)), NT threads; warp w owns query rows m0+16w.. as in the
// forward. Per key tile: S = Q K^T, dP = dO V^T, dS = P (Z dP - delta) in registers, then
// dQ += dS K with dS as the register A operand.
// ------------------------------------------------------------------------------------------
template <typename T, int HD>
__global__ void __launch_bounds__(BwdQCfg<T, HD>::NT) _attention_bwd_dq_kernel(const AttnParams p) {
  using C = BwdQCfg<T, HD>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, NT = C::NT;
  LLMFAST_DYN_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sdO = sQ + BM * LD;                    // [BM][LD]
  T* sK = sdO + BM * LD;                    // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]
  float* scratch = reinterpret_cast<float*>(sV + BN * LD);  // SIMT only: [NW][16][LDP]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int rows_q = imin(BM, p.L - m0);
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const bool aligned = p.aligned != 0;

  load_tile<T, BM, HD, NT>(sQ, LD, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + static_cast<int64_t>(m0) * p.q_sl,
                           p.q_sl, rows_q, p.D, aligned);
  load_tile<T, BM, HD, NT>(sdO, LD,
                           static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + static_cast<int64_t>(m0) * p.do_sl,
                           p.do_sl, rows_q, p.Dv, aligned);
  cp_async_commit();

  const int i_row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float lse2[2], dl[2];
  DropKey rkey[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = INFINITY;
    dl[r] = 0.f;
    if (i_row[r] < p.L) {
      const float lse = p.lse[static_cast<int64_t>(bh) * p.L + i_row[r]];
      lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      dl[r] = p.delta[static_cast<int64_t>(bh) * p.L + i_row[r]];
    }
    rkey[r] = p.has_dropout ? dropout_row_key(p.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i_row[r])) : DropKey{};
  }

  float acc_dq[HD / 8][4];
#pragma unroll
  for (int nb = 0; nb < HD / 8; ++nb) acc_dq[nb][0] = acc_dq[nb][1] = acc_dq[nb][2] = acc_dq[nb][3] = 0.f;

  const Range keys = key_range(p, m0, m0 + rows_q - 1, BN);  // the forward's key tiles
  for (int n0 = keys.lo; n0 < keys.hi; n0 += BN) {
    const int rows_kv = imin(BN, p.S - n0);
    // K and V in two groups: S = Q K^T starts while V is still in flight.
    load_tile<T, BN, HD, NT>(sK, LD, k + static_cast<int64_t>(n0) * p.k_ss, p.k_ss, rows_kv, p.D, aligned);
    cp_async_commit();
    load_tile<T, BN, HD, NT>(sV, LD, v + static_cast<int64_t>(n0) * p.v_ss, p.v_ss, rows_kv, p.Dv, aligned);
    cp_async_commit();
    cp_async_wait<1>();  // Q, dO (first tile) and K(n)
    __syncthreads();

    float acc_s[BN / 8][4], acc_dp[BN / 8][4];
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc_s[nb][c] = acc_dp[nb][c] = 0.f;
    }
    warp_gemm_ss<T, BN / 8, HD, false>(acc_s, sQ + warp * 16 * LD, LD, sK, LD, p.D, rows_kv);
    cp_async_wait<0>();  // V(n)
    __syncthreads();
    warp_gemm_ss<T, BN / 8, HD, false>(acc_dp, sdO + warp * 16 * LD, LD, sV, LD, p.Dv, rows_kv);

    const bool need_mask = tile_needs_mask(p, m0, m0 + BM - 1, n0, BN);  // as the forward's
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = n0 + nb * 8 + 2 * t + e;
          float th = 0.f;
          float x = logit(acc_s[nb][2 * r + e], p, &th);
          if (need_mask) x = mask_score(x, i_row[r], j, p, b, h);
          const float pr = exp2f(x - lse2[r]);
          float dp = acc_dp[nb][2 * r + e];
          if (p.has_dropout)
            dp = dropout_bits(rkey[r], static_cast<uint32_t>(j)) >= p.drop_threshold ? dp * p.rp_keep : 0.f;
          float ds = pr * (dp - dl[r]);
          if (p.has_cap) ds *= 1.f - th * th;  // d(c tanh(s/c))/ds
          acc_s[nb][2 * r + e] = ds;
        }
      }
    }
    warp_gemm_rs<T, HD / 8, BN / 16, true>(acc_dq, acc_s, sK, LD, rows_kv, p.D, scratch + warp * 16 * C::LDP);
    __syncthreads();  // every warp is done with sK and sV before the next tile's copies
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i_row[r];
    if (i >= p.L) continue;
    store_row(static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh + static_cast<int64_t>(i) * p.dq_sl, acc_dq, r,
              p.scale, 0, p.D);
  }
}

// ------------------------------------------------------------------------------------------
// Launchers: dtype x head-dim bucket -> kernel instantiation. They return the launch's CUDA error.
// ------------------------------------------------------------------------------------------
inline int head_dim_bucket(int d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }

template <template <typename, int> class Cfg>
inline int smem_bytes(DType dt, int hd) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    return hd == 64 ? Cfg<T, 64>::kSmem : (hd == 128 ? Cfg<T, 128>::kSmem : Cfg<T, 256>::kSmem);
  });
}

// One tiled pass: Cfg<T, HD> for the call's dtype and head-dim bucket gives the CTA (NT threads,
// kSmem bytes), kernel(T{}, integral_constant<HD>) the instantiation, grid(Cfg<T, HD>{}) the CTAs.
template <template <typename, int> class Cfg, typename Kernel, typename Grid>
inline cudaError_t launch_tiled(const AttnParams& p, DType dt, cudaStream_t stream, Kernel&& kernel, Grid&& grid) {
  auto go = [&](auto tag, auto hd) {
    using C = Cfg<decltype(tag), decltype(hd)::value>;
    return launch(kernel(tag, hd), grid(C{}), dim3(C::NT), C::kSmem, stream, p);
  };
  const int hd = head_dim_bucket(p.D > p.Dv ? p.D : p.Dv);
  return dispatch(dt, [&](auto tag) {
    if (hd == 64) return go(tag, std::integral_constant<int, 64>{});
    if (hd == 128) return go(tag, std::integral_constant<int, 128>{});
    return go(tag, std::integral_constant<int, 256>{});
  });
}

// Forward: writes p.out and p.lse. Needs B*H >= 1, L >= 1.
inline cudaError_t attention_fwd_launch(const AttnParams& p, DType dt, cudaStream_t stream) {
  return launch_tiled<FwdCfg>(
      p, dt, stream, [](auto t, auto hd) { return _attention_fwd_kernel<decltype(t), decltype(hd)::value>; },
      [&](auto c) { return dim3(p.B * p.H, (p.L + c.BM - 1) / c.BM); });
}

// Backward step 1: p.delta. Needs B*H*L >= 1.
inline cudaError_t attention_bwd_delta_launch(const AttnParams& p, DType dt, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  return dispatch(dt, [&](auto tag) {
    return launch(_attention_bwd_delta_kernel<decltype(tag)>, grid, dim3(128), 0, stream, p);
  });
}

// Backward step 1b (with sinks): p.dsinks. Needs H >= 1 and p.delta.
inline cudaError_t attention_bwd_dsinks_launch(const AttnParams& p, cudaStream_t stream) {
  return launch(_attention_bwd_dsinks_kernel, dim3(p.H), dim3(256), 0, stream, p);
}

// Backward step 2: p.dk, p.dv. Needs B*Hkv >= 1, S >= 1 (L may be 0: zeros).
inline cudaError_t attention_bwd_dkdv_launch(const AttnParams& p, DType dt, cudaStream_t stream) {
  return launch_tiled<BwdKVCfg>(
      p, dt, stream, [](auto t, auto hd) { return _attention_bwd_dkdv_kernel<decltype(t), decltype(hd)::value>; },
      [&](auto c) { return dim3(p.B * p.Hkv, (p.S + c.BN - 1) / c.BN); });
}

// Backward step 3: p.dq. Needs B*H >= 1, L >= 1 (S may be 0: zeros).
inline cudaError_t attention_bwd_dq_launch(const AttnParams& p, DType dt, cudaStream_t stream) {
  return launch_tiled<BwdQCfg>(
      p, dt, stream, [](auto t, auto hd) { return _attention_bwd_dq_kernel<decltype(t), decltype(hd)::value>; },
      [&](auto c) { return dim3(p.B * p.H, (p.L + c.BM - 1) / c.BM); });
}

// Largest dynamic shared memory any kernel of a call needs (checked against the device limit).
inline int attention_fwd_smem(DType dt, int D, int Dv) { return smem_bytes<FwdCfg>(dt, head_dim_bucket(D > Dv ? D : Dv)); }
inline int attention_bwd_smem(DType dt, int D, int Dv) {
  const int hd = head_dim_bucket(D > Dv ? D : Dv);
  const int a = smem_bytes<BwdKVCfg>(dt, hd), b = smem_bytes<BwdQCfg>(dt, hd);
  return a > b ? a : b;
}

// The band and softcap of llmfast/ops/attention.py into p (sinks are pointers, set by the caller).
// window bounds: -1 = unbounded; bottom_right aligns the band's diagonal to the last key.
inline void set_options(AttnParams& p, bool is_causal, int64_t window_left, int64_t window_right, bool bottom_right,
                        double scale, double softcap) {
  const int64_t big = static_cast<int64_t>(p.L) + p.S + 1;  // past every key: keeps i + off +- w in int32
  p.band = is_causal || window_left >= 0 || window_right >= 0;
  p.wl = static_cast<int>(window_left >= 0 && window_left < big ? window_left : big);
  p.wr = static_cast<int>(window_right >= 0 && window_right < big ? window_right : big);
  if (is_causal && p.wr > 0) p.wr = 0;
  p.off = p.band && bottom_right ? p.S - p.L : 0;
  p.has_cap = softcap > 0.0;
  p.cap_inv = p.has_cap ? static_cast<float>(scale / softcap) : 0.f;
  p.cap_log2 = static_cast<float>(softcap * 1.4426950408889634);
}

// Dropout keep threshold: keep iff the 32-bit draw >= floor(p * 2^32) (the reference's rule).
inline void set_dropout(AttnParams& p, double dropout_p, uint64_t seed) {
  p.seed = seed;
  p.has_dropout = dropout_p > 0.0;
  if (!p.has_dropout) {
    p.drop_threshold = 0;
    p.rp_keep = 1.f;
    return;
  }
  const double thr = std::floor(dropout_p * 4294967296.0);
  p.drop_threshold = thr >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(thr);
  p.rp_keep = dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.f;
}

}  // namespace
}  // namespace llmfast::cuda

#ifndef LLMFAST_CUDA_KERNELS_ONLY
// =============================================================================================
// torch binding
// =============================================================================================
#include <ATen/ops/empty.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/binding.h"

namespace llmfast::cuda {
namespace {

constexpr const char* kFwd = "llmfast::attention_fwd";
constexpr const char* kBwd = "llmfast::attention_bwd";

// cp.async copies 16 B chunks: legal when the base and every row start are 16 B-aligned.
bool rows_aligned(const Tensor& t) {
  const int64_t ch = 16 / t.element_size();
  if (!aligned16(t.const_data_ptr())) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % ch != 0) return false;
  return true;
}

// t as the kernels read it: unit stride along the last dim (autograd may hand over an expanded
// or transposed gradient, e.g. from .sum(); only that case is copied).
Tensor last_dim_contiguous(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

void check_last_dim(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg, " must be contiguous in its last dim, got strides ",
              t.strides());
}

struct Shapes {
  int64_t B, H, Hkv, L, S, D, Dv;
};

// q: [B, H, L, D], k: [B, Hkv, S, D], v: [B, Hkv, S, Dv], one dtype and device.
Shapes check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_on_device(op, "q", q);
  check_device(op, "k", k, q);
  check_device(op, "v", v, q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, H, L, D], got ", q.dim(),
              "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  dtype_of(op, "q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": batch sizes differ: q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(v.size(1) == s.Hkv, op, ": k and v head counts differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(s.Hkv > 0 ? s.H % s.Hkv == 0 : s.H == 0, op, ": query heads (", s.H,
              ") must be a multiple of key/value heads (", s.Hkv, ")");
  TORCH_CHECK(v.size(2) == s.S, op, ": k and v lengths differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.size(3) == s.D, op, ": q and k head dims differ: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(s.D >= 1 && s.D <= 256 && s.Dv >= 1 && s.Dv <= 256, op, ": head dims must be in [1, 256], got D=",
              s.D, ", Dv=", s.Dv);
  check_last_dim(op, "q", q);
  check_last_dim(op, "k", k);
  check_last_dim(op, "v", v);
  // Grids: (B*H, ceil(L/BM)) and (B*Hkv, ceil(S/BN)) with BM, BN >= 32 (gridDim.y <= 65535), and
  // ceil(B*H*L / 4) blocks for the delta pass.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(s.L <= 65535LL * 32 && s.S <= 65535LL * 32 && s.B * s.H <= kIntMax && s.B * s.H * s.L / 4 < kIntMax,
              op, ": sizes exceed the kernels' grid limits: q ", q.sizes(), ", k ", k.sizes());
  return s;
}

// The arguments the forward and the backward share; fills p with them.
void set_common(AttnParams& p, const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Shapes& s,
                const std::optional<Tensor>& mask, double scale, bool is_causal, double dropout_p, int64_t seed,
                int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                const std::optional<Tensor>& sinks) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_attention_options(op, q, window_left, window_right, softcap, sinks);
  TORCH_CHECK(!defined(sinks) || sinks->is_contiguous(), op, ": sinks must be contiguous, got strides ",
              sinks->strides());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.B = static_cast<int>(s.B), p.H = static_cast<int>(s.H), p.Hkv = static_cast<int>(s.Hkv);
  p.group = s.Hkv > 0 ? static_cast<int>(s.H / s.Hkv) : 1;
  p.L = static_cast<int>(s.L), p.S = static_cast<int>(s.S), p.D = static_cast<int>(s.D), p.Dv = static_cast<int>(s.Dv);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  set_options(p, is_causal, window_left, window_right, bottom_right, scale, softcap);
  p.sinks = defined(sinks) ? sinks->const_data_ptr<float>() : nullptr;  // [H] fp32 (checked above)
  set_dropout(p, dropout_p, static_cast<uint64_t>(seed));
  if (!defined(mask)) return;
  // mask: [B, H, L, S] view, any strides (0 where broadcast), bool (True = attend) or float32 (additive)
  const Tensor& m = *mask;
  check_mask(op, m, {s.B, s.H, s.L, s.S}, q);
  p.mask = m.const_data_ptr();
  p.mask_kind = m.scalar_type() == at::kBool ? 1 : 2;
  p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_sl = m.stride(2), p.m_ss = m.stride(3);
}

void check_smem(const char* op, int needed) {
  const int optin = smem_optin();
  TORCH_CHECK(needed <= optin, op, ": this head dim needs ", needed, " bytes of shared memory per block; the device ",
              "allows ", optin, " (use the triton or torch backend on this GPU)");
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& mask, double scale, bool is_causal,
                                         double dropout_p, int64_t seed, int64_t window_left, int64_t window_right,
                                         bool bottom_right, double softcap, const std::optional<Tensor>& sinks) {
  const Shapes s = check_qkv(kFwd, q, k, v);
  AttnParams p;
  set_common(p, kFwd, q, k, v, s, mask, scale, is_causal, dropout_p, seed, window_left, window_right, bottom_right,
             softcap, sinks);
  const DeviceGuard guard(q.device());
  Tensor out = at::empty({s.B, s.H, s.L, s.Dv}, q.options());
  Tensor lse = at::empty({s.B, s.H, s.L}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.L == 0) return {out, lse};
  p.out = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v);
  const DType dt = dtype_of(kFwd, "q", q);
  check_smem(kFwd, attention_fwd_smem(dt, p.D, p.Dv));
  check_launch(attention_fwd_launch(p, dt, current_stream()));
  return {out, lse};
}

// Returns (dq, dk, dv, dsinks); dsinks is [H] float32 with sinks, else an empty float32 [0].
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& out, const Tensor& lse,
                                                         const std::optional<Tensor>& mask, double scale,
                                                         bool is_causal, double dropout_p, int64_t seed,
                                                         int64_t window_left, int64_t window_right, bool bottom_right,
                                                         double softcap, const std::optional<Tensor>& sinks) {
  const Shapes s = check_qkv(kBwd, q, k, v);
  AttnParams p;
  set_common(p, kBwd, q, k, v, s, mask, scale, is_causal, dropout_p, seed, window_left, window_right, bottom_right,
             softcap, sinks);
  const std::vector<int64_t> o_shape{s.B, s.H, s.L, s.Dv};
  TORCH_CHECK(out.sizes() == o_shape && out.scalar_type() == q.scalar_type(), kBwd, ": out must be a ",
              q.scalar_type(), " [B, H, L, Dv] = ", o_shape, " tensor, got ", out.scalar_type(), " ", out.sizes());
  check_device(kBwd, "out", out, q);
  check_like(kBwd, "grad_out", grad_out, out);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({s.B, s.H, s.L}), kBwd,
              ": lse must be a float32 [B, H, L] tensor, got ", lse.scalar_type(), " ", lse.sizes());
  check_device(kBwd, "lse", lse, q);
  const DeviceGuard guard(q.device());
  Tensor dq = at::empty({s.B, s.H, s.L, s.D}, q.options());
  Tensor dk = at::empty({s.B, s.Hkv, s.S, s.D}, q.options());
  Tensor dv = at::empty({s.B, s.Hkv, s.S, s.Dv}, q.options());
  Tensor dsinks = at::empty({defined(sinks) ? s.H : 0}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.L == 0 || s.S == 0) {
    // No query rows: dK = dV = 0. No keys: every row is fully masked, dQ = 0, out = 0 and so
    // delta = 0 and dsinks = 0.
    dq.zero_();
    dk.zero_();
    dv.zero_();
    dsinks.zero_();
    return {dq, dk, dv, dsinks};
  }
  const Tensor dO = last_dim_contiguous(grad_out), o = last_dim_contiguous(out), lse_c = lse.contiguous();
  p.out = const_cast<void*>(o.const_data_ptr());  // read only in the backward
  p.o_sb = o.stride(0), p.o_sh = o.stride(1), p.o_sl = o.stride(2);
  p.lse = const_cast<float*>(lse_c.const_data_ptr<float>());
  p.dout = dO.const_data_ptr();
  p.do_sb = dO.stride(0), p.do_sh = dO.stride(1), p.do_sl = dO.stride(2);
  Tensor delta = at::empty({s.B, s.H, s.L}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dq_sb = dq.stride(0), p.dq_sh = dq.stride(1), p.dq_sl = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_sb = dk.stride(0), p.dk_sh = dk.stride(1), p.dk_ss = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_sb = dv.stride(0), p.dv_sh = dv.stride(1), p.dv_ss = dv.stride(2);
  p.aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v) && rows_aligned(dO);
  const DType dt = dtype_of(kBwd, "q", q);
  check_smem(kBwd, attention_bwd_smem(dt, p.D, p.Dv));
  const cudaStream_t stream = current_stream();
  check_launch(attention_bwd_delta_launch(p, dt, stream));
  if (p.sinks) {
    p.dsinks = dsinks.data_ptr<float>();
    check_launch(attention_bwd_dsinks_launch(p, stream));
  }
  check_launch(attention_bwd_dkdv_launch(p, dt, stream));
  check_launch(attention_bwd_dq_launch(p, dt, stream));
  return {dq, dk, dv, dsinks};
}

}  // namespace

LLMFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace llmfast::cuda
#endif  // LLMFAST_CUDA_KERNELS_ONLY
