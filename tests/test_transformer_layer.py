"""llmfast.nn.TransformerEncoderLayer against torch.nn.TransformerEncoderLayer (same weights)."""
import pytest
import torch

import llmfast

ATOL, RTOL = 3e-5, 1e-4
D, H, FF = 16, 4, 24


# tiny models: one thread (conftest.one_thread says why)
pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(**kw):
    kw.setdefault("dropout", 0.0)
    ref = torch.nn.TransformerEncoderLayer(D, H, FF, **kw)
    ours = llmfast.nn.TransformerEncoderLayer(D, H, FF, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _masks(kind, B, L):
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[-1, L - 2:] = True          # the last sequence is shorter; no query loses every key
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)   # float -inf above the diagonal
    return {
        "none": {},
        "padding": dict(src_key_padding_mask=pad),
        "causal": dict(src_mask=causal, is_causal=True),
        "causal+padding": dict(src_mask=causal.isinf(), src_key_padding_mask=pad, is_causal=True),
        "float+padding": dict(src_mask=torch.randn(L, L), src_key_padding_mask=pad.float() * -1e4),
        "per-head": dict(src_mask=torch.rand(B * H, L, L) < 0.2),
    }[kind]


def _run(layer, x, kw):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(x, **kw)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def _check(ours, ref, x, kw):
    out, gx, g = _run(ours, x, kw)
    out_r, gx_r, g_r = _run(ref, x, kw)
    torch.testing.assert_close(out, out_r, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gx, gx_r, atol=ATOL, rtol=RTOL)
    for n in g_r:
        torch.testing.assert_close(g[n], g_r[n], atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_matches_torch(batch_first, norm_first, activation, mode):
    ours, ref = _pair(batch_first=batch_first, norm_first=norm_first, activation=activation)
    ours.train(mode == "train")
    ref.train(mode == "train")
    B, L = 3, 7
    x = torch.randn(B, L, D) if batch_first else torch.randn(L, B, D)
    for kind in ("none", "padding", "causal", "causal+padding", "float+padding", "per-head"):
        _check(ours, ref, x, _masks(kind, B, L))


def test_state_dict_constructor_and_bias_false():
    ours, ref = _pair(bias=False, layer_norm_eps=1e-6, batch_first=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # both ways
    assert ours.norm1.eps == 1e-6 and ours.self_attn.in_proj_bias is None
    _check(ours, ref, torch.randn(2, 5, D), {})


def test_unbatched_and_encoder_stack():
    ours, ref = _pair(batch_first=True)
    x = torch.randn(5, D)  # [L, E]: no batch dimension
    _check(ours, ref, x, {})
    _check(ours, ref, x, dict(src_key_padding_mask=torch.tensor([False, False, False, True, True])))
    # torch.nn.TransformerEncoder would turn a padded batch into nested tensors in eval/no_grad;
    # with an llmfast layer it keeps dense tensors and still matches torch.
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        enc = torch.nn.TransformerEncoder(ours, 2).eval()
    enc_ref = torch.nn.TransformerEncoder(ref, 2, enable_nested_tensor=False).eval()
    enc_ref.load_state_dict(enc.state_dict())
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    xb = torch.randn(2, 6, D)
    with torch.no_grad():
        got, want = enc(xb, src_key_padding_mask=pad), enc_ref(xb, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=RTOL)


def test_dropout_trains_and_is_off_in_eval():
    ours, ref = _pair(dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, D)
    ours.train()
    a, b = ours(x), ours(x)
    assert not torch.allclose(a, b)  # dropout active
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)


def _layer_backends():
    out = []
    for name in llmfast.backends.BACKENDS:
        whys = [llmfast.backends.why_not(op, name, "cpu") for op in ("attention", "layer_norm")]
        why = next((w for w in whys if w), None)
        out.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=f"{name}: {why}")] if why else []))
    return out


@pytest.mark.parametrize("backend", _layer_backends())
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_each_backend(backend, norm_first):
    # the tiniest shapes: the Triton kernels run interpreted here
    ours, ref = _pair(batch_first=True, norm_first=norm_first, activation="gelu")
    x = torch.randn(2, 5, D)
    with llmfast.backend(backend):
        for kind in ("none", "causal+padding"):
            _check(ours, ref, x, _masks(kind, 2, 5))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_autocast_bf16(norm_first):
    ours, ref = _pair(batch_first=True, norm_first=norm_first)
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)
