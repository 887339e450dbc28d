"""Attention variants (issue 12): sliding window, bottom-right causal, softcap, sinks, ALiBi,
varlen, through ``llmfast.flash_attn`` (FlashAttention 2's semantics) and the op layer.

Every case is checked with FlashAttention's rule against the float64 reference, forward
and every gradient (sinks included). The backends whose kernels lack an option
(``OpSpec.features``) must still answer correctly: the op layer routes those calls.
"""
import math

import pytest
import torch

import llmfast
from llmfast import backends, reference
from llmfast.flash_attn import flash_attn_func, flash_attn_varlen_func
from llmfast.ops import attention as attention_op
from llmfast.testing import check, second_derivatives

from conftest import DEVICE, backends_for

BACKENDS = backends_for("attention", emu=True)
CPU = [p for p in BACKENDS if p.values[0] == "cpu"]


def _bshd(B, L, S, H, Hkv, D, Dv=None, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed + 1000 * L + S + D)
    mk = lambda *shape: (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return mk(B, L, H, D), mk(B, S, Hkv, D), mk(B, S, Hkv, Dv or D)


def _fa(**kw):
    return lambda q, k, v, *rest: flash_attn_func(q, k, v, **kw, **({"sinks": rest[0]} if rest else {}))


def _dense_keep(L, S, causal, window):
    """FlashAttention 2's visibility, written out elementwise (independent of band_keep)."""
    left, right = window
    if causal:
        right = 0
    keep = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        for j in range(S):
            d = j - (i + S - L)
            keep[i, j] = (left < 0 or d >= -left) and (right < 0 or d <= right)
    return keep


# ----------------------------------------------------------------------------------
# The reference's semantics


@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (7, 7), (1, 6)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (2, 1)), (True, (3, -1)), (False, (0, 0)),
                                           (False, (-1, 2))])
def test_band_keep_is_fa2_visibility(L, S, causal, window):
    got = reference.band_keep(L, S, "cpu", is_causal=causal, window=window, bottom_right=True)
    assert torch.equal(got, _dense_keep(L, S, causal, window))


def test_reference_sinks_and_softcap_formulas():
    q, k, v = (t.transpose(1, 2).double() for t in _bshd(1, 6, 8, 2, 2, 4))
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out, lse = reference.attention(q, k, v, scale=0.7, softcap=3.0, sinks=sinks)
    z = 3.0 * torch.tanh(q @ k.transpose(-1, -2) * 0.7 / 3.0)
    denom = z.exp().sum(-1) + sinks.view(1, 2, 1).exp()
    torch.testing.assert_close(out, (z.exp() / denom.unsqueeze(-1)) @ v)
    torch.testing.assert_close(lse.double(), denom.log(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------
# flash_attn_func on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(37, 53), (53, 37), (1, 19), (70, 70)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (9, 4)), (True, (16, -1)), (False, (-1, 0))],
                         ids=["causal", "window", "causal+left", "right0"])
def test_flash_attn_band(backend, L, S, causal, window):
    q, k, v = _bshd(1, L, S, 2, 2, 16)
    check(_fa(causal=causal, window_size=window), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_softcap_and_sinks(backend):
    q, k, v = _bshd(1, 29, 41, 4, 2, 16, scale=3.0)  # |scores| ~ 30 >> softcap
    sinks = torch.randn(4, device=DEVICE)
    check(_fa(causal=True, softcap=5.0, window_size=(11, -1)), [q, k, v, sinks], backend)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flash_attn_half(backend, dtype):
    q, k, v = _bshd(2, 67, 131, 2, 1, 64, dtype=dtype, scale=2.0)
    sinks = torch.randn(2, device=DEVICE)
    check(_fa(causal=True, window_size=(40, -1), softcap=20.0), [q, k, v, sinks], backend)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L,S,causal,window", [(130, 600, True, (50, -1)), (600, 130, False, (20, 70)),
                                               (333, 333, False, (100, 0)), (257, 513, True, (-1, -1))])
def test_cpu_kernel_many_blocks(backend, dtype, L, S, causal, window):
    # longer than the forward's 64 x 256 and the backward's 64 x 64 tiles: bands that start
    # and end inside blocks, tiles skipped on both sides, GQA, softcap and sinks together
    q, k, v = _bshd(1, L, S, 4, 2, 32, dtype=dtype, scale=1.5)
    sinks = torch.randn(4, device=DEVICE)
    check(_fa(causal=causal, window_size=window, softcap=8.0), [q, k, v, sinks], backend)


# The tiled GPU kernels (Triton's, and CUDA's: emulated on CPU tensors), both with 64-row and
# 64-key tiles here.
TILED = [p for p in BACKENDS if p.values[0] in ("triton", "cuda")]


@pytest.mark.parametrize("backend", TILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("L,S,causal,window", [
    (150, 90, True, (40, -1)), (90, 150, False, (20, 70)),
    (200, 200, True, (140, -1)),
    pytest.param(140, 140, False, (-1, -1), marks=pytest.mark.slow)], ids=["causal+left", "band", "wide", "plain"])
def test_tiled_kernels_many_blocks(backend, dtype, L, S, causal, window):
    # more than one 64-row / 64-key tile each way: loops that start and end inside the band,
    # tiles wholly inside it (no checks: "wide"), kv blocks no query sees (zero dk/dv), Sq > Sk
    # bottom-right, GQA, softcap and sinks together
    q, k, v = _bshd(1, L, S, 4, 2, 16, dtype=dtype, scale=1.5)
    sinks = torch.randn(4, device=DEVICE)
    check(_fa(causal=causal, window_size=window, softcap=6.0), [q, k, v, sinks], backend)


CUDA = [p for p in BACKENDS if p.values[0] == "cuda"]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [96, 256])
def test_cuda_band_in_every_tile_config(backend, dtype, D):
    # the head-dim buckets 128 and 256 change the CUDA tiles (32-key forward tiles at 256; 32-row
    # dK/dV query steps and 32-key dQ tiles for fp32): the band's loop bounds on those grids
    q, k, v = _bshd(1, 70, 100, 2, 1, D, dtype=dtype, scale=1.5)
    sinks = torch.randn(2, device=DEVICE)
    check(_fa(causal=True, window_size=(30, -1), softcap=6.0), [q, k, v, sinks], backend)
    check(_fa(window_size=(5, 40)), [q, k, v], backend)


@pytest.mark.parametrize("backend", TILED)
def test_tiled_kernels_skip_tiles_outside_the_band(backend):
    # Work proportional to the window: keys 0..63 are NaN, and query rows >= 128 of a causal
    # window of 10 see no key below 118, so with key tiles of at most 64 (the interpreter's
    # and the CUDA kernels') their loops must never touch tile [0, 64): a masked full loop
    # would give 0 * NaN = NaN. Query rows 0..63 are NaN too: the dK/dV loops of the keys
    # >= 128 (seen by rows >= 128 only) must never touch their tile either.
    q, k, v = (t.detach() for t in _bshd(1, 320, 320, 1, 1, 16))
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    qp[:, :64], kp[:, :64], vp[:, :64] = float("nan"), float("nan"), float("nan")
    fn = _fa(causal=True, window_size=(10, -1))
    with llmfast.backend(backend):
        got = [t.requires_grad_() for t in (qp, kp, vp)]
        out = fn(*got)
        out.backward(torch.ones_like(out))
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fn(*want)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out[:, 128:], ref[:, 128:], atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):  # dq of those rows; dk/dv of the keys only they see
        torch.testing.assert_close(g.grad[:, 128:], w.grad[:, 128:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU)
def test_window_larger_than_sequence_and_window_as_causal(backend):
    q, k, v = _bshd(1, 23, 23, 2, 2, 16)
    wide = flash_attn_func(q, k, v, window_size=(1000, 1000))
    torch.testing.assert_close(wide, flash_attn_func(q, k, v))
    with llmfast.backend(backend):
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(22, 0)), flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_more_queries_than_keys_gives_zero_rows(backend):
    # bottom-right causal with Sq > Sk: the first Sq - Sk query rows see no key at all
    q, k, v = _bshd(1, 20, 7, 2, 2, 16)
    res = check(_fa(causal=True), [q, k, v], backend)
    with llmfast.backend(backend):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :13] == 0) and torch.all(torch.isneginf(lse[:, :, :13]))
    assert torch.isfinite(out).all() and res.ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_with_sinks(backend):
    # rows that see no key still see the sink: out = 0, lse = sink, zero gradients (dq and
    # their share of dsinks: delta = dO.out = 0), and finite everything
    q, k, v = _bshd(1, 20, 7, 2, 2, 16)
    sinks = torch.tensor([0.5, -2.0], device=DEVICE)
    res = check(_fa(causal=True), [q, k, v, sinks], backend)
    qq, kk, vv, ss = (t.detach().clone().requires_grad_() for t in (q, k, v, sinks))
    with llmfast.backend(backend):
        out, lse, _ = flash_attn_func(qq, kk, vv, causal=True, return_attn_probs=True, sinks=ss)
        out.square().sum().backward()
    torch.testing.assert_close(lse[0, :, :13], sinks.view(2, 1).expand(2, 13))
    assert torch.all(out[:, :13] == 0) and torch.all(qq.grad[:, :13] == 0)
    assert all(torch.isfinite(t).all() for t in (out, qq.grad, kk.grad, vv.grad, ss.grad)) and res.ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi(backend):
    q, k, v = _bshd(2, 17, 29, 4, 4, 16)
    slopes = torch.rand(4, device=DEVICE)
    check(lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes), [q, k, v], backend)
    # the FA2 formula, by hand: -slope * |i + Sk - Sq - j| on the scaled scores
    bias = -slopes.view(1, 4, 1, 1) * (torch.arange(17).view(17, 1) + 12 - torch.arange(29)).abs()
    keep = _dense_keep(17, 29, True, (-1, -1))
    s = torch.einsum("blhd,bshd->bhls", q, k) / 4.0 + bias
    want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes),
                               torch.einsum("bhls,bshd->blhd", want, v), atol=1e-5, rtol=1e-5)
    per_batch = torch.rand(2, 4, device=DEVICE)
    check(lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=per_batch), [q, k, v], backend)


def test_return_attn_probs_layouts():
    q, k, v = _bshd(2, 9, 13, 4, 2, 8)
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (2, 9, 4, 8) and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert probs.numel() == 0
    ref, ref_lse = reference.attention(*(t.transpose(1, 2).double() for t in (q, k, v)), is_causal=True,
                                       bottom_right=True)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------
# Routing: kernels that lack an option never see it


def test_features_route_unsupported_options(monkeypatch):
    spec = backends.OPS["attention"]
    every = attention_op.FEATURES
    assert all(spec.supports(b, every) for b in ("torch", "cpu", "triton", "cuda"))
    # a backend whose kernels lacked an option would be passed over for one that implements it
    # (resolve's uncached body: the cache must not keep this pretend answer)
    monkeypatch.setitem(spec.features, "cuda", frozenset())
    assert not spec.supports("cuda", frozenset({"window"}))
    assert backends._resolve.__wrapped__("attention", "cpu", torch.float32, "cuda", frozenset({"window"})) == "torch"
    monkeypatch.undo()
    # the plain call goes to the kernels, and now so does every option
    with llmfast.backend("cuda"):
        plain = backends.resolve("attention", torch.empty(1))
        assert plain in ("cuda", "torch") and backends.resolve("attention", torch.empty(1), every) == plain


def test_canonical_band_drops_what_changes_nothing():
    band = attention_op._canonical_band
    assert band(8, 8, False, (7, 7), False) == (False, -1, -1, False)     # window covers everything
    assert band(8, 8, False, (3, 0), True) == (True, 3, -1, False)        # (left, 0) is causal + left
    assert band(8, 8, True, (-1, 5), True) == (True, -1, -1, False)       # right bound past the causal edge
    assert band(4, 9, True, (-1, -1), True) == (True, -1, -1, True)       # alignment matters when L != S
    assert band(4, 9, False, (-1, -1), True) == (False, -1, -1, False)    # ... but not without a band


def test_native_kernels_check_options():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="window bounds must be >= -1"):
        torch.ops.llmfast.attention_fwd(q, q, q, None, 0.3, False, 0.0, 0, -2, -1, False, 0.0, None)
    with pytest.raises(RuntimeError, match="sinks must be a \\[2\\]"):
        torch.ops.llmfast.attention_fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, 0.0, torch.zeros(3))
    if attention_op.attention_fwd.emu:  # the CUDA binding's checks, emulated
        fwd, bwd = attention_op.attention_fwd.on("cuda", "cpu"), attention_op.attention_bwd.on("cuda", "cpu")
        with pytest.raises(RuntimeError, match="llmfast::attention_fwd: window bounds must be >= -1"):
            fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -4, False, 0.0, None)
        with pytest.raises(RuntimeError, match="llmfast::attention_fwd: softcap must be finite and >= 0"):
            fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, -1.0, None)
        with pytest.raises(RuntimeError, match="llmfast::attention_fwd: sinks must be a \\[2\\] Float"):
            fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, 0.0, torch.zeros(2, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="llmfast::attention_fwd: sinks must be contiguous"):
            fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, 0.0, torch.zeros(4)[::2])
        out, lse = fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, 0.0, None)
        with pytest.raises(RuntimeError, match="llmfast::attention_bwd: sinks must be a \\[2\\]"):
            bwd(out, q, q, q, out, lse, None, 0.3, False, 0.0, 0, -1, -1, False, 0.0, torch.zeros(3))
    triton_fwd = torch.ops.llmfast.attention_fwd_triton
    with pytest.raises(RuntimeError, match="window bounds must be >= -1"):
        triton_fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -3, False, 0.0, None)
    with pytest.raises(RuntimeError, match="softcap must be finite"):
        triton_fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, float("inf"), None)
    with pytest.raises(RuntimeError, match="sinks must be a \\[2\\] float32"):
        triton_fwd(q, q, q, None, 0.3, False, 0.0, 0, -1, -1, False, 0.0, torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------
# Varlen


def _packed(lengths_q, lengths_k, H=2, Hkv=2, D=16, extra=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(lengths_q) * 31 + sum(lengths_k))
    tq, tk = sum(lengths_q) + extra, sum(lengths_k) + extra
    q = torch.randn(tq, H, D, generator=g).to(dtype)
    k = torch.randn(tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(tk, Hkv, D, generator=g).to(dtype)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (3, -1))])
def test_varlen_matches_per_segment(backend, causal, window):
    lq, lk = [5, 0, 1, 12, 3], [7, 4, 1, 9, 0]  # zero-length segments, a segment of one, Sq > Sk
    q, k, v, cq, ck = _packed(lq, lk, extra=3)  # 3 tokens past cu_seqlens[-1]

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window)

    check(fn, [q, k, v], backend)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    with llmfast.backend(backend):
        out, lse, _ = flash_attn_varlen_func(qq, kk, vv, cq, ck, max(lq), max(lk), causal=causal,
                                             window_size=window, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0])
    for b in range(len(lq)):
        s, e, sk, ek = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if e > s:
            want = flash_attn_func(q[s:e][None], k[sk:ek][None], v[sk:ek][None], causal=causal, window_size=window)
            torch.testing.assert_close(out[s:e], want[0])
    assert torch.all(out[-3:] == 0)
    out.square().sum().backward()
    assert torch.all(qq.grad[-3:] == 0) and torch.all(kk.grad[-3:] == 0) and torch.all(vv.grad[-3:] == 0)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal,window,softcap,sinks", [(False, (-1, -1), 0.0, False), (True, (-1, -1), 0.0, False),
                                                         (True, (40, -1), 0.0, True), (False, (30, 20), 5.0, False)],
                         ids=["full", "causal", "causal-window-sinks", "window-softcap"])
def test_varlen_cpu_one_kernel_call(backend, dtype, causal, window, softcap, sinks, monkeypatch):
    # the cpu kernel runs every segment in one call: segments longer than a tile (64 rows, 256 keys)
    # whose tiles straddle segment ends, an empty one, one of 1 token, Sq != Sk (bottom-right),
    # GQA 4:2, tokens past cu_seqlens[-1] (with sinks: their lse stays -inf)
    lq, lk = [130, 0, 1, 70, 300], [100, 5, 1, 70, 310]
    q, k, v, cq, ck = _packed(lq, lk, H=4, Hkv=2, D=32, extra=3, dtype=dtype)
    s = [torch.randn(4)] if sinks else []

    def fn(q, k, v, *s):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window,
                                             softcap=softcap, return_attn_probs=True, sinks=s[0] if s else None)
        return out, lse

    check(fn, [q, k, v] + s, backend)
    per_segment = []
    attention = attention_op.attention
    monkeypatch.setattr(attention_op, "attention", lambda *a, **kw: per_segment.append(1) or attention(*a, **kw))
    with llmfast.backend(backend):
        out, lse = fn(q, k, v, *s)
    assert not per_segment and out.is_contiguous() and lse.shape == (4, q.shape[0])
    assert torch.all(out[-3:] == 0) and torch.all(lse[:, -3:] == float("-inf"))


@pytest.mark.parametrize("backend", CPU)
def test_varlen_cpu_opcheck_and_double_backward(backend):
    q, k, v, cq, ck = _packed([5, 0, 9, 1], [6, 2, 9, 1], H=4, Hkv=2, D=16, extra=2)
    sinks = torch.randn(4)
    for args in [(q, k, v, cq, ck, 0.25, True, -1, -1, 0.0, None), (q, k, v, cq, ck, 0.3, False, 3, 2, 4.0, sinks)]:
        args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)
        torch.library.opcheck(torch.ops.llmfast.attention_varlen_fwd.default, args)

    def fn(q, k, v, sinks):
        return flash_attn_varlen_func(q, k, v, cq, ck, 9, 9, causal=True, window_size=(3, -1), sinks=sinks)
    ours = second_derivatives(fn, [q, k, v, sinks], backend)
    ref = second_derivatives(fn, [q, k, v, sinks], "torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_varlen_cpu_kernel_refuses_bad_cu_seqlens():
    q, k, v, cq, ck = _packed([4, 3], [4, 3])
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731

    def op(cq, ck):
        return torch.ops.llmfast.attention_varlen_fwd(q, k, v, cq, ck, 0.25, False, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be a 1-D int32"):
        op(cq.long(), ck)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be non-decreasing"):
        op(cq, i32(0, 5, 3))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0"):
        op(i32(1, 4, 7), ck)
    with pytest.raises(RuntimeError, match="beyond the packed buffer"):
        op(cq, i32(0, 4, 8))
    with pytest.raises(RuntimeError, match="must have one length"):
        op(cq, ck[:2])


def test_varlen_bad_input():
    q, k, v, cq, ck = _packed([4, 3], [4, 3])
    f = flash_attn_varlen_func
    with pytest.raises(RuntimeError, match="must be int32"):
        f(q, k, v, cq.long(), ck, 4, 4)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        f(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32), ck, 5, 4)
    with pytest.raises(RuntimeError, match="beyond the packed buffer"):
        f(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), ck, 5, 4)
    with pytest.raises(RuntimeError, match="more than max_seqlen"):
        f(q, k, v, cq, ck, 3, 4)
    with pytest.raises(RuntimeError, match="one length"):
        f(q, k, v, cq, ck[:2], 4, 4)
    with pytest.raises(ValueError, match="window_size left must be >= 0"):
        f(q, k, v, cq, ck, 4, 4, window_size=(-2, 0))
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32"):
        f(q, k, v, cq, ck, 4, 4, alibi_slopes=torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="alibi_slopes must be \\[H\\] or \\[B, H\\]"):
        f(q, k, v, cq, ck, 4, 4, alibi_slopes=torch.ones(3))


def test_flash_attn_bad_input():
    q, k, v = _bshd(1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="window_size right"):
        flash_attn_func(q, k, v, window_size=(3, -5))
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attn_func(q, k, v, window_size=3)
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(RuntimeError, match="sinks must be a float \\[H\\]"):
        flash_attn_func(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(RuntimeError, match="multiple of the number of key/value heads"):
        flash_attn_func(q, k[:, :, :1].expand(1, 4, 3, 8), v[:, :, :1].expand(1, 4, 3, 8))


# ----------------------------------------------------------------------------------
# torch.library and compile


def _opt_cases():
    q, k, v = (t.transpose(1, 2) for t in _bshd(1, 19, 23, 4, 2, 16))
    sinks = torch.randn(4, device=DEVICE)
    return [(q, k, v, None, 0.25, True, 0.0, 0, 5, -1, True, 0.0, None),
            (q, k, v, None, 0.25, False, 0.0, 0, 3, 2, True, 4.0, sinks),
            (q, k, v, None, 0.25, True, 0.2, 9, -1, -1, True, 2.0, sinks)]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda")])
def test_opcheck_options(backend):
    op = attention_op.attention_fwd.on(backend, DEVICE).default  # cuda on CPU tensors: the emulated kernels
    for args in _opt_cases():
        args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and (i < 3 or i == 12)
                     else a for i, a in enumerate(args))
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    q, k, v = _bshd(1, 21, 21, 2, 2, 16)
    sinks = torch.randn(2)
    fn = lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(7, -1), softcap=3.0, sinks=sinks)  # noqa
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v))


def test_double_backward_with_options():
    q, k, v = (t.double().requires_grad_() for t in _bshd(1, 7, 9, 2, 2, 4))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, s: flash_attn_func(q, k, v, causal=True, window_size=(3, -1), softcap=2.0, sinks=s)  # noqa
    assert torch.autograd.gradgradcheck(fn, (q, k, v, sinks))
    assert math.isfinite(fn(q, k, v, sinks).sum().item())
