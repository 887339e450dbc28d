"""CUDA attention kernels (csrc/cuda/attention.cu), called through the raw ops.

On a GPU these are ``torch.ops.llmfast.attention_fwd/bwd`` on CUDA tensors; without one,
the same kernels compiled for the CPU warp emulator (``torch.ops.llmfast_emu.*``, built
as llmfast._emu, enabled by ``LLMFAST_CUDA_EMU=1``) on CPU tensors, with fewer and
smaller cases (every CUDA thread is a fiber there). Both are compared with a float64
reference written here in plain torch, with FlashAttention's rule: the kernel's max
error against float64 must be at most twice the error of the same maths done by torch
in the input dtype, plus a small atol. Gradients come from autograd on the float64
reference, an independent derivation of the kernel's backward formulas. Skips cleanly
when neither is built.
"""
import math

import pytest
import torch

import llmfast
from llmfast.ops.attention import attention_bwd, attention_fwd

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"  # without a GPU: CPU tensors, emulated kernels
_WHY_NOT = llmfast.available("attention", DEV)["cuda"]

pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"cuda attention kernels: {_WHY_NOT}")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Under emulation: every head-dim bucket (64, 128, 256) with a ragged D in each, and lengths
# that cover one/several tiles, ragged tails and L != S in both directions.
HEAD_DIMS = [16, 40, 64, 80, 96, 128, 256] if ON_GPU else [40, 96, 256]
LENGTHS = [(1, 1), (1, 129), (113, 203), (128, 217), (256, 128)] if ON_GPU else [(1, 1), (70, 129), (129, 65)]
# atol relative to the output's magnitude: about half an ulp of the dtype at 1.0
ATOL = {torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float32: 1e-5}


def fwd(q, k, v, mask=None, scale=None, causal=False, dropout_p=0.0, seed=0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attention_fwd.on("cuda", DEV)(q, k, v, mask, scale, causal, dropout_p, seed)


def bwd(dout, q, k, v, out, lse, mask=None, scale=None, causal=False, dropout_p=0.0, seed=0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # (dq, dk, dv); the 4th output, dsinks, is empty without sinks (the options beyond SDPA:
    # tests/test_attention_variants.py, and test_attention_cuda_options_deterministic below)
    return attention_bwd.on("cuda", DEV)(dout, q, k, v, out, lse, mask, scale, causal, dropout_p, seed)[:3]


def reference(q, k, v, dout, mask=None, scale=None, causal=False, keep=None, dropout_p=0.0, dtype=torch.float64):
    """(out, lse, dq, dk, dv) in `dtype` by autograd. keep: bool [B, H, L, S] dropout mask.

    A row that sees no key gets out = 0, lse = -inf and zero gradients: its scores are replaced
    by zeros before the logsumexp so nothing on the autograd path is NaN.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    kk = k.repeat_interleave(H // Hkv, dim=1)
    vv = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), -math.inf)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, -math.inf)
        else:
            s = s + mask.to(dtype)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)  # [B, H, L, 1]
    s_safe = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s_safe, dim=-1, keepdim=True)
    p = torch.exp(s - lse)  # exactly 0 where s = -inf, including dead rows
    if keep is not None:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    out = p @ vv
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    lse = lse.squeeze(-1).masked_fill(dead.squeeze(-1), -math.inf)
    return out.detach(), lse.detach(), dq, dk, dv


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_fa(name, got, ref64, ref_lp, dtype):
    """FlashAttention rule: max|got - ref64| <= 2 max|torch_same_dtype - ref64| + atol."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err, base = max_err(got, ref64), max_err(ref_lp, ref64)
    assert err <= 2 * base + ATOL[dtype] * scale, f"{name}: kernel err {err:.3e} vs torch {dtype} err {base:.3e}"


def make(B, H, Hkv, L, S, D, Dv, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, H, L, D, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, Dv, device=DEV, dtype=dtype, generator=g)
    dout = torch.randn(B, H, L, Dv, device=DEV, dtype=dtype, generator=g)
    return q, k, v, dout


def check_case(q, k, v, dout, mask=None, causal=False, scale=None):
    dtype = q.dtype
    out, lse = fwd(q, k, v, mask, scale, causal)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, mask, scale, causal)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    r64 = reference(q, k, v, dout, mask, scale, causal)
    rlp = reference(q, k, v, dout, mask, scale, causal, dtype=dtype)
    for name, got, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (r64[0], *r64[2:]), (rlp[0], *rlp[2:])):
        assert_close_fa(name, got, a, b, dtype)
    # lse: -inf exactly where the reference has no visible key, fp32-accurate elsewhere
    finite = torch.isfinite(r64[1])
    assert torch.equal(torch.isneginf(lse), ~finite)
    if finite.any():
        assert max_err(lse[finite], r64[1][finite]) <= 1e-4 * max(1.0, r64[1][finite].abs().max().item())
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L,S", LENGTHS, ids=[f"L{a}S{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("D", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_shapes(dtype, D, L, S, causal):
    q, k, v, dout = make(1, 2, 2, L, S, D, D, dtype)
    check_case(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("D,Dv", [(96, 40), (40, 160), (256, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_value_dim(dtype, D, Dv):
    q, k, v, dout = make(2, 2, 2, 77, 130, D, Dv, dtype)
    check_case(q, k, v, dout, causal=True)


@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_gqa(dtype, causal, Hkv):
    # 8 query heads share Hkv key/value heads; dk/dv are the group sums (checked by the reference)
    q, k, v, dout = make(2, 8, Hkv, 113, 203, 64, 64, dtype) if ON_GPU else make(1, 8, Hkv, 70, 90, 64, 64, dtype)
    check_case(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("mask_shape", ["full", "bcast_bh", "bcast_b"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_masks(dtype, mask_shape):
    B, H, Hkv, L, S = (2, 4, 2, 100, 150) if ON_GPU else (2, 4, 2, 40, 70)
    q, k, v, dout = make(B, H, Hkv, L, S, 64, 64, dtype)
    shape = {"full": (B, H, L, S), "bcast_bh": (1, 1, L, S), "bcast_b": (1, H, L, S)}[mask_shape]
    g = torch.Generator(device=DEV).manual_seed(1)
    keep = torch.rand(shape, device=DEV, generator=g) > 0.3
    keep[..., ::7, :] = False  # fully masked rows: zeros, lse -inf, zero and finite gradients
    bool_mask = keep.expand(B, H, L, S)  # a stride-0 view, as the op contract allows
    add_mask = torch.zeros(shape, device=DEV).masked_fill(~keep, -math.inf).expand(B, H, L, S)
    res_b = check_case(q, k, v, dout, mask=bool_mask)
    res_a = check_case(q, k, v, dout, mask=add_mask)
    # a bool mask and the equivalent additive mask are the same computation
    for a, b in zip(res_b, res_a):
        assert torch.equal(a, b)
    out, lse, dq, dk, dv = res_b
    dead = ~keep.expand(B, H, L, S).any(-1)
    assert torch.isneginf(lse[dead]).all() and (out[dead] == 0).all() and (dq[dead] == 0).all()
    # a random additive mask (finite values) too
    check_case(q, k, v, dout, mask=torch.randn(shape, device=DEV, generator=g).expand(B, H, L, S), causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_all_masked(dtype):
    q, k, v, dout = make(1, 2, 2, 33, 40, 64, 64, dtype)
    mask = torch.zeros(1, 2, 33, 40, dtype=torch.bool, device=DEV)
    out, lse, dq, dk, dv = check_case(q, k, v, dout, mask=mask)
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("D", [40, 64, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_strided_views(dtype, D):
    """Views of a packed [B, L, 3, H, D] projection and of [B, L, H, D] give the contiguous result.

    D = 33 makes rows start at odd addresses: the kernels' plain-load fallback instead of cp.async.
    """
    B, H, L = (2, 4, 97) if ON_GPU else (1, 2, 70)
    g = torch.Generator(device=DEV).manual_seed(2)
    qkv = torch.randn(B, L, 3, H, D, device=DEV, dtype=dtype, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, D], strides (L*3*H*D, D, 3*H*D, 1)
    dout = torch.randn(B, L, H, D, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
    res_view = check_case(q, k, v, dout, causal=True)
    qc, kc, vc, dc = (t.contiguous() for t in (q, k, v, dout))
    res_cont = (*fwd(qc, kc, vc, causal=True),)
    res_cont += bwd(dc, qc, kc, vc, *res_cont, causal=True)
    for a, b in zip(res_view, res_cont):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_attention_cuda_dropout(dtype):
    """Dropout: the forward's keep mask, read back through V = I, explains out and all gradients."""
    B, H, L, S, D, p, seed = 1, 2, 80, 100, 64, 0.3, 1234
    q, k, _, _ = make(B, H, H, L, S, D, 64, dtype)
    # V = identity: out[i, j] = Z_ij P_ij, so out != 0 exactly where the key was kept
    eye = torch.eye(S, device=DEV, dtype=dtype).expand(B, H, S, S)
    out_eye, _ = fwd(q, k, eye, dropout_p=p, seed=seed)
    keep = out_eye != 0
    frac = keep.double().mean().item()
    n = keep.numel()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep fraction {frac:.4f}, expected {1 - p}"
    # the mask depends on the seed only, not on the data; another seed gives another mask
    out_eye2, _ = fwd(q * 0.5, k, eye, dropout_p=p, seed=seed)
    assert torch.equal(out_eye2 != 0, keep)
    out_eye3, _ = fwd(q, k, eye, dropout_p=p, seed=seed + 1)
    assert not torch.equal(out_eye3 != 0, keep)

    _, _, v, dout = make(B, H, H, L, S, D, 64, dtype, seed=5)
    out, lse = fwd(q, k, v, dropout_p=p, seed=seed)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, dropout_p=p, seed=seed)
    r64 = reference(q, k, v, dout, keep=keep, dropout_p=p)
    rlp = reference(q, k, v, dout, keep=keep, dropout_p=p, dtype=dtype)
    for name, got, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (r64[0], *r64[2:]), (rlp[0], *rlp[2:])):
        assert_close_fa(name, got, a, b, dtype)
    # lse ignores dropout
    assert max_err(lse, r64[1]) <= 1e-4 * max(1.0, r64[1].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_attention_cuda_deterministic(dtype):
    # several query and key tiles per CTA loop; under emulation the fibers also run in a random order
    q, k, v, dout = make(2, 8, 2, 300, 333, 128, 128, dtype) if ON_GPU else make(1, 4, 2, 130, 150, 128, 128, dtype)
    out, lse = fwd(q, k, v, causal=True, dropout_p=0.1, seed=7)
    g1 = bwd(dout, q, k, v, out, lse, causal=True, dropout_p=0.1, seed=7)
    out2, lse2 = fwd(q, k, v, causal=True, dropout_p=0.1, seed=7)
    g2 = bwd(dout, q, k, v, out2, lse2, causal=True, dropout_p=0.1, seed=7)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_attention_cuda_options_deterministic(dtype):
    # bottom-right causal window, softcap and sinks: the same bits twice, dsinks included (a fixed
    # per-head reduction, no atomics); under emulation the fibers run in a random order
    q, k, v, dout = make(2, 8, 2, 300, 333, 128, 128, dtype) if ON_GPU else make(1, 4, 2, 100, 140, 64, 64, dtype)
    sinks = torch.randn(q.shape[1], device=DEV)
    opts = (70, -1, True, 5.0, sinks)  # window_left, window_right, bottom_right, softcap, sinks
    scale = 1.0 / math.sqrt(q.shape[-1])
    runs = []
    for _ in range(2):
        out, lse = attention_fwd.on("cuda", DEV)(q, k, v, None, scale, True, 0.1, 7, *opts)
        runs.append((out, lse) + tuple(attention_bwd.on("cuda", DEV)(dout, q, k, v, out, lse, None, scale, True,
                                                                      0.1, 7, *opts)))
    assert runs[0][-1].shape == (q.shape[1],) and runs[0][-1].dtype == torch.float32
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_attention_cuda_empty():
    q, k, v, dout = make(1, 2, 2, 0, 5, 64, 64, torch.float16)
    out, lse = fwd(q, k, v)
    assert out.shape == (1, 2, 0, 64)
    dq, dk, dv = bwd(dout, q, k, v, out, lse)
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()
    q, k, v, dout = make(1, 2, 2, 5, 0, 64, 64, torch.float16)
    out, lse = fwd(q, k, v)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = bwd(dout, q, k, v, out, lse)
    assert (dq == 0).all() and dk.shape == k.shape


def test_attention_cuda_bad_input():
    q, k, v, _ = make(1, 4, 2, 8, 8, 64, 64, torch.float16)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        fwd(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(RuntimeError, match="head dims differ"):
        fwd(q, k[..., :32], v)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        fwd(q[:, :3], k, v)
    with pytest.raises(RuntimeError, match="one dtype"):
        fwd(q, k.float(), v)
    with pytest.raises(RuntimeError):
        fwd(q, k, v, mask=torch.ones(1, 1, 8, 9, dtype=torch.bool, device=DEV))
    with pytest.raises(RuntimeError, match="mask has unsupported dtype"):
        fwd(q, k, v, mask=torch.ones(1, 4, 8, 8, dtype=torch.int64, device=DEV))
    big = torch.randn(1, 1, 4, 257, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"\[1, 256\]"):
        fwd(big, big, big)
    with pytest.raises(RuntimeError, match="last dim"):
        fwd(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)  # same shape, last-dim stride L
    if ON_GPU:
        with pytest.raises(RuntimeError, match="k is on cpu"):
            fwd(q, k.cpu(), v)
