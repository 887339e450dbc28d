"""softmax / log_softmax on every backend against a float64 reference (FlashAttention rule)."""
import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.testing import check, second_derivatives
from tests.conftest import DEVICE, backends_for

BACKENDS = backends_for("softmax", emu=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FNS = {"softmax": LF.softmax, "log_softmax": LF.log_softmax}


def _x(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("width", [1, 127, 128, 129, 781, 4097, 65537])
def test_widths(backend, dtype, log, width):
    rows = 3 if width < 4097 else 2
    f = FNS["log_softmax" if log else "softmax"]
    check(lambda x: f(x, -1), [_x((rows, width), dtype, 3.0)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_long_row_not_truncated(backend, log):
    # far longer than one block: the two-pass loop must cover every column
    x = _x((1, 262144), torch.float32, 4.0)
    x[0, -1] = 30.0  # the row's maximum sits in the very last block
    f = FNS["log_softmax" if log else "softmax"]
    with llmfast.backend(backend):
        y = f(x, -1)
    ref = (torch.log_softmax if log else torch.softmax)(x.double(), -1)
    assert (y.double() - ref).abs().max().item() < 1e-5
    if not log:
        assert abs(y.double().sum().item() - 1.0) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [0, 1, -1, 2])
def test_any_dim_and_transposed(backend, dim):
    x = _x((5, 33, 7), torch.float32)
    check(lambda t: LF.softmax(t, dim), [x], backend)
    xt = _x((7, 33, 5), torch.float32).transpose(0, 2)  # non-contiguous
    assert not xt.is_contiguous()
    check(lambda t: LF.log_softmax(t, dim), [xt], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_slices(backend):
    base = _x((6, 300), torch.float16)
    check(lambda t: LF.softmax(t, -1), [base[::2, 10:250]], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("kind", ["bool", "additive", "broadcast", "per_row"])
def test_masks(backend, dtype, log, kind):
    x = _x((2, 3, 17, 45), dtype, 2.0)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(2, 3, 17, 45, generator=g) > 0.4
    elif kind == "additive":
        mask = torch.randn(2, 3, 17, 45, generator=g).masked_fill(torch.rand(2, 3, 17, 45, generator=g) > 0.6,
                                                                    float("-inf"))
    elif kind == "broadcast":
        mask = torch.rand(17, 45, generator=g) > 0.3
    else:  # key-padding style: [B, 1, 1, S]
        mask = torch.rand(2, 1, 1, 45, generator=g) > 0.3
    mask = mask.to(DEVICE)
    f = FNS["log_softmax" if log else "softmax"]
    check(lambda t: f(t, -1, scale=0.7, mask=mask), [x], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_bool_and_additive_masks_agree(backend, log):
    x = _x((4, 9, 50), torch.float32)
    keep = torch.rand(4, 9, 50, device=DEVICE) > 0.5
    add = torch.zeros(4, 9, 50, device=DEVICE).masked_fill(~keep, float("-inf"))
    f = FNS["log_softmax" if log else "softmax"]
    with llmfast.backend(backend):
        a, b = f(x, -1, mask=keep), f(x, -1, mask=add)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("width", [5, 300, 9000])
def test_fully_masked_rows_give_zeros_and_zero_grad(backend, log, width):
    x = _x((4, width), torch.float32).requires_grad_()
    keep = torch.rand(4, width, device=DEVICE) > 0.5
    keep[1] = False
    keep[3] = False
    f = FNS["log_softmax" if log else "softmax"]
    with llmfast.backend(backend):
        y = f(x, -1, mask=keep)
        dy = torch.randn_like(y).masked_fill(torch.isinf(y), 0.0)
        y.backward(dy)
    assert not torch.isnan(y).any()
    assert torch.equal(y[1], torch.zeros(width)) and torch.equal(y[3], torch.zeros(width))
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros(width))
    assert (x.grad[0][~keep[0]] == 0).all()  # masked positions get no gradient
    check(lambda t: f(t, -1, mask=keep), [x.detach()], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [5, 300, 9000])
def test_masked_log_softmax_ignores_gradient_at_masked_positions(backend, width):
    # a masked log-prob is the constant -inf: a gradient arriving there must not move the
    # other positions (the kernels summed it into their row total; the reference did not)
    x = _x((4, width), torch.float32)
    keep = torch.rand(4, width, device=DEVICE) > 0.5
    keep[:, 0] = True
    dy = torch.randn(4, width, device=DEVICE)
    grads = {}
    for name in (backend, "torch"):
        xg = x.clone().requires_grad_()
        with llmfast.backend(name):
            LF.log_softmax(xg, -1, mask=keep).backward(dy)
        grads[name] = xg.grad
    torch.testing.assert_close(grads[backend], grads["torch"], atol=1e-5, rtol=1e-5)
    clean = x.clone().requires_grad_()
    with llmfast.backend(backend):
        LF.log_softmax(clean, -1, mask=keep).backward(dy.masked_fill(~keep, 0.0))
    torch.testing.assert_close(grads[backend], clean.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("L,S", [(5, 5), (7, 13), (13, 7), (1, 40), (40, 1)])
def test_causal(backend, log, L, S):
    x = _x((2, 3, L, S), torch.float32)
    f = FNS["log_softmax" if log else "softmax"]
    check(lambda t: f(t, -1, is_causal=True), [x], backend)
    ref = torch.softmax(x.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(), float("-inf")), -1)
    with llmfast.backend(backend):
        y = LF.softmax(x, -1, is_causal=True)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_mask_and_other_dim(backend):
    x = _x((2, 9, 11), torch.float32)
    m = torch.rand(9, 11, device=DEVICE) > 0.2
    check(lambda t: LF.softmax(t, -1, mask=m, is_causal=True, scale=2.0), [x], backend)
    check(lambda t: LF.softmax(t, 1, is_causal=True), [x], backend)  # causal over (L, S), softmax over L


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_inf_nan_like_torch(backend, log):
    x = torch.randn(6, 40, device=DEVICE)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    x[2, :] = float("-inf")
    x[3, 7] = float("-inf")
    x[4, :] = float("inf")
    f = FNS["log_softmax" if log else "softmax"]
    tf = torch.log_softmax if log else torch.softmax
    with llmfast.backend(backend):
        y = f(x, -1)
    torch.testing.assert_close(y, tf(x, -1), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_not_mutated(backend):
    x = _x((8, 300), torch.float32).requires_grad_()
    dy = torch.randn(8, 300, device=DEVICE)
    keep = dy.clone()
    with llmfast.backend(backend):
        LF.softmax(x, -1).backward(dy)
        LF.log_softmax(x, -1, mask=x.detach() > 0).backward(dy)
    assert torch.equal(dy, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_argument(backend):
    x = _x((4, 50), torch.float16).requires_grad_()
    with llmfast.backend(backend):
        y = LF.softmax(x, -1, dtype=torch.float32)
        y.sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float16
    torch.testing.assert_close(y, torch.softmax(x.detach(), -1, dtype=torch.float32))
    xi = torch.arange(12, device=DEVICE).reshape(3, 4)
    with llmfast.backend(backend):
        yi = LF.log_softmax(xi, 1, dtype=torch.float32)
    torch.testing.assert_close(yi, torch.log_softmax(xi, 1, dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_empty_and_implicit_dim(backend):
    with llmfast.backend(backend):
        assert LF.softmax(torch.tensor(3.0, device=DEVICE), 0).item() == 1.0
        assert LF.softmax(torch.empty(0, 5, device=DEVICE), -1).shape == (0, 5)
        assert LF.softmax(torch.empty(4, 0, device=DEVICE), -1).shape == (4, 0)
        x = _x((3, 4), torch.float32)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            y = LF.softmax(x)
    torch.testing.assert_close(y, torch.softmax(x, 1))


def test_bad_input_raises_clear_errors():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(TypeError, match="floating point"):
        LF.softmax(torch.arange(4, device=DEVICE), 0)
    with pytest.raises(IndexError, match="Dimension out of range"):
        LF.softmax(x, 2)
    with pytest.raises(TypeError, match="dim"):
        LF.softmax(x, 1.5)
    with pytest.raises(ValueError, match="not broadcastable"):
        LF.softmax(x, -1, mask=torch.ones(5, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="not broadcastable"):  # mask may not enlarge the input
        LF.softmax(x, -1, mask=torch.ones(2, 3, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="mask must be bool"):
        LF.softmax(x, -1, mask=torch.ones(3, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="is_causal"):
        LF.softmax(torch.randn(4, device=DEVICE), -1, is_causal=True)
    with pytest.raises(TypeError, match="Tensor"):
        LF.softmax([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        with llmfast.backend("fast"):
            pass


def test_unavailable_backend_says_why():
    # (on this machine every backend may run CPU tensors: triton interpreted, cuda emulated)
    with pytest.raises(llmfast.BackendUnavailableError, match="cpu and cuda tensors, not meta"):
        with llmfast.backend("cpu"):
            LF.softmax(torch.randn(2, 3, device="meta"), -1)
    reasons = llmfast.available("softmax", "meta")
    assert reasons["torch"] is None and all(isinstance(reasons[b], str) for b in ("cpu", "cuda", "triton"))


def test_module_is_drop_in():
    m = llmfast.nn.Softmax(dim=1)
    assert isinstance(m, torch.nn.Softmax) and m.state_dict().keys() == torch.nn.Softmax(dim=1).state_dict().keys()
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(m(x), torch.nn.Softmax(dim=1)(x))
    torch.testing.assert_close(llmfast.nn.LogSoftmax(dim=-1)(x), torch.log_softmax(x, -1))


def _native_available():
    return llmfast.available("softmax", "cpu")["cpu"] is None


@pytest.mark.skipif(not _native_available(), reason="llmfast._C not built")
@pytest.mark.parametrize("log", [False, True])
def test_opcheck_native(log):
    x = torch.randn(1, 2, 3, 17, requires_grad=True)
    mask = (torch.rand(1, 2, 3, 17) > 0.3)
    torch.library.opcheck(torch.ops.llmfast.softmax_fwd, (x, 0.5, mask, False, log))
    torch.library.opcheck(torch.ops.llmfast.softmax_fwd, (x, 1.0, None, True, log))
    y = torch.randn(1, 2, 3, 17)
    torch.library.opcheck(torch.ops.llmfast.softmax_bwd, (torch.randn(1, 2, 3, 17), y.softmax(-1), 1.0, log, True))


@pytest.mark.parametrize("log", [False, True])
def test_opcheck_triton(log):
    pytest.importorskip("triton")
    if llmfast.available("softmax", DEVICE)["triton"] is not None:
        pytest.skip("triton unavailable here")
    x = torch.randn(1, 2, 3, 17, requires_grad=True, device=DEVICE)
    torch.library.opcheck(torch.ops.llmfast.softmax_fwd_triton, (x, 0.5, None, True, log))


@pytest.mark.skipif(not _native_available(), reason="llmfast._C not built")
def test_torch_compile_fullgraph_cpu_backend():
    def f(x, m):
        return LF.softmax(x, -1, scale=0.5, mask=m).sum() + LF.log_softmax(x, 1).mean()

    x = torch.randn(2, 6, 33, requires_grad=True)
    m = torch.rand(6, 33) > 0.2
    with llmfast.backend("cpu"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, m)
        out.backward()
        g = x.grad.clone()
        x.grad = None
        f(x, m).backward()
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("masked", [False, True])
def test_double_backward(backend, log, masked):
    # create_graph=True: the gradient must carry a graph (was graph-less: second derivatives silently wrong)
    mask = None
    if masked:
        mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.4
        mask[1] = False  # a fully masked row
    f = FNS["log_softmax" if log else "softmax"]

    def fn(x):
        return f(x, -1, scale=0.7, mask=mask)
    inputs = [_x((4, 6), torch.float32)]
    ours = second_derivatives(fn, inputs, backend)
    ref = second_derivatives(fn, inputs, "torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_softmax_nan_row_gradient_like_torch(backend):
    # a row with +inf is NaN in torch's output and gradient; the cpu backward gave -inf
    x = torch.tensor([[float("inf"), 1.0], [3.0, -float("inf")], [0.5, 2.0]], device=DEVICE)
    g = torch.tensor([[1.0, 2.0]] * 3, device=DEVICE)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.autograd.grad(torch.log_softmax(a, -1), a, g)[0]
    with llmfast.backend(backend):
        ours = torch.autograd.grad(LF.log_softmax(b, -1), b, g)[0]
    torch.testing.assert_close(ours, ref, equal_nan=True)
