"""Rotary position embedding (RoPE) in Triton: one kernel for forward and backward.

x [B, S, H, D] (unit stride along D, any other strides), cos/sin [B, S, W] (unit stride along
W; stride 0 along B when shared). The first R features are rotated in pairs (e1, e2):
NeoX (e, e + R/2), or interleaved GPT-J (2i, 2i + 1); features R..D pass through. Element by
element, with p the partner of e and sign -1 for the pair's first element, +1 for its second:

    forward:  out[e] = x[e] * cos[ci(e)] + sign(e) * x[p] * sin[ci(e)]
    backward: dx[e]  = g[e] * cos[ci(e)] - sign(e) * g[p] * sin[ci(p)]     (CONJ: the transpose)

ci(e) is the pair index when W = R/2 (one angle per pair, HALF_COS) and e itself when W = R
(Hugging Face's per-feature layout); with HALF_COS the backward is the rotation by -theta.
Math in fp32, one rounding per output. One program per (b, s) row and block of heads: the
row's cos/sin are read once for all its heads.

Bytes moved (s = itemsize of x, c of cos): read x and write out, ``2*B*S*H*D*s``, plus the
angles ``2*B*S*W*c`` (once per row, whatever H).
"""
import triton
import triton.language as tl

from .norm import to_dtype  # bf16 rounding to nearest even (the interpreter's cast truncates)

TILE = 4096  # elements per program: heads x BLOCK_D


@triton.jit
def _rope_kernel(X_ptr, C_ptr, S_ptr, O_ptr, S, H, D, R, stride_xb, stride_xs, stride_xh, stride_cb, stride_cs,
                 stride_sb, stride_ss, HALF_COS: tl.constexpr, INTERLEAVED: tl.constexpr, CONJ: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # x: [B, S, H, D] at its strides; out: [B, S, H, D] contiguous; cos, sin: [B, S, W]
    row = tl.program_id(0).to(tl.int64)  # b * S + s; int64: B*S*H*D may pass 2^31
    b = row // S
    s = row % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    e = tl.arange(0, BLOCK_D)
    half = R // 2
    if INTERLEAVED:
        first = (e % 2) == 0
        j = e // 2
        p = tl.where(first, e + 1, e - 1)
    else:
        first = e < half
        j = tl.where(first, e, e - half)
        p = tl.where(first, e + half, e - half)
    rot = e < R
    if HALF_COS:
        ci = j
        si = j
    else:
        ci = e
        if CONJ:
            si = p  # the transpose reads the partner's sine
        else:
            si = e
    sign = tl.where(first, -1.0, 1.0)
    if CONJ:
        sign = -sign
    c = tl.load(C_ptr + b * stride_cb + s * stride_cs + ci, mask=rot, other=1.0).to(tl.float32)
    sn = tl.load(S_ptr + b * stride_sb + s * stride_ss + si, mask=rot, other=0.0).to(tl.float32) * sign
    mask = (heads < H)[:, None] & (e < D)[None, :]
    x_row = X_ptr + b * stride_xb + s * stride_xs + heads[:, None].to(tl.int64) * stride_xh
    x = tl.load(x_row + e[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_row + p[None, :], mask=mask & rot[None, :], other=0.0).to(tl.float32)
    out = x * c[None, :] + xp * sn[None, :]  # pass-through features: c = 1, sn = 0
    o_ptr = O_ptr + (row * H + heads[:, None]) * D + e[None, :]
    tl.store(o_ptr, to_dtype(out, O_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------
# Launch geometry and launchers


def geometry(H, D):
    """(BLOCK_H, BLOCK_D, num_warps): whole heads, about TILE elements per program."""
    block_d = triton.next_power_of_2(max(D, 1))
    block_h = max(1, min(triton.next_power_of_2(max(H, 1)), TILE // block_d))
    return block_h, block_d, 4


def _rotate(x, cos, sin, rotary_dim, interleaved, conj):
    import torch

    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    B, S, H, D = x.shape
    if out.numel() == 0:
        return out
    bh, bd, warps = geometry(H, D)
    _rope_kernel[(B * S, triton.cdiv(H, bh))](
        x, cos, sin, out, S, H, D, rotary_dim, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), HALF_COS=cos.shape[-1] != rotary_dim, INTERLEAVED=bool(interleaved),
        CONJ=conj, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps)
    return out


def _both(q, k, cos, sin, rotary_dim, interleaved, conj):
    qo = _rotate(q, cos, sin, rotary_dim, interleaved, conj)
    ko = q.new_empty((0,)) if k is None else _rotate(k, cos, sin, rotary_dim, interleaved, conj)
    return qo, ko


def rope_fwd(q, k, cos, sin, rotary_dim, interleaved):
    return _both(q, k, cos, sin, rotary_dim, interleaved, False)


def rope_bwd(grad_q, grad_k, cos, sin, rotary_dim, interleaved):
    return _both(grad_q, grad_k, cos, sin, rotary_dim, interleaved, True)


def _compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers produce: each dtype (cos/sin in
    x's dtype or fp32), both layouts of the angles, both pairings, both directions, at D = 128,
    and the geometries of D = 64 and 256."""
    out = []

    def add(dt, ct, H, D, half_cos, interleaved, conj):
        bh, bd, warps = geometry(H, D)
        sig = {"X_ptr": f"*{dt}", "C_ptr": f"*{ct}", "S_ptr": f"*{ct}", "O_ptr": f"*{dt}"}
        sig.update({n: "i32" for n in ("S", "H", "D", "R")})
        sig.update({n: "i64" for n in ("stride_xb", "stride_xs", "stride_xh", "stride_cb", "stride_cs", "stride_sb",
                                       "stride_ss")})
        const = dict(HALF_COS=half_cos, INTERLEAVED=interleaved, CONJ=conj, BLOCK_H=bh, BLOCK_D=bd)
        out.append((_rope_kernel, sig, const, dict(num_warps=warps)))

    for dt in ("fp32", "fp16", "bf16"):
        for ct in sorted({dt, "fp32"}):
            for half_cos in (False, True):
                for interleaved in (False, True):
                    for conj in (False, True):
                        add(dt, ct, 32, 128, half_cos, interleaved, conj)
    for H, D in ((8, 64), (4, 256), (1, 80)):
        add("bf16", "bf16", H, D, False, False, False)
    return out


COMPILE_CONFIGS = _compile_configs
