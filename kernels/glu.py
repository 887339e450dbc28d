"""Gated activations (SwiGLU, GeGLU) in Triton, forward and backward.

One kernel per direction; ``ACT`` (a compile-time constant) picks the activation. Per
element of gate ``a`` and up ``b`` ([M, N] each, any row strides, unit column stride):

    out = act(a) * b
    da  = dout * b * act'(a),   db = dout * act(a)

    silu (ACT=0):       q = sigmoid(a),   act = a*q,  act' = q * (1 + a*(1 - q))
    gelu tanh (ACT=1):  u = sqrt(2/pi) * (a + 0.044715 a^3),  q = sigmoid(2u)
                        act = a*q                       (= 0.5 a (1 + tanh u))
                        act' = q + 2 a q (1 - q) * sqrt(2/pi) * (1 + 3*0.044715 a^2)
    gelu erf (ACT=2):   act = a * 0.5 (1 + erf(a / sqrt 2)),  act' = Phi(a) + a * exp(-a^2/2) / sqrt(2 pi)

The tanh form is computed through ``1 + tanh(u) = 2 sigmoid(2u)``: one exp, and no
``1 + tanh(u)`` cancellation for negative a (the erf form keeps torch's ``1 + erf``).
All math in fp32; each output is rounded once (eager rounds ``act(a)`` and then the
product). The packed form (one [M, 2N] gate_up projection) is a launcher matter: up is
the view ``gate[:, N:]`` at gate's row stride, and the packed gradient's halves are
written as two views of one [M, 2N] tensor.

Bytes moved (s = itemsize): forward reads a, b and writes out, ``3*M*N*s``; backward
reads dout, a, b and writes da, db, ``5*M*N*s`` (nothing else is saved or re-read).
"""
import triton
import triton.language as tl

from .norm import to_dtype  # bf16 rounding to nearest even (the interpreter's cast truncates)

TILE = 2048      # elements per program: 16 fp32 values per thread at 4 warps
MAX_BLOCK_N = 2048


@triton.jit
def _act(a, ACT: tl.constexpr, GRAD: tl.constexpr):
    """(act(a), act'(a)) in fp32; act'(a) is 0.0 unless GRAD."""
    d = 0.0
    if ACT == 2:
        phi = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        y = a * phi
        if GRAD:
            d = phi + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        if ACT == 1:
            z = 1.5957691216057308 * (a + 0.044715 * a * a * a)  # 2u
        else:
            z = a
        q = 1.0 / (1.0 + tl.exp(-z))
        y = a * q
        if GRAD:
            if ACT == 1:
                d = q + 2.0 * a * q * (1.0 - q) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
            else:
                d = q * (1.0 + a * (1.0 - q))
    return y, d


@triton.jit
def _glu_fwd_kernel(G_ptr, U_ptr, O_ptr, M, N, stride_gm, stride_um,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # gate, up: [M, N] at row strides stride_gm / stride_um; out: [M, N] contiguous
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M*N may pass 2^31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    a = tl.load(G_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(U_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, _ = _act(a, ACT, False)
    tl.store(O_ptr + rows[:, None] * N + cols[None, :], to_dtype(y * b, O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DO_ptr, G_ptr, U_ptr, DG_ptr, DU_ptr, M, N, stride_dom, stride_gm, stride_um, stride_dgm,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dout, gate, up: [M, N] at their row strides; dgate, dup: [M, N] at row stride stride_dgm
    # (N apart, or the two halves of one packed [M, 2N] gradient)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r = rows[:, None]
    c = cols[None, :]
    g = tl.load(DO_ptr + r * stride_dom + c, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(G_ptr + r * stride_gm + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(U_ptr + r * stride_um + c, mask=mask, other=0.0).to(tl.float32)
    y, d = _act(a, ACT, True)
    tl.store(DG_ptr + r * stride_dgm + c, to_dtype(g * b * d, DG_ptr.dtype.element_ty), mask=mask)
    tl.store(DU_ptr + r * stride_dgm + c, to_dtype(g * y, DU_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------
# Launch geometry and launchers


def geometry(N):
    """(BLOCK_M, BLOCK_N, num_warps): TILE elements per program, several rows when N is short."""
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(max(N, 1)))
    return max(1, TILE // block_n), block_n, 4


def _split(gate, up):
    """(gate [M, N] view, up [M, N] view, N): the packed form's halves are views of gate."""
    if up is None:
        N = gate.shape[1] // 2
        return gate[:, :N], gate[:, N:], N
    return gate, up, gate.shape[1]


def glu_fwd(gate, up, act):
    import torch

    a, b, N = _split(gate, up)
    M = gate.shape[0]
    out = torch.empty((M, N), device=gate.device, dtype=gate.dtype)
    if M == 0 or N == 0:
        return out
    bm, bn, warps = geometry(N)
    _glu_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        a, b, out, M, N, gate.stride(0), b.stride(0), ACT=int(act), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return out


def glu_bwd(dout, gate, up, act):
    import torch

    a, b, N = _split(gate, up)
    M = gate.shape[0]
    packed = up is None
    dgate = torch.empty((M, 2 * N if packed else N), device=gate.device, dtype=gate.dtype)
    dup = torch.empty((0,) if packed else (M, N), device=gate.device, dtype=gate.dtype)
    if M == 0 or N == 0:
        return dgate, dup
    dg, du = (dgate[:, :N], dgate[:, N:]) if packed else (dgate, dup)
    bm, bn, warps = geometry(N)
    _glu_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        dout, a, b, dg, du, M, N, dout.stride(0), gate.stride(0), b.stride(0), dgate.stride(0), ACT=int(act),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return dgate, dup


def _compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers produce: each activation and
    dtype, for the many-rows tile (N=1), a mid-size one and the widest block."""
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        for act in (0, 1, 2):
            for n in (1, 100, MAX_BLOCK_N):
                bm, bn, warps = geometry(n)
                const = dict(ACT=act, BLOCK_M=bm, BLOCK_N=bn)
                out.append((_glu_fwd_kernel, {"G_ptr": f"*{dt}", "U_ptr": f"*{dt}", "O_ptr": f"*{dt}", "M": "i32",
                                              "N": "i32", "stride_gm": "i64", "stride_um": "i64"},
                            const, dict(num_warps=warps)))
                out.append((_glu_bwd_kernel, {"DO_ptr": f"*{dt}", "G_ptr": f"*{dt}", "U_ptr": f"*{dt}",
                                              "DG_ptr": f"*{dt}", "DU_ptr": f"*{dt}", "M": "i32", "N": "i32",
                                              "stride_dom": "i64", "stride_gm": "i64", "stride_um": "i64",
                                              "stride_dgm": "i64"}, const, dict(num_warps=warps)))
    return out


COMPILE_CONFIGS = _compile_configs
