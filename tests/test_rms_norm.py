"""RMSNorm (+ fused residual add): every backend against a float64 reference.

Outputs and every gradient (input, residual, weight) follow FlashAttention's rule
(llmfast.testing.compare). Shapes stay small: the Triton backend runs under the
interpreter here; the many-row case that is slow there is marked ``slow``.
"""
import importlib

import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.testing import compare, second_derivatives

from conftest import DEVICE, backends_for

BACKENDS = backends_for("rms_norm")
# the interpreter runs Triton programs one by one in Python: big cases are `slow` there
SLOW_ON_INTERPRETER = [pytest.param(*p.values, marks=list(p.marks) + [pytest.mark.slow], id=p.id)
                       if p.id == "triton" and DEVICE == "cpu" else p for p in BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rms(x, w, *, eps=1e-6):
    return LF.rms_norm(x, (x.shape[-1],), w, eps)


def _check(res):
    assert res.ok, str(res)


def _rows_for(n):
    return max(2, min(33, 8192 // n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 127, 1023, 4096, 5120, 12288, 65536])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_sizes(backend, n, dtype, device):
    x = torch.randn(_rows_for(n), n, device=device).to(dtype)
    w = torch.randn(n, device=device).to(dtype)
    _check(compare(_rms, [x, w], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 4096, 12288])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual(backend, n, dtype, device):
    x = torch.randn(3, _rows_for(n) // 2 + 1, n, device=device).to(dtype)
    r = torch.randn_like(x)
    w = torch.randn(n, device=device).to(dtype)
    _check(compare(lambda x, r, w: LF.rms_norm(x, (n,), w, 1e-6, residual=r), [x, r, w], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_returns_sum(backend, device):
    x = torch.randn(4, 9, 96, device=device, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    with llmfast.backend(backend):
        y, s = LF.rms_norm(x, (96,), residual=r)
    assert torch.equal(s, x + r)  # the same rounding as torch's add
    with llmfast.backend("torch"):
        ref = LF.rms_norm(s.double(), (96,), eps=torch.finfo(x.dtype).eps).to(x.dtype)
    assert (y.double() - ref.double()).abs().max() < 3e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_eps_is_finfo_eps(backend, dtype, device):
    x = (torch.randn(5, 300, device=device) * 1e-2).to(dtype)  # small rows: eps matters
    w = torch.randn(300, device=device).to(dtype)
    with llmfast.backend(backend):
        y = LF.rms_norm(x, (300,), w)
    ref = torch.nn.functional.rms_norm(x.double(), (300,), w.double(), eps=torch.finfo(dtype).eps)
    assert (y.double() - ref).abs().max() <= 2 * (torch.nn.functional.rms_norm(x, (300,), w).double() - ref).abs().max() + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_with_half_input(backend, dtype, device):
    x = torch.randn(6, 5, 200, device=device).to(dtype)
    r = torch.randn_like(x)
    w = torch.randn(200, device=device)
    _check(compare(_rms, [x, w], backend))
    _check(compare(lambda x, r, w: LF.rms_norm(x, (200,), w, 1e-6, residual=r), [x, r, w], backend))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with llmfast.backend(backend):
        y = LF.rms_norm(xg, (200,), wg)
    y.float().sum().backward()
    assert y.dtype == dtype and xg.grad.dtype == dtype  # as torch: output in the input's dtype
    assert wg.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_weight_dtypes_follow_torch(backend, device):
    """torch.rms_norm takes any floating weight and keeps the input's dtype."""
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device).to(torch.bfloat16).requires_grad_()
    with llmfast.backend(backend):
        y = LF.rms_norm(x, (64,), w)
    ref = torch.nn.functional.rms_norm(x, (64,), w.detach())
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", SLOW_ON_INTERPRETER)
def test_many_rows(backend, device):
    """65537 rows of 64: the weight gradient sums over every row."""
    x = torch.randn(65537, 64, device=device)
    _check(compare(_rms, [x, torch.randn(64, device=device)], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_4d_and_2d_normalized_shape(backend, dtype, device):
    x3 = torch.randn(2, 5, 48, device=device).to(dtype)
    w = torch.randn(48, device=device).to(dtype)
    _check(compare(lambda x, w: LF.rms_norm(x, (48,), w, 1e-6), [x3, w], backend))
    x4 = torch.randn(2, 3, 6, 40, device=device).to(dtype)
    w2 = torch.randn(6, 40, device=device).to(dtype)
    _check(compare(lambda x, w: LF.rms_norm(x, (6, 40), w, 1e-6), [x4, w2], backend))
    _check(compare(lambda x: LF.rms_norm(x, torch.Size([3, 6, 40]), eps=1e-6), [x4], backend))


@pytest.mark.parametrize("n", [64, 10000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend, dtype, n, device):
    x = torch.randn(5, n, device=device).to(dtype)
    x[1] = 0
    x[3] = 0
    w = torch.randn(n, device=device).to(dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with llmfast.backend(backend):
        y = LF.rms_norm(xg, (n,), wg)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(y[3], torch.zeros_like(y[3]))
    (y.float() * torch.randn(y.shape, device=device)).sum().backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(wg.grad).all()
    _check(compare(_rms, [x, w], backend))


@pytest.mark.parametrize("n", [512, 10000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_rows(backend, dtype, n, device):
    x = (1000 + torch.randn(6, n, device=device)).to(dtype)
    _check(compare(_rms, [x, torch.randn(n, device=device).to(dtype)], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, device):
    base = torch.randn(6, 10, 160, device=device)
    x_slice = base[..., :96]                      # row stride 160: read in place
    x_t = torch.randn(96, 6, 10, device=device).permute(1, 2, 0)   # needs a copy
    r_slice = torch.randn(6, 10, 200, device=device)[..., 50:146]
    w = torch.randn(200, device=device)[::2][:96]  # strided weight
    for x in (x_slice, x_t):
        _check(compare(_rms, [x, w], backend))
        _check(compare(lambda x, r, w: LF.rms_norm(x, (96,), w, 1e-6, residual=r), [x, r_slice, w], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_exist_only_for_trainable_params(backend, device):
    x = torch.randn(4, 32, device=device, requires_grad=True)
    with llmfast.backend(backend):
        m = llmfast.nn.RMSNorm(32, device=device)
        m(x).sum().backward()
        assert m.weight.grad is not None
        m_plain = llmfast.nn.RMSNorm(32, elementwise_affine=False, device=device)
        assert list(m_plain.parameters()) == []
        x.grad = None
        m_plain(x).sum().backward()
        assert x.grad is not None
        w = torch.randn(32, device=device)
        x.grad = None
        LF.rms_norm(x, (32,), w).sum().backward()
        assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grads_deterministic(backend, device):
    x = torch.randn(1000, 48, device=device)
    w = torch.randn(48, device=device, requires_grad=True)
    dy = torch.randn(1000, 48, device=device)
    grads = []
    with llmfast.backend(backend):
        for _ in range(2):
            w.grad = None
            LF.rms_norm(x, (48,), w).backward(dy)
            grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_state_dict_round_trip(backend, device):
    for eps in (None, 1e-6):
        ref = torch.nn.RMSNorm((6, 20), eps=eps, device=device)
        with torch.no_grad():
            ref.weight.normal_()
        ours = llmfast.nn.RMSNorm((6, 20), eps=eps, device=device)
        ours.load_state_dict(ref.state_dict())
        assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
        assert ours.extra_repr() == ref.extra_repr()
        x = torch.randn(3, 6, 20, device=device)
        with llmfast.backend(backend):
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
            r = torch.randn_like(x)
            y, s = ours(x, residual=r)
        torch.testing.assert_close(y, ref(x + r), atol=1e-5, rtol=1e-5)
        back = torch.nn.RMSNorm((6, 20), eps=eps, device=device)
        back.load_state_dict(ours.state_dict())


def test_bad_input_raises():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        LF.rms_norm(x, (7,))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        LF.rms_norm(x, [])
    with pytest.raises(RuntimeError, match="weight"):
        LF.rms_norm(x, (8,), torch.ones(7))
    with pytest.raises(TypeError, match="input"):
        LF.rms_norm(torch.ones(4, 8, dtype=torch.int32), (8,))
    with pytest.raises(TypeError, match="weight"):
        LF.rms_norm(x, (8,), torch.ones(8, dtype=torch.long))
    with pytest.raises(TypeError, match="normalized_shape"):
        LF.rms_norm(x, 8)
    with pytest.raises(RuntimeError, match="residual"):
        LF.rms_norm(x, (8,), residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual"):
        LF.rms_norm(x, (8,), residual=torch.randn(4, 8, dtype=torch.float16))


def test_native_op_rejects_bad_weight():
    if not hasattr(torch.ops.llmfast, "rms_norm_fwd"):
        pytest.skip("llmfast._C not built")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.llmfast.rms_norm_fwd(torch.randn(4, 8), None, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.llmfast.rms_norm_fwd(torch.randn(4, 8), None, torch.ones(8, dtype=torch.float16), 1e-5)


# ----------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    mod = importlib.import_module("llmfast.ops.rms_norm")  # llmfast.ops.rms_norm is also a function
    op = mod.rms_norm_fwd_triton if backend == "triton" else torch.ops.llmfast.rms_norm_fwd.default
    x = torch.randn(5, 40, device=device)
    samples = [
        (x, None, torch.randn(40, device=device), 1e-5),
        (x, torch.randn(5, 40, device=device), torch.randn(40, device=device), 1e-5),
        (x.half(), x.half(), torch.randn(40, device=device), 1e-5),
        (torch.randn(3, 9000, device=device), None, None, 1e-6),
    ]
    for x, r, w, eps in samples:
        x = x.clone().requires_grad_()
        if w is not None:
            w = w.requires_grad_()
        torch.library.opcheck(op, (x, r, w, eps))
    bwd = mod.rms_norm_bwd_triton if backend == "triton" else torch.ops.llmfast.rms_norm_bwd.default
    x = torch.randn(6, 40, device=device)
    y, s, rstd = op(x, None, None, 1e-5)
    dy, w = torch.randn_like(x), torch.randn(40, device=device)
    ds = torch.randn(6, 50, device=device)[:, :40]  # row stride 50
    torch.library.opcheck(bwd, (dy, ds, x, w, rstd, True))
    torch.library.opcheck(bwd, (dy, None, x, None, rstd, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def block(x, r, w):
        y, s = LF.rms_norm(x, (64,), w, residual=r)
        return y * 2 + s

    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    r = torch.randn(3, 5, 64, device=device)
    w = torch.randn(64, device=device, requires_grad=True)
    with llmfast.backend(backend):
        eager = block(x, r, w)
        compiled = torch.compile(block, fullgraph=True)(x, r, w)
        torch.testing.assert_close(compiled, eager)
        compiled.sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_double_backward(backend, residual):
    # create_graph=True: the gradient must carry a graph (was graph-less: second derivatives missing)
    x, r, w = (torch.randn(s, device=DEVICE) for s in ((3, 7), (3, 7), (7,)))
    if residual:
        def fn(x, r, w):
            return LF.rms_norm(x, (7,), w, 1e-5, residual=r)
        inputs = [x, r, w]
    else:
        def fn(x, w):
            return LF.rms_norm(x, (7,), w, 1e-5)
        inputs = [x, w]
    ours = second_derivatives(fn, inputs, backend)
    ref = second_derivatives(fn, inputs, "torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_input_like_torch(dtype):
    # torch's rms_norm takes complex input (OpInfo lists complex64/128); we raised TypeError
    x = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    out = LF.rms_norm(x, (3, 4), w, 0.5)
    ref = torch.nn.functional.rms_norm(x, (3, 4), w, 0.5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_default_eps_low_precision_like_torch(backend, dtype):
    # eps=None: torch uses float32's epsilon for fp16/bf16; finfo(bf16).eps = 2^-7 gave 0.11 instead of 1
    x = torch.full((2, 4), 1e-2, device=DEVICE).to(dtype)
    with llmfast.backend(backend):
        out = LF.rms_norm(x, (4,))
        mod = llmfast.nn.RMSNorm(4, device=DEVICE, dtype=dtype)(x)
    ref = torch.nn.functional.rms_norm(x, (4,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mod, ref)
