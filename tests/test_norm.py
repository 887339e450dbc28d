"""LayerNorm and RMSNorm (+ fused residual add): every backend against a float64 reference.

One kernel per language serves both norms, so every test runs for both kinds. Outputs
and every gradient (input, residual, weight, bias) follow FlashAttention's rule
(llmfast.testing.compare). Shapes stay small: the Triton backend runs under the
interpreter and the cuda backend under the warp emulator here; cases that are slow
there are marked ``slow`` or leave the emulator out.
"""
from dataclasses import dataclass

import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.ops import norm as norm_op
from llmfast.testing import compare, second_derivatives

from conftest import DEVICE, backends_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Kind:
    """One norm: its llmfast function, torch module, and which parameters it has."""

    name: str
    centered: bool

    @property
    def has_bias(self):
        return self.centered

    def __call__(self, x, shape, w=None, b=None, residual=None, eps=1e-6):
        if self.centered:
            return LF.layer_norm(x, shape, w, b, eps, residual=residual)
        return LF.rms_norm(x, shape, w, eps, residual=residual)

    def params(self, shape, device, dtype=torch.float32):
        """[w, b] (LayerNorm) or [w] (RMSNorm): random, in ``dtype``."""
        return [torch.randn(shape, device=device).to(dtype) for _ in range(2 if self.has_bias else 1)]

    def fn(self, shape):
        """f(x, *params) and f(x, r, *params) for compare()."""
        return (lambda x, *p: self(x, shape, *p)), (lambda x, r, *p: self(x, shape, *p, residual=r))

    def module(self, *args, **kw):
        return (llmfast.nn.LayerNorm if self.centered else llmfast.nn.RMSNorm)(*args, **kw)

    def torch_module(self, *args, **kw):
        return (torch.nn.LayerNorm if self.centered else torch.nn.RMSNorm)(*args, **kw)


KINDS = [Kind("layer_norm", True), Kind("rms_norm", False)]


def cases(emu=False, slow_on_interpreter=False):
    """(kind, backend) params: every kind x every llmfast backend (skipped with the reason
    when unavailable). ``emu``: include the emulated cuda backend (small shapes only)."""
    out = []
    for kind in KINDS:
        for p in backends_for(kind.name, emu=emu):
            marks = list(p.marks)
            if slow_on_interpreter and p.id == "triton" and DEVICE == "cpu":
                marks.append(pytest.mark.slow)  # the interpreter runs Triton programs one by one
            out.append(pytest.param(kind, p.values[0], marks=marks, id=f"{kind.name}-{p.id}"))
    return out


def _check(res):
    assert res.ok, str(res)


def _rows_for(n):
    return max(2, min(33, 8192 // n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 127, 1023, 4096, 5120, 12288, 65536])
@pytest.mark.parametrize("kind,backend", cases())
def test_hidden_sizes(kind, backend, n, dtype, device):
    x = torch.randn(_rows_for(n), n, device=device).to(dtype)
    _check(compare(kind.fn((n,))[0], [x, *kind.params(n, device, dtype)], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 1000, 1536])  # one warp per row, several rows per warp team, block per row
@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_small_rows_and_residual(kind, backend, n, dtype, device):
    x = torch.randn(2, 5, n, device=device).to(dtype)
    plain, with_res = kind.fn((n,))
    _check(compare(plain, [x, *kind.params(n, device, dtype)], backend))
    _check(compare(with_res, [x, torch.randn_like(x), *kind.params(n, device, dtype)], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 4096, 12288])
@pytest.mark.parametrize("kind,backend", cases())
def test_residual(kind, backend, n, dtype, device):
    x = torch.randn(3, _rows_for(n) // 2 + 1, n, device=device).to(dtype)
    _check(compare(kind.fn((n,))[1], [x, torch.randn_like(x), *kind.params(n, device, dtype)], backend))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_residual_returns_sum(kind, backend, device):
    x = torch.randn(4, 9, 96, device=device, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    with llmfast.backend(backend):
        y, s = kind(x, (96,), residual=r)
    assert torch.equal(s, x + r)  # the same rounding as torch's add
    with llmfast.backend("torch"):
        ref = kind(s.double(), (96,)).to(x.dtype)
    assert (y.double() - ref.double()).abs().max() < 3e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_fp32_params_with_half_input(kind, backend, dtype, device):
    x = torch.randn(6, 5, 200, device=device).to(dtype)
    params = kind.params(200, device)  # float32
    plain, with_res = kind.fn((200,))
    _check(compare(plain, [x, *params], backend))
    _check(compare(with_res, [x, torch.randn_like(x), *params], backend))
    xg = x.clone().requires_grad_()
    pg = [p.clone().requires_grad_() for p in params]
    with llmfast.backend(backend):
        y = kind(xg, (200,), *pg)
    y.float().sum().backward()
    assert y.dtype == dtype and xg.grad.dtype == dtype  # as torch: output in the input's dtype
    assert all(p.grad.dtype == torch.float32 for p in pg)


@pytest.mark.parametrize("kind,backend", cases(slow_on_interpreter=True))
def test_many_rows(kind, backend, device):
    """65537 rows of 64: the weight/bias gradients sum over every row."""
    x = torch.randn(65537, 64, device=device)
    _check(compare(kind.fn((64,))[0], [x, *kind.params(64, device)], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_3d_4d_and_2d_normalized_shape(kind, backend, dtype, device):
    x3 = torch.randn(2, 5, 48, device=device).to(dtype)
    _check(compare(lambda x, w: kind(x, (48,), w), [x3, torch.randn(48, device=device).to(dtype)], backend))
    x4 = torch.randn(2, 3, 6, 40, device=device).to(dtype)
    _check(compare(kind.fn((6, 40))[0], [x4, *kind.params((6, 40), device, dtype)], backend))
    _check(compare(lambda x: kind(x, torch.Size([3, 6, 40])), [x4], backend))


@pytest.mark.parametrize("n", [64, 10000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_constant_and_zero_rows(kind, backend, dtype, n, device):
    """LayerNorm of a constant row is exactly its bias; RMSNorm of a zero row is exactly 0; no NaN."""
    x = torch.tensor([0.0, 1.0, -3.5, 1000.3], device=device)[:, None].expand(4, n).to(dtype).contiguous()
    if not kind.centered:
        x[1::2] = 0
    params = kind.params(n, device, dtype)
    xg = x.clone().requires_grad_()
    pg = [p.clone().requires_grad_() for p in params]
    with llmfast.backend(backend):
        y = kind(xg, (n,), *pg)
    if kind.centered:
        assert torch.equal(y, params[1].expand_as(y)), (y - params[1]).abs().max()
    else:
        assert torch.equal(y[1::2], torch.zeros_like(y[1::2]))
    (y.float() * torch.randn(y.shape, device=device)).sum().backward()
    for t in [xg.grad] + [p.grad for p in pg]:
        assert torch.isfinite(t).all()
    _check(compare(kind.fn((n,))[0], [x, *params], backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,nshape", [((1,), (1,)), ((5, 1), (1,)), ((3, 2, 1, 1), (1, 1))])
@pytest.mark.parametrize("backend", backends_for("layer_norm", emu=True))
def test_layer_norm_one_feature(backend, shape, nshape, dtype, device):
    """Over one feature the output is the bias and dx is exactly 0 (the residual's gradient
    passes through); torch's OpInfo samples include this shape. Before, fma contraction of
    dy * w - mean(dy * w) left rstd * (one rounding) = 1.5e-5 at eps = 1e-5."""
    x = (torch.randn(shape, device=device) * 2 + 100).to(dtype).requires_grad_()
    r = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (torch.randn(nshape, device=device) + 1).to(dtype).requires_grad_()
    b = torch.randn(nshape, device=device).to(dtype).requires_grad_()
    for residual in (None, r):
        with llmfast.backend(backend):
            y = LF.layer_norm(x, nshape, w, b, 1e-5, residual=residual)
        outs = y if isinstance(y, tuple) else (y,)
        assert torch.equal(outs[0], b.detach().expand(shape)), backend
        cots = [torch.randn_like(o) for o in outs]
        dx = torch.autograd.grad(outs, x, cots)[0]
        expected = torch.zeros_like(x) if residual is None else cots[1]
        assert torch.equal(dx, expected), (dx - expected).abs().max()
    _check(compare(lambda x, w, b: LF.layer_norm(x, nshape, w, b, 1e-5), [x.detach(), w.detach(), b.detach()],
                   backend))


@pytest.mark.parametrize("n", [512, 10000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,backend", cases())
def test_large_mean_rows(kind, backend, dtype, n, device):
    x = (1000 + torch.randn(6, n, device=device)).to(dtype)
    _check(compare(kind.fn((n,))[0], [x, *kind.params(n, device, dtype)], backend))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_non_contiguous(kind, backend, device):
    base = torch.randn(6, 10, 160, device=device)
    x_slice = base[..., :96]                      # row stride 160: read in place
    x_t = torch.randn(96, 6, 10, device=device).permute(1, 2, 0)   # needs a copy
    r_slice = torch.randn(6, 10, 200, device=device)[..., 50:146]
    params = [torch.randn(200, device=device)[::2][:96]] + kind.params(96, device)[1:]  # a strided weight
    plain, with_res = kind.fn((96,))
    for x in (x_slice, x_t):
        _check(compare(plain, [x, *params], backend))
        _check(compare(with_res, [x, r_slice, *params], backend))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_non_contiguous_grad(kind, backend, device):
    x = torch.randn(8, 64, device=device, requires_grad=True)
    with llmfast.backend(backend):
        kind(x, (64,)).sum().backward()  # the incoming gradient is an expanded (stride 0) tensor
    with llmfast.backend("torch"):
        x2 = x.detach().clone().requires_grad_()
        kind(x2, (64,)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_grads_exist_only_for_trainable_params(kind, backend, device):
    x = torch.randn(4, 32, device=device, requires_grad=True)
    with llmfast.backend(backend):
        m = kind.module(32, device=device)
        m(x).sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        assert len(list(m.parameters())) == (2 if kind.has_bias else 1)
        if kind.has_bias:
            m_nobias = kind.module(32, bias=False, device=device)
            m_nobias(x).sum().backward()
            assert m_nobias.bias is None and m_nobias.weight.grad is not None
        m_plain = kind.module(32, elementwise_affine=False, device=device)
        assert list(m_plain.parameters()) == []
        x.grad = None
        m_plain(x).sum().backward()
        assert x.grad is not None
        params = kind.params(32, device)
        params[-1].requires_grad_()  # LayerNorm: the bias only; RMSNorm: the weight
        kind(x, (32,), *params).sum().backward()
        assert params[-1].grad is not None and (len(params) == 1 or params[0].grad is None)


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_weight_grads_deterministic(kind, backend, device):
    x = torch.randn(300, 48, device=device)
    params = [p.requires_grad_() for p in kind.params(48, device)]
    dy = torch.randn(300, 48, device=device)
    grads = []
    with llmfast.backend(backend):
        for _ in range(2):
            for p in params:
                p.grad = None
            kind(x, (48,), *params).backward(dy)
            grads.append([p.grad.clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("kind,backend", cases())
def test_module_state_dict_round_trip(kind, backend, device):
    for eps in ((None, 1e-6) if not kind.centered else (1e-6,)):
        ref = kind.torch_module((6, 20), eps=eps, device=device)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        ours = kind.module((6, 20), eps=eps, device=device)
        ours.load_state_dict(ref.state_dict())
        assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"][:1 + kind.has_bias]
        assert ours.extra_repr() == ref.extra_repr()
        x = torch.randn(3, 6, 20, device=device)
        with llmfast.backend(backend):
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
            r = torch.randn_like(x)
            y, s = ours(x, residual=r)
        torch.testing.assert_close(y, ref(x + r), atol=1e-5, rtol=1e-5)
        back = kind.torch_module((6, 20), eps=eps, device=device)
        back.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_bad_input_raises(kind):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        kind(x, (7,))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        kind(x, [])
    with pytest.raises(RuntimeError, match="weight"):
        kind(x, (8,), torch.ones(7))
    with pytest.raises(TypeError, match="input"):
        kind(torch.ones(4, 8, dtype=torch.int32), (8,))
    with pytest.raises(TypeError, match="normalized_shape"):
        kind(x, 8)
    with pytest.raises(TypeError, match="normalized_shape"):
        kind(x, (8.0,))
    with pytest.raises(RuntimeError, match="residual"):
        kind(x, (8,), residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual"):
        kind(x, (8,), residual=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="eps"):
        kind(x, (8,), eps="small")
    if kind.centered:
        with pytest.raises(RuntimeError, match="bias"):
            kind(x, (8,), None, torch.ones(4, 2))
        with pytest.raises(RuntimeError, match="mixed dtype"):
            kind(x, (8,), torch.ones(8, dtype=torch.float16))
    else:
        with pytest.raises(TypeError, match="weight"):
            kind(x, (8,), torch.ones(8, dtype=torch.long))


@pytest.mark.parametrize("backend", [p for p in backends_for("layer_norm", emu=True) if p.id != "triton"])
def test_native_op_rejects_bad_arguments(backend, device):
    op = norm_op.norm_fwd.on(backend, device)
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(x, None, torch.ones(7, device=device), None, 1e-5, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, None, torch.ones(8, dtype=torch.float16, device=device), None, 1e-5, False)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, None, None, torch.ones(8, device=device), 1e-5, False)
    with pytest.raises(RuntimeError, match="residual"):
        op(x, torch.randn(4, 9, device=device), None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="unit stride"):
        op(torch.randn(8, 4, device=device).t(), None, None, None, 1e-5, True)


# ----------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_opcheck(kind, backend, device):
    fwd = norm_op.norm_fwd.on(backend, device)
    bwd = norm_op.norm_bwd.on(backend, device)
    c = kind.centered
    x = torch.randn(5, 40, device=device)
    samples = [
        (x, None, torch.randn(40, device=device), torch.randn(40, device=device) if c else None, 1e-5, c),
        (x, torch.randn(5, 40, device=device), torch.randn(40, device=device), None, 1e-5, c),
        (x.half(), x.half(), torch.randn(40, device=device), torch.randn(40, device=device) if c else None, 1e-5, c),
        (torch.randn(3, 1500, device=device), None, None, None, 1e-6, c),
    ]
    for x, r, w, b, eps, centered in samples:
        x = x.clone().requires_grad_()
        if w is not None:
            w = w.requires_grad_()
        torch.library.opcheck(fwd, (x, r, w, b, eps, centered))
    x = torch.randn(6, 40, device=device)
    y, s, mean, rstd = fwd(x, None, None, None, 1e-5, c)
    dy, w = torch.randn_like(x), torch.randn(40, device=device)
    ds = torch.randn(6, 50, device=device)[:, :40]  # row stride 50
    torch.library.opcheck(bwd, (dy, ds, x, w, mean, rstd, c, True, c))
    torch.library.opcheck(bwd, (dy, None, x, None, mean, rstd, c, False, False))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_torch_compile_fullgraph(kind, backend, device):
    torch._dynamo.reset()

    def block(x, r, *params):
        y, s = kind(x, (64,), *params, residual=r)
        return y * 2 + s

    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    r = torch.randn(3, 5, 64, device=device)
    params = [p.requires_grad_() for p in kind.params(64, device)]
    with llmfast.backend(backend):
        eager = block(x, r, *params)
        compiled = torch.compile(block, fullgraph=True)(x, r, *params)
        torch.testing.assert_close(compiled, eager)
        compiled.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in params)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind,backend", cases())
def test_double_backward(kind, backend, residual):
    # create_graph=True: the gradient must carry a graph (was graph-less: second derivatives missing)
    x, r = torch.randn(3, 7, device=DEVICE), torch.randn(3, 7, device=DEVICE)
    plain, with_res = kind.fn((7,))
    inputs = [x, r] if residual else [x]
    inputs += kind.params(7, DEVICE)
    fn = with_res if residual else plain
    ours = second_derivatives(fn, inputs, backend)
    ref = second_derivatives(fn, inputs, "torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------
# RMSNorm's torch semantics: eps=None, weight dtypes, complex input


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends_for("rms_norm", emu=True))
def test_rms_default_eps_is_finfo_eps(backend, dtype, device):
    x = (torch.randn(5, 300, device=device) * 1e-2).to(dtype)  # small rows: eps matters
    w = torch.randn(300, device=device).to(dtype)
    with llmfast.backend(backend):
        y = LF.rms_norm(x, (300,), w)
    ref = torch.nn.functional.rms_norm(x.double(), (300,), w.double(), eps=torch.finfo(dtype).eps)
    assert (y.double() - ref).abs().max() <= 2 * (torch.nn.functional.rms_norm(x, (300,), w).double() - ref).abs().max() + 1e-5


@pytest.mark.parametrize("backend", ["torch"] + backends_for("rms_norm", emu=True))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rms_default_eps_low_precision_like_torch(backend, dtype):
    # eps=None: torch uses float32's epsilon for fp16/bf16; finfo(bf16).eps = 2^-7 gave 0.11 instead of 1
    x = torch.full((2, 4), 1e-2, device=DEVICE).to(dtype)
    with llmfast.backend(backend):
        out = LF.rms_norm(x, (4,))
        mod = llmfast.nn.RMSNorm(4, device=DEVICE, dtype=dtype)(x)
    ref = torch.nn.functional.rms_norm(x, (4,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mod, ref)


@pytest.mark.parametrize("backend", backends_for("rms_norm", emu=True))
def test_rms_other_weight_dtypes_follow_torch(backend, device):
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


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_rms_complex_input_like_torch(dtype):
    # torch's rms_norm takes complex input (OpInfo lists complex64/128); we raised TypeError
    x = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    out = LF.rms_norm(x, (3, 4), w, 0.5)
    ref = torch.nn.functional.rms_norm(x, (3, 4), w, 0.5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g))


# ---------------------------------------------------------------------------------------
# In-place variants (rms_norm_ / layer_norm_): residual <- input + residual, out <- norm


def _inplace(kind, x, shape, params, residual=None, out=None, eps=1e-6):
    fn = LF.layer_norm_ if kind.centered else LF.rms_norm_
    return fn(x, shape, *params, eps=eps, residual=residual, out=out)


@pytest.mark.parametrize("use_out", [False, True], ids=["over_input", "out"])
@pytest.mark.parametrize("use_res", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 1000, 1536, 9000])  # warp rows, block rows, Triton's streamed path
@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_inplace_matches_out_of_place(kind, backend, n, dtype, use_res, use_out, device):
    """Bit for bit the out-of-place kernel's results, written where asked and nowhere else."""
    if n == 9000 and backend == "cuda" and device == "cpu" and dtype != torch.float32:
        pytest.skip("long emulated rows: fp32 covers the block-row path")
    rows = 3 if n >= 1000 else 7
    x = torch.randn(rows, n, device=device).to(dtype)
    r = torch.randn_like(x) if use_res else None
    params = kind.params(n, device, dtype)
    with llmfast.backend(backend):
        want = kind(x, (n,), *params, residual=r)
        want_y, want_s = want if use_res else (want, None)
        xi, ri = x.clone(), (r.clone() if use_res else None)
        out = torch.full_like(x, float("nan")) if use_out else None
        got = _inplace(kind, xi, (n,), params, residual=ri, out=out)
    y = got[0] if use_res else got
    assert y is (out if use_out else xi)  # the caller's tensors come back
    assert torch.equal(y, want_y)
    if use_res:
        assert got[1] is ri and torch.equal(ri, want_s)
    if use_out:
        assert torch.equal(xi, x)  # input untouched when out is given


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_inplace_against_float64(kind, backend, dtype, device):
    """The FlashAttention rule against float64, through compare() (forward only: no autograd here)."""
    def fn(x, r, *params):
        x, r = x.clone(), r.clone()
        y, s = _inplace(kind, x, (200,), params, residual=r)
        return y, s

    x = torch.randn(2, 9, 200, device=device).to(dtype)
    _check(compare(fn, [x, torch.randn_like(x), *kind.params(200, device, dtype)], backend, grad=False))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_inplace_strided_buffers(kind, backend, device):
    """Row-strided views are written in place, their padding untouched; a layout that no row
    view can describe (a transpose) still gets the right answer."""
    n = 48
    base_x = torch.randn(6, 64, device=device)
    base_r = torch.randn(6, 80, device=device)
    base_o = torch.full((6, 56), 7.0, device=device)
    x, r, o = base_x[:, :n], base_r[:, 8:8 + n], base_o[:, :n]
    params = kind.params(n, device)
    with llmfast.backend("torch"):
        want_y, want_s = kind(x.clone(), (n,), *params, residual=r.clone())
    before_x, before_r, before_o = base_x.clone(), base_r.clone(), base_o.clone()
    with llmfast.backend(backend):
        _inplace(kind, x, (n,), params, residual=r, out=o)
    torch.testing.assert_close(o, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, want_s)
    assert torch.equal(base_x, before_x)
    assert torch.equal(base_r[:, :8], before_r[:, :8]) and torch.equal(base_r[:, 8 + n:], before_r[:, 8 + n:])
    assert torch.equal(base_o[:, n:], before_o[:, n:])
    xt = torch.randn(n, 5, device=device).t()  # [5, n], column stride 5: no row view
    rt = torch.randn(5, n, device=device)
    with llmfast.backend("torch"):
        want_y, want_s = kind(xt.clone(), (n,), *params, residual=rt.clone())
    with llmfast.backend(backend):
        y, s = _inplace(kind, xt, (n,), params, residual=rt)
    assert y is xt and s is rt
    torch.testing.assert_close(xt, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rt, want_s)


@pytest.mark.parametrize("kind,backend", cases())
def test_inplace_under_autograd_runs_torch_inplace_ops(kind, backend, device):
    """With an argument requiring grad the result is differentiable, as torch's in-place ops are."""
    x = torch.randn(4, 32, device=device, requires_grad=True)
    r0 = torch.randn(4, 32, device=device, requires_grad=True)
    params = [p.requires_grad_() for p in kind.params(32, device)]
    with llmfast.backend(backend):
        r = r0.clone()  # a non-leaf may be written in place
        y, s = _inplace(kind, x * 1.0, (32,), params, residual=r)
        (y * s).sum().backward()
    got = [x.grad, r0.grad] + [p.grad for p in params]
    for t in [x, r0, *params]:
        t.grad = None
    with llmfast.backend("torch"):
        y, s = kind(x, (32,), *params, residual=r0)
        (y * s).sum().backward()
    for g, want in zip(got, [x.grad, r0.grad] + [p.grad for p in params]):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_inplace_bad_input_raises(kind):
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    p = kind.params(16, "cpu")
    with pytest.raises(ValueError, match="residual overlaps input"):
        _inplace(kind, x, (16,), p, residual=x)
    with pytest.raises(ValueError, match="out overlaps residual"):
        _inplace(kind, x, (16,), p, residual=r, out=r)
    with pytest.raises(ValueError, match="out partially overlaps input"):
        buf = torch.randn(5, 16)
        _inplace(kind, buf[:4], (16,), p, out=buf[1:])
    with pytest.raises(RuntimeError, match="out must be like input"):
        _inplace(kind, x, (16,), p, out=torch.empty(4, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="'out' must be a Tensor"):
        _inplace(kind, x, (16,), p, out=3)
    with pytest.raises(RuntimeError, match="residual of shape"):
        _inplace(kind, x, (16,), p, residual=torch.randn(4, 8))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_inplace_opcheck(kind, backend, device):
    op = norm_op.norm_add_.on(backend, device)
    c = kind.centered
    w, b = torch.randn(40, device=device), (torch.randn(40, device=device) if c else None)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 40, device=device).to(dt)
        torch.library.opcheck(op, (x.clone(), torch.randn_like(x), None, w, b, 1e-5, c))
        torch.library.opcheck(op, (x.clone(), torch.randn_like(x), torch.empty_like(x), w, b, 1e-5, c))
        torch.library.opcheck(op, (x.clone(), None, None, None, None, 1e-5, c))


@pytest.mark.parametrize("kind,backend", cases(emu=True))
def test_inplace_torch_compile_fullgraph(kind, backend, device):
    torch._dynamo.reset()
    params = kind.params(64, device)

    def step(h, r, buf):  # a decode loop's block boundary: no fresh allocations
        _inplace(kind, h, (64,), params, residual=r, out=buf)
        return buf

    h, r = torch.randn(3, 64, device=device), torch.randn(3, 64, device=device)
    h2, r2, buf, buf2 = h.clone(), r.clone(), torch.empty_like(h), torch.empty_like(h)
    with llmfast.backend(backend):
        step(h, r, buf)
        torch.compile(step, fullgraph=True)(h2, r2, buf2)
    assert torch.equal(buf, buf2) and torch.equal(r, r2)
