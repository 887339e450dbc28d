"""fused_linear_cross_entropy against cross_entropy(hidden @ weight.T + bias) in float64.

Loss and the three gradients (hidden, weight, bias) for several chunk sizes (one that
does not divide N), every reduction (the 'none' path recomputes in backward), label
smoothing and class weights, fp16/bf16, bad input, opcheck and torch.compile.
"""
import math

import pytest
import torch
import torch.nn.functional as TF

import llmfast
from llmfast import backends
from llmfast.nn import functional as F
from llmfast.ops.fused_linear_cross_entropy import default_chunk_size
from llmfast.testing import check

from conftest import DEVICE, backends_for

BACKENDS = backends_for("fused_linear_cross_entropy", emu=True)


def _inputs(N=23, H=32, V=500, dtype=torch.float32, bias=True, ignore_every=4):
    h = torch.randn(N, H, device=DEVICE).to(dtype)
    w = (torch.randn(V, H, device=DEVICE) / math.sqrt(H)).to(dtype)
    t = torch.randint(0, V, (N,), device=DEVICE)
    if ignore_every:
        t[::ignore_every] = -100
    b = (torch.randn(V, device=DEVICE) * 0.1).to(dtype) if bias else None
    return h, w, t, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 8, 23, None])
def test_matches_unfused(backend, reduction, chunk):
    h, w, t, b = _inputs()
    check(lambda h, w, t, b: F.fused_linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=chunk),
           [h, w, t, b], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_smoothing_class_weight_no_bias(backend, reduction):
    h, w, t, _ = _inputs(N=19, V=301, bias=False)
    cw = torch.rand(301, device=DEVICE) + 0.5
    check(lambda h, w, t: F.fused_linear_cross_entropy(h, w, t, reduction=reduction, label_smoothing=0.1,
                                                        chunk_size=6, class_weight=cw), [h, w, t], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap(backend, dtype, reduction):
    # Gemma 2's final-logit soft-capping: the loss of c * tanh(logits / c). A small cap
    # (3, logits of size ~3) so that tanh is far from linear and a missing 1 - tanh^2
    # factor in the gradients would fail; 'none' takes the recompute path.
    h, w, t, b = _inputs(N=21, V=300, dtype=dtype)
    h = h * 2
    check(lambda h, w, t, b: F.fused_linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=8,
                                                           softcap=3.0, label_smoothing=0.1), [h, w, t, b], backend)


def test_softcap_matches_torch_and_dtype_option():
    h, w, t, b = (x.double() if x.is_floating_point() else x for x in _inputs(N=9, V=40))
    ref = TF.cross_entropy(torch.tanh(TF.linear(h, w, b) / 5.0) * 5.0, t)
    torch.testing.assert_close(F.fused_linear_cross_entropy(h, w, t, b, softcap=5.0), ref)
    torch.testing.assert_close(F.fused_linear_cross_entropy(h, w, t, b, softcap=0.0),
                               F.fused_linear_cross_entropy(h, w, t, b))
    hb, wb, bb = h.bfloat16(), w.bfloat16(), b.bfloat16()
    loss = F.fused_linear_cross_entropy(hb, wb, t, bb, dtype=torch.float32)
    assert loss.dtype == torch.float32 and F.fused_linear_cross_entropy(hb, wb, t, bb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="softcap"):
        F.fused_linear_cross_entropy(h, w, t, b, softcap=-1.0)
    with pytest.raises(TypeError, match="softcap"):
        F.fused_linear_cross_entropy(h, w, t, b, softcap="30")
    with pytest.raises(TypeError, match="dtype"):
        F.fused_linear_cross_entropy(h, w, t, b, dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    h, w, t, b = _inputs(N=21, H=64, V=400, dtype=dtype)
    check(lambda h, w, t, b: F.fused_linear_cross_entropy(h, w, t, b, chunk_size=8), [h, w, t, b], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_torch_directly_3d(backend):
    # [B, L, H] hidden with [B, L] targets, checked against the plain torch expression
    h = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(70, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(70, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 70, (2, 9), device=DEVICE)
    t[1, 5:] = -100
    with llmfast.backend(backend):
        ours = F.fused_linear_cross_entropy(h, w, t, b, chunk_size=5, label_smoothing=0.05)
    grads = torch.autograd.grad(ours, (h, w, b))
    ref = TF.cross_entropy((h @ w.T + b).reshape(-1, 70), t.reshape(-1), label_smoothing=0.05)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    with llmfast.backend(backend):
        none = F.fused_linear_cross_entropy(h, w, t, b, reduction="none")
    assert none.shape == (2, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads_and_no_grad(backend):
    h, w, t, b = _inputs()
    ref = TF.cross_entropy(h @ w.T + b, t)
    with llmfast.backend(backend):
        with torch.no_grad():  # eval: no gradient work at all
            torch.testing.assert_close(F.fused_linear_cross_entropy(h, w, t, b, chunk_size=5), ref)
        # a frozen head: only hidden asks for a gradient
        hg = h.clone().requires_grad_(True)
        F.fused_linear_cross_entropy(hg, w, t, b, chunk_size=5).backward()
    hr = h.clone().requires_grad_(True)
    TF.cross_entropy(hr @ w.T + b, t).backward()
    torch.testing.assert_close(hg.grad, hr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    h, w, t, b = _inputs()
    t[:] = -100
    for red in ("mean", "sum", "none"):
        check(lambda h, w, t, b: F.fused_linear_cross_entropy(h, w, t, b, reduction=red, chunk_size=8),
               [h, w, t, b], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    h, w, t, b = _inputs(ignore_every=0)
    with llmfast.backend(backend):
        tb = t.clone()
        tb[5] = 500
        with pytest.raises(IndexError, match="out of bounds"):
            F.fused_linear_cross_entropy(h, w, tb, b)
        with pytest.raises(ValueError, match="does not match"):
            F.fused_linear_cross_entropy(h, w, t[:-1], b)
        with pytest.raises(ValueError, match=r"weight \[V, H\]"):
            F.fused_linear_cross_entropy(h, w.T, t, b)
        with pytest.raises(TypeError, match="must match hidden"):
            F.fused_linear_cross_entropy(h, w.double(), t, b)
        with pytest.raises(RuntimeError, match="Long or Byte"):
            F.fused_linear_cross_entropy(h, w, t.int(), b)
        with pytest.raises(ValueError, match="chunk_size"):
            F.fused_linear_cross_entropy(h, w, t, b, chunk_size=0)
        with pytest.raises(ValueError, match="bias"):
            F.fused_linear_cross_entropy(h, w, t, b[:-1])


def test_default_chunk_size():
    assert default_chunk_size(4096, 1024, 32000) == 256   # Liger-like 128, floored at 256 rows
    assert default_chunk_size(65536, 4096, 32000) == 8192
    assert default_chunk_size(10, 64, 1000) == 10


# ----------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_opcheck(backend):
    if backends.why_not("fused_linear_cross_entropy", backend, DEVICE):
        pytest.skip(backends.why_not("fused_linear_cross_entropy", backend, DEVICE))
    from llmfast.ops.fused_linear_cross_entropy import (fused_linear_cross_entropy_bwd,
                                                        fused_linear_cross_entropy_fwd)
    h, w, t, b = _inputs(N=11, V=50)
    cw = torch.rand(50, device=DEVICE)
    hg, wg, bg = (x.clone().requires_grad_(True) for x in (h, w, b))
    for args in ((hg, wg, bg, t, None, -100, 0.0, 0.0, "mean", 7, 4, backend),    # grads in forward
                 (hg, wg, bg, t, None, -100, 0.0, 2.0, "sum", 7, 4, backend),     # soft-capped
                 (hg, wg, None, t, cw, -100, 0.1, 0.0, "none", 0, 4, backend)):  # 'none': recompute in backward
        torch.library.opcheck(fused_linear_cross_entropy_fwd, args)
    for softcap in (0.0, 2.0):
        _, lse, *_ = fused_linear_cross_entropy_fwd(h, w, b, t, None, -100, 0.0, softcap, "none", 0, 4, backend)
        torch.library.opcheck(fused_linear_cross_entropy_bwd, (torch.randn(11, device=DEVICE), h, w, b, t, None, lse,
                                                               -100, 0.0, softcap, 7, 4, backend))


@pytest.mark.skipif(DEVICE != "cpu", reason="cpu backend")
def test_compile_fullgraph():
    if backends.why_not("fused_linear_cross_entropy", "cpu", "cpu"):
        pytest.skip(backends.why_not("fused_linear_cross_entropy", "cpu", "cpu"))
    torch._dynamo.reset()
    h, w, t, b = _inputs()

    def fn(h, w, t, b):
        return F.fused_linear_cross_entropy(h, w, t, b, chunk_size=8, label_smoothing=0.1)

    compiled = torch.compile(fn, fullgraph=True)
    outs = []
    for f in (compiled, fn):
        args = [h.clone().requires_grad_(True), w.clone().requires_grad_(True), t, b.clone().requires_grad_(True)]
        with llmfast.backend("cpu"):
            loss = f(*args)
            loss.backward()
        outs.append([loss.detach(), args[0].grad, args[1].grad, args[3].grad])
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r)


@pytest.mark.skipif(DEVICE != "cpu", reason="cpu autocast")
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    # as F.linear + F.cross_entropy under autocast: bf16 projection, fp32 loss
    h, w, t, b = _inputs(N=12, H=16, V=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = TF.cross_entropy(TF.linear(h, w, b), t)
        ref_ce = TF.cross_entropy(TF.linear(h, w, b), t, reduction="none")
        with llmfast.backend(backend):
            ours = F.fused_linear_cross_entropy(h, w, t, b, chunk_size=5)
            ours_ce = F.cross_entropy(TF.linear(h, w, b), t, reduction="none")
    assert ours.dtype == ref.dtype == torch.float32 and ours_ce.dtype == ref_ce.dtype
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours_ce, ref_ce, atol=1e-2, rtol=1e-2)
