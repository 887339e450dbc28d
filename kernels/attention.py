"""Fused attention (FlashAttention-2) in Triton, forward and backward.

Shapes: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (last dim contiguous,
other strides free); query head h reads kv head h // (H // Hkv). Forward, one program
per (BLOCK_M query rows, b·H + h):

    s_ij = q_i·k_j · scale (+ mask_ij | -inf where hidden)      in the log2 domain
    m_i  = running max,  l_i = Σ_j exp2(s_ij − m_i)             (online softmax)
    acc_i = Σ_j exp2(s_ij − m_i)·z_ij·v_j,  out_i = acc_i / l_i,  lse_i = ln-sum-exp
    z_ij = keep_ij / (1 − p) with dropout, else 1

k/v tiles stream through shared memory; the [L, S] scores never exist. A row with no
visible key gives out = 0, lse = -inf.

Bands (causal, sliding window, either alignment): with ``off`` = S − L (bottom-right) or
0 (top-left), key j is visible to query i iff −WL ≤ j − i − off ≤ WR (causal folds into
WR ≤ 0; an unbounded side gets a bound past every key). Each program computes the key
range its query block can see, so a window of W keys costs O(L·W), not O(L·S); only the
tiles that straddle a band edge (or the end of the keys) evaluate the band, the tiles
wholly inside it run without any masking. The backward kernels bound their loops the
same way (the query rows that can see a kv block; the keys a query block can see).

softcap c > 0 (Gemma 2): s = c·tanh(q·k·scale / c) in fp32, with tanh(x) =
sign(x)·(1 − e)/(1 + e), e = exp(−2|x|) ∈ (0, 1], which cannot overflow; the backward
multiplies dS by 1 − tanh². sinks [H] (gpt-oss): exp(sink_h) joins every row's
denominator once, after the key loop (so lse includes it and the backward's P, recomputed
from lse, needs nothing more); dsink_h = −Σ_i exp(sink_h − lse_i)·Δ_i.

Backward (FlashAttention-2, P recomputed from the saved lse, Δ_i = Σ_d dO_id·O_id):

    p_ij = exp(s_ij − lse_i),   dP = dO·Vᵀ,   dS = p∘(z∘dP − Δ)·scale
    dV = (p∘z)ᵀ·dO,   dK = dSᵀ·Q,   dQ = dS·K

``_attn_bwd_dkdv_kernel`` runs one program per (kv block, b·Hkv + hk) and loops over
every query head of its GQA group, so dK/dV are group sums written once, without
atomics; ``_attn_bwd_dq_kernel`` runs one program per (query block, b·H + h). Both
are deterministic.

Dropout: element (b, h, i, j) is kept iff word 0 of Philox4x32-10 with counter
(j, i, b·H + h, 0) and key (seed lo 32 bits, seed hi 32 bits) is >= floor(p·2^32):
the same draw as the C++ kernel and ``llmfast.reference.dropout_keep``, regenerated
by the backward kernels from (seed, index).

FLOPs (standard count): forward 4·B·H·L·S·D (halved for causal), backward 2.5×.
Bytes: q read and out written once; k and v re-read once per query block (from L2 when
they fit).

fp32 inputs use ``input_precision="ieee"`` dots (tf32 would be less accurate than
torch's fp32 matmul); fp16/bf16 inputs run tensor-core dots (wgmma on sm_90) with
fp32 accumulation. Under ``TRITON_INTERPRET=1`` bf16 dot operands are upcast to fp32
(``UPCAST``) because numpy has no bf16 and the interpreter's bf16 ``tl.dot`` is wrong.
"""
import math

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dropout_keep(seed, threshold, bh, rows, cols):
    """[BM, BN] bool: keep element (bh, row, col); rows [BM, 1], cols [1, BN] int32."""
    zero = rows * 0 + cols * 0
    c0 = (cols + zero).to(tl.uint32, bitcast=True)
    c1 = (rows + zero).to(tl.uint32, bitcast=True)
    c2 = (bh + zero).to(tl.uint32, bitcast=True)
    c3 = zero.to(tl.uint32, bitcast=True)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return r >= threshold.to(tl.uint32)


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp(−2|x|) ∈ (0, 1]: no overflow for any |x| (Triton has no portable tanh)."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|) = exp2(-2·log2(e)·|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits(s, qk_scale, cap_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Raw dot products -> (scores in the log2 domain, t): s·scale·log2(e) without softcap; with
    it t = tanh(s·scale/c) (the backward's 1 - t²) and c·t·log2(e) (cap_scale = scale/c,
    cap_log2 = c·log2(e)). One return (Triton wants one type per return); t is unused without."""
    if SOFTCAP:
        t = _tanh(s * cap_scale)
        s = t * cap_log2
    else:
        t = s
        s = s * qk_scale
    return s, t


@triton.jit
def _in_band(rows, cols, OFF, WL, WR):
    """Key cols visible to query rows: −WL <= j − i − OFF <= WR (rows [M, 1] / cols [1, N] or transposed)."""
    d = cols - rows - OFF
    return (d >= -WL) & (d <= WR)


@triton.jit
def _scores(q, K_ptr, M_ptr, offs_m, start_n, offs_n, offs_d, stride_kn, m_base, stride_ml, stride_ms,
            L, S, D, qk_scale, cap_scale, cap_log2, OFF, WL, WR,
            CHECK: tl.constexpr, MASK_KIND: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """s = q·kᵀ·scale·log2(e) (softcapped, + mask) for one [BLOCK_M, BLOCK_N] tile, -inf where hidden.

    CHECK: the tile may hold keys past S or outside the band (else it is wholly visible)."""
    cols = start_n + offs_n
    k_ptrs = K_ptr + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
    if CHECK:
        kt = tl.load(k_ptrs, mask=(offs_d[:, None] < D) & (cols[None, :] < S), other=0.0)
    else:
        kt = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
    if UPCAST:
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=PRECISION)
    else:
        s = tl.dot(q, kt, input_precision=PRECISION)
    s, _ = _logits(s, qk_scale, cap_scale, cap_log2, SOFTCAP)
    if MASK_KIND != 0:
        m_ptrs = M_ptr + m_base + offs_m[:, None].to(tl.int64) * stride_ml + cols[None, :].to(tl.int64) * stride_ms
        in_mask = (offs_m[:, None] < L) & (cols[None, :] < S)
        if MASK_KIND == 1:  # bool: True = attend
            mv = tl.load(m_ptrs, mask=in_mask, other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        else:  # additive float32
            mv = tl.load(m_ptrs, mask=in_mask, other=0.0)
            s = s + mv * 1.4426950408889634
    if CHECK:
        visible = cols[None, :] < S
        if BAND:
            visible = visible & _in_band(offs_m[:, None], cols[None, :], OFF, WL, WR)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K_ptr, V_ptr, M_ptr, offs_m, offs_n, offs_d, offs_dv,
               stride_kn, stride_vn, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale, cap_scale, cap_log2,
               OFF, WL, WR, seed, threshold, keep_scale, bh, lo, hi,
               BLOCK_N: tl.constexpr, CHECK: tl.constexpr, MASK_KIND: tl.constexpr, BAND: tl.constexpr,
               SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        s = _scores(q, K_ptr, M_ptr, offs_m, start_n, offs_n, offs_d, stride_kn, m_base, stride_ml, stride_ms,
                    L, S, D, qk_scale, cap_scale, cap_log2, OFF, WL, WR, CHECK, MASK_KIND, BAND, SOFTCAP, UPCAST,
                    PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet keep m = -inf; exp2(-inf - 0) = 0 avoids NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            cols = start_n + offs_n
            keep = _dropout_keep(seed, threshold, bh, offs_m[:, None], cols[None, :])
            p = tl.where(keep, p * keep_scale, 0.0)
        cols = start_n + offs_n
        v_ptrs = V_ptr + cols[:, None].to(tl.int64) * stride_vn + offs_dv[None, :]
        if CHECK:
            v = tl.load(v_ptrs, mask=(cols[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_block(Q_ptr, K_ptr, V_ptr, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb, stride_vh,
                 stride_mb, stride_mh, H, G, L, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query block (grid: (query blocks, B*H)) and where its head reads.

    Returns (start_m, bh, offs_m, offs_d, q [BLOCK_M, BLOCK_D] (zero past L and D), the k and v
    bases of kv head h // G, the mask offset of (b, h)).
    """
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    K_base = K_ptr + b * stride_kb + hk * stride_kh
    V_base = V_ptr + b * stride_vb + hk * stride_vh
    return start_m, bh, offs_m, offs_d, q, K_base, V_base, b * stride_mb + h * stride_mh


@triton.jit
def _key_range(start_m, L, S, OFF, WL, WR, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_lo, full_hi, hi): the keys [lo, hi) some row of query block start_m can see
    (lo a multiple of BLOCK_N), and the tiles [full_lo, full_hi) every row sees whole (no
    bound, band or key-count checks); lo <= full_lo <= full_hi <= hi."""
    first = start_m + OFF                               # the first row's diagonal key
    last = tl.minimum(start_m + BLOCK_M, L) - 1 + OFF   # the last real row's
    lo = (tl.maximum(first - WL, 0) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.minimum(last + WR + 1, S), lo)
    full_lo = tl.minimum(((tl.maximum(last - WL, lo) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
    full_hi = tl.minimum((tl.maximum(first + WR + 1, 0) // BLOCK_N) * BLOCK_N, (S // BLOCK_N) * BLOCK_N)
    return lo, full_lo, tl.maximum(full_hi, full_lo), hi


@triton.jit
def _attn_fwd_kernel(Q_ptr, K_ptr, V_ptr, M_ptr, O_ptr, LSE_ptr, SINK_ptr,
                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ml, stride_ms,
                     H, G, L, S, D, DV, qk_scale, cap_scale, cap_log2, OFF, WL, WR, seed, threshold, keep_scale,
                     MASK_KIND: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
                     DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]; out [B, H, L, Dv] and lse [B, H, L] contiguous;
    # sinks [H] fp32 (read only when SINKS)
    start_m, bh, offs_m, offs_d, q, K_base, V_base, m_base = _query_block(
        Q_ptr, K_ptr, V_ptr, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
        stride_mh, H, G, L, D, BLOCK_M, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, L, S, OFF, WL, WR, BLOCK_M, BLOCK_N)
    # the band's leading edge, its inside without checks, its trailing edge (and the keys' end)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, M_ptr, offs_m, offs_n, offs_d, offs_dv,
                               stride_ks, stride_vs, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale,
                               cap_scale, cap_log2, OFF, WL, WR, seed, threshold, keep_scale, bh, lo, full_lo,
                               BLOCK_N, True, MASK_KIND, BAND, SOFTCAP, DROPOUT, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, M_ptr, offs_m, offs_n, offs_d, offs_dv,
                               stride_ks, stride_vs, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale,
                               cap_scale, cap_log2, OFF, WL, WR, seed, threshold, keep_scale, bh, full_lo, full_hi,
                               BLOCK_N, False, MASK_KIND, BAND, SOFTCAP, DROPOUT, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, M_ptr, offs_m, offs_n, offs_d, offs_dv,
                               stride_ks, stride_vs, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale,
                               cap_scale, cap_log2, OFF, WL, WR, seed, threshold, keep_scale, bh, full_hi, hi,
                               BLOCK_N, True, MASK_KIND, BAND, SOFTCAP, DROPOUT, UPCAST, PRECISION)
    if SINKS:  # the sink's exp joins the denominator once; it has no value row
        sink = tl.load(SINK_ptr + bh % H) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.math.exp2(sink - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new
    dead = l_i == 0.0  # no visible key: zeros and lse = -inf
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < L
    o_ptrs = O_ptr + (bh.to(tl.int64) * L + offs_m[:, None]) * DV + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_ptr + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(O_ptr, DO_ptr, Delta_ptr, N_ROWS, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Δ = rowsum(dO ∘ O) over rows of the contiguous [B·H·L, Dv] out and grad_out
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    msk = (rows[:, None] < N_ROWS) & (cols[None, :] < DV)
    off = rows[:, None].to(tl.int64) * DV + cols[None, :]
    o = tl.load(O_ptr + off, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO_ptr + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(Delta_ptr + rows, tl.sum(o * do, 1), mask=rows < N_ROWS)


@triton.jit
def _bwd_probs(s, lse2, cols, rows, bh, seed, threshold, keep_scale, DROPOUT: tl.constexpr):
    """p = exp2(s − lse·log2e) and the dropout factor z (1 without dropout)."""
    p = tl.math.exp2(s - lse2)
    if DROPOUT:
        keep = _dropout_keep(seed, threshold, bh, rows, cols)
        z = tl.where(keep, keep_scale, 0.0)
    else:
        z = 1.0
    return p, z


@triton.jit
def _attn_bwd_dkdv_kernel(Q_ptr, K_ptr, V_ptr, M_ptr, DO_ptr, LSE_ptr, Delta_ptr, DK_ptr, DV_ptr,
                          stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_ks,
                          stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ml, stride_ms,
                          H, HKV, G, L, S, D, DV, qk_scale, scale, cap_scale, cap_log2, OFF, WL, WR,
                          seed, threshold, keep_scale,
                          MASK_KIND: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # one kv block of kv head hk; dO [B, H, L, Dv], lse/Δ [B, H, L] contiguous; dk/dv like k/v, contiguous
    start_n = tl.program_id(0) * BLOCK_N
    bk = tl.program_id(1)
    b = bk // HKV
    hk = bk % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < S
    k = tl.load(K_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # the query rows [lo, hi) that can see a key of this block (all of them without a band)
    last_n = tl.minimum(start_n + BLOCK_N, S) - 1
    lo = (tl.maximum(start_n - OFF - WR, 0) // BLOCK_M) * BLOCK_M
    hi = tl.maximum(tl.minimum(last_n - OFF + WL + 1, L), lo)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO_ptr + bh.to(tl.int64) * L * DV
        m_base = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < L
            # transposed tiles: sT [BLOCK_N, BLOCK_M] = k·qᵀ
            qt = tl.load(q_base + offs_m[None, :].to(tl.int64) * stride_ql + offs_d[:, None],
                         mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * DV + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            st, tt = _logits(tl.dot(k, qt, input_precision=PRECISION), qk_scale, cap_scale, cap_log2, SOFTCAP)
            visible = n_ok[:, None] & m_ok[None, :]
            if BAND:
                visible = visible & _in_band(offs_m[None, :], offs_n[:, None], OFF, WL, WR)
            if MASK_KIND != 0:
                m_ptrs = (M_ptr + m_base + offs_m[None, :].to(tl.int64) * stride_ml
                          + offs_n[:, None].to(tl.int64) * stride_ms)
                if MASK_KIND == 1:
                    visible = visible & (tl.load(m_ptrs, mask=visible, other=0) != 0)
                else:
                    st = st + tl.load(m_ptrs, mask=visible, other=0.0) * 1.4426950408889634
            lse = tl.load(LSE_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=float("-inf"))
            # a row with lse = -inf saw no key: exp2(s - inf) = 0 gives it p = 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            pt, zt = _bwd_probs(st, lse2[None, :], offs_n[:, None], offs_m[None, :], bh, seed, threshold,
                                keep_scale, DROPOUT)
            pt = tl.where(visible, pt, 0.0)
            delta = tl.load(Delta_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
            pdt = pt * zt
            if UPCAST:
                dv = tl.dot(pdt, do, dv, input_precision=PRECISION)
            else:
                dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt * zt - delta[None, :])
            if SOFTCAP:
                dst = dst * (1.0 - tt * tt)  # d(c·tanh(x/c))/dx
            if UPCAST:
                dk = tl.dot(dst, tl.trans(qt), dk, input_precision=PRECISION)
            else:
                dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    dk = dk * scale
    out_off = bk.to(tl.int64) * S + offs_n[:, None]
    tl.store(DK_ptr + out_off * D + offs_d[None, :], dk.to(DK_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ptr + out_off * DV + offs_dv[None, :], dv.to(DV_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(Q_ptr, K_ptr, V_ptr, M_ptr, DO_ptr, LSE_ptr, Delta_ptr, DQ_ptr,
                        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_ks,
                        stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ml, stride_ms,
                        H, G, L, S, D, DV, qk_scale, scale, cap_scale, cap_log2, OFF, WL, WR,
                        seed, threshold, keep_scale,
                        MASK_KIND: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                        DELTA_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    # one query block of head h; dq [B, H, L, D] contiguous. DELTA_PASS: instead of dq, write
    # Δ_i = Σ_j p_ij·z_ij·dP_ij (fp32), the value Σ_d dO·O has for the unrounded output (see
    # attention_bwd: fp16/bf16 take this pass)
    start_m, bh, offs_m, offs_d, q, K_base, V_base, m_base = _query_block(
        Q_ptr, K_ptr, V_ptr, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
        stride_mh, H, G, L, D, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    do = tl.load(DO_ptr + (bh.to(tl.int64) * L + offs_m[:, None]) * DV + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)
    else:
        delta = tl.load(Delta_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, _, _, hi = _key_range(start_m, L, S, OFF, WL, WR, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < S
        kt = tl.load(K_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(V_base + offs_n[None, :].to(tl.int64) * stride_vs + offs_dv[:, None],
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s, t = _logits(tl.dot(q, kt, input_precision=PRECISION), qk_scale, cap_scale, cap_log2, SOFTCAP)
        visible = m_ok[:, None] & n_ok[None, :]
        if BAND:
            visible = visible & _in_band(offs_m[:, None], offs_n[None, :], OFF, WL, WR)
        if MASK_KIND != 0:
            m_ptrs = M_ptr + m_base + offs_m[:, None].to(tl.int64) * stride_ml + offs_n[None, :].to(tl.int64) * stride_ms
            if MASK_KIND == 1:
                visible = visible & (tl.load(m_ptrs, mask=visible, other=0) != 0)
            else:
                s = s + tl.load(m_ptrs, mask=visible, other=0.0) * 1.4426950408889634
        p, z = _bwd_probs(s, lse2[:, None], offs_n[None, :], offs_m[:, None], bh, seed, threshold, keep_scale,
                          DROPOUT)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if DELTA_PASS:
            delta += tl.sum(p * z * dp, 1)
        else:
            ds = p * (dp * z - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            if UPCAST:
                dq = tl.dot(ds, tl.trans(kt), dq, input_precision=PRECISION)
            else:
                dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    if DELTA_PASS:
        tl.store(Delta_ptr + bh.to(tl.int64) * L + offs_m, delta, mask=m_ok)
    else:
        dq = dq * scale
        tl.store(DQ_ptr + (bh.to(tl.int64) * L + offs_m[:, None]) * D + offs_d[None, :],
                 dq.to(DQ_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------
# Tile configs and launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per (head-dim bucket, 16-bit?).
# Shared memory per forward stage ≈ BLOCK_N·(BLOCK_D + BLOCK_DV)·itemsize, plus the
# q tile: every config stays under sm_80's 163 KiB (checked by test_triton_compile).
_FWD_CONFIGS = {
    (64, True): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    (128, True): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    (256, True): [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    (64, False): [(64, 64, 4, 2), (128, 32, 8, 2)],
    (128, False): [(64, 32, 4, 2), (32, 64, 4, 2)],
    (256, False): [(32, 32, 4, 1), (64, 16, 4, 1)],
}
# backward: (BLOCK_M, BLOCK_N, num_warps, num_stages), used by both dk/dv and dq kernels
_BWD_CONFIGS = {
    (64, True): [(64, 64, 4, 2), (32, 128, 8, 2), (128, 64, 8, 2)],
    (128, True): [(64, 64, 8, 2), (32, 64, 4, 2)],
    (256, True): [(32, 64, 8, 1), (32, 32, 4, 1)],
    (64, False): [(32, 64, 4, 1), (64, 32, 4, 1)],
    (128, False): [(32, 32, 4, 1), (16, 64, 4, 1)],
    (256, False): [(16, 32, 4, 1), (32, 16, 4, 1)],
}


def _bucket(d):
    return 64 if d <= 64 else (128 if d <= 128 else 256)


def _block_d(d):
    return max(16, triton.next_power_of_2(max(d, 1)))


def _is16(dtype_name):
    return dtype_name in ("fp16", "bf16")


_TUNED = {}
# Tuned once per head dim, flags and dtype (Triton adds argument dtypes to the key), not
# per sequence length: variable-length training would otherwise re-tune at every shape.
_TUNE_KEY = ["G", "MASK_KIND", "BAND", "SOFTCAP", "DROPOUT", "BLOCK_D", "BLOCK_DV"]


def _launch(kernel, kind, grid_fn, args, meta, bucket_key, tune_key, device_is_cpu):
    """Run ``kernel`` with the first config under the interpreter, autotuned on a GPU."""
    table = _FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS
    configs = table[bucket_key]
    if device_is_cpu:  # TRITON_INTERPRET=1: one config, tiles no larger than the problem
        bm, bn, nw, ns = configs[0]
        bm = min(bm, max(16, triton.next_power_of_2(meta.pop("_L"))))
        bn = min(bn, max(16, triton.next_power_of_2(meta.pop("_S"))))
        kernel[grid_fn(dict(BLOCK_M=bm, BLOCK_N=bn))](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
        return
    meta.pop("_L")
    meta.pop("_S")
    key = (kernel.__name__, bucket_key)
    tuned = _TUNED.get(key)
    if tuned is None:
        cfgs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=nw, num_stages=ns) for bm, bn, nw, ns in configs]
        tuned = triton.autotune(configs=cfgs, key=tune_key)(kernel)
        _TUNED[key] = tuned
    tuned[grid_fn](*args, **meta)


def _common(q, k, v, mask, dropout_p, seed):
    import torch

    B, H, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    if B * H > 65535:  # b·H + h runs on grid axis 1 (CUDA caps it at 65535)
        raise ValueError(f"llmfast triton attention: batch x heads = {B * H} exceeds 65535; split the batch")
    if mask is None:
        kind, m_arg, mstr = 0, q, (0, 0, 0, 0)
    else:
        kind = 1 if mask.dtype == torch.bool else 2
        m_arg, mstr = mask, mask.stride()
    drop = dropout_p > 0
    # drop iff the uint32 draw < floor(p * 2^32) (llmfast.reference.dropout_threshold, the spec)
    threshold = min(int(dropout_p * 4294967296.0), 4294967295) if drop else 0
    keep_scale = 1.0 / (1.0 - dropout_p) if drop else 1.0
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[q.dtype]
    interp = q.device.type == "cpu"
    # Triton runs CPU tensors only under the interpreter, whose bf16 tl.dot is wrong (numpy has no bf16)
    upcast = bool(interp and q.dtype == torch.bfloat16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    bucket = (_bucket(max(D, DV)), _is16(name))
    return dict(B=B, H=H, L=L, D=D, Hkv=Hkv, S=S, DV=DV, kind=kind, m_arg=m_arg, mstr=mstr, drop=drop,
                threshold=threshold, keep_scale=keep_scale, upcast=upcast, precision=precision, bucket=bucket,
                interp=interp, seed=int(seed) if drop else 0)


def _options(who, q, L, S, is_causal, window_left, window_right, bottom_right, softcap, sinks):
    """The band, softcap and sinks as kernel arguments: (meta, (cap_scale, cap_log2, OFF, WL, WR)).

    Key j is visible to row i iff -WL <= j - i - OFF <= WR (BAND); causal caps WR at 0 and
    an unbounded side gets L + S + 1, past every key, which keeps the index arithmetic
    in int32. Checks as the C++ kernels' (csrc/checks.h check_attention_options)."""
    import torch

    op = f"llmfast::{who}_triton"
    if window_left < -1 or window_right < -1:
        raise RuntimeError(f"{op}: window bounds must be >= -1 (-1 = unbounded), got ({window_left}, {window_right})")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise RuntimeError(f"{op}: softcap must be finite and >= 0, got {softcap}")
    if sinks is not None:
        H = q.shape[1]
        if sinks.dim() != 1 or sinks.shape[0] != H or sinks.dtype != torch.float32 or sinks.device != q.device:
            raise RuntimeError(f"{op}: sinks must be a [{H}] float32 tensor on {q.device}, got {sinks.dtype} "
                               f"{list(sinks.shape)} on {sinks.device}")
    big = L + S + 1
    band = bool(is_causal) or window_left >= 0 or window_right >= 0
    wl = min(window_left, big) if window_left >= 0 else big
    wr = min(window_right, big) if window_right >= 0 else big
    if is_causal:
        wr = min(wr, 0)
    off = S - L if band and bottom_right else 0
    cap = float(softcap)
    meta = dict(BAND=band, SOFTCAP=cap > 0)
    return meta, ((1.0 / cap if cap > 0 else 0.0), cap * LOG2E, off, wl, wr)


def attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed, window_left=-1, window_right=-1,
                  bottom_right=False, softcap=0.0, sinks=None):
    """q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (last dim contiguous); mask None or a
    [B, H, L, S] bool/float32 view; the band, softcap and sinks ([H] fp32) of llmfast/ops/attention.py.
    Returns (out [B, H, L, Dv] contiguous, lse [B, H, L] fp32, including the sink)."""
    import torch

    c = _common(q, k, v, mask, dropout_p, seed)
    B, H, L, D, S, DV = c["B"], c["H"], c["L"], c["D"], c["S"], c["DV"]
    opt_meta, (cap_inv, cap_log2, off, wl, wr) = _options("attention_fwd", q, L, S, is_causal, window_left,
                                                          window_right, bottom_right, softcap, sinks)
    out = torch.empty((B, H, L, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    args = (q, k, v, c["m_arg"], out, lse, q if sinks is None else sinks, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *c["mstr"], H, H // c["Hkv"], L, S, D, DV, float(scale) * LOG2E,
            float(scale) * cap_inv, cap_log2, off, wl, wr, c["seed"], c["threshold"], c["keep_scale"])
    meta = dict(MASK_KIND=c["kind"], **opt_meta, SINKS=sinks is not None, DROPOUT=c["drop"], BLOCK_D=_block_d(D),
                BLOCK_DV=_block_d(DV), UPCAST=c["upcast"], PRECISION=c["precision"], _L=L, _S=S)
    _launch(_attn_fwd_kernel, "fwd", lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H), args, meta, c["bucket"],
            _TUNE_KEY + ["SINKS"], c["interp"])
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed, window_left=-1,
                  window_right=-1, bottom_right=False, softcap=0.0, sinks=None):
    """Returns (dq, dk, dv, dsinks): dq, dk, dv contiguous, shaped like q, k, v (dk/dv summed
    over each GQA group); dsinks [H] fp32 (an empty [0] without sinks)."""
    import torch

    c = _common(q, k, v, mask, dropout_p, seed)
    B, H, L, D, Hkv, S, DV = c["B"], c["H"], c["L"], c["D"], c["Hkv"], c["S"], c["DV"]
    opt_meta, (cap_inv, cap_log2, off, wl, wr) = _options("attention_bwd", q, L, S, is_causal, window_left,
                                                          window_right, bottom_right, softcap, sinks)
    dsinks = torch.zeros((0,) if sinks is None else (H,), dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dsinks
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *c["mstr"])
    tail = (float(scale) * LOG2E, float(scale), float(scale) * cap_inv, cap_log2, off, wl, wr, c["seed"],
            c["threshold"], c["keep_scale"])
    meta = dict(MASK_KIND=c["kind"], **opt_meta, DROPOUT=c["drop"], BLOCK_D=_block_d(D),
                BLOCK_DV=_block_d(DV), UPCAST=c["upcast"], PRECISION=c["precision"])
    tune_key = _TUNE_KEY
    dq_args = (q, k, v, c["m_arg"], grad_out, lse, delta, dq, *common, H, H // Hkv, L, S, D, DV, *tail)
    dq_grid = lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H)  # noqa: E731
    if q.dtype == torch.float32:
        rows = B * H * L
        _attn_bwd_preprocess[(triton.cdiv(rows, 64),)](out, grad_out, delta, rows, DV, BLOCK_M=64,
                                                       BLOCK_DV=_block_d(DV))
    else:
        # Δ = Σ_d dO·O from the stored fp16/bf16 O carries O's rounding (8 or 11 bits), which
        # with peaked softmaxes dwarfs the true dS = p∘(dP − Δ): dQ/dK came out up to 2x less
        # accurate than torch's fp32-internal math. Σ_j p·z·dP from the backward's own p and dP
        # (as the C++ kernel's delta_from_probs) costs two more dots per tile, 16-bit only.
        _launch(_attn_bwd_dq_kernel, "bwd", dq_grid, dq_args, dict(meta, DELTA_PASS=True, _L=L, _S=S), c["bucket"],
                tune_key + ["DELTA_PASS"], c["interp"])
    _launch(_attn_bwd_dkdv_kernel, "bwd", lambda m: (triton.cdiv(S, m["BLOCK_N"]), B * Hkv),
            (q, k, v, c["m_arg"], grad_out, lse, delta, dk, dv, *common, H, Hkv, H // Hkv, L, S, D, DV, *tail),
            dict(meta, _L=L, _S=S), c["bucket"], tune_key, c["interp"])
    _launch(_attn_bwd_dq_kernel, "bwd", dq_grid, dq_args, dict(meta, DELTA_PASS=False, _L=L, _S=S), c["bucket"],
            tune_key + ["DELTA_PASS"], c["interp"])
    if sinks is not None:
        # d lse_i / d sink_h = p_sink_i = exp(sink_h - lse_i) and d out_i / d sink_h = -p_sink_i·out_i, so
        # dsink_h = -Σ_{b,i} p_sink·Δ_i: a [B, H, L] reduction, deterministic in torch, negligible next to the
        # kernels (lse includes the sink, so it is finite unless the sink is -inf)
        p_sink = torch.exp(sinks.view(1, H, 1) - lse).masked_fill(torch.isneginf(lse), 0.0)
        dsinks = -(p_sink * delta).sum((0, 2))
    return dq, dk, dv, dsinks


# ----------------------------------------------------------------------------------
# Compile configs (tests/test_triton_compile.py compiles each for sm_80 and sm_90)


def _sig(names, dt, mdt, ints_i64=()):
    sig = {}
    for n in names:
        if n.endswith("_ptr"):
            sig[n] = f"*{mdt}" if n == "M_ptr" else ("*fp32" if n in ("LSE_ptr", "Delta_ptr", "SINK_ptr") else f"*{dt}")
        elif n.startswith("stride_") or n in ints_i64:
            sig[n] = "i64"
        elif n in ("qk_scale", "scale", "keep_scale", "cap_scale", "cap_log2"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


_PTRS_FWD = ["Q_ptr", "K_ptr", "V_ptr", "M_ptr", "O_ptr", "LSE_ptr", "SINK_ptr"]
_PTRS_DKDV = ["Q_ptr", "K_ptr", "V_ptr", "M_ptr", "DO_ptr", "LSE_ptr", "Delta_ptr", "DK_ptr", "DV_ptr"]
_PTRS_DQ = ["Q_ptr", "K_ptr", "V_ptr", "M_ptr", "DO_ptr", "LSE_ptr", "Delta_ptr", "DQ_ptr"]
_STRIDES = ["stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
            "stride_vs", "stride_mb", "stride_mh", "stride_ml", "stride_ms"]


_OPT_ARGS = ["cap_scale", "cap_log2", "OFF", "WL", "WR", "seed", "threshold", "keep_scale"]


def _kernel_sig(kern, dt, mdt):
    if kern is _attn_fwd_kernel:
        names = _PTRS_FWD + _STRIDES + ["H", "G", "L", "S", "D", "DV", "qk_scale"] + _OPT_ARGS
    elif kern is _attn_bwd_dkdv_kernel:
        names = _PTRS_DKDV + _STRIDES + ["H", "HKV", "G", "L", "S", "D", "DV", "qk_scale", "scale"] + _OPT_ARGS
    else:
        names = _PTRS_DQ + _STRIDES + ["H", "G", "L", "S", "D", "DV", "qk_scale", "scale"] + _OPT_ARGS
    return _sig(names, dt, mdt, ints_i64=("seed", "threshold"))


def _compile_configs():
    """(kernel, signature, constexprs, options) for the compile test: every tile config of
    every (head-dim bucket, dtype) at the bucket's largest head dim (the most shared memory
    and registers), plus the mask / band / dropout variants on the first config of each
    kernel for fp16 and fp32 (they add a few ops, not tiles); band + softcap + sinks (the
    tanh and its derivative add registers) on the first config of bucket 64 and of the
    16-bit bucket 256 (the most registers); the 16-bit Δ pass on each bucket's first config."""
    out = []
    kernels = {"fwd": (_attn_fwd_kernel,), "bwd": (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel)}
    for dt in ("fp32", "fp16", "bf16"):
        precision = "ieee" if dt == "fp32" else "tf32"
        for bucket in (64, 128, 256):
            key = (bucket, _is16(dt))
            for kind, table in (("fwd", _FWD_CONFIGS), ("bwd", _BWD_CONFIGS)):
                for ci, (bm, bn, nw, ns) in enumerate(table[key]):
                    # (MASK_KIND, BAND, SOFTCAP and SINKS, DROPOUT)
                    flags = [(0, False, False, False)]
                    if ci == 0 and bucket == 64 and dt != "bf16":
                        flags += [(1, True, False, True), (2, True, False, False)]
                    if ci == 0 and (bucket == 64 or (bucket == 256 and dt != "fp32")):
                        flags += [(0, True, True, False)]
                    for mask_kind, band, capped, drop in flags:
                        for kern in kernels[kind]:
                            const = dict(MASK_KIND=mask_kind, BAND=band, SOFTCAP=capped, DROPOUT=drop, BLOCK_M=bm,
                                         BLOCK_N=bn, BLOCK_D=bucket, BLOCK_DV=bucket, UPCAST=False,
                                         PRECISION=precision)
                            if kern is _attn_fwd_kernel:
                                const["SINKS"] = capped
                            if kern is _attn_bwd_dq_kernel:
                                const["DELTA_PASS"] = False
                                if ci == 0 and dt != "fp32" and not (mask_kind or band):  # 16-bit inputs' Δ pass
                                    out.append((kern, _kernel_sig(kern, dt, "i1" if mask_kind == 1 else "fp32"),
                                                dict(const, DELTA_PASS=True), dict(num_warps=nw, num_stages=ns)))
                            sig = _kernel_sig(kern, dt, "i1" if mask_kind == 1 else "fp32")
                            out.append((kern, sig, const, dict(num_warps=nw, num_stages=ns)))
    for dt in ("fp32", "fp16", "bf16"):
        sig = {"O_ptr": f"*{dt}", "DO_ptr": f"*{dt}", "Delta_ptr": "*fp32", "N_ROWS": "i32", "DV": "i32"}
        out.append((_attn_bwd_preprocess, sig, dict(BLOCK_M=64, BLOCK_DV=128), dict(num_warps=4)))
    return out


COMPILE_CONFIGS = _compile_configs
