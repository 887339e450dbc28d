"""Fused cross-entropy in Triton, forward and backward (class-index targets).

One program per row of the logits ``x`` [N, C] (C = vocabulary, up to 256K). With
target ``t``, optional class weights ``w`` (fp32 [C]; w = 1 without), ``W = sum_c w_c``
and ``eps`` = label smoothing, torch's definition is

    lse    = log sum_c exp(x_c)
    loss   = (1-eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c)        (0 if t == ignore_index)
    dx_c   = g * [ p_c ((1-eps) w_t + eps/C W) - eps/C w_c - (1-eps) w_t [c == t] ],   p_c = exp(x_c - lse)

Forward streams the row once in blocks of BLOCK_V with an online log-sum-exp kept per
lane (running max m_i and sum s_i, rescaled when m_i grows), then combines the lanes.
The smoothing sum is kept per lane as S_i = sum w (x - m_i) (rescaled by -W_i * dm) so
that ``W (lse - m) - S`` adds two non-negative numbers: no cancellation at |x| ~ 1e4.
Backward recomputes p_c from (x, lse): one read of x and one write of dx, no softmax
tensor. lse is kept as hi + lo (hi = fl(lse), lo its rounding error, by TwoSum): at
|x| ~ 1e4 fp32 rounds lse by up to 5e-4, which exp(x - lse) would turn into a 5e-4
relative error on every probability; exp((x - hi) - lo) is as accurate as torch. ``WRITE_GRAD`` makes the forward also write d(sum_i loss_i)/dx over x in place
(second sweep of the row, mostly from L2): the loss half of the fused linear +
cross-entropy, which reuses a chunk's logits buffer for its gradient.

A target outside [0, C) that is not ignore_index sets an error flag (read by the
launcher, which raises) and gives NaN for that row; nothing is read out of bounds.

Bytes moved (the minimum, used for GB/s): forward ``N*C*s`` (s = bytes per logit) plus
O(N); backward ``2*N*C*s``; forward with WRITE_GRAD ``3*N*C*s`` when the row falls out of
L2 between the sweeps. Offsets are int64: N*C may pass 2^31.
"""
import triton
import triton.language as tl

# Columns per block of the sweep over the vocabulary.
MAX_BLOCK_V = 4096


@triton.jit
def _ce_grad_row(X_ptr, DX_ptr, W_ptr, row, C, t, lse_hi, lse_lo, g, wt, w_total, eps, cols,
                 HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr):
    """dx = g * dloss/dx for one row (DX_ptr may be X_ptr)."""
    coef = g * ((1.0 - eps) * wt + eps / C * w_total)
    a = g * eps / C          # subtracted at every class (times w_c)
    b = g * (1.0 - eps) * wt  # subtracted at the target
    for start in range(0, C, BLOCK_V):
        c = start + cols
        inb = c < C
        x = tl.load(X_ptr + row + c, mask=inb, other=0.0).to(tl.float32)
        d = tl.exp((x - lse_hi) - lse_lo) * coef
        if SMOOTH:
            if HAS_WEIGHT:
                d -= a * tl.load(W_ptr + c, mask=inb, other=0.0)
            else:
                d -= a
        d = tl.where(c == t, d - b, d)
        tl.store(DX_ptr + row + c, d.to(DX_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _ce_fill_row(DX_ptr, row, C, value, cols, BLOCK_V: tl.constexpr):
    for start in range(0, C, BLOCK_V):
        c = start + cols
        tl.store(DX_ptr + row + c, (tl.zeros([BLOCK_V], tl.float32) + value).to(DX_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _cross_entropy_fwd_kernel(X_ptr, T_ptr, W_ptr, WSum_ptr, Loss_ptr, Lse_ptr, Err_ptr, C, ignore_index, eps,
                              HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr,
                              BLOCK_V: tl.constexpr):
    # x: [N, C] contiguous; t, loss: [N]; lse: [N, 2] (hi, lo); w: [C] fp32; one program per row
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * C
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(T_ptr + pid).to(tl.int64)
    if t == ignore_index:
        tl.store(Loss_ptr + pid, 0.0)
        tl.store(Lse_ptr + 2 * pid, 0.0)
        tl.store(Lse_ptr + 2 * pid + 1, 0.0)
        if WRITE_GRAD:
            _ce_fill_row(X_ptr, row, C, 0.0, cols, BLOCK_V)
    elif (t < 0) | (t >= C):
        tl.store(Err_ptr, 1)
        tl.store(Loss_ptr + pid, float("nan"))
        tl.store(Lse_ptr + 2 * pid, float("nan"))
        tl.store(Lse_ptr + 2 * pid + 1, float("nan"))
        if WRITE_GRAD:
            _ce_fill_row(X_ptr, row, C, float("nan"), cols, BLOCK_V)
    else:
        m_i = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_V], tl.float32)
        S_i = tl.zeros([BLOCK_V], tl.float32)   # sum w (x - m_i) over finite x (SMOOTH)
        w_i = tl.zeros([BLOCK_V], tl.float32)   # sum w over finite x (SMOOTH)
        neg_i = tl.zeros([BLOCK_V], tl.int32)   # a real -inf logit: log p = -inf, smoothing term +inf
        for start in range(0, C, BLOCK_V):
            c = start + cols
            inb = c < C
            x = tl.load(X_ptr + row + c, mask=inb, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, x, propagate_nan=tl.PropagateNan.ALL)
            # Lanes still at -inf (past C, or only -inf logits so far) would give
            # exp(-inf - -inf) = NaN: shift them by 0 instead (their sum stays 0). NaN
            # lanes stay NaN and poison the row, as in torch.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_ref) + tl.exp(x - m_ref)
            if SMOOTH:
                fin = inb & (x != float("-inf"))
                if HAS_WEIGHT:
                    w = tl.load(W_ptr + c, mask=fin, other=0.0)
                else:
                    w = tl.where(fin, 1.0, 0.0)
                # w_i != 0 means a finite x was seen, so m_i is finite there; elsewhere shift by 0
                seen = w_i != 0.0
                dm = tl.where(seen, m_new, 0.0) - tl.where(seen, m_i, 0.0)
                S_i = S_i - w_i * dm + w * (tl.where(fin, x, 0.0) - tl.where(fin, m_new, 0.0))
                w_i += w
                neg_i = tl.maximum(neg_i, (inb & (x == float("-inf"))).to(tl.int32))
            m_i = m_new
        m = tl.max(m_i, axis=0)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(s_i * tl.exp(m_i - m_ref), axis=0)
        ls = tl.log(s)
        # lse = hi + lo exactly (TwoSum): hi = fl(m + ls), lo its rounding error
        hi = m + ls
        bb = hi - m
        lo = (m - (hi - bb)) + (ls - bb)
        lo = tl.where((hi == hi) & (tl.abs(hi) != float("inf")), lo, 0.0)
        if HAS_WEIGHT:
            wt = tl.load(W_ptr + t)
        else:
            wt = 1.0
        xt = tl.load(X_ptr + row + t).to(tl.float32)
        loss = (1.0 - eps) * wt * ((m - xt) + ls)  # lse - x_t, exact when x_t is the max
        if SMOOTH:
            S = tl.sum(S_i - w_i * (m - tl.where(w_i != 0.0, m_i, m)), axis=0)
            smooth = tl.sum(w_i, axis=0) * ls - S
            if tl.max(neg_i, axis=0) > 0:
                smooth = float("inf")
            loss += eps / C * smooth
        tl.store(Loss_ptr + pid, loss)
        tl.store(Lse_ptr + 2 * pid, hi)
        tl.store(Lse_ptr + 2 * pid + 1, lo)
        if WRITE_GRAD:
            if HAS_WEIGHT:
                w_total = tl.load(WSum_ptr)
            else:
                w_total = C * 1.0
            _ce_grad_row(X_ptr, X_ptr, W_ptr, row, C, t, hi, lo, 1.0, wt, w_total, eps, cols, HAS_WEIGHT, SMOOTH,
                         BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(G_ptr, X_ptr, T_ptr, W_ptr, WSum_ptr, Lse_ptr, DX_ptr, C, ignore_index, eps,
                              HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr):
    # g: [N] fp32; lse: [N, 2] fp32 (hi, lo); x, dx: [N, C] contiguous; one program per row
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * C
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(T_ptr + pid).to(tl.int64)
    if (t == ignore_index) | (t < 0) | (t >= C):  # forward raised on bad targets; never read out of bounds
        _ce_fill_row(DX_ptr, row, C, 0.0, cols, BLOCK_V)
    else:
        if HAS_WEIGHT:
            wt = tl.load(W_ptr + t)
            w_total = tl.load(WSum_ptr)
        else:
            wt = 1.0
            w_total = C * 1.0
        g = tl.load(G_ptr + pid)
        hi = tl.load(Lse_ptr + 2 * pid)
        lo = tl.load(Lse_ptr + 2 * pid + 1)
        _ce_grad_row(X_ptr, DX_ptr, W_ptr, row, C, t, hi, lo, g, wt, w_total, eps, cols, HAS_WEIGHT, SMOOTH,
                     BLOCK_V)


# ----------------------------------------------------------------------------------
# Launchers


def _block(C):
    block = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(max(C, 1))))
    # ~16 fp32 values per thread per block sweep
    num_warps = max(1, min(8, block // 512))
    return block, num_warps


def _weight_args(x, weight):
    import torch

    if weight is None:
        return x, x, False
    return weight, weight.sum(dtype=torch.float32).reshape(1), True


def _fwd(x, target, weight, ignore_index, eps, write_grad, check):
    import torch

    N, C = x.shape
    loss = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty(N, 2, device=x.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    err = torch.zeros(1, device=x.device, dtype=torch.int32)
    w, wsum, has_w = _weight_args(x, weight)
    block, num_warps = _block(C)
    _cross_entropy_fwd_kernel[(N,)](
        x, target, w, wsum, loss, lse, err, C, int(ignore_index), float(eps),
        HAS_WEIGHT=has_w, SMOOTH=float(eps) != 0.0, WRITE_GRAD=bool(write_grad), BLOCK_V=block, num_warps=num_warps)
    if check and bool(err.item()):  # one host sync per call, for a clear error instead of garbage
        raise IndexError(f"cross_entropy: a target is out of bounds for {C} classes (targets must be in [0, {C}) "
                         f"or equal ignore_index={ignore_index})")
    return loss, lse


def cross_entropy_fwd(x, target, weight, ignore_index, eps):
    """x: [N, C] contiguous; target: [N] int64; weight: None or [C] fp32. Returns loss [N], lse [N, 2] (fp32)."""
    return _fwd(x, target, weight, ignore_index, eps, write_grad=False, check=True)


def cross_entropy_fwd_grad(x, target, weight, ignore_index, eps):
    """As cross_entropy_fwd, and overwrites x with d(sum loss)/dx. Targets are not checked (the caller does)."""
    return _fwd(x, target, weight, ignore_index, eps, write_grad=True, check=False)


def cross_entropy_bwd(grad, x, target, weight, lse, ignore_index, eps):
    """grad: [N] fp32, lse: [N, 2] fp32; returns dx shaped and typed like x."""
    import torch

    dx = torch.empty_like(x)
    N, C = x.shape
    if x.numel() == 0:
        return dx
    w, wsum, has_w = _weight_args(x, weight)
    block, num_warps = _block(C)
    _cross_entropy_bwd_kernel[(N,)](
        grad, x, target, w, wsum, lse, dx, C, int(ignore_index), float(eps),
        HAS_WEIGHT=has_w, SMOOTH=float(eps) != 0.0, BLOCK_V=block, num_warps=num_warps)
    return dx


def _compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers can produce, for compile tests."""
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        for block in (16, 512, MAX_BLOCK_V):
            opts = dict(num_warps=_block(block)[1])
            for has_w in (False, True):
                for smooth in (False, True):
                    for write in (False, True):
                        sig = {"X_ptr": f"*{dt}", "T_ptr": "*i64", "W_ptr": "*fp32" if has_w else f"*{dt}",
                               "WSum_ptr": "*fp32" if has_w else f"*{dt}", "Loss_ptr": "*fp32", "Lse_ptr": "*fp32",
                               "Err_ptr": "*i32", "C": "i32", "ignore_index": "i32", "eps": "fp32"}
                        out.append((_cross_entropy_fwd_kernel, sig, dict(HAS_WEIGHT=has_w, SMOOTH=smooth,
                                                                         WRITE_GRAD=write, BLOCK_V=block), opts))
                    sig = {"G_ptr": "*fp32", "X_ptr": f"*{dt}", "T_ptr": "*i64", "W_ptr": "*fp32" if has_w else f"*{dt}",
                           "WSum_ptr": "*fp32" if has_w else f"*{dt}", "Lse_ptr": "*fp32", "DX_ptr": f"*{dt}",
                           "C": "i32", "ignore_index": "i32", "eps": "fp32"}
                    out.append((_cross_entropy_bwd_kernel, sig, dict(HAS_WEIGHT=has_w, SMOOTH=smooth, BLOCK_V=block),
                                opts))
    return out


COMPILE_CONFIGS = _compile_configs
