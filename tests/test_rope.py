"""RoPE (apply_rotary_pos_emb, rotary_embedding) on every backend against a float64 reference and HF."""
import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.testing import check, saved_for_backward
from tests.conftest import DEVICE, backends_for

BACKENDS = backends_for("rope", emu=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BUILT = llmfast.available("rope", "cpu")["cpu"] is None


def _hf_angles(B, S, R, dtype, offsets=None, base=10000.0, device=DEVICE):
    """HF's cos/sin [B, S, R]: cat(freqs, freqs) at positions offset + 0..S-1, per batch row."""
    inv = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    offsets = torch.randint(0, 1000, (B,)) if offsets is None else offsets
    pos = offsets[:, None] + torch.arange(S)[None, :]
    freqs = pos[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _flash_angles(S, R, dtype, batch=None):
    """flash-attn's cos/sin [S, R/2] (or [batch, S, R/2]) at arbitrary angles."""
    theta = torch.rand(*(() if batch is None else (batch,)), S, R // 2) * 200 - 100
    return theta.cos().to(DEVICE, dtype), theta.sin().to(DEVICE, dtype)


def _heads(B, S, H, D, dtype, device=DEVICE):
    """HF's q/k: the [B, H, S, D] transpose of a [B, S, H, D] projection (non-contiguous)."""
    return torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2)


# (B, Hq, Hkv, S, D, R): one of everything, GQA (Hkv = 1), odd/non-power-of-two dims, vector
# tails (R/2 = 12), partial rotary (R < D), a row longer than one CUDA block (8 * 64 > 256)
SHAPES = [(1, 1, 1, 1, 2, 2), (2, 4, 2, 5, 16, 16), (2, 3, 1, 7, 24, 24), (1, 2, 2, 3, 20, 12), (1, 8, 1, 3, 64, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_rotary_pos_emb(backend, dtype, shape):
    B, Hq, Hkv, S, D, R = shape
    cos, sin = _hf_angles(B, S, R, dtype)
    check(LF.apply_rotary_pos_emb, [_heads(B, S, Hq, D, dtype), _heads(B, S, Hkv, D, dtype), cos, sin], backend,
          grad=[True, True, False, False])
    # [B, S, H, D] with unsqueeze_dim=2, positions shared by the batch ([1, S, R])
    cos1, sin1 = cos[:1], sin[:1]
    q, k = (torch.randn(B, S, H, D, device=DEVICE).to(dtype) for H in (Hq, Hkv))
    check(lambda q, k, c, s: LF.apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=2), [q, k, cos1, sin1], backend,
          grad=[True, True, False, False])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 2), (2, 5, 3, 24, 24), (2, 3, 2, 40, 16), (1, 2, 9, 64, 64)],
                         ids=str)
def test_rotary_embedding(backend, dtype, interleaved, shape):
    B, S, H, D, R = shape
    x = torch.randn(B, S, H, D, device=DEVICE).to(dtype)
    cos, sin = _flash_angles(S + 3, R, dtype)  # more positions than the sequence: the first S are used
    check(lambda x, c, s: LF.rotary_embedding(x, c, s, interleaved=interleaved), [x, cos, sin], backend,
          grad=[True, False, False])
    cos, sin = _flash_angles(S, R, torch.float32, batch=B)  # per batch row, fp32 angles for any x
    check(lambda x: LF.rotary_embedding(x, cos, sin, interleaved=interleaved), [x], backend)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hugging_face(backend):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

    B, Hq, Hkv, S, D = 2, 4, 1, 6, 32
    for hf, R, angles in ((llama_rope, D, _hf_angles(B, S, D, torch.float32)),
                          (phi3_rope, 16, _hf_angles(B, S, 16, torch.float32)),  # partial rotary
                          # any cos/sin, not only cat(freqs, freqs): HF's formula holds element by element
                          (llama_rope, D, (torch.randn(B, S, D, device=DEVICE), torch.randn(1, S, D, device=DEVICE)))):
        cos, sin = angles
        q, k = _heads(B, S, Hq, D, torch.float32), _heads(B, S, Hkv, D, torch.float32)
        dq, dk = torch.randn(B, Hq, S, D, device=DEVICE), torch.randn(B, Hkv, S, D, device=DEVICE)
        results = []
        for fn, be in ((hf, "torch"), (LF.apply_rotary_pos_emb, backend)):
            q1, k1 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
            with llmfast.backend(be):
                qo, ko = fn(q1, k1, cos, sin)
                torch.autograd.backward((qo, ko), (dq, dk))
            results.append((qo, ko, q1.grad, k1.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # HF's dtype promotion: bf16 q with fp32 cos/sin gives fp32
    cos, sin = _hf_angles(B, S, D, torch.float32)
    q, k = _heads(B, S, Hq, D, torch.bfloat16), _heads(B, S, Hkv, D, torch.bfloat16)
    with llmfast.backend(backend):
        qo, ko = LF.apply_rotary_pos_emb(q, k, cos, sin)
    want = llama_rope(q, k, cos, sin)
    assert qo.dtype == want[0].dtype == torch.float32
    torch.testing.assert_close(qo, want[0])
    torch.testing.assert_close(ko, want[1])


def test_mixed_dtypes_and_positional_unsqueeze_dim_follow_hf():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

    cos, sin = _hf_angles(2, 5, 8, torch.bfloat16)
    q, k = _heads(2, 5, 2, 8, torch.bfloat16), _heads(2, 5, 1, 8, torch.float16)  # k promotes to fp32 with bf16
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D]: unsqueeze_dim=2
    for be in [b.values[0] for b in BACKENDS if not b.marks] + ["torch"]:
        with llmfast.backend(be):
            got = LF.apply_rotary_pos_emb(q, k, cos, sin, 2)  # HF's signature: unsqueeze_dim is the 5th positional
        for a, b in zip(got, llama_rope(q, k, cos, sin, 2)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_interleaved_is_complex_multiplication():
    # GPT-J / Meta Llama's formulation: pairs (x[2i], x[2i+1]) as complex numbers times e^{i theta}
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    theta = torch.rand(5, 8, dtype=torch.float64) * 10
    want = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 8, 2)) * torch.polar(torch.ones_like(theta),
                                                                                              theta)[:, None])
    for be in ["torch"] + (["cpu"] if _BUILT else []):
        with llmfast.backend(be):
            got = LF.rotary_embedding(x, theta.cos(), theta.sin(), interleaved=True)
        torch.testing.assert_close(got, want.flatten(-2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    B, S, H, D = 2, 5, 3, 16
    # q, k, v from one fused projection [B, S, 3, H, D]: strided views read in place
    qkv = torch.randn(B, S, 3, H, D, device=DEVICE)
    q, k, _ = qkv.unbind(2)
    wide_cos, wide_sin = (t.repeat(1, 1, 2) for t in _hf_angles(B, S, D, torch.float32))  # row stride 2D
    check(lambda q, k, c, s: LF.apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=2),
          [q, k, wide_cos[..., :D], wide_sin[..., :D]], backend, grad=[True, True, False, False])
    # a contiguous [B, H, S, D] q (its [B, S, H, D] view is strided), cos/sin broadcast over the batch
    cos, sin = _hf_angles(1, S, D, torch.float16)
    check(LF.apply_rotary_pos_emb, [torch.randn(B, H, S, D, device=DEVICE).half(),
                                    torch.randn(B, 1, S, D, device=DEVICE).half(), cos.expand(B, S, D),
                                    sin.expand(B, S, D)], backend, grad=[True, True, False, False])
    # a non-unit last stride (copied), and a column-sliced x
    c, s = _flash_angles(S, 8, torch.float32)
    check(lambda x: LF.rotary_embedding(x, c, s), [torch.randn(B, S, D, H, device=DEVICE).transpose(2, 3)], backend)
    check(lambda x: LF.rotary_embedding(x, c, s, interleaved=True),
          [torch.randn(B, S, H, 2 * D, device=DEVICE)[..., 3:3 + D]], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_saves_only_angles_and_writes_nothing_in_place(backend):
    B, S, H, D = 2, 4, 2, 8
    q, k = _heads(B, S, H, D, torch.float32).requires_grad_(), _heads(B, S, 1, D, torch.float32).requires_grad_()
    cos, sin = _hf_angles(B, S, D, torch.float32)
    keep = [t.detach().clone() for t in (q, k, cos, sin)]
    versions = [t._version for t in (q, k, cos, sin)]
    with llmfast.backend(backend), saved_for_backward() as saved:
        qo, ko = LF.apply_rotary_pos_emb(q, k, cos, sin)
    assert {t.data_ptr() for t in saved} <= {cos.data_ptr(), sin.data_ptr()}, saved
    dq = torch.randn_like(qo)
    dq_keep = dq.clone()
    with llmfast.backend(backend):
        torch.autograd.backward((qo,), (dq,))  # k's output unused: its gradient is zero
    assert torch.equal(k.grad, torch.zeros_like(k))
    assert torch.equal(dq, dq_keep)
    for t, was, v in zip((q, k, cos, sin), keep, versions):
        assert torch.equal(t.detach(), was) and t._version == v
    # only q needs a gradient (k's transpose is skipped): q's is unchanged
    grads = []
    for be in (backend, "torch"):
        q1 = q.detach().clone().requires_grad_()
        with llmfast.backend(be):
            qo, ko = LF.apply_rotary_pos_emb(q1, k.detach(), cos, sin)
            (qo.square().sum() + ko.sum()).backward()
        grads.append(q1.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_angles_that_require_grad_take_the_torch_path(backend):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

    B, S, H, D = 1, 3, 2, 8
    q, k = _heads(B, S, H, D, torch.float32), _heads(B, S, H, D, torch.float32)
    cos, sin = _hf_angles(B, S, D, torch.float32)
    grads = []
    for fn, be in ((llama_rope, "torch"), (LF.apply_rotary_pos_emb, backend)):
        args = [t.detach().clone().requires_grad_() for t in (q, k, cos, sin)]
        with llmfast.backend(be):
            qo, ko = fn(*args)
            (qo.square().sum() + ko.sum()).backward()
        grads.append([a.grad for a in args])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not _BUILT, reason="llmfast._C not built")
def test_kernel_refuses_to_drop_angle_gradients():
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    cos, sin = torch.randn(1, 2, 8, requires_grad=True), torch.randn(1, 2, 8)
    qo, _ = torch.ops.llmfast.rope_fwd(q, None, cos, sin, 8, False)
    with pytest.raises(RuntimeError, match="does not differentiate cos/sin"):
        qo.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend):
    # The map is linear: second derivatives in q vanish, and the gradient is linear in the
    # cotangent. Double backward is d<grad, v>/d(cotangent) = J v: the forward applied to v.
    cos, sin = _hf_angles(1, 3, 8, torch.float32)
    q, k = _heads(1, 3, 2, 8, torch.float32), _heads(1, 3, 1, 8, torch.float32)
    cot, v = torch.randn(1, 2, 3, 8, device=DEVICE), torch.randn(1, 2, 3, 8, device=DEVICE)
    results = []
    for be in ("torch", backend):
        q1, c1 = q.detach().clone().requires_grad_(), cot.clone().requires_grad_()
        with llmfast.backend(be):
            qo, _ = LF.apply_rotary_pos_emb(q1, k, cos, sin)
            (gq,) = torch.autograd.grad(qo, q1, c1, create_graph=True)
            (gc,) = torch.autograd.grad((gq * v).sum(), c1)
        results.append((gq.detach(), gc))
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[1][1], LF.apply_rotary_pos_emb(v, k, cos, sin)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    with llmfast.backend(backend):
        for S in (0, 3):
            x = torch.randn(0 if S else 2, S, 2, 8, device=DEVICE, requires_grad=True)
            c = torch.randn(S + 1, 4, device=DEVICE)
            y = LF.rotary_embedding(x, c, c)
            y.sum().backward()
            assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.skipif(not _BUILT, reason="llmfast._C not built")
def test_float64_on_cpu_backend():
    cos, sin = _hf_angles(2, 5, 12, torch.float64, device="cpu")
    q, k = _heads(2, 5, 3, 16, torch.float64, device="cpu"), _heads(2, 5, 1, 16, torch.float64, device="cpu")
    check(LF.apply_rotary_pos_emb, [q, k, cos, sin], "cpu", grad=[True, True, False, False])


def test_bad_input_raises_clear_errors():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = _hf_angles(1, 3, 8, torch.float32, device="cpu")
    with pytest.raises(TypeError, match="'q' must be a floating point"):
        LF.apply_rotary_pos_emb(q.long(), k, cos, sin)
    with pytest.raises(TypeError, match="'sin' must be a Tensor"):
        LF.apply_rotary_pos_emb(q, k, cos, [1.0])
    with pytest.raises(ValueError, match="same rank and last dim"):
        LF.apply_rotary_pos_emb(q, k, cos, sin[..., :4])
    with pytest.raises(ValueError, match=r"cos and sin must be \[1 or 1, 3, rotary_dim\]"):
        LF.apply_rotary_pos_emb(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="rotary_dim"):
        LF.apply_rotary_pos_emb(q, k, torch.randn(1, 3, 10), torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match="rotary_dim"):
        LF.apply_rotary_pos_emb(q, k, cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="agree"):
        LF.apply_rotary_pos_emb(q, torch.randn(1, 1, 3, 4), cos, sin)
    with pytest.raises(ValueError, match="4-D"):
        LF.apply_rotary_pos_emb(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        LF.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=3)
    x = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="S_ro >= 3"):
        LF.rotary_embedding(x, torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="rotary_dim 10"):
        LF.rotary_embedding(x, torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(TypeError, match="float32"):
        LF.rotary_embedding(x, torch.randn(3, 4).double(), torch.randn(3, 4).double())
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        LF.rotary_embedding(x[0], torch.randn(3, 4), torch.randn(3, 4))


@pytest.mark.skipif(not _BUILT, reason="llmfast._C not built")
def test_kernel_argument_checks():
    q, cos = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.llmfast.rope_fwd(q, torch.randn(1, 4, 2, 8), cos, cos, 8, False)
    with pytest.raises(RuntimeError, match="rotary_dim must be even"):
        torch.ops.llmfast.rope_fwd(q, None, cos, cos, 7, False)
    with pytest.raises(RuntimeError, match="cos must be"):
        torch.ops.llmfast.rope_fwd(q, None, cos, cos, 4, False)
    with pytest.raises(RuntimeError, match="sin has shape"):
        torch.ops.llmfast.rope_bwd(q, None, cos, cos[:, :2], 8, False)
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.llmfast.rope_fwd(q.transpose(2, 3), None, cos[..., :4], cos[..., :4], 4, False)
    with pytest.raises(RuntimeError, match="cos has dtype"):
        torch.ops.llmfast.rope_fwd(q, None, cos.half(), cos.half(), 8, False)


def _variants():
    from llmfast.ops.rope import rope_fwd

    return [pytest.param(b, d, id=b) for b, d in rope_fwd.variants() if llmfast.available("rope", "cpu")[b] is None]


@pytest.mark.parametrize("backend,device_type", _variants())
def test_opcheck(backend, device_type):
    from llmfast.ops.rope import rope_bwd, rope_fwd

    fwd, bwd = rope_fwd.on(backend, device_type), rope_bwd.on(backend, device_type)
    q = torch.randn(2, 4, 3, 10)[:, :3].requires_grad_()  # strided along S
    k = torch.randn(2, 3, 1, 10, requires_grad=True)
    full, half = torch.randn(1, 3, 8).expand(2, 3, 8), torch.randn(2, 3, 4)
    for cos, k_, interleaved in ((full, k, False), (full, None, False), (half, k, True)):
        torch.library.opcheck(fwd, (q, k_, cos, cos, 8, interleaved))
    torch.library.opcheck(bwd, (torch.randn(2, 3, 3, 10), torch.randn(2, 3, 1, 10), half, half, 8, False))


@pytest.mark.parametrize("backend,device_type", _variants())
def test_kernels_on_every_layout(backend, device_type):
    # direct kernel calls: both angle layouts x both pairings x both directions in fp32, and
    # fp32 angles with bf16 x, against the torch formulas (reference / its transpose)
    from llmfast.ops.rope import reference, rope_bwd, rope_fwd

    q, k = torch.randn(2, 5, 3, 20)[..., :18], torch.randn(2, 5, 1, 18)  # R = 12 of D = 18
    layouts = [(torch.float32, W, il) for W in (12, 6) for il in (False, True)] + [(torch.bfloat16, 6, False)]
    for dtype, W, interleaved in layouts:
        x, y = q.to(dtype), k.to(dtype)
        cos, sin = torch.randn(1, 5, W).expand(2, 5, W), torch.randn(2, 5, W)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for op, conj in ((rope_fwd, False), (rope_bwd, True)):
            qo, ko = op.on(backend, device_type)(x, y, cos, sin, 12, interleaved)
            for got, t in ((qo, x), (ko, y)):
                torch.testing.assert_close(got, reference(t, cos, sin, 12, interleaved, conj), atol=tol, rtol=tol)


@pytest.mark.skipif(not _BUILT, reason="llmfast._C not built")
def test_torch_compile_fullgraph_cpu_backend():
    cos, sin = _hf_angles(2, 5, 16, torch.float32, device="cpu")

    def f(q, k, x):
        qo, ko = LF.apply_rotary_pos_emb(q, k, cos, sin)
        return (qo * 2).sum() + ko.square().mean() + LF.rotary_embedding(x, cos[0, :, :4], sin[0, :, :4]).sum()

    args = [_heads(2, 5, 4, 16, torch.float32, device="cpu").requires_grad_(),
            _heads(2, 5, 2, 16, torch.float32, device="cpu").requires_grad_(), torch.randn(2, 5, 3, 16, requires_grad=True)]
    with llmfast.backend("cpu"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        compiled(*args).backward()
        grads = [t.grad.clone() for t in args]
        for t in args:
            t.grad = None
        f(*args).backward()
    for a, t in zip(grads, args):
        torch.testing.assert_close(a, t.grad)
