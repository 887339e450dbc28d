"""Decode attention over a paged KV cache (flash-decoding) in Triton.

The canonical problem (llmfast/ops/kvcache.py): q [B, Sq, Hq, D]; k, v pages
[NB, P, Hkv, D] (last dim contiguous); key j of batch row b lives in page
block_table[b, j // P], slot j % P (any P >= 1); keys [kv_start_b, seqlens_b) exist;
query i sits at p_i = seqlens_b - Sq + i (bottom-right causal, FlashAttention 2).

One program per (b·Hkv + kv head, split, block of BLOCK_M query rows), where the rows
are the M = Sq·G queries of the G = Hq / Hkv query heads that read this kv head (row
m = i·G + g): each K/V tile is loaded once for all of them (GQA)::

    s_mj = q_m·k_j·scale  (softcap·tanh(s/softcap); − slope·|p_i − j|; −inf where hidden)
    m, l, acc: online softmax over the split's keys;  o = acc / l,  lse = m + ln l

Split-KV: the key range [lo, seqlens) of each (b, kv head) is cut into NS chunks, one
program each, so B·Hkv·NS programs fill the GPU at B = 1; the launcher combines the
partial (o, lse) with the log-sum-exp trick (a split with no visible key has lse = -inf
and weight 0; a row with none at all gives zeros). Keys outside the range are never
loaded (masked loads), and masked probabilities are exactly 0, so garbage in unused
slots cannot reach the output.

Bytes: the visible K and V rows, 2·Σ_b len_b·Hkv·D elements, read once; q, out and
the partials are negligible at decode (Sq = 1). FLOPs: 4·Σ_b len_b·Hq·Sq·D.

fp32 uses ``input_precision="ieee"`` dots; fp16/bf16 tensor-core dots with fp32
accumulation. Under ``TRITON_INTERPRET=1`` bf16 operands are upcast (numpy has no bf16).
"""
import triton
import triton.language as tl


@triton.jit
def _kvcache_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, BT_ptr, SEQ_ptr, START_ptr, ALIBI_ptr, PO_ptr, PL_ptr,
    stride_qb, stride_qs, stride_qh, stride_kn, stride_kp, stride_kh, stride_vn, stride_vp, stride_vh, stride_bt,
    HKV, HQ, G, SQ, M, D, P, NS, scale, softcap, window_left, window_right,
    HAS_START: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    n = tl.load(SEQ_ptr + b)
    lo = 0
    if HAS_START:
        lo = tl.maximum(tl.load(START_ptr + b), 0)
    if WINDOW:
        if window_left >= 0:  # the first query's left edge
            lo = tl.maximum(lo, n - SQ - window_left)
    lo = tl.minimum(lo, n)
    chunk = tl.cdiv(n - lo, NS)
    j0 = tl.minimum(n, lo + split * chunk)
    j1 = tl.minimum(n, j0 + chunk)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    d_ok = offs_d < D
    i = offs_m // G
    hq = h * G + offs_m % G
    pos = n - SQ + i                                                  # [BM] query positions
    q_ptrs = Q_ptr + b.to(tl.int64) * stride_qb + i[:, None] * stride_qs + hq[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI_ptr + b * HQ + hq, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(j0, j1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < j1
        page = tl.load(BT_ptr + b * stride_bt + offs_n // P, mask=n_ok, other=0).to(tl.int64)
        slot = (offs_n % P).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K_ptr + (page * stride_kn + slot * stride_kp + h * stride_kh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V_ptr + (page * stride_vn + slot * stride_vp + h * stride_vh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
        if SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflow gives 1)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        if HAS_ALIBI:
            dist = tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
            s = s - slope[:, None] * dist
        vis = row_ok[:, None] & n_ok[None, :]
        if WINDOW:
            if window_left >= 0:
                vis = vis & (offs_n[None, :] >= pos[:, None] - window_left)
            if window_right >= 0:
                vis = vis & (offs_n[None, :] <= pos[:, None] + window_right)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # a row with nothing visible yet
        p = tl.where(vis, tl.exp(s - m_safe[:, None]), 0.0)
        alpha = tl.exp(m_i - m_safe)                                 # exp(-inf) = 0 on the first visible tile
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    base = (pid_bh * NS + split).to(tl.int64) * M
    tl.store(PO_ptr + (base + offs_m)[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(PL_ptr + base + offs_m, lse, mask=row_ok)


BLOCK_M = 16  # tl.dot's minimum; decode has M = G rows (4 for Hq = 32, Hkv = 8)


def _block_d(d):
    return max(16, triton.next_power_of_2(max(d, 1)))


def _block_n(block_d):
    return 64 if block_d <= 128 else 32   # [BLOCK_N, BLOCK_D] K and V tiles in registers


def _splits(tasks, capacity, device):
    """Splits per (b, kv head): two waves of programs on the GPU's SMs, no split under ~512 keys
    (the bound uses the cache capacity, known without reading seqlens from the device)."""
    import torch

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(2 * sms, max(tasks, 1))
    return max(1, min(want, triton.cdiv(capacity, 512), 128))


def kvcache_fwd(q, k_pages, v_pages, block_table, seqlens, kv_start, alibi, scale, causal, window_left,
                window_right, softcap, num_splits):
    """The canonical problem (module docstring); returns (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    import torch

    B, Sq, Hq, D = q.shape
    NB, P, Hkv, _ = k_pages.shape
    G = Hq // Hkv
    M = Sq * G
    if causal:
        window_right = 0   # FlashAttention 2: causal is window (left, 0)
    window = window_left >= 0 or window_right >= 0
    m_blocks = triton.cdiv(M, BLOCK_M)
    NS = num_splits if num_splits > 0 else _splits(B * Hkv * m_blocks, block_table.shape[1] * P, q.device)
    po = torch.empty((B * Hkv, NS, M, D), dtype=torch.float32, device=q.device)
    pl = torch.empty((B * Hkv, NS, M), dtype=torch.float32, device=q.device)
    if B * Hkv * M > 0:
        interp = q.device.type == "cpu"
        bd = _block_d(D)
        _kvcache_fwd_kernel[(B * Hkv, NS, m_blocks)](
            q, k_pages, v_pages, block_table, seqlens, seqlens if kv_start is None else kv_start,
            q if alibi is None else alibi, po, pl, *q.stride()[:3], *k_pages.stride()[:3], *v_pages.stride()[:3],
            block_table.stride(0), Hkv, Hq, G, Sq, M, D, P, NS, float(scale), float(softcap), int(window_left),
            int(window_right), HAS_START=kv_start is not None, HAS_ALIBI=alibi is not None, SOFTCAP=softcap > 0,
            WINDOW=window, BLOCK_M=BLOCK_M, BLOCK_N=_block_n(bd), BLOCK_D=bd,
            UPCAST=bool(interp and q.dtype == torch.bfloat16),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    # Combine the splits (log-sum-exp); splits with lse = -inf weigh 0.
    top = pl.amax(1, keepdim=True)
    w = torch.exp(pl - torch.where(torch.isinf(top), 0.0, top))          # [BH, NS, M]
    total = w.sum(1)                                                      # [BH, M]
    o = (w[..., None] * po).sum(1) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, top[:, 0] + torch.log(total), float("-inf"))
    out = o.view(B, Hkv, Sq, G, D).permute(0, 2, 1, 3, 4).reshape(B, Sq, Hq, D).to(q.dtype)
    return out, lse.view(B, Hkv, Sq, G).permute(0, 1, 3, 2).reshape(B, Hq, Sq)


def COMPILE_CONFIGS():
    """(kernel, signature, constexprs, options): every tile the launcher produces (head dims
    up to 256, three dtypes) and the option variants at D = 128."""
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        sig = {n: f"*{dt}" for n in ("Q_ptr", "K_ptr", "V_ptr")}
        sig.update({"BT_ptr": "*i32", "SEQ_ptr": "*i32", "START_ptr": "*i32", "ALIBI_ptr": "*fp32",
                    "PO_ptr": "*fp32", "PL_ptr": "*fp32"})
        for n in ("stride_qb", "stride_qs", "stride_qh", "stride_kn", "stride_kp", "stride_kh", "stride_vn",
                  "stride_vp", "stride_vh", "stride_bt"):
            sig[n] = "i64"
        for n in ("HKV", "HQ", "G", "SQ", "M", "D", "P", "NS", "window_left", "window_right"):
            sig[n] = "i32"
        sig.update(scale="fp32", softcap="fp32")
        for bd in (64, 128, 256):
            flags = [(False, False, False, False)]
            if bd == 128:
                flags.append((True, True, True, True))
            for has_start, has_alibi, cap, window in flags:
                const = dict(HAS_START=has_start, HAS_ALIBI=has_alibi, SOFTCAP=cap, WINDOW=window, BLOCK_M=BLOCK_M,
                             BLOCK_N=_block_n(bd), BLOCK_D=bd, UPCAST=False,
                             PRECISION="ieee" if dt == "fp32" else "tf32")
                out.append((_kvcache_fwd_kernel, sig, const, dict(num_warps=4, num_stages=2)))
    return out
