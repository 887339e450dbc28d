"""64-bit indexing on the cpu backend: one tensor per op with more than 2^31 elements.

A kernel that forms ``row * stride`` (or a mask offset) in 32 bits reads and writes the
wrong rows past element 2^31; the rows checked here lie past it, each against the
reference computed on that row alone. bf16 keeps each big tensor at ~4.3 GB; every test
needs 5-13 GB of RAM and tens of seconds: marked ``slow`` and ``bigmem`` (CI skips both;
run them one at a time: ``pytest tests/test_bigmem.py -m bigmem``).
cross_entropy's case is tests/test_cross_entropy.py::test_int64_indexing_cpu.
"""
import pytest
import torch
import torch.nn.functional as TF

import llmfast
from llmfast import backends, flash_attn
from llmfast.nn import functional as F

from conftest import DEVICE

BIG = 2**31
pytestmark = [pytest.mark.slow, pytest.mark.bigmem,
              pytest.mark.skipif(DEVICE != "cpu", reason="cpu backend (CPU RAM)")]


def _need_cpu(op):
    why = backends.why_not(op, "cpu", "cpu")
    if why:
        pytest.skip(why)


def _close(out, ref):
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1.6e-2)


def _big_rows(N):
    """A bf16 [M, N] tensor with M * N > 2^31, and the indices of its last rows (all past 2^31)."""
    M = BIG // N + 3
    x = torch.empty(M, N, dtype=torch.bfloat16)
    x.view(-1)[:] = 0  # zero-fill fast, then make the checked rows random
    tail = torch.arange(M - 3, M)
    assert int(tail[0]) * N >= BIG
    x[tail] = torch.randn(3, N).to(torch.bfloat16)
    x[0] = torch.randn(N).to(torch.bfloat16)
    return x, tail


@pytest.mark.parametrize("log", [False, True])
def test_softmax_fwd_bwd(log):
    _need_cpu("softmax")
    N = 65536
    x, tail = _big_rows(N)
    fn, ref_fn = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    with llmfast.backend("cpu"):
        y = fn(x, -1)
    _close(y[tail], ref_fn(x[tail].float(), -1))
    _close(y[0], ref_fn(x[0].float(), -1))
    # backward with dy = y (no second big tensor): the reference is the backward formula
    # on the kernel's own rows of y (this checks which rows are read, not the rounding)
    yt = y[tail].float()
    ref_dx = yt - yt.exp() * yt.sum(-1, keepdim=True) if log else yt * (yt - (yt * yt).sum(-1, keepdim=True))
    del x
    from llmfast.ops import softmax as softmax_op
    y4 = y.view(1, 1, *y.shape)
    dx = softmax_op.softmax_bwd.on("cpu", "cpu")(y4, y4, 1.0, log, False)
    _close(dx.view(y.shape)[tail], ref_dx)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norm_fwd(norm):
    _need_cpu(norm)
    N = 16384
    x, tail = _big_rows(N)
    w = (torch.randn(N) * 0.1 + 1).to(torch.bfloat16)
    b = (torch.randn(N) * 0.1).to(torch.bfloat16)
    with llmfast.backend("cpu"):
        y = F.layer_norm(x, (N,), w, b) if norm == "layer_norm" else F.rms_norm(x, (N,), w)
    xt = x[tail].float()
    ref = (TF.layer_norm(xt, (N,), w.float(), b.float()) if norm == "layer_norm"
           else TF.rms_norm(xt, (N,), w.float()))
    _close(y[tail], ref)


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_glu_packed_fwd(act):
    """gate and up packed in one [M, 2N] tensor (up=None): the input passes 2^31, the output half of it."""
    _need_cpu("glu")
    N = 8192
    x, tail = _big_rows(2 * N)
    with llmfast.backend("cpu"):
        y = F.swiglu(x) if act == "swiglu" else F.geglu(x)
    g, u = x[tail].float().chunk(2, dim=-1)
    ref = TF.silu(g) * u if act == "swiglu" else TF.gelu(g, approximate="tanh") * u
    _close(y[tail], ref)


def test_attention_mask_offsets():
    """A [1, 1, L, S] bool mask with L * S > 2^31 (2.1 GB): the last query rows read mask
    offsets past 2^31. q, k, v are small (D = 16)."""
    _need_cpu("attention")
    L = S = 46341  # L * S = 2^31 + 88,881
    D = 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, D, generator=g) for n in (L, S, S))
    mask = torch.ones(1, 1, L, S, dtype=torch.bool)
    mask[0, 0, -2:, ::3] = False  # the checked rows: only a third of the keys hidden, past 2^31
    with llmfast.backend("cpu"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = slice(L - 2, L)
    ref = TF.scaled_dot_product_attention(q[:, :, rows].double(), k.double(), v.double(),
                                          attn_mask=mask[:, :, rows])
    torch.testing.assert_close(out[:, :, rows].double(), ref, atol=1e-5, rtol=1e-4)


def test_kvcache_batch_offsets():
    """flash_attn_with_kvcache over a bf16 cache [3, S, 8, 128] (3.2 G elements, k and v the
    same tensor to halve the memory): batch row 2 starts past element 2^31."""
    _need_cpu("kvcache")
    Hkv, D = 8, 128
    S = BIG // (2 * Hkv * D) + 64
    cache = torch.empty(3, S, Hkv, D, dtype=torch.bfloat16)
    n = 1000
    g = torch.Generator().manual_seed(0)
    cache[:, :n] = torch.randn(3, n, Hkv, D, generator=g).to(torch.bfloat16)
    assert 2 * S * Hkv * D >= BIG
    q = torch.randn(3, 1, 16, D, generator=g).to(torch.bfloat16)
    seqlens = torch.tensor([10, 500, n], dtype=torch.int32)
    with llmfast.backend("cpu"):
        out = flash_attn.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=seqlens)
    kv = cache[2, :n].float().transpose(0, 1).repeat_interleave(2, dim=0)  # [Hq, n, D], GQA 16 / 8
    ref = TF.scaled_dot_product_attention(q[2].float().transpose(0, 1), kv, kv)  # [Hq, 1, D]
    _close(out[2], ref.transpose(0, 1))
