"""swiglu / geglu (one glu kernel, three activations) on every backend against a float64 reference."""
import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.testing import check, saved_for_backward, second_derivatives
from tests.conftest import DEVICE, backends_for

BACKENDS = backends_for("glu", emu=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# name -> (llmfast function of (gate, up), the torch activation)
ACTS = {
    "silu": (lambda g, u=None: LF.swiglu(g, u), torch.nn.functional.silu),
    "gelu_tanh": (lambda g, u=None: LF.geglu(g, u), lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    "gelu": (lambda g, u=None: LF.geglu(g, u, approximate="none"), torch.nn.functional.gelu),
}


def _x(shape, dtype, scale=3.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (2, 5, 96), (2, 2049)], ids=str)
def test_forward_and_grads(backend, dtype, act, shape):
    f = ACTS[act][0]
    check(lambda g, u: f(g, u), [_x(shape, dtype), _x(shape, dtype)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(1, 2), (3, 254), (2, 3, 130), (2, 4098)], ids=str)
def test_packed(backend, dtype, act, shape):
    # gate = first half, up = second half; the gradient is the packed tensor's
    f = ACTS[act][0]
    check(lambda x: f(x), [_x(shape, dtype)], backend)
    x = _x(shape, dtype)
    with llmfast.backend(backend):
        y = f(x)
    g, u = x.chunk(2, -1)
    torch.testing.assert_close(y, f(g.contiguous(), u.contiguous()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_non_contiguous(backend, act):
    f = ACTS[act][0]
    # row-strided slices (read in place) and transposes (copied to rows)
    wide = _x((6, 300), torch.float16)
    check(lambda g, u: f(g, u), [wide[:, :100], wide[:, 150:250]], backend)
    check(lambda g, u: f(g, u), [_x((33, 7), torch.float32).t(), _x((33, 7), torch.float32).t()], backend)
    check(lambda x: f(x), [_x((3, 40, 5), torch.bfloat16).transpose(1, 2)], backend)  # packed, copied
    check(lambda x: f(x), [_x((4, 50), torch.float32)[::2, 4:44]], backend)  # packed, row-strided view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_matches_torch_at_extremes(backend, act):
    f, torch_act = ACTS[act]
    g = torch.tensor([[-1e4, -100.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 100.0, 1e4, 3e3]], device=DEVICE)
    u = torch.linspace(-2, 2, g.shape[1], device=DEVICE).unsqueeze(0)
    g, u = g.requires_grad_(), u.requires_grad_()
    with llmfast.backend(backend):
        y = f(g, u)
        dg, du = torch.autograd.grad(y, (g, u), torch.ones_like(y))
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    ref = torch_act(g2) * u2
    rg, ru = torch.autograd.grad(ref, (g2, u2), torch.ones_like(ref))
    assert torch.isfinite(y).all() and torch.isfinite(dg).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg, rg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, ru, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_inputs_saved_for_backward(backend):
    # the memory claim: backward recomputes act(gate); it keeps gate and up and nothing else
    for packed in (False, True):
        x = _x((4, 64), torch.float32).requires_grad_()
        g, u = _x((4, 32), torch.float32).requires_grad_(), _x((4, 32), torch.float32).requires_grad_()
        with llmfast.backend(backend), saved_for_backward() as saved:
            y = LF.swiglu(x) if packed else LF.swiglu(g, u)
        ptrs = {t.data_ptr() for t in saved}
        assert ptrs <= ({x.data_ptr()} if packed else {g.data_ptr(), u.data_ptr()}), saved
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_and_inputs_not_mutated(backend):
    g, u = _x((8, 40), torch.float32).requires_grad_(), _x((8, 40), torch.float32).requires_grad_()
    dy = torch.randn(8, 40, device=DEVICE)
    keep = (g.detach().clone(), u.detach().clone(), dy.clone())
    with llmfast.backend(backend):
        LF.geglu(g, u).backward(dy)
    for a, b in zip((g.detach(), u.detach(), dy), keep):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_input_needs_grad_and_empty(backend):
    g, u = _x((3, 10), torch.float32), _x((3, 10), torch.float32).requires_grad_()
    with llmfast.backend(backend):
        (du,) = torch.autograd.grad(LF.swiglu(g, u).sum(), u)
        assert LF.swiglu(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
        assert LF.geglu(torch.empty(2, 0, device=DEVICE), torch.empty(2, 0, device=DEVICE)).shape == (2, 0)
    torch.testing.assert_close(du, torch.nn.functional.silu(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_double_backward(backend, act):
    f = ACTS[act][0]
    for fn, inputs in ((lambda g, u: f(g, u), [_x((3, 5), torch.float32), _x((3, 5), torch.float32)]),
                       (lambda x: f(x), [_x((3, 10), torch.float32)])):
        ours = second_derivatives(fn, inputs, backend)
        ref = second_derivatives(fn, inputs, "torch")
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_float64_on_cpu_backend():
    if llmfast.available("glu", "cpu")["cpu"] is not None:
        pytest.skip("llmfast._C not built")
    check(lambda g, u: LF.geglu(g, u, approximate="none"), [_x((3, 77), torch.float64), _x((3, 77), torch.float64)],
           "cpu")


def test_bad_input_raises_clear_errors():
    g = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="same shape"):
        LF.swiglu(g, torch.randn(3, 5, device=DEVICE))
    with pytest.raises(RuntimeError, match="same shape"):
        LF.swiglu(g, torch.randn(4, device=DEVICE))  # no broadcasting
    with pytest.raises(RuntimeError, match="even"):
        LF.swiglu(torch.randn(3, 5, device=DEVICE))
    with pytest.raises(TypeError, match="same dtype"):
        LF.geglu(g, g.double())
    with pytest.raises(TypeError, match="'gate' must be a floating point"):
        LF.swiglu(torch.arange(4, device=DEVICE))
    with pytest.raises(TypeError, match="'up' must be a Tensor"):
        LF.swiglu(g, [1.0])
    with pytest.raises(ValueError, match="approximate"):
        LF.geglu(g, g, approximate="erf")


@pytest.mark.skipif(llmfast.available("glu", "cpu")["cpu"] is not None, reason="llmfast._C not built")
def test_kernel_argument_checks():
    g = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="up has shape"):
        torch.ops.llmfast.glu_fwd(g, torch.randn(3, 7), 0)
    with pytest.raises(RuntimeError, match="act must be"):
        torch.ops.llmfast.glu_fwd(g, None, 5)
    with pytest.raises(RuntimeError, match="even last dim"):
        torch.ops.llmfast.glu_fwd(torch.randn(3, 7), None, 0)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.llmfast.glu_bwd(torch.randn(3, 8), g, None, 0)


def _variants():
    from llmfast.ops.glu import glu_fwd

    out = []
    for backend, device_type in glu_fwd.variants():
        if llmfast.available("glu", "cpu")[backend] is None:
            out.append(pytest.param(backend, device_type, id=backend))
    return out


@pytest.mark.parametrize("backend,device_type", _variants())
def test_opcheck(backend, device_type):
    from llmfast.ops.glu import glu_bwd, glu_fwd

    g = torch.randn(3, 17, requires_grad=True)
    u = torch.randn(3, 17, requires_grad=True)
    x = torch.randn(2, 3, 34)[:, 1]  # packed, row stride 3 * 34
    x.requires_grad_()
    fwd, bwd = glu_fwd.on(backend, device_type), glu_bwd.on(backend, device_type)
    for act in (0, 1, 2):
        torch.library.opcheck(fwd, (g, u, act))
        torch.library.opcheck(fwd, (x, None, act))
    torch.library.opcheck(bwd, (torch.randn(3, 17), g.detach(), u.detach(), 1))
    torch.library.opcheck(bwd, (torch.randn(2, 17), x.detach(), None, 0))


@pytest.mark.skipif(llmfast.available("glu", "cpu")["cpu"] is not None, reason="llmfast._C not built")
def test_torch_compile_fullgraph_cpu_backend():
    def f(g, u, x):
        return (LF.swiglu(g, u) * 2).sum() + LF.geglu(x).square().mean()

    g, u = torch.randn(2, 6, 33, requires_grad=True), torch.randn(2, 6, 33, requires_grad=True)
    x = torch.randn(5, 66, requires_grad=True)
    with llmfast.backend("cpu"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        compiled(g, u, x).backward()
        grads = [t.grad.clone() for t in (g, u, x)]
        for t in (g, u, x):
            t.grad = None
        f(g, u, x).backward()
    for a, t in zip(grads, (g, u, x)):
        torch.testing.assert_close(a, t.grad)


# ----------------------------------------------------------------------------------
# llmfast.nn.GatedMLP and the Hugging Face patch rule


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("packed", [False, True])
def test_gated_mlp_matches_eager(activation, packed):
    mlp = llmfast.nn.GatedMLP(16, 24, bias=True, activation=activation, packed=packed)
    x = torch.randn(2, 5, 16, requires_grad=True)
    act = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
           "gelu": torch.nn.functional.gelu}[activation]
    if packed:
        g, u = mlp.gate_up_proj(x).chunk(2, -1)
    else:
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
    want = mlp.down_proj(act(g) * u)
    got = mlp(x)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(got.sum(), [x] + list(mlp.parameters()))
    ww = torch.autograd.grad(want.sum(), [x] + list(mlp.parameters()))
    for a, b in zip(gw, ww):
        torch.testing.assert_close(a, b)
    assert f"activation={activation!r}" in repr(mlp)


def test_gated_mlp_arguments_and_swiglu():
    with pytest.raises(ValueError, match="activation"):
        llmfast.nn.GatedMLP(8, 16, activation="relu")
    m = llmfast.nn.SwiGLU(8, 16, dtype=torch.float64)
    assert m.activation == "silu" and m.gate_proj.weight.dtype == torch.float64 and m.down_proj.bias is None
    assert set(llmfast.nn.GatedMLP(8, 16, packed=True).state_dict()) == {"gate_up_proj.weight", "down_proj.weight"}
    assert llmfast.nn.gated_activation("swish") == "silu"
    assert llmfast.nn.gated_activation("gelu_new") == "gelu_tanh"
    assert llmfast.nn.gated_activation("gelu_pytorch_tanh") == "gelu_tanh"
    assert llmfast.nn.gated_activation("gelu") == "gelu"
    with pytest.raises(ValueError, match="relu"):
        llmfast.nn.gated_activation("relu")


transformers = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
HF_MLP_CONFIGS = {
    "llama": lambda T: T.LlamaConfig(**_COMMON, mlp_bias=True),
    "mistral": lambda T: T.MistralConfig(**_COMMON),
    "qwen2": lambda T: T.Qwen2Config(**_COMMON),
    "qwen3": lambda T: T.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda T: T.GemmaConfig(**_COMMON, head_dim=8, hidden_act="gelu_pytorch_tanh"),
    "gemma2": lambda T: T.Gemma2Config(**_COMMON, head_dim=8, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": lambda T: T.Gemma3TextConfig(**_COMMON, head_dim=8, hidden_activation="gelu_pytorch_tanh"),
    "phi3": lambda T: T.Phi3Config(**_COMMON, pad_token_id=0),
}


def test_state_dict_loads_from_hf_mlps():
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    hf = LlamaMLP(transformers.LlamaConfig(**_COMMON, mlp_bias=True))
    ours = llmfast.nn.GatedMLP(32, 48, bias=True)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(ours(x), hf(x))
    phi = Phi3MLP(transformers.Phi3Config(**_COMMON))
    packed = llmfast.nn.GatedMLP(32, 48, packed=True)
    packed.load_state_dict(phi.state_dict())
    torch.testing.assert_close(packed(x), phi(x))


@pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread says why)
@pytest.mark.parametrize("family", list(HF_MLP_CONFIGS))
def test_hf_mlp_patch_logits_grads_and_undo(family):
    import copy

    model = transformers.AutoModelForCausalLM.from_config(HF_MLP_CONFIGS[family](transformers),
                                                          attn_implementation="eager")
    ref = copy.deepcopy(model)
    mlps = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("MLP")}
    assert len(mlps) == 2
    handle = llmfast.patch(model, ops="glu")
    report = handle.report()
    assert len(handle.swapped) == 2 and "GatedMLP" in report and not handle.skipped, report
    for n, old in mlps.items():
        new = model.get_submodule(n)
        assert type(new) is llmfast.nn.GatedMLP and new.packed == (family == "phi3")
        assert new.activation == ("gelu_tanh" if family.startswith("gemma") else "silu")
        assert new.down_proj is old.down_proj  # the Linear modules are shared, not copied
        assert (new.gate_up_proj is old.gate_up_proj) if new.packed else (new.gate_proj is old.gate_proj)
    ids = torch.randint(0, 64, (2, 9))
    out, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    want.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4)
    handle.undo()
    for n, old in mlps.items():
        assert model.get_submodule(n) is old


def test_hf_mlp_with_unknown_activation_is_skipped():
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**_COMMON, hidden_act="relu"))
    handle = llmfast.patch(model, ops="glu")
    assert not handle.swapped and len(handle.skipped) == 2
    assert "ReLU" in handle.report()
