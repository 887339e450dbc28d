"""Fused attention on every backend against the float64 reference (FlashAttention's rule).

The Triton backend runs under the interpreter here, so its shapes stay small; the
heavy cases are marked ``slow``.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as tF

import llmfast
from llmfast import reference
from llmfast.nn import functional as F
from llmfast.testing import check, second_derivatives

from conftest import DEVICE, backends_for

BACKENDS = backends_for("attention", emu=True)
_INTERP = DEVICE == "cpu"  # the triton backend is interpreted: keep its shapes small


def _qkv(B, H, Hkv, L, S, D, Dv=None, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(1000 * L + S + D)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, H, L, D), mk(B, Hkv, S, D), mk(B, Hkv, S, Dv or D)


def _sdpa(**kw):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)


# ----------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 96, 128, 256])
def test_head_dims(backend, D, causal):
    q, k, v = _qkv(1, 2, 2, 37, 53, D)
    check(_sdpa(is_causal=causal), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L,S", [(1, 1), (1, 129), (113, 203), (128, 217), (256, 128)])
def test_lengths(backend, L, S, causal):
    B, H = (1, 2) if backend == "triton" and _INTERP else (2, 3)
    q, k, v = _qkv(B, H, H, L, S, 64)
    check(_sdpa(is_causal=causal), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_dtypes(backend, dtype, causal):
    # bf16 on the interpreted triton backend runs its dots on fp32-upcast operands (UPCAST)
    q, k, v = _qkv(2, 2, 2, 65, 97, 64, dtype=dtype)
    check(_sdpa(is_causal=causal), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv", [(8, 2), (8, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(backend, H, Hkv, causal):
    # key/value gradients are the sums over each group of query heads
    q, k, v = _qkv(2, H, Hkv, 33, 47, 32, Dv=48)
    check(_sdpa(is_causal=causal, enable_gqa=True), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_dim_and_scale(backend):
    q, k, v = _qkv(1, 2, 2, 29, 31, 40, Dv=24)
    check(_sdpa(scale=0.37), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims(backend):
    # rank 3 (no head dim), rank 5, and a key/value broadcast over the batch
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    check(_sdpa(), [r(3, 17, 16), r(3, 23, 16), r(3, 23, 16)], backend)
    check(_sdpa(is_causal=True), [r(2, 2, 2, 17, 16), r(2, 2, 2, 23, 16), r(2, 2, 2, 23, 16)], backend)
    check(_sdpa(), [r(2, 3, 17, 16), r(1, 3, 23, 16), r(1, 3, 23, 16)], backend)


# ----------------------------------------------------------------------------------
# Masks


def _bool_mask(shape, dead_row=None, p=0.35, seed=7):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > p
    if dead_row is not None:
        m[..., dead_row, :] = False
    return m.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mshape", [(41, 59), (2, 1, 41, 59), (2, 3, 41, 59), (1, 3, 1, 59)],
                         ids=["LS", "B1LS", "BHLS", "1H1S"])
def test_bool_and_additive_masks_agree(backend, mshape):
    q, k, v = _qkv(2, 3, 3, 41, 59, 32)
    keep = _bool_mask(mshape)
    add = torch.zeros(mshape, device=DEVICE).masked_fill(~keep, float("-inf"))
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    check(fn, [q, k, v, keep], backend)
    check(fn, [q, k, v, add], backend, grad=[True, True, True, False])
    with llmfast.backend(backend):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=add)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_float_mask(backend):
    q, k, v = _qkv(2, 2, 2, 41, 59, 32)
    m = torch.randn(2, 1, 41, 59, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    check(fn, [q, k, v, m], backend, grad=[True, True, True, False])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fully_masked_rows(backend, dtype):
    q, k, v = _qkv(1, 2, 2, 21, 37, 32, dtype=dtype)
    keep = _bool_mask((21, 37), dead_row=4)
    keep[9] = False
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    check(fn, [q, k, v, keep], backend)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    with llmfast.backend(backend):
        out, lse = F.flash_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                     attn_mask=keep, return_lse=True)
    out = out.transpose(1, 2)
    assert torch.all(out[:, :, [4, 9]] == 0)
    assert torch.all(torch.isneginf(lse[:, :, [4, 9]])) and torch.isfinite(lse[:, :, :4]).all()
    out.float().pow(2).sum().backward()
    for t in (qq, kk, vv):
        assert torch.isfinite(t.grad).all()
    assert torch.all(qq.grad[:, :, [4, 9]] == 0)


# ----------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_qkv_views(backend, causal):
    """q, k, v as strided views of one packed [B, L, 3, H, D] tensor equal the contiguous result."""
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 45, 3, 4, 40, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(2)  # [B, L, H, D], last dim contiguous, other strides packed
    assert not q.is_contiguous()
    with llmfast.backend(backend):
        out = F.flash_attention(q, k, v, causal=causal)
        ref = F.flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
        # the same views in torch's [B, H, L, D] layout, and a layout whose last dim is strided
        sd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=causal)
        vt = v.permute(0, 2, 3, 1).contiguous().transpose(-1, -2)  # [B, H, S, D] with stride(-1) != 1
        sd2 = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), vt, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(sd, ref.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(sd2, sd, rtol=0, atol=1e-6)
    check(lambda x: F.flash_attention(*x.unbind(2), causal=causal), [qkv], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_lse(backend):
    q, k, v = _qkv(2, 4, 2, 27, 39, 32)
    with llmfast.backend(backend):
        out, lse = F.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                     return_lse=True)
    ro, rl = reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.shape == (2, 27, 4, 32) and lse.shape == (2, 4, 27) and lse.dtype == torch.float32
    assert not lse.requires_grad
    torch.testing.assert_close(out.transpose(1, 2).double(), ro, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), rl.double(), rtol=0, atol=2e-5)


def test_cpu_backward_deterministic():
    if "cpu" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("no cpu backend")
    q, k, v = _qkv(1, 4, 2, 130, 150, 32)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with llmfast.backend("cpu"):
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_float64_runs_on_torch():
    q, k, v = _qkv(1, 2, 2, 9, 11, 16, dtype=torch.float64)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, tF.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_empty():
    for L, S in ((0, 5), (5, 0)):
        q, k, v = _qkv(1, 2, 2, L, S, 16)
        for backend in [p.values[0] for p in BACKENDS if not p.marks] + ["torch"]:
            with llmfast.backend(backend):
                out = F.scaled_dot_product_attention(q, k, v)
            assert out.shape == (1, 2, L, 16) and torch.all(out == 0)


# ----------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_reference_mask(backend, causal):
    """Forward and backward use the documented Philox mask (the reference draws the same one)."""
    q, k, v = _qkv(2, 3, 3, 37, 45, 32)
    fn = lambda q, k, v: F.flash_attention(q, k, v, causal=causal, dropout_p=0.3, seed=1234567890123)  # noqa: E731
    check(fn, [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_statistics(backend):
    """Read the kernel's mask off its output (v = identity): keep rate 1-p, scaled by 1/(1-p)."""
    p, S = 0.25, 64
    q = torch.zeros(1, 4, 64, S, device=DEVICE)  # uniform attention: probabilities 1/S
    k = torch.zeros(1, 4, S, S, device=DEVICE)
    v = torch.eye(S, device=DEVICE).expand(1, 4, S, S)
    with llmfast.backend(backend):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        torch.manual_seed(123)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        torch.manual_seed(123)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        c = F.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, seed=5)
    kept = out != 0
    n = kept.numel()
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5), rate
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (S * (1 - p))))
    assert torch.equal(a, b) and not torch.equal(a, out)  # torch.manual_seed fixes the mask
    keep = reference.dropout_keep(5, p, 1, 4, 64, S, DEVICE)
    assert torch.equal(c.transpose(1, 2) != 0, keep)


def test_dropout_one_gives_zeros():
    q, k, v = _qkv(1, 2, 2, 9, 11, 16)
    q.requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


# ----------------------------------------------------------------------------------
# MultiheadAttention


def _mha_pair(batch_first, **kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(48, 4, batch_first=batch_first, **kw).to(DEVICE)
    ours = llmfast.nn.MultiheadAttention(48, 4, batch_first=batch_first, **kw).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict())
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("variant", ["self", "cross", "kpm", "bool_mask", "float_mask", "causal", "kpm+causal",
                                     "bias_kv", "zero_attn", "kdim", "unbatched"])
def test_multihead_attention_matches_torch(backend, batch_first, variant):
    kw = {}
    if variant == "bias_kv":
        kw["add_bias_kv"] = True
    if variant == "zero_attn":
        kw["add_zero_attn"] = True
    if variant == "kdim":
        kw.update(kdim=24, vdim=40)
    ref, ours = _mha_pair(batch_first, **kw)
    g = torch.Generator().manual_seed(1)
    N, L, S = 3, 11, 13
    shape = lambda n, e=48: (n, N, e) if not batch_first else (N, n, e)  # noqa: E731
    x = torch.randn(shape(L), generator=g).to(DEVICE)
    key = value = x
    args = {}
    if variant in ("cross", "kdim"):
        key = torch.randn(shape(S, 24 if variant == "kdim" else 48), generator=g).to(DEVICE)
        value = torch.randn(shape(S, 40 if variant == "kdim" else 48), generator=g).to(DEVICE)
    src = key.shape[0] if not batch_first else key.shape[1]
    if variant in ("kpm", "kpm+causal"):
        kpm = torch.zeros(N, src, dtype=torch.bool, device=DEVICE)
        kpm[0, 7:] = True
        args["key_padding_mask"] = kpm
    if variant == "bool_mask":
        args["attn_mask"] = torch.rand(L, src, generator=g).to(DEVICE) > 0.8  # True = not allowed
    if variant == "float_mask":
        args["attn_mask"] = torch.randn(N * 4, L, src, generator=g).to(DEVICE)
    if variant in ("causal", "kpm+causal"):
        args["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
        args["is_causal"] = True
    if variant == "unbatched":
        x = key = value = x[:, 0] if not batch_first else x[0]
    with llmfast.backend(backend):
        out, w = ours(x, key, value, need_weights=False, **args)
        out_w, w_w = ours(x, key, value, need_weights=True, **args)
    ref_out, _ = ref(x, key, value, need_weights=False, **args)
    _, ref_w = ref(x, key, value, need_weights=True, **args)
    assert w is None
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out_w, ref_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(w_w, ref_w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_attention_grads_and_training(backend):
    ref, ours = _mha_pair(True)
    x = torch.randn(2, 9, 48, device=DEVICE)
    for m in (ref, ours):
        m.zero_grad()
    with llmfast.backend(backend):
        ours(x, x, x, need_weights=False)[0].pow(2).sum().backward()
    ref(x, x, x, need_weights=False)[0].pow(2).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    # training mode with dropout: a fresh mask each call, zero output rows impossible to tell apart,
    # but the output stays finite and differs from eval
    ours.dropout = 0.5
    ours.train()
    with llmfast.backend(backend):
        y = ours(x, x, x, need_weights=False)[0]
    assert torch.isfinite(y).all()


def test_multihead_attention_errors():
    _, ours = _mha_pair(True)
    x = torch.randn(2, 9, 48, device=DEVICE)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)
    for bad in (torch.zeros(3, 9, 9, device=DEVICE), torch.zeros(9, 8, device=DEVICE)):
        with pytest.raises(RuntimeError, match="attn_mask is"):
            ours(x, x, x, need_weights=False, attn_mask=bad)
        with pytest.raises(RuntimeError, match="attn_mask is"):  # torch says the same
            torch.nn.MultiheadAttention.forward(ours, x, x, x, need_weights=False, attn_mask=bad)


# ----------------------------------------------------------------------------------
# Errors


def test_bad_inputs():
    q, k, v = _qkv(2, 8, 8, 5, 7, 16)
    with pytest.raises(RuntimeError, match="same embedding dim"):
        F.scaled_dot_product_attention(q, k[..., :15], v)
    with pytest.raises(RuntimeError, match="same sequence length"):
        F.scaled_dot_product_attention(q, k, v[:, :, :6])
    with pytest.raises(RuntimeError, match="Number of heads in key and value must divide"):
        F.scaled_dot_product_attention(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        F.scaled_dot_product_attention(q, k[:, :2], v[:, :2])  # GQA heads without enable_gqa
    with pytest.raises(RuntimeError, match="not broadcastable"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int32, device=DEVICE))
    with pytest.raises(RuntimeError, match="floating point"):
        F.scaled_dot_product_attention(q.long(), k.long(), v.long())
    with pytest.raises(RuntimeError, match="same dtype"):
        F.scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(RuntimeError, match="at least 2 dimensional"):
        F.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(RuntimeError, match="should not be set when is_causal"):
        F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                       attn_mask=torch.ones(5, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="scale"):
        F.scaled_dot_product_attention(q, k, v, scale="a")
    with pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="must be Tensor"):
        F.scaled_dot_product_attention(q, k, [1.0])
    with pytest.raises(RuntimeError, match="4-D"):
        F.flash_attention(q[0], k[0], v[0])
    with pytest.raises(RuntimeError, match="multiple of the number of key/value heads"):
        F.flash_attention(q.transpose(1, 2), k[:, :3].transpose(1, 2), v[:, :3].transpose(1, 2))
    with pytest.raises(RuntimeError, match="expected q"):
        F.flash_attention(q.transpose(1, 2), k[..., :8].transpose(1, 2), v.transpose(1, 2))


def test_native_op_errors():
    if not hasattr(torch.ops.llmfast, "attention_fwd"):
        pytest.skip("llmfast._C not built")
    q, k, v = _qkv(1, 4, 3, 5, 7, 16, device="cpu")
    with pytest.raises(RuntimeError, match="multiple of the number of key/value heads"):
        torch.ops.llmfast.attention_fwd(q, k, v, None, 0.25, False, 0.0, 0)
    q, k, v = _qkv(1, 4, 4, 5, 7, 16, device="cpu")
    with pytest.raises(RuntimeError, match="last dim"):
        torch.ops.llmfast.attention_fwd(q.transpose(-1, -2), k, v, None, 0.25, False, 0.0, 0)
    with pytest.raises(RuntimeError, match="mask must be viewed as"):
        torch.ops.llmfast.attention_fwd(q, k, v, torch.ones(1, 4, 5, 6, dtype=torch.bool), 0.25, False, 0.0, 0)


# ----------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def _opcheck_cases(device):
    q, k, v = _qkv(1, 4, 2, 19, 23, 16, device=device)
    m = _bool_mask((1, 4, 19, 23), dead_row=3).to(device)
    fm = torch.randn(1, 1, 19, 23, device=device).expand(1, 4, 19, 23)
    return [(q, k, v, None, 0.25, False, 0.0, 0), (q, k, v, None, 0.25, True, 0.0, 0),
            (q, k, v, m, 0.3, False, 0.0, 0), (q, k, v, fm, 0.3, False, 0.2, 77)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = (torch.ops.llmfast.attention_fwd_triton if backend == "triton" else torch.ops.llmfast.attention_fwd).default
    for args in _opcheck_cases(DEVICE):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and i < 3 else a
                     for i, a in enumerate(args))
        torch.library.opcheck(op, args)
    # dropout with a tensor seed (drawn inside scaled_dot_product_attention)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 19, 23, 16))
    torch.library.opcheck(torch.ops.llmfast.attention_fwd_seeded.default,
                          (q, k, v, None, 0.25, True, 0.2, torch.tensor(1234567890123), backend))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum() + F.flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).float().sum()

    q, k, v = _qkv(1, 2, 2, 17, 17, 16)
    m = _bool_mask((17, 17))
    with llmfast.backend(backend):
        compiled = torch.compile(fn, fullgraph=True)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        compiled(qq, kk, vv, m).backward()
        q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
        fn(q2, k2, v2, m).backward()
    for a, b in ((qq, q2), (kk, k2), (vv, v2)):
        torch.testing.assert_close(a.grad, b.grad)

    # dropout: the seed is drawn inside the graph (no .item() while tracing), fresh per call
    drop = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.3), fullgraph=True)
    with llmfast.backend(backend):
        a, b = drop(qq), drop(qq)
        a.sum().backward()
    assert torch.isfinite(a).all() and not torch.equal(a, b)


# ----------------------------------------------------------------------------------
# Triton on sm_90: tensor-core (wgmma) dots for fp16/bf16

_WGMMA_CHILD = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmfast.kernels import attention as A
seen = {}
for kernel, sig, const, opts in A.COMPILE_CONFIGS():
    dt = sig.get("Q_ptr", "")
    key = (kernel.__name__, dt)
    if kernel is A._attn_bwd_preprocess or dt not in ("*fp16", "*bf16") or key in seen:
        continue
    if const["MASK_KIND"] or const["DROPOUT"] or const["BLOCK_D"] != 64:
        continue
    full = dict(sig, **{k: "constexpr" for k in const})
    src = ASTSource(fn=kernel, signature=full, constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    seen[key] = "wgmma" in c.asm["ptx"]
print(json.dumps({f"{k[0]}:{k[1]}": v for k, v in seen.items()}))
"""


@pytest.mark.slow
def test_triton_sm90_uses_wgmma():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _WGMMA_CHILD], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen) == 6, seen
    assert all(seen.values()), seen


# ----------------------------------------------------------------------------------
# Heavier shapes


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequences(backend, causal):
    q, k, v = _qkv(1, 4, 2, 700, 1031, 64)
    check(_sdpa(is_causal=causal, enable_gqa=True), [q, k, v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_double_backward(backend, causal):
    # create_graph=True: the gradient must carry a graph (was graph-less: second derivatives missing)
    q, k, v = (torch.randn(s, device=DEVICE) for s in ((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    inputs = [q, k, v]
    ours = second_derivatives(fn, inputs, backend)
    ref = second_derivatives(fn, inputs, "torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_grad_mask_matches_torch(backend, dtype):
    # OpInfo's sample: values in [-9, 9] (|q.k| ~ 100) and an additive mask that requires grad,
    # which runs the torch reference; it computed scores/softmax in bf16 (~10x torch's error)
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(s, generator=g) * 18 - 9).to(dtype) for s in ((2, 2, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8)))
    m = (torch.rand(3, 6, generator=g) * 18 - 9).to(dtype)
    cot = torch.randn(2, 2, 3, 8, generator=g).to(dtype)

    def run(fn, dt):
        args = [t.detach().to(dt).requires_grad_() for t in (q, k, v, m)]
        out = fn(*args[:3], attn_mask=args[3])
        return [out] + list(torch.autograd.grad(out, args, cot.to(dt)))
    ref = run(tF.scaled_dot_product_attention, torch.float64)
    theirs = run(tF.scaled_dot_product_attention, dtype)
    with llmfast.backend(backend):
        ours = run(F.scaled_dot_product_attention, dtype)
    for name, o, t, r in zip(["out", "dq", "dk", "dv", "dmask"], ours, theirs, ref):
        err, bound = (o.double() - r).abs().max().item(), 2 * (t.double() - r).abs().max().item() + 2e-2
        assert err <= bound, (name, err, bound)


def test_one_dim_mask_raises_like_torch():
    # torch raises for a 1-D attn_mask; we broadcast it silently
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(IndexError):
        tF.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(5))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(5))


# cpu only: the triton and cuda backwards still take delta from the rounded output (and
# triton, under the interpreter, stayed above the bound on some OpInfo-like cases even with an
# fp32 delta), so they fail here.
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", ["mha", "gqa", "mask"])
def test_opinfo_like_half_inputs(backend, dtype, causal, case):
    # OpInfo's samples: make_tensor values uniform in [-9, 9], so |q.k| ~ 100 and the softmax
    # is nearly one-hot; the true dS = p(dP - delta) is then tiny. The cpu backward took
    # delta = rowsum(dO * O) from the output rounded to fp16/bf16, whose rounding error swamped
    # dS: dq/dk errors were 2-8x the bound (torch's error, computed in fp32 internally).
    torch.manual_seed(0)
    H, Hkv, L, S = {"mha": (4, 4, 5, 5), "gqa": (4, 2, 3, 7), "mask": (4, 4, 8, 8)}[case]
    mk = lambda *s: torch.testing.make_tensor(s, dtype=dtype, device=DEVICE, low=-9, high=9)  # noqa: E731
    q, k, v = mk(4, H, L, 8), mk(4, Hkv, S, 8), mk(4, Hkv, S, 8)
    if case == "mask":
        m = torch.testing.make_tensor((L, S), dtype=dtype, device=DEVICE, low=-9, high=9)
        fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=False)  # noqa: E731
        if causal:  # is_causal with attn_mask raises in torch: a bool mask with the causal pattern instead
            m = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril()
        check(fn, [q, k, v, m], backend, grad=[True, True, True, False])
    else:
        check(_sdpa(is_causal=causal, enable_gqa=H != Hkv), [q, k, v], backend)
