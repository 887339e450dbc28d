"""Fused attention (FlashAttention-2) in Triton, forward and backward.

Shapes: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (last dim contiguous,
other strides free); query head h reads kv head h // (H // Hkv). Forward, one program
per (BLOCK_M query rows, b·H + h):

    s_ij = q_i·k_j · scale (+ mask_ij | -inf where hidden)      in the log2 domain
    m_i  = running max,  l_i = Σ_j exp2(s_ij − m_i)             (online softmax)
    acc_i = Σ_j exp2(s_ij − m_i)·z_ij·v_j,  out_i = acc_i / l_i,  lse_i = ln-sum-exp
    z_ij = keep_ij / (1 − p) with dropout, else 1

k/v tiles stream through shared memory; the [L, S] scores never exist. Causal rows
stop at the diagonal (block skipping), and blocks wholly below it run a loop without
any bounds or causal masking. A row with no visible key gives out = 0, lse = -inf.

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
def _scores(q, K_ptr, M_ptr, offs_m, start_n, offs_n, offs_d, stride_kn, m_base, stride_ml, stride_ms,
            L, S, D, qk_scale,
            CHECK: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
            PRECISION: tl.constexpr):
    """s = q·kᵀ·scale·log2(e) (+ mask) for one [BLOCK_M, BLOCK_N] tile, -inf where hidden."""
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
    s = s * qk_scale
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
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K_ptr, V_ptr, M_ptr, offs_m, offs_n, offs_d, offs_dv,
               stride_kn, stride_vn, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale,
               seed, threshold, keep_scale, bh, lo, hi,
               BLOCK_N: tl.constexpr, CHECK: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        s = _scores(q, K_ptr, M_ptr, offs_m, start_n, offs_n, offs_d, stride_kn, m_base, stride_ml, stride_ms,
                    L, S, D, qk_scale, CHECK, MASK_KIND, IS_CAUSAL, UPCAST, PRECISION)
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
def _attn_fwd_kernel(Q_ptr, K_ptr, V_ptr, M_ptr, O_ptr, LSE_ptr,
                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ml, stride_ms,
                     H, G, L, S, D, DV, qk_scale, seed, threshold, keep_scale,
                     MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]; out [B, H, L, Dv] and lse [B, H, L] contiguous
    start_m, bh, offs_m, offs_d, q, K_base, V_base, m_base = _query_block(
        Q_ptr, K_ptr, V_ptr, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
        stride_mh, H, G, L, D, BLOCK_M, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # keys [0, hi) can be visible to this block; [0, n_full) need no bounds/causal checks
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        n_full = (tl.minimum(start_m + 1, S) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        n_full = (S // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, M_ptr, offs_m, offs_n, offs_d, offs_dv,
                               stride_ks, stride_vs, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale,
                               seed, threshold, keep_scale, bh, 0, n_full,
                               BLOCK_N, False, MASK_KIND, IS_CAUSAL, DROPOUT, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, M_ptr, offs_m, offs_n, offs_d, offs_dv,
                               stride_ks, stride_vs, m_base, stride_ml, stride_ms, L, S, D, DV, qk_scale,
                               seed, threshold, keep_scale, bh, n_full, hi,
                               BLOCK_N, True, MASK_KIND, IS_CAUSAL, DROPOUT, UPCAST, PRECISION)
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
                          H, HKV, G, L, S, D, DV, qk_scale, scale, seed, threshold, keep_scale,
                          MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
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
    # causal: query rows before start_n see none of these keys
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO_ptr + bh.to(tl.int64) * L * DV
        m_base = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        for start_m in range(lo, L, BLOCK_M):
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
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
            visible = n_ok[:, None] & m_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :])
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
                        H, G, L, S, D, DV, qk_scale, scale, seed, threshold, keep_scale,
                        MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # one query block of head h; dq [B, H, L, D] contiguous
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
    delta = tl.load(Delta_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
    else:
        hi = S
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < S
        kt = tl.load(K_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(V_base + offs_n[None, :].to(tl.int64) * stride_vs + offs_dv[:, None],
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        visible = m_ok[:, None] & n_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
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
        ds = p * (dp * z - delta[:, None])
        if UPCAST:
            dq = tl.dot(ds, tl.trans(kt), dq, input_precision=PRECISION)
        else:
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ_ptr + (bh.to(tl.int64) * L + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < D))


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
_TUNE_KEY = ["G", "MASK_KIND", "IS_CAUSAL", "DROPOUT", "BLOCK_D", "BLOCK_DV"]


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


def _plain_only(who, window_left, window_right, bottom_right, softcap, sinks):
    """These kernels implement top-left causal attention without window, softcap or sinks;
    the op layer (OpSpec.features) sends calls that use those elsewhere."""
    if window_left != -1 or window_right != -1 or bottom_right or softcap != 0.0 or sinks is not None:
        raise RuntimeError(f"llmfast::{who}_triton: window, bottom_right, softcap and sinks are not implemented "
                           "in the Triton kernels (use the cpu or torch backend)")


def attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed, window_left=-1, window_right=-1,
                  bottom_right=False, softcap=0.0, sinks=None):
    """q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (last dim contiguous); mask None or a
    [B, H, L, S] bool/float32 view. Returns (out [B, H, L, Dv] contiguous, lse [B, H, L] fp32)."""
    import torch

    _plain_only("attention_fwd", window_left, window_right, bottom_right, softcap, sinks)
    c = _common(q, k, v, mask, dropout_p, seed)
    B, H, L, D, S, DV = c["B"], c["H"], c["L"], c["D"], c["S"], c["DV"]
    out = torch.empty((B, H, L, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    args = (q, k, v, c["m_arg"], out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *c["mstr"],
            H, H // c["Hkv"], L, S, D, DV, float(scale) * LOG2E, c["seed"], c["threshold"], c["keep_scale"])
    meta = dict(MASK_KIND=c["kind"], IS_CAUSAL=bool(is_causal), DROPOUT=c["drop"], BLOCK_D=_block_d(D),
                BLOCK_DV=_block_d(DV), UPCAST=c["upcast"], PRECISION=c["precision"], _L=L, _S=S)
    _launch(_attn_fwd_kernel, "fwd", lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H), args, meta, c["bucket"],
            _TUNE_KEY, c["interp"])
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed, window_left=-1,
                  window_right=-1, bottom_right=False, softcap=0.0, sinks=None):
    """Returns (dq, dk, dv, dsinks): dq, dk, dv contiguous, shaped like q, k, v (dk/dv summed
    over each GQA group); dsinks is an empty fp32 [0] (no sinks here)."""
    import torch

    _plain_only("attention_bwd", window_left, window_right, bottom_right, softcap, sinks)
    no_sinks = torch.empty((0,), dtype=torch.float32, device=q.device)
    c = _common(q, k, v, mask, dropout_p, seed)
    B, H, L, D, Hkv, S, DV = c["B"], c["H"], c["L"], c["D"], c["Hkv"], c["S"], c["DV"]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), no_sinks
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    rows = B * H * L
    _attn_bwd_preprocess[(triton.cdiv(rows, 64),)](out, grad_out, delta, rows, DV, BLOCK_M=64,
                                                   BLOCK_DV=_block_d(DV))
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *c["mstr"])
    tail = (float(scale) * LOG2E, float(scale), c["seed"], c["threshold"], c["keep_scale"])
    meta = dict(MASK_KIND=c["kind"], IS_CAUSAL=bool(is_causal), DROPOUT=c["drop"], BLOCK_D=_block_d(D),
                BLOCK_DV=_block_d(DV), UPCAST=c["upcast"], PRECISION=c["precision"])
    tune_key = _TUNE_KEY
    _launch(_attn_bwd_dkdv_kernel, "bwd", lambda m: (triton.cdiv(S, m["BLOCK_N"]), B * Hkv),
            (q, k, v, c["m_arg"], grad_out, lse, delta, dk, dv, *common, H, Hkv, H // Hkv, L, S, D, DV, *tail),
            dict(meta, _L=L, _S=S), c["bucket"], tune_key, c["interp"])
    _launch(_attn_bwd_dq_kernel, "bwd", lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H),
            (q, k, v, c["m_arg"], grad_out, lse, delta, dq, *common, H, H // Hkv, L, S, D, DV, *tail),
            dict(meta, _L=L, _S=S), c["bucket"], tune_key, c["interp"])
    return dq, dk, dv, no_sinks


# ----------------------------------------------------------------------------------
# Compile configs (tests/test_triton_compile.py compiles each for sm_80 and sm_90)


def _sig(names, dt, mdt, ints_i64=()):
    sig = {}
    for n in names:
        if n.endswith("_ptr"):
            sig[n] = f"*{mdt}" if n == "M_ptr" else ("*fp32" if n in ("LSE_ptr", "Delta_ptr") else f"*{dt}")
        elif n.startswith("stride_") or n in ints_i64:
            sig[n] = "i64"
        elif n in ("qk_scale", "scale", "keep_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


_PTRS_FWD = ["Q_ptr", "K_ptr", "V_ptr", "M_ptr", "O_ptr", "LSE_ptr"]
_PTRS_DKDV = ["Q_ptr", "K_ptr", "V_ptr", "M_ptr", "DO_ptr", "LSE_ptr", "Delta_ptr", "DK_ptr", "DV_ptr"]
_PTRS_DQ = ["Q_ptr", "K_ptr", "V_ptr", "M_ptr", "DO_ptr", "LSE_ptr", "Delta_ptr", "DQ_ptr"]
_STRIDES = ["stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
            "stride_vs", "stride_mb", "stride_mh", "stride_ml", "stride_ms"]


def _kernel_sig(kern, dt, mdt):
    if kern is _attn_fwd_kernel:
        names = _PTRS_FWD + _STRIDES + ["H", "G", "L", "S", "D", "DV", "qk_scale", "seed", "threshold", "keep_scale"]
    elif kern is _attn_bwd_dkdv_kernel:
        names = _PTRS_DKDV + _STRIDES + ["H", "HKV", "G", "L", "S", "D", "DV", "qk_scale", "scale", "seed",
                                         "threshold", "keep_scale"]
    else:
        names = _PTRS_DQ + _STRIDES + ["H", "G", "L", "S", "D", "DV", "qk_scale", "scale", "seed", "threshold",
                                       "keep_scale"]
    return _sig(names, dt, mdt, ints_i64=("seed", "threshold"))


def _compile_configs():
    """(kernel, signature, constexprs, options) for the compile test: every tile config of
    every (head-dim bucket, dtype) at the bucket's largest head dim (the most shared memory
    and registers), plus the mask / causal / dropout variants on the first config of each
    kernel for fp16 and fp32 (they add a few ops, not tiles)."""
    out = []
    kernels = {"fwd": (_attn_fwd_kernel,), "bwd": (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel)}
    for dt in ("fp32", "fp16", "bf16"):
        precision = "ieee" if dt == "fp32" else "tf32"
        for bucket in (64, 128, 256):
            key = (bucket, _is16(dt))
            for kind, table in (("fwd", _FWD_CONFIGS), ("bwd", _BWD_CONFIGS)):
                for ci, (bm, bn, nw, ns) in enumerate(table[key]):
                    flags = [(0, False, False)]
                    if ci == 0 and bucket == 64 and dt != "bf16":
                        flags += [(1, True, True), (2, True, False)]
                    for mask_kind, causal, drop in flags:
                        for kern in kernels[kind]:
                            const = dict(MASK_KIND=mask_kind, IS_CAUSAL=causal, DROPOUT=drop, BLOCK_M=bm, BLOCK_N=bn,
                                         BLOCK_D=bucket, BLOCK_DV=bucket, UPCAST=False, PRECISION=precision)
                            sig = _kernel_sig(kern, dt, "i1" if mask_kind == 1 else "fp32")
                            out.append((kern, sig, const, dict(num_warps=nw, num_stages=ns)))
    for dt in ("fp32", "fp16", "bf16"):
        sig = {"O_ptr": f"*{dt}", "DO_ptr": f"*{dt}", "Delta_ptr": "*fp32", "N_ROWS": "i32", "DV": "i32"}
        out.append((_attn_bwd_preprocess, sig, dict(BLOCK_M=64, BLOCK_DV=128), dict(num_warps=4)))
    return out


COMPILE_CONFIGS = _compile_configs
