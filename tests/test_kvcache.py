"""flash_attn_with_kvcache (FlashAttention 2 semantics) and the kvcache_fwd kernels.

Every backend against a float64 run of the torch reference with the FlashAttention rule
(llmfast.testing.compare), on contiguous and paged caches (page sizes 1, 3, 16) whose
unused slots hold NaN, so a kernel that reads or multiplies a slot it should not fails.
"""
import math

import pytest
import torch

import llmfast
from llmfast.flash_attn import flash_attn_with_kvcache
from llmfast.ops import kvcache as kv
from llmfast.testing import compare

from conftest import DEVICE, backends_for

BACKENDS = backends_for("kvcache", emu=True)


def _problem(B=2, Sq=1, Hq=4, Hkv=2, D=32, S=40, seqlens=(5, 33), page=None, Sk=1, dtype=torch.float32, spare=3):
    """Inputs of one call: q, caches (unused slots NaN), new k/v, seqlens, block_table."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    q = rnd(B, Sq, Hq, D)
    k = rnd(B, Sk, Hkv, D) if Sk else None
    v = rnd(B, Sk, Hkv, D) if Sk else None
    seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    if page is None:
        kc, vc = rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
        slot = torch.arange(S, device=DEVICE)[None, :, None, None]
        for c in (kc, vc):
            c.masked_fill_(slot >= seqlens.long()[:, None, None, None], float("nan"))
        return q, kc, vc, k, v, seqlens, None
    pages = math.ceil(S / page)
    NB = B * pages + spare
    kc, vc = rnd(NB, page, Hkv, D), rnd(NB, page, Hkv, D)
    # rows own shuffled pages; the spare pages and every slot past a row's length hold NaN
    table = torch.randperm(NB, generator=g)[:B * pages].reshape(B, pages).to(torch.int32).to(DEVICE)
    filled = torch.zeros(NB, page, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        for j in range(int(seqlens[b])):
            filled[table[b, j // page], j % page] = True
    for c in (kc, vc):
        c.masked_fill_(~filled[:, :, None, None], float("nan"))
    return q, kc, vc, k, v, seqlens, table


def _call(**kw):
    def fn(q, kc, vc, k, v, seqlens, table, *rest):
        kwargs = dict(kw)
        if rest:
            kwargs["alibi_slopes"] = rest[0]
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                       return_softmax_lse=True, **kwargs)
    return fn


def _check(backend, inputs, **kw):
    res = compare(_call(**kw), inputs, backend, grad=False)
    assert res.ok, res


LAYOUTS = [None, 1, 3, 16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page", LAYOUTS, ids=lambda p: "contig" if p is None else f"page{p}")
@pytest.mark.parametrize("Sq,Sk,causal", [(1, 1, False), (1, 0, True), (3, 2, True), (3, 3, False)])
def test_matches_reference(backend, page, Sq, Sk, causal):
    inputs = _problem(Sq=Sq, Sk=Sk, page=page, seqlens=(0 if Sk else 4, 33))
    _check(backend, inputs, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page", [None, 3])
def test_half_dtypes(backend, dtype, page):
    _check(backend, _problem(Sq=2, Sk=1, page=page, dtype=dtype, seqlens=(17, 38)), causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (6, 3), (3, 3)])
def test_gqa(backend, Hq, Hkv):
    _check(backend, _problem(Sq=2, Hq=Hq, Hkv=Hkv, D=24, page=16, seqlens=(9, 0, 36), B=3), causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", ["window", "window_right", "softcap", "alibi", "alibi_b", "leftpad", "batch_idx",
                                 "rotary", "rotary_neox", "scale"])
def test_options(backend, opt):
    inputs = list(_problem(Sq=3, Sk=2, B=3, seqlens=(6, 20, 0), page=3 if opt in ("window", "softcap") else None))
    kw = dict(causal=True)
    B, Hq = 3, 4
    if opt == "window":
        kw["window_size"] = (5, -1)
    elif opt == "window_right":
        kw.update(causal=False, window_size=(4, 1))
    elif opt == "softcap":
        kw["softcap"] = 2.5
    elif opt in ("alibi", "alibi_b"):
        shape = (Hq,) if opt == "alibi" else (B, Hq)
        inputs.append(torch.rand(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE))
    elif opt == "leftpad":
        kw["cache_leftpad"] = torch.tensor([2, 11, 0], dtype=torch.int32, device=DEVICE)
    elif opt == "batch_idx":
        # batch row 0 reads cache row 3 (a copy of row 0, which is then poisoned)
        q, kc, vc, k, v, seqlens, _ = inputs
        kc, vc = torch.cat((kc, kc[:1])), torch.cat((vc, vc[:1]))
        kc[0], vc[0] = float("nan"), float("nan")
        inputs[1:3] = (kc, vc)
        kw["cache_batch_idx"] = torch.tensor([3, 1, 2], dtype=torch.int32, device=DEVICE)
    elif opt.startswith("rotary"):
        angles = torch.rand(48, 8, generator=torch.Generator().manual_seed(3)) * 6
        kw.update(rotary_cos=angles.cos().to(DEVICE), rotary_sin=angles.sin().to(DEVICE),
                  rotary_interleaved=opt == "rotary")
    elif opt == "scale":
        kw.update(softmax_scale=0.37, causal=False)
    _check(backend, inputs, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_num_splits(backend, splits):
    # A narrow window leaves most splits of the long row with no visible key: they must
    # combine to nothing; row 1 (no key at all) gives zeros and lse = -inf.
    inputs = _problem(Sq=2, Sk=0, seqlens=(37, 0), page=16)
    _check(backend, inputs, causal=True, window_size=(3, -1), num_splits=splits)
    _check(backend, inputs, causal=False, num_splits=splits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_visible_key_gives_zeros(backend):
    q, kc, vc, _, _, _, table = _problem(Sk=0, seqlens=(0, 0), page=3)
    with llmfast.backend(backend):
        out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=0, block_table=table, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend):
    # q a slice of a packed qkv tensor; caches halves of one [.., 2, Hkv, D] buffer (strided pages)
    q, kc, vc, k, v, seqlens, table = _problem(Sq=2, Sk=1, page=3)
    packed = torch.stack((kc, vc), dim=2)                  # [NB, P, 2, Hkv, D]
    qbig = torch.cat((q, q), dim=2)[:, :, ::2]               # stride 2 over heads
    inputs = (qbig, packed[:, :, 0], packed[:, :, 1], k, v, seqlens, table)
    assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    _check(backend, inputs, causal=True)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("torch", id="torch")])
@pytest.mark.parametrize("page", [None, 3])
def test_append_in_place(backend, page):
    q, kc, vc, k, v, seqlens, table = _problem(Sq=2, Sk=2, page=page, seqlens=(0, 31))
    angles = torch.rand(48, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kc0, vc0 = kc.clone(), vc.clone()
    with llmfast.backend(backend):
        flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
                                cache_seqlens=seqlens, block_table=table, causal=True)
    # expected: the rotated new keys (computed in float64) at seqlens, seqlens + 1; nothing else changes
    for b in range(2):
        for i in range(2):
            pos = int(seqlens[b]) + i
            row, slot = (b, pos) if page is None else (int(table[b, pos // page]), pos % page)
            c, s = angles[pos].cos().double(), angles[pos].sin().double()
            x = k[b, i].double()
            x1, x2 = x[:, 0::2], x[:, 1::2]
            want = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
            torch.testing.assert_close(kc[row, slot].double(), want, atol=1e-6, rtol=1e-5)
            assert torch.equal(vc[row, slot], v[b, i])
            kc0[row, slot], vc0[row, slot] = kc[row, slot], vc[row, slot]
    assert torch.equal(kc.nan_to_num(7.0), kc0.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0),
                                                                                vc0.nan_to_num(7.0))


def test_generation_steps_match_one_call():
    # Decoding token by token through the cache gives what one causal call over the whole
    # sequence gives for its last queries (the cache semantics, end to end).
    B, L, Hq, Hkv, D = 2, 9, 4, 2, 16
    q, k, v = (torch.randn(B, L, h, D, device=DEVICE) for h in (Hq, Hkv, Hkv))
    kc, vc = torch.zeros(B, 16, Hkv, D, device=DEVICE), torch.zeros(B, 16, Hkv, D, device=DEVICE)
    full = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=0, causal=True)
    outs = [flash_attn_with_kvcache(q[:, :4], kc, vc, k[:, :4], v[:, :4], cache_seqlens=0, causal=True)]
    for t in range(4, L):
        outs.append(flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1], cache_seqlens=t,
                                            causal=True))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------
# Bad input


def test_capacity_checked_before_writing():
    q, kc, vc, k, v, seqlens, table = _problem(Sk=2, page=None, S=40, seqlens=(5, 39))
    kc0 = kc.clone()
    with pytest.raises(ValueError, match="exceeds"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens)
    assert torch.equal(kc.nan_to_num(), kc0.nan_to_num())  # nothing written
    q, kc, vc, k, v, seqlens, table = _problem(Sk=1, page=16, S=40, seqlens=(5, 33))
    with pytest.raises(ValueError, match="exceeds"):   # 3 pages of 16: 48 slots
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([5, 48], dtype=torch.int32),
                                block_table=table)
    bad = table.clone()
    bad[1, 2] = kc.shape[0]
    kc0 = kc.clone()
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=bad)
    assert torch.equal(kc.nan_to_num(), kc0.nan_to_num())
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=bad)
    bad = table.clone()
    bad[0, 2] = 10 ** 6   # a page row 0 does not use: ignored
    flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=bad)


def test_bad_arguments():
    q, kc, vc, k, v, seqlens, table = _problem(Sk=1, page=3)
    f = flash_attn_with_kvcache
    with pytest.raises(TypeError, match="cache_seqlens"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens.long(), block_table=table)
    with pytest.raises(TypeError, match="block_table"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table.long())
    with pytest.raises(TypeError, match="cache_leftpad"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, cache_leftpad=seqlens.float())
    with pytest.raises(ValueError, match="cache_seqlens"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens[:1], block_table=table)
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        f(q, kc, vc, k, v, cache_seqlens=-seqlens, block_table=table)
    with pytest.raises(ValueError, match="multiple"):
        f(q[:, :, :3], kc, vc, k, v, cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match="head dim"):
        f(q[..., :16], kc, vc, k, v, cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match="head dim"):   # strided, but the shape is checked first
        f(q, kc[..., ::2], vc[..., ::2], cache_seqlens=seqlens, block_table=table)
    with pytest.raises(TypeError, match="dtype"):
        f(q.half(), kc, vc, k, v, cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match="both k and v"):
        f(q, kc, vc, k, None, cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match="shape"):
        f(q, kc, vc, k[:, :, :1], v[:, :, :1], cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match="cache_batch_idx and block_table"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, cache_batch_idx=seqlens)
    with pytest.raises(ValueError, match="contiguous last"):
        f(q[..., ::2], kc[..., ::2], vc[..., ::2], cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match="rotary"):
        f(q, kc, vc, cache_seqlens=seqlens, block_table=table, rotary_cos=torch.ones(48, 4),
          rotary_sin=torch.ones(48, 4))
    with pytest.raises(ValueError, match="rotary_cos"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, rotary_cos=torch.ones(20, 4),
          rotary_sin=torch.ones(20, 4))
    with pytest.raises(ValueError, match="alibi_slopes"):
        f(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, alibi_slopes=torch.ones(3))
    with pytest.raises(RuntimeError, match="no backward"):
        f(q.requires_grad_(), kc, vc, k, v, cache_seqlens=seqlens, block_table=table)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_kernel_rejects_bad_calls(backend):
    q, kc, vc, _, _, seqlens, table = _problem(Sk=0, page=3)
    op = kv.kvcache_fwd.on(backend, "cpu")
    with pytest.raises(RuntimeError, match="block_table"):
        op(q, kc, vc, table.long(), seqlens, None, None, 0.1, False, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="seqlens"):
        op(q, kc, vc, table, seqlens.long(), None, None, 0.1, False, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="heads"):
        op(q[:, :, :3], kc, vc, table, seqlens, None, None, 0.1, False, -1, -1, 0.0, 0)


# ----------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def _kernel_args():
    q, kc, vc, _, _, seqlens, table = _problem(Sq=2, Sk=0, page=3, seqlens=(7, 30))
    alibi = torch.rand(2, 4, device=DEVICE)
    return [(q, kc.nan_to_num(), vc.nan_to_num(), table, seqlens, None, None, 0.2, True, -1, -1, 0.0, 0),
            (q, kc.nan_to_num(), vc.nan_to_num(), table, seqlens, seqlens // 3, alibi, 0.2, False, 4, 2, 3.0, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = {"cpu": torch.ops.llmfast.kvcache_fwd, "cuda": getattr(torch.ops.llmfast_emu, "kvcache_fwd", None),
          "triton": getattr(torch.ops.llmfast, "kvcache_fwd_triton", None)}[backend].default
    for args in _kernel_args():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    args = _kernel_args()[1]

    def fn(q, kp, vp, table, seqlens, start, alibi):
        out, lse = kv.kvcache_attention(q, kp, vp, table, seqlens, start, alibi, scale=0.2, window=(4, 2),
                                        softcap=3.0, num_splits=3)
        return out * 2, lse

    with llmfast.backend(backend):
        got = torch.compile(fn, fullgraph=True)(*args[:7])
        want = fn(*args[:7])
    torch.testing.assert_close(got, want)
