"""LayerNorm (+ fused residual add): every backend against a float64 reference.

Outputs and every gradient (input, residual, weight, bias) follow FlashAttention's
rule (llmfast.testing.compare). Shapes stay small: the Triton backend runs under the
interpreter here; the many-row case that is slow there is marked ``slow``.
"""
import importlib

import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.testing import compare, second_derivatives

from conftest import DEVICE, backends_for

BACKENDS = backends_for("layer_norm")
# the interpreter runs Triton programs one by one in Python: big cases are `slow` there
SLOW_ON_INTERPRETER = [pytest.param(*p.values, marks=list(p.marks) + [pytest.mark.slow], id=p.id)
                       if p.id == "triton" and DEVICE == "cpu" else p for p in BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ln(x, w, b, *, shape=None):
    return LF.layer_norm(x, shape or (x.shape[-1],), w, b)


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
    b = torch.randn(n, device=device).to(dtype)
    _check(compare(_ln, [x, w, b], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 4096, 12288])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual(backend, n, dtype, device):
    x = torch.randn(3, _rows_for(n) // 2 + 1, n, device=device).to(dtype)
    r = torch.randn_like(x)
    w = torch.randn(n, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    _check(compare(lambda x, r, w, b: LF.layer_norm(x, (n,), w, b, residual=r), [x, r, w, b], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_returns_sum(backend, device):
    x = torch.randn(4, 9, 96, device=device, dtype=torch.float16)
    r = torch.randn_like(x)
    with llmfast.backend(backend):
        y, s = LF.layer_norm(x, (96,), residual=r)
    assert torch.equal(s, x + r)  # the same rounding as torch's add
    with llmfast.backend("torch"):
        ref = LF.layer_norm(s.double(), (96,)).to(x.dtype)
    assert (y.double() - ref.double()).abs().max() < 4e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_params_with_half_input(backend, dtype, device):
    x = torch.randn(6, 5, 200, device=device).to(dtype)
    r = torch.randn_like(x)
    w = torch.randn(200, device=device)
    b = torch.randn(200, device=device)
    _check(compare(_ln, [x, w, b], backend))
    _check(compare(lambda x, r, w, b: LF.layer_norm(x, (200,), w, b, residual=r), [x, r, w, b], backend))
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    with llmfast.backend(backend):
        y = LF.layer_norm(xg, (200,), wg, bg)
    y.float().sum().backward()
    assert y.dtype == dtype and xg.grad.dtype == dtype  # as torch: output in the input's dtype
    assert wg.grad.dtype == torch.float32 and bg.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", SLOW_ON_INTERPRETER)
def test_many_rows(backend, device):
    """65537 rows of 64: the weight/bias gradients sum over every row."""
    x = torch.randn(65537, 64, device=device)
    _check(compare(_ln, [x, torch.randn(64, device=device), torch.randn(64, device=device)], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_4d_and_2d_normalized_shape(backend, dtype, device):
    x3 = torch.randn(2, 5, 48, device=device).to(dtype)
    w = torch.randn(48, device=device).to(dtype)
    _check(compare(lambda x, w: LF.layer_norm(x, (48,), w), [x3, w], backend))
    x4 = torch.randn(2, 3, 6, 40, device=device).to(dtype)
    w2 = torch.randn(6, 40, device=device).to(dtype)
    b2 = torch.randn(6, 40, device=device).to(dtype)
    _check(compare(lambda x, w, b: LF.layer_norm(x, (6, 40), w, b), [x4, w2, b2], backend))
    _check(compare(lambda x: LF.layer_norm(x, torch.Size([3, 6, 40])), [x4], backend))


@pytest.mark.parametrize("n", [64, 10000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_rows_give_bias(backend, dtype, n, device):
    x = torch.tensor([0.0, 1.0, -3.5, 1000.3], device=device)[:, None].expand(4, n).to(dtype).contiguous()
    w = torch.randn(n, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    with llmfast.backend(backend):
        y = LF.layer_norm(xg, (n,), wg, bg)
    assert torch.equal(y, b.expand_as(y)), (y - b).abs().max()
    (y.float() * torch.randn(y.shape, device=device)).sum().backward()
    for t in (xg.grad, wg.grad, bg.grad):
        assert torch.isfinite(t).all()
    _check(compare(_ln, [x, w, b], backend))


@pytest.mark.parametrize("n", [512, 10000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_rows(backend, dtype, n, device):
    x = (1000 + torch.randn(6, n, device=device)).to(dtype)
    w = torch.randn(n, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    _check(compare(_ln, [x, w, b], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, device):
    base = torch.randn(6, 10, 160, device=device)
    x_slice = base[..., :96]                      # row stride 160: read in place
    x_t = torch.randn(96, 6, 10, device=device).permute(1, 2, 0)   # needs a copy
    r_slice = torch.randn(6, 10, 200, device=device)[..., 50:146]
    w = torch.randn(200, device=device)[::2][:96]  # strided weight
    b = torch.randn(96, device=device)
    for x in (x_slice, x_t):
        _check(compare(_ln, [x, w, b], backend))
        _check(compare(lambda x, r, w, b: LF.layer_norm(x, (96,), w, b, residual=r), [x, r_slice, w, b], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grad(backend, device):
    x = torch.randn(8, 64, device=device, requires_grad=True)
    with llmfast.backend(backend):
        y = LF.layer_norm(x, (64,))
    y.sum().backward()  # the incoming gradient is an expanded (stride 0) tensor
    with llmfast.backend("torch"):
        x2 = x.detach().clone().requires_grad_()
        LF.layer_norm(x2, (64,)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_exist_only_for_trainable_params(backend, device):
    x = torch.randn(4, 32, device=device, requires_grad=True)
    with llmfast.backend(backend):
        m = llmfast.nn.LayerNorm(32, device=device)
        m(x).sum().backward()
        assert m.weight.grad is not None and m.bias.grad is not None
        m_nobias = llmfast.nn.LayerNorm(32, bias=False, device=device)
        m_nobias(x).sum().backward()
        assert m_nobias.bias is None and m_nobias.weight.grad is not None
        m_plain = llmfast.nn.LayerNorm(32, elementwise_affine=False, device=device)
        assert list(m_plain.parameters()) == []
        x.grad = None
        m_plain(x).sum().backward()
        assert x.grad is not None
        w = torch.randn(32, device=device)
        b = torch.randn(32, device=device, requires_grad=True)
        LF.layer_norm(x, (32,), w, b).sum().backward()
        assert w.grad is None and b.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grads_deterministic(backend, device):
    x = torch.randn(1000, 48, device=device)
    w = torch.randn(48, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    dy = torch.randn(1000, 48, device=device)
    grads = []
    with llmfast.backend(backend):
        for _ in range(2):
            w.grad = b.grad = None
            LF.layer_norm(x, (48,), w, b).backward(dy)
            grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_state_dict_round_trip(backend, device):
    ref = torch.nn.LayerNorm((6, 20), eps=1e-6, device=device)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = llmfast.nn.LayerNorm((6, 20), eps=1e-6, device=device)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 6, 20, device=device)
    with llmfast.backend(backend):
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        r = torch.randn_like(x)
        y, s = ours(x, residual=r)
    torch.testing.assert_close(y, ref(x + r), atol=1e-5, rtol=1e-5)
    back = torch.nn.LayerNorm((6, 20), eps=1e-6, device=device)
    back.load_state_dict(ours.state_dict())
    assert ours.extra_repr() == ref.extra_repr()


def test_bad_input_raises():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        LF.layer_norm(x, (7,))
    with pytest.raises(RuntimeError, match="weight"):
        LF.layer_norm(x, (8,), torch.ones(7))
    with pytest.raises(RuntimeError, match="bias"):
        LF.layer_norm(x, (8,), None, torch.ones(4, 2))
    with pytest.raises(TypeError, match="input"):
        LF.layer_norm(torch.ones(4, 8, dtype=torch.long), (8,))
    with pytest.raises(TypeError, match="normalized_shape"):
        LF.layer_norm(x, 8)
    with pytest.raises(TypeError, match="normalized_shape"):
        LF.layer_norm(x, (8.0,))
    with pytest.raises(RuntimeError, match="residual"):
        LF.layer_norm(x, (8,), residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual"):
        LF.layer_norm(x, (8,), residual=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="mixed dtype"):
        LF.layer_norm(x, (8,), torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="eps"):
        LF.layer_norm(x, (8,), eps="small")


def test_native_op_rejects_bad_weight():
    if not hasattr(torch.ops.llmfast, "layer_norm_fwd"):
        pytest.skip("llmfast._C not built")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.llmfast.layer_norm_fwd(torch.randn(4, 8), None, torch.ones(7), None, 1e-5)


# ----------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def _opcheck_samples(device):
    x = torch.randn(5, 40, device=device)
    return [
        (x, None, torch.randn(40, device=device), torch.randn(40, device=device), 1e-5),
        (x, torch.randn(5, 40, device=device), torch.randn(40, device=device), None, 1e-5),
        (x.half(), x.half(), torch.randn(40, device=device), torch.randn(40, device=device), 1e-5),
        (torch.randn(3, 9000, device=device), None, None, None, 1e-6),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    mod = importlib.import_module("llmfast.ops.layer_norm")  # llmfast.ops.layer_norm is also a function

    op = mod.layer_norm_fwd_triton if backend == "triton" else torch.ops.llmfast.layer_norm_fwd.default
    for x, r, w, b, eps in _opcheck_samples(device):
        x = x.requires_grad_()
        if w is not None:
            w = w.requires_grad_()
        torch.library.opcheck(op, (x, r, w, b, eps))
    bwd = mod.layer_norm_bwd_triton if backend == "triton" else torch.ops.llmfast.layer_norm_bwd.default
    x = torch.randn(6, 40, device=device)
    y, s, mean, rstd = op(x, None, None, None, 1e-5)
    dy, w = torch.randn_like(x), torch.randn(40, device=device)
    ds = torch.randn(6, 50, device=device)[:, :40]  # row stride 50
    torch.library.opcheck(bwd, (dy, ds, x, w, mean, rstd, True, True))
    torch.library.opcheck(bwd, (dy, None, x, None, mean, rstd, False, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def block(x, r, w, b):
        y, s = LF.layer_norm(x, (64,), w, b, residual=r)
        return y * 2 + s

    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    r = torch.randn(3, 5, 64, device=device)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    with llmfast.backend(backend):
        eager = block(x, r, w, b)
        compiled = torch.compile(block, fullgraph=True)(x, r, w, b)
        torch.testing.assert_close(compiled, eager)
        compiled.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_double_backward(backend, residual):
    # create_graph=True: the gradient must carry a graph (was graph-less: second derivatives missing)
    x, r, w, b = (torch.randn(s, device=DEVICE) for s in ((3, 7), (3, 7), (7,), (7,)))
    if residual:
        def fn(x, r, w, b):
            return LF.layer_norm(x, (7,), w, b, residual=r)
        inputs = [x, r, w, b]
    else:
        def fn(x, w, b):
            return LF.layer_norm(x, (7,), w, b)
        inputs = [x, w, b]
    ours = second_derivatives(fn, inputs, backend)
    ref = second_derivatives(fn, inputs, "torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
