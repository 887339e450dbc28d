"""Fused softmax / log_softmax in Triton, forward and backward.

Forward, one program per row of ``x`` [M, N] (M = A*B*L):

    z_j = x_j * scale (+ mask_j | -inf where a bool/causal mask hides j)
    m   = max_j z_j,   s = sum_j exp(z_j - m)
    y_j = exp(z_j - m) / s            (softmax)
    y_j = z_j - m - log(s)            (log_softmax)

A row that fits one block (N <= MAX_FUSED_N) is loaded once and kept in registers.
A longer row streams through blocks twice: pass 1 keeps a running (m, s) (the
online softmax), pass 2 writes y. Nothing is truncated at any length.

Bytes moved (the minimum, used for GB/s): forward reads x and writes y,
``2*M*N*itemsize`` (+ the mask's bytes); backward reads dy and y and writes dx,
``3*M*N*itemsize``. Long rows re-read x (from L2 when it fits).

Backward: softmax ``dx = scale*y*(dy - sum(dy*y))``; log_softmax
``dx = scale*(dy - exp(y)*sum(dy))``. When the forward had a mask, positions at
-inf and fully masked rows (written as zeros) get zero gradient.
"""
import triton
import triton.language as tl

# Rows up to this length stay in registers; past it the two-pass loop runs.
MAX_FUSED_N = 8192
LOOP_BLOCK_N = 4096


@triton.jit
def _row_z(X_ptr, M_ptr, row, cols, n_valid, l, a, b, scale,
           stride_ma, stride_mb, stride_ml, stride_mn,
           MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """z for columns ``cols`` of one row, as fp32, -inf where hidden."""
    inb = cols < n_valid
    visible = inb
    if IS_CAUSAL:
        visible = visible & (cols <= l)
    x = tl.load(X_ptr + row + cols, mask=visible, other=0.0).to(tl.float32)
    z = x * scale
    if MASK_KIND != 0:
        m_off = a.to(tl.int64) * stride_ma + b.to(tl.int64) * stride_mb + l.to(tl.int64) * stride_ml
        mv = tl.load(M_ptr + m_off + cols.to(tl.int64) * stride_mn, mask=visible, other=0)
        if MASK_KIND == 1:  # bool: True = keep
            visible = visible & (mv != 0)
        else:  # additive float32
            z = z + mv
    return tl.where(visible, z, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(X_ptr, Y_ptr, M_ptr, N, B, L, scale,
                        stride_ma, stride_mb, stride_ml, stride_mn,
                        MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, LOG: tl.constexpr,
                        SINGLE_PASS: tl.constexpr, BLOCK_N: tl.constexpr):
    # x, y: [M, N] contiguous; one program per row (int64 offsets: M*N may pass 2^31)
    pid = tl.program_id(0)
    l = pid % L
    b = (pid // L) % B
    a = pid // (L * B)
    row = pid.to(tl.int64) * N
    MASKED: tl.constexpr = (MASK_KIND != 0) or IS_CAUSAL
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        z = _row_z(X_ptr, M_ptr, row, cols, N, l, a, b, scale, stride_ma, stride_mb, stride_ml, stride_mn,
                   MASK_KIND, IS_CAUSAL)
        m = tl.max(z, axis=0)
        e = tl.exp(z - m)
        s = tl.sum(e, axis=0)
        if LOG:
            y = z - m - tl.log(s)
        else:
            y = e / s
        if MASKED:
            y = tl.where(m == float("-inf"), 0.0, y)
        tl.store(Y_ptr + row + cols, y.to(Y_ptr.dtype.element_ty), mask=cols < N)
    else:
        # pass 1: online max and sum over blocks
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            z = _row_z(X_ptr, M_ptr, row, start + cols, N, l, a, b, scale, stride_ma, stride_mb, stride_ml,
                       stride_mn, MASK_KIND, IS_CAUSAL)
            m_new = tl.maximum(m_i, z)
            # lanes still at -inf would give exp(-inf - -inf) = NaN: guard them
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_i - m_new))
            s_i = s_i * alpha + tl.where(m_new == float("-inf"), 0.0, tl.exp(z - m_new))
            m_i = m_new
        m = tl.max(m_i, axis=0)
        s = tl.sum(tl.where(m_i == float("-inf"), 0.0, s_i * tl.exp(m_i - m)), axis=0)
        if m != m:  # a NaN anywhere in the row poisons it, as in torch
            s = m
        lse = m + tl.log(s)
        for start in range(0, N, BLOCK_N):
            z = _row_z(X_ptr, M_ptr, row, start + cols, N, l, a, b, scale, stride_ma, stride_mb, stride_ml,
                       stride_mn, MASK_KIND, IS_CAUSAL)
            if LOG:
                y = z - lse
            else:
                y = tl.exp(z - lse)
            if MASKED:
                y = tl.where(m == float("-inf"), 0.0, y)
            tl.store(Y_ptr + row + start + cols, y.to(Y_ptr.dtype.element_ty), mask=start + cols < N)


@triton.jit
def _softmax_bwd_kernel(DY_ptr, Y_ptr, DX_ptr, N, scale,
                        LOG: tl.constexpr, MASKED: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK_N: tl.constexpr):
    # dy, y, dx: [M, N] contiguous; one program per row
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        inb = cols < N
        dy = tl.load(DY_ptr + row + cols, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(Y_ptr + row + cols, mask=inb, other=float("-inf") if LOG else 0.0).to(tl.float32)
        if LOG:
            p = tl.exp(y)
            if MASKED:  # a masked position's -inf is a constant: its dy is left out of the sum
                dx = (dy - p * tl.sum(tl.where(y == float("-inf"), 0.0, dy), axis=0)) * scale
            else:
                dx = (dy - p * tl.sum(dy, axis=0)) * scale
            if MASKED:
                # fully masked rows were written as zeros: their exp sums to N > 1
                dead_row = (N > 1) & (tl.sum(p, axis=0) > 1.5)
                dx = tl.where((y == float("-inf")) | dead_row, 0.0, dx)
        else:
            dx = y * (dy - tl.sum(dy * y, axis=0)) * scale
        tl.store(DX_ptr + row + cols, dx.to(DX_ptr.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        acc_p = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            inb = start + cols < N
            dy = tl.load(DY_ptr + row + start + cols, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(Y_ptr + row + start + cols, mask=inb, other=float("-inf") if LOG else 0.0).to(tl.float32)
            if LOG:
                acc += tl.where(y == float("-inf"), 0.0, dy) if MASKED else dy
                acc_p += tl.exp(y)
            else:
                acc += dy * y
        total = tl.sum(acc, axis=0)
        dead_row = (N > 1) & (tl.sum(acc_p, axis=0) > 1.5)
        for start in range(0, N, BLOCK_N):
            inb = start + cols < N
            dy = tl.load(DY_ptr + row + start + cols, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(Y_ptr + row + start + cols, mask=inb, other=0.0).to(tl.float32)
            if LOG:
                dx = (dy - tl.exp(y) * total) * scale
                if MASKED:
                    dx = tl.where((y == float("-inf")) | dead_row, 0.0, dx)
            else:
                dx = y * (dy - total) * scale
            tl.store(DX_ptr + row + start + cols, dx.to(DX_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------
# Launchers


def _block(N):
    single = N <= MAX_FUSED_N
    block = triton.next_power_of_2(max(N, 1)) if single else LOOP_BLOCK_N
    # wider rows get more warps so each thread holds at most ~32 fp32 values
    num_warps = max(1, min(16, block // 256))
    return single, block, num_warps


def softmax_fwd(x, scale, mask, is_causal, log):
    """x: [A, B, L, N] contiguous; mask: None or [A, B, L, N] bool/float32 view."""
    import torch

    A, B, L, N = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    single, block, num_warps = _block(N)
    if mask is None:
        kind, m_arg, strides = 0, x, (0, 0, 0, 0)
    else:
        kind = 1 if mask.dtype == torch.bool else 2
        m_arg, strides = mask, mask.stride()
    _softmax_fwd_kernel[(A * B * L,)](
        x, y, m_arg, N, B, L, float(scale), *strides,
        MASK_KIND=kind, IS_CAUSAL=bool(is_causal), LOG=bool(log), SINGLE_PASS=single, BLOCK_N=block,
        num_warps=num_warps)
    return y


def softmax_bwd(dy, y, scale, log, masked):
    """dy, y: same shape, contiguous; returns dx."""
    import torch

    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    N = y.shape[-1]
    single, block, num_warps = _block(N)
    _softmax_bwd_kernel[(y.numel() // N,)](
        dy, y, dx, N, float(scale), LOG=bool(log), MASKED=bool(masked), SINGLE_PASS=single, BLOCK_N=block,
        num_warps=num_warps)
    return dx


def _compile_configs():
    """Every tile config the launchers produce (block size x num_warps x dtype), for
    compile tests. The mask/causal/log flags don't change the tiling, so each tile
    config is compiled with a covering set of flag combinations rather than all 12."""
    flag_sets = [dict(MASK_KIND=0, IS_CAUSAL=False, LOG=False), dict(MASK_KIND=1, IS_CAUSAL=True, LOG=True),
                 dict(MASK_KIND=2, IS_CAUSAL=False, LOG=True), dict(MASK_KIND=2, IS_CAUSAL=True, LOG=False)]
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        for single, block in ((True, 1), (True, 128), (True, 1024), (True, MAX_FUSED_N), (False, LOOP_BLOCK_N)):
            options = dict(num_warps=_block(block if single else 10**9)[2])
            for flags in flag_sets:
                mdt = {0: dt, 1: "i1", 2: "fp32"}[flags["MASK_KIND"]]
                sig = {"X_ptr": f"*{dt}", "Y_ptr": f"*{dt}", "M_ptr": f"*{mdt}", "N": "i32", "B": "i32",
                       "L": "i32", "scale": "fp32", "stride_ma": "i64", "stride_mb": "i64",
                       "stride_ml": "i64", "stride_mn": "i64"}
                out.append((_softmax_fwd_kernel, sig, dict(flags, SINGLE_PASS=single, BLOCK_N=block), options))
            for log, masked in ((False, False), (True, True), (True, False)):
                sig = {"DY_ptr": f"*{dt}", "Y_ptr": f"*{dt}", "DX_ptr": f"*{dt}", "N": "i32", "scale": "fp32"}
                out.append((_softmax_bwd_kernel, sig, dict(LOG=log, MASKED=masked, SINGLE_PASS=single,
                                                           BLOCK_N=block), options))
    return out


COMPILE_CONFIGS = _compile_configs
