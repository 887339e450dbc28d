"""LayerNorm and RMSNorm with an optional fused residual add, in Triton, forward and backward.

One kernel per direction serves both norms; ``CENTERED`` (a compile-time constant)
picks LayerNorm. Per row of ``x`` [M, N] (any row stride, unit column stride):

    s     = x + r                    (with a residual: rounded to x's dtype and stored)
    LayerNorm (CENTERED):
      m0   = sum(s) / N              (a first estimate of the mean)
      d    = s - m0,  mean = m0 + sum(d) / N,  var = sum(d^2) / N - (sum(d) / N)^2
      rstd = 1 / sqrt(var + eps),  x_hat = (s - mean) * rstd
    RMSNorm:
      rstd = 1 / sqrt(sum(s^2) / N + eps),  x_hat = s * rstd
    y = x_hat * w (+ b)

The LayerNorm moments about m0 avoid E[x^2] - E[x]^2 cancellation (rows like 1000 +
noise), and a constant row gets exactly mean = s, var = 0, so y = b with no NaN. An
all-zero row under RMSNorm gives rstd = 1/sqrt(eps) and y = 0. Statistics are fp32 for
every input dtype; mean (LayerNorm) and rstd are saved for backward.

Backward, with g = dy * w:

    dx = rstd * (g - [CENTERED: mean(g)] - x_hat * mean(g * x_hat)) (+ d_summed)
    dw = sum_rows dy * x_hat,   db = sum_rows dy      (two-stage, see partial_grid)

Rows up to MAX_FUSED_N are tiles in registers: a program takes BLOCK_M rows x BLOCK_N
columns (several short rows per program, so hidden sizes like 64 don't leave most lanes
idle). Longer rows are streamed by one program per row in LOOP_BLOCK_N chunks
(forward: statistics passes then the output; backward: two passes), re-reading the row
from L2, so no length is ever truncated.

Backward sums dw/db over rows in two deterministic stages: a fixed grid of G programs
each owns a contiguous range of row tiles and writes its partial sums to row ``pid`` of
a [G, N] fp32 buffer (no atomics); the launcher then adds the G rows in a fixed order. G
depends only on M, N and the device, so reruns give the same bits.

Bytes moved (the minimum, for GB/s), with s = itemsize: forward reads x (and r) and
writes y (and the sum), ``(2 + 2*has_res) * M*N*s``; backward reads x and dy (and
d_summed) and writes dx, ``(3 + has_ds) * M*N*s``, plus the [G, N] fp32 partials.
"""
import functools

import triton
import triton.language as tl

MAX_FUSED_N = 8192
LOOP_BLOCK_N = 4096
TILE = 4096  # elements per program tile when several rows share one program


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even).

    For bfloat16 the rounding is done on the bits first, then the cast is exact: the
    GPU's own conversion gives the same result, but the Triton interpreter's truncates,
    which would double the error the CPU tests see.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _load_input(X_ptr, R_ptr, S_ptr, x_off, r_off, s_off, mask, HAS_RES: tl.constexpr, STORE_S: tl.constexpr):
    """The values the norm sees, as fp32: x, or x + r rounded to x's dtype (stored to S when asked)."""
    x = tl.load(X_ptr + x_off, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R_ptr + r_off, mask=mask, other=0.0)
        x = to_dtype(x.to(tl.float32) + r.to(tl.float32), X_ptr.dtype.element_ty)
        if STORE_S:
            tl.store(S_ptr + s_off, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _reload(X_ptr, S_ptr, x_off, s_off, mask, HAS_RES: tl.constexpr):
    """A streamed row's later passes: x, or the s the first pass stored (one read, not two,
    and right when s overwrote r in place). The chunks of every pass share one layout, so
    each thread reads back what it stored itself."""
    if HAS_RES:
        return tl.load(S_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
    return tl.load(X_ptr + x_off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _affine(y, W_ptr, B_ptr, c, cm, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_W:
        y = y * tl.load(W_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B_ptr + c, mask=cm, other=0.0).to(tl.float32)
    return y


@triton.jit
def _norm_fwd_kernel(X_ptr, R_ptr, W_ptr, B_ptr, Y_ptr, S_ptr, Mean_ptr, Rstd_ptr,
                     M, N, stride_xm, stride_rm, stride_ym, stride_sm, eps,
                     CENTERED: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_STATS: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    # x, r, y, s: [M, N] rows at their row strides; mean, rstd: [M] fp32 (HAS_STATS). The
    # in-place variant (norm_add_) passes S = R and Y = X or another buffer: a program reads
    # each element before it writes it, and the streamed path's later passes read s back
    # rather than x + r (r is gone by then).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_input(X_ptr, R_ptr, S_ptr, rows[:, None] * stride_xm + cols[None, :],
                        rows[:, None] * stride_rm + cols[None, :], rows[:, None] * stride_sm + cols[None, :], mask,
                        HAS_RES, True)
        if CENTERED:
            m0 = tl.sum(x, axis=1) / N
            d = tl.where(mask, x - m0[:, None], 0.0)
            # IEEE division (`/` is approximate on the GPU): N copies of d sum exactly, so a
            # constant row gets d1 == d and mean == its value exactly
            d1 = tl.math.div_rn(tl.sum(d, axis=1), N * 1.0)
            mean = m0 + d1
            var = tl.maximum(tl.sum(d * d, axis=1) / N - d1 * d1, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_STATS:
                tl.store(Mean_ptr + rows, mean, mask=row_ok)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            y = x * rstd[:, None]
        y = _affine(y, W_ptr, B_ptr, cols[None, :], col_ok[None, :], HAS_W, HAS_B)
        tl.store(Y_ptr + rows[:, None] * stride_ym + cols[None, :], to_dtype(y, Y_ptr.dtype.element_ty), mask=mask)
        if HAS_STATS:
            tl.store(Rstd_ptr + rows, rstd, mask=row_ok)
    else:
        # one row per program; the row is streamed for its statistics (LayerNorm: sum, then
        # moments), then once more for the output
        row = pid.to(tl.int64)
        x_row = row * stride_xm
        r_row = row * stride_rm
        s_row = row * stride_sm
        y_row = row * stride_ym
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = _load_input(X_ptr, R_ptr, S_ptr, x_row + c, r_row + c, s_row + c, c < N, HAS_RES, True)
            if CENTERED:
                acc += x
            else:
                acc += x * x
        mean = 0.0
        if CENTERED:
            m0 = tl.sum(acc, axis=0) / N
            acc1 = tl.zeros([BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                x = _reload(X_ptr, S_ptr, x_row + c, s_row + c, c < N, HAS_RES)
                d = tl.where(c < N, x - m0, 0.0)
                acc1 += d
                acc2 += d * d
            d1 = tl.math.div_rn(tl.sum(acc1, axis=0), N * 1.0)  # exact for constant rows, as above
            mean = m0 + d1
            var = tl.maximum(tl.sum(acc2, axis=0) / N - d1 * d1, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
            if HAS_STATS:
                tl.store(Mean_ptr + row, mean)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            cm = c < N
            x = _reload(X_ptr, S_ptr, x_row + c, s_row + c, cm, HAS_RES)
            y = _affine((x - mean) * rstd, W_ptr, B_ptr, c, cm, HAS_W, HAS_B)
            tl.store(Y_ptr + y_row + c, to_dtype(y, Y_ptr.dtype.element_ty), mask=cm)
        if HAS_STATS:
            tl.store(Rstd_ptr + row, rstd)


@triton.jit
def _x_hat(X_ptr, x_off, mask, mean, rstd, CENTERED: tl.constexpr):
    x = tl.load(X_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    if CENTERED:
        x = x - mean
    return tl.where(mask, x * rstd, 0.0)


@triton.jit
def _bwd_chunk(X_ptr, DY_ptr, W_ptr, x_off, dy_off, c, cm, mean, rstd, CENTERED: tl.constexpr, HAS_W: tl.constexpr):
    """(x_hat, dy, g = dy * w) of one chunk of a streamed row, fp32."""
    dy = tl.load(DY_ptr + dy_off, mask=cm, other=0.0).to(tl.float32)
    return _x_hat(X_ptr, x_off, cm, mean, rstd, CENTERED), dy, _affine(dy, W_ptr, W_ptr, c, cm, HAS_W, False)


@triton.jit
def _norm_bwd_kernel(X_ptr, W_ptr, DY_ptr, DS_ptr, DX_ptr, Mean_ptr, Rstd_ptr, DW_ptr, DB_ptr,
                     M, N, stride_xm, stride_dym, stride_dsm, tiles_per_prog,
                     CENTERED: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                     NEED_DB: tl.constexpr, SINGLE_PASS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # x, dy, ds: [M, N] at their row strides; dx: [M, N] contiguous; DW/DB: [G, N] fp32 partials,
    # row pid owned by this program (no atomics).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    first = pid.to(tl.int64) * tiles_per_prog  # int64: the loop index addresses rows
    if SINGLE_PASS:
        col_ok = cols < N
        if HAS_W:
            w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        last = tl.minimum(first + tiles_per_prog, tl.cdiv(M, BLOCK_M))
        for t in range(first, last):
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            mean = 0.0
            if CENTERED:
                mean = tl.load(Mean_ptr + rows, mask=row_ok, other=0.0)[:, None]
            rstd = tl.load(Rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
            xh = _x_hat(X_ptr, rows[:, None] * stride_xm + cols[None, :], mask, mean, rstd, CENTERED)
            dy = tl.load(DY_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = dy
            if HAS_W:
                g = dy * w
            c2 = tl.sum(g * xh, axis=1) / N
            if CENTERED:
                dx = (g - (tl.sum(g, axis=1) / N)[:, None] - xh * c2[:, None]) * rstd
                # one feature: dx is exactly 0 (NaN for non-finite x, dy or rstd, as in torch),
                # but fp fusion would make g - mean(g) one rounding of dy * w (times
                # rstd = 1/sqrt(eps)), as in the C++ kernels
                dx = tl.where(N == 1, 0.0 * (xh + g), dx)
            else:
                dx = (g - xh * c2[:, None]) * rstd
            if HAS_DS:
                dx += tl.load(DS_ptr + rows[:, None] * stride_dsm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX_ptr + rows[:, None] * N + cols[None, :], to_dtype(dx, DX_ptr.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw_acc += dy * xh
            if NEED_DB:
                db_acc += dy
        if NEED_DW:
            tl.store(DW_ptr + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if NEED_DB:
            tl.store(DB_ptr + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    else:
        # one row at a time, streamed twice; the program's partial rows (zeroed by the
        # launcher) are read-modified-written in place, each element by the same thread
        p_row = pid.to(tl.int64) * N
        last = tl.minimum(first + tiles_per_prog, M)
        for r in range(first, last):
            row = r
            mean = 0.0
            if CENTERED:
                mean = tl.load(Mean_ptr + row)
            rstd = tl.load(Rstd_ptr + row)
            acc1 = tl.zeros([BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                cm = c < N
                xh, dy, g = _bwd_chunk(X_ptr, DY_ptr, W_ptr, row * stride_xm + c, row * stride_dym + c, c, cm, mean,
                                       rstd, CENTERED, HAS_W)
                acc1 += g
                acc2 += g * xh
                if NEED_DW:
                    tl.store(DW_ptr + p_row + c, tl.load(DW_ptr + p_row + c, mask=cm, other=0.0) + dy * xh, mask=cm)
                if NEED_DB:
                    tl.store(DB_ptr + p_row + c, tl.load(DB_ptr + p_row + c, mask=cm, other=0.0) + dy, mask=cm)
            c1 = 0.0
            if CENTERED:
                c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                cm = c < N
                xh, dy, g = _bwd_chunk(X_ptr, DY_ptr, W_ptr, row * stride_xm + c, row * stride_dym + c, c, cm, mean,
                                       rstd, CENTERED, HAS_W)
                dx = (g - c1 - xh * c2) * rstd
                if HAS_DS:
                    dx += tl.load(DS_ptr + row * stride_dsm + c, mask=cm, other=0.0).to(tl.float32)
                tl.store(DX_ptr + row * N + c, to_dtype(dx, DX_ptr.dtype.element_ty), mask=cm)


# ----------------------------------------------------------------------------------
# Launch geometry


def fwd_geometry(N):
    """(single_pass, BLOCK_M, BLOCK_N, num_warps) for rows of length N."""
    if N <= MAX_FUSED_N:
        block_n = triton.next_power_of_2(max(N, 1))
        block_m = max(1, TILE // block_n) if block_n < TILE else 1
        block_m = min(block_m, 64)
        # ~16 fp32 values per thread in the tile, at most 16 warps
        return True, block_m, block_n, max(1, min(16, block_m * block_n // 512))
    return False, 1, LOOP_BLOCK_N, 8


def bwd_geometry(N):
    """Backward keeps more tiles live (x, dy, x_hat, g, dw/db accumulators): half the rows."""
    single, block_m, block_n, warps = fwd_geometry(N)
    if single:
        block_m = max(1, block_m // 2)
        warps = max(1, min(16, block_m * block_n // 256))
    return single, block_m, block_n, warps


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def partial_grid(num_tiles, N, device):
    """(G, tiles_per_program): the number of partial-sum rows for dw/db."""
    # Each program adds its tiles' rows one after another in fp32; enough programs keep
    # that run short (its rounding error grows with it), the second stage is torch's sum.
    if device.type == "cuda":
        g = 4 * _sm_count(device.index if device.index is not None else 0)
    else:
        g = 64  # the interpreter (tests)
    # keep the [G, N] fp32 partials within ~64 MB per parameter for very long rows
    g = max(1, min(g, num_tiles, max(1, (1 << 24) // max(N, 1))))
    tpp = triton.cdiv(num_tiles, g)
    return triton.cdiv(num_tiles, tpp), tpp


# ----------------------------------------------------------------------------------
# Launchers


def _launch_fwd(x, residual, weight, bias, y, s, mean, rstd, eps, centered):
    """One forward launch: y (and s with a residual) [M, N] rows; mean/rstd None to keep no statistics."""
    M, N = x.shape
    if M == 0:
        return
    single, block_m, block_n, num_warps = fwd_geometry(N)
    r = residual if residual is not None else x
    s = s if residual is not None else y
    stats = rstd is not None
    _norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, r, weight if weight is not None else x, bias if bias is not None else x, y, s,
        mean if (stats and centered) else (rstd if stats else x), rstd if stats else x, M, N,
        x.stride(0), r.stride(0), y.stride(0), s.stride(0), float(eps), CENTERED=bool(centered),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, HAS_STATS=stats,
        SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def norm_fwd(x, residual, weight, bias, eps, centered):
    """x: [M, N] (unit column stride); returns (y, summed or empty, mean or empty, rstd)."""
    import torch

    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, N) if residual is not None else (0,), device=x.device, dtype=x.dtype)
    mean = torch.empty((M if centered else 0,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    _launch_fwd(x, residual, weight, bias, y, s, mean, rstd, eps, centered)
    return y, s, mean, rstd


def norm_add_(x, residual, out, weight, bias, eps, centered):
    """In place: residual <- x + residual (if given), out (or x) <- the norm of it; [M, N] rows."""
    _launch_fwd(x, residual, weight, bias, out if out is not None else x, residual, None, None, eps, centered)


def norm_bwd(dy, ds, x, weight, mean, rstd, centered, weight_grad, bias_grad):
    """Returns (dx [M, N], dw [N] fp32 or empty, db [N] fp32 or empty)."""
    import torch

    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    f32 = dict(device=x.device, dtype=torch.float32)
    if M == 0:
        return dx, torch.zeros((N if weight_grad else 0,), **f32), torch.zeros((N if bias_grad else 0,), **f32)
    single, block_m, block_n, num_warps = bwd_geometry(N)
    num_tiles = triton.cdiv(M, block_m)
    G, tpp = partial_grid(num_tiles, N, x.device)
    alloc = torch.empty if single else torch.zeros  # the streamed path accumulates in place
    dw_part = alloc((G, N), **f32) if weight_grad else rstd
    db_part = alloc((G, N), **f32) if bias_grad else rstd
    _norm_bwd_kernel[(G,)](
        x, weight if weight is not None else x, dy, ds if ds is not None else dy, dx, mean if centered else rstd,
        rstd, dw_part, db_part, M, N, x.stride(0), dy.stride(0), ds.stride(0) if ds is not None else 0, tpp,
        CENTERED=bool(centered), HAS_DS=ds is not None, HAS_W=weight is not None, NEED_DW=bool(weight_grad),
        NEED_DB=bool(bias_grad), SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    # second stage: a fixed-order sum over the G partial rows (deterministic)
    dw = dw_part.sum(0) if weight_grad else torch.empty((0,), **f32)
    db = db_part.sum(0) if bias_grad else torch.empty((0,), **f32)
    return dx, dw, db


def _compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers can produce, for compile tests.

    Block shapes: the many-rows tile (N=1), the largest one-row tile and the streamed
    path; flags: each on and off for both norms (all off, all on, affine without residual).
    """
    out = []
    flag_sets = ((False, False, False), (True, True, True), (False, True, True))
    for dt in ("fp32", "fp16", "bf16"):
        for wdt in sorted({dt, "fp32"}):
            for centered in (True, False):
                for n in (1, MAX_FUSED_N, MAX_FUSED_N + 1):
                    single, bm, bn, warps = fwd_geometry(n)
                    for (res, w, b), stats in zip(flag_sets, (True, True, False)):  # norm_add_ keeps no stats
                        sig = {"X_ptr": f"*{dt}", "R_ptr": f"*{dt}", "W_ptr": f"*{wdt}", "B_ptr": f"*{wdt}",
                               "Y_ptr": f"*{dt}", "S_ptr": f"*{dt}", "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32",
                               "M": "i32", "N": "i32", "stride_xm": "i64", "stride_rm": "i64",
                               "stride_ym": "i64", "stride_sm": "i64", "eps": "fp32"}
                        out.append((_norm_fwd_kernel, sig,
                                    dict(CENTERED=centered, HAS_RES=res, HAS_W=w, HAS_B=b and centered,
                                         HAS_STATS=stats, SINGLE_PASS=single, BLOCK_M=bm, BLOCK_N=bn),
                                    dict(num_warps=warps)))
                    single, bm, bn, warps = bwd_geometry(n)
                    for ds, w, dw in flag_sets:
                        sig = {"X_ptr": f"*{dt}", "W_ptr": f"*{wdt}", "DY_ptr": f"*{dt}", "DS_ptr": f"*{dt}",
                               "DX_ptr": f"*{dt}", "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32", "DW_ptr": "*fp32",
                               "DB_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i64", "stride_dym": "i64",
                               "stride_dsm": "i64", "tiles_per_prog": "i32"}
                        out.append((_norm_bwd_kernel, sig,
                                    dict(CENTERED=centered, HAS_DS=ds, HAS_W=w, NEED_DW=dw, NEED_DB=dw and centered,
                                         SINGLE_PASS=single, BLOCK_M=bm, BLOCK_N=bn), dict(num_warps=warps)))
    return out


COMPILE_CONFIGS = _compile_configs
