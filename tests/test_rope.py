"""RoPE (apply_rotary_pos_emb, rotary_embedding) on every backend against a float64 reference and HF."""
import pytest
import torch

import llmfast
from llmfast.nn import functional as LF
from llmfast.testing import ATOL, check, saved_for_backward
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


# ----------------------------------------------------------------------------------
# flash-attn's full apply_rotary_emb: seqlen_offsets, cu_seqlens/max_seqlen (packed), inplace


def _token_loop_ref(x, cos, sin, interleaved, offsets=0, cu=None):
    """flash-attn's apply_rotary_emb written out one token at a time, in x's dtype (no llmfast code).

    x [B, S, H, D] or packed [T, H, D] (cu: the segment bounds, a list); cos/sin [S_ro, R/2] or
    [B, S_ro, R/2]; offsets an int or a list. Differentiable (torch ops on fresh tensors)."""
    R = 2 * cos.shape[-1]
    offs = offsets if isinstance(offsets, list) else [offsets] * (len(cu) - 1 if cu is not None else x.shape[0])
    if cu is None:
        tokens = [((b, s), b, offs[b] + s) for b in range(x.shape[0]) for s in range(x.shape[1])]
    else:
        tokens = [((i,), b, i - cu[b] + offs[b]) for b in range(len(cu) - 1) for i in range(cu[b], cu[b + 1])]
    out = x.clone()
    for idx, b, p in tokens:
        c, s = ((t[p] if t.dim() == 2 else t[b if t.shape[0] > 1 else 0, p]).to(x.dtype) for t in (cos, sin))
        v = x[idx]                                                  # [H, D]
        i1 = torch.arange(0, R, 2) if interleaved else torch.arange(R // 2)
        i2 = i1 + 1 if interleaved else i1 + R // 2
        x1, x2 = v[:, i1], v[:, i2]
        out[idx + (slice(None), i1)] = x1 * c - x2 * s
        out[idx + (slice(None), i2)] = x2 * c + x1 * s
    return out


def _check_flash(backend, x, cos, sin, grads=(True, False, False), **kw):
    """fn = rotary_embedding(x, cos, sin, **kw) on ``backend`` against the token loop in float64, with the
    FlashAttention rule (error <= 2x the loop's own error in x's dtype + atol), forward and every gradient."""
    off, cu = kw.get("seqlen_offsets", 0), kw.get("cu_seqlens")
    ref_kw = dict(interleaved=kw.get("interleaved", False), cu=None if cu is None else cu.tolist(),
                  offsets=off.tolist() if isinstance(off, torch.Tensor) else off)
    cot = torch.randn(x.shape, dtype=torch.float64)
    runs = []

    def loop(*a):
        return _token_loop_ref(*a, **ref_kw)
    for fn, dt in ((loop, torch.float64), (loop, None), (lambda *a: LF.rotary_embedding(*a, **kw), None)):
        args = [t.detach().to(dt or t.dtype).clone().requires_grad_(g) for t, g in zip((x, cos, sin), grads)]
        with llmfast.backend(backend):   # (the loops use no llmfast code)
            out = fn(*args)
            diff = [a for a in args if a.requires_grad]
            got = torch.autograd.grad(out, diff, cot.to(out.dtype)) if diff else ()
        runs.append([out.detach()] + [g for g in got])
    ref, same_dtype, mine = runs
    assert len(ref) == len(same_dtype) == len(mine) == 1 + sum(grads)
    atol = ATOL[x.dtype]
    for i, (r, b, m) in enumerate(zip(ref, same_dtype, mine)):
        assert m.dtype == b.dtype, (i, m.dtype, b.dtype)
        err, bound = (m.double() - r).abs().max().item(), 2 * (b.double() - r).abs().max().item() + atol
        assert err <= bound, f"{'out' if i == 0 else f'grad {i}'}: {err:.3g} > {bound:.3g}"
    return mine


FLASH_BACKENDS = BACKENDS + ["torch"]


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_seqlen_offsets(backend, dtype, interleaved):
    B, S, H, D, R = 3, 4, 2, 12, 8          # partial rotary (R < D)
    x = torch.randn(B, S, H, D).to(dtype)
    cos, sin = _flash_angles(S + 5, R, torch.float32)
    for off in (0, 5, torch.tensor([0, 5, 2], dtype=torch.int32), torch.tensor([3, 0, 5])):
        _check_flash(backend, x, cos, sin, interleaved=interleaved, seqlen_offsets=off)
    # per-sequence tables [B, S_ro, R/2] with per-sequence offsets, angles in x's dtype
    cb, sb = _flash_angles(S + 2, R, dtype, batch=B)
    _check_flash(backend, x, cb, sb, interleaved=interleaved, seqlen_offsets=torch.tensor([2, 0, 1]))


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_varlen(backend, dtype, interleaved):
    # segments of 3, 0, 1 and 5 tokens in a buffer of 12: the 3 tokens past cu_seqlens[-1] pass through
    H, D, R = 2, 8, 8
    cu = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    x = torch.randn(12, H, D).to(dtype)
    cos, sin = _flash_angles(9, R, torch.float32)
    for off in (0, 2, torch.tensor([4, 9, 8, 1], dtype=torch.int32)):   # 9 + 0 tokens: an empty segment at the end
        out = _check_flash(backend, x, cos, sin, interleaved=interleaved, seqlen_offsets=off, cu_seqlens=cu,
                           max_seqlen=6)[0]
        assert torch.equal(out[9:], x[9:])
    # partial rotary, per-segment tables, strided x, and no padding (cu_seqlens[-1] == total)
    xs = torch.randn(9, H, 2 * D)[..., 1:1 + D].to(dtype)
    cb, sb = _flash_angles(5, 4, torch.float32, batch=4)
    _check_flash(backend, xs, cb, sb, interleaved=interleaved, cu_seqlens=cu, max_seqlen=5)


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
def test_flash_attn_signature_and_angle_gradients(backend):
    from llmfast.flash_attn import apply_rotary_emb

    assert apply_rotary_emb is LF.rotary_embedding
    x = torch.randn(2, 3, 2, 8)
    cos, sin = _flash_angles(6, 8, torch.float32)
    with llmfast.backend(backend):   # flash-attn's positional order: interleaved, inplace, seqlen_offsets, ...
        got = apply_rotary_emb(x, cos, sin, True, False, 3)
    torch.testing.assert_close(got, _token_loop_ref(x, cos, sin, True, 3))
    # cos/sin that require grad: the torch path, differentiable in them too (offsets and packed)
    _check_flash(backend, x, cos, sin, grads=(True, True, True), seqlen_offsets=torch.tensor([1, 3]))
    _check_flash(backend, x.flatten(0, 1), cos, sin, grads=(True, True, True), interleaved=True,
                 cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32), max_seqlen=3, seqlen_offsets=1)


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
def test_inplace(backend):
    B, S, H, D, R = 2, 3, 2, 10, 6
    cos, sin = _flash_angles(S + 2, R, torch.float32)
    base = torch.randn(B, S, H, D)
    want = _token_loop_ref(base, cos, sin, False, 2)
    with llmfast.backend(backend):
        x = base.clone()
        v = x._version
        out = LF.rotary_embedding(x, cos, sin, False, True, 2)
        assert out is x and x._version > v
        torch.testing.assert_close(x, want)
        # packed, in place: the padding tokens are untouched
        xp = base.flatten(0, 1).clone()
        cu = torch.tensor([0, 1, 4], dtype=torch.int32)
        LF.rotary_embedding(xp, cos, sin, inplace=True, cu_seqlens=cu, max_seqlen=3,
                            seqlen_offsets=torch.tensor([2, 0]))
        torch.testing.assert_close(xp, _token_loop_ref(base.flatten(0, 1), cos, sin, False, [2, 0], cu.tolist()))
        assert torch.equal(xp[4:], base.flatten(0, 1)[4:])

        # gradients through the in-place result (x a non-leaf): the kernels', for x alone
        w = base.clone().requires_grad_()
        y = w * 2
        LF.rotary_embedding(y, cos, sin, True, True, 1)
        (y * base).sum().backward()
        w2 = base.clone().requires_grad_()
        (_token_loop_ref(w2 * 2, cos, sin, True, 1) * base).sum().backward()
        torch.testing.assert_close(w.grad, w2.grad)
        # ... and the torch path's, for x and for cos/sin that require grad
        w = base.clone().requires_grad_()
        c1, s1 = cos.clone().requires_grad_(), sin.clone().requires_grad_()
        y = w * 2
        LF.rotary_embedding(y, c1, s1, inplace=True, seqlen_offsets=torch.tensor([1, 2]))
        (y * base).sum().backward()
    w2, c2, s2 = base.clone().requires_grad_(), cos.clone().requires_grad_(), sin.clone().requires_grad_()
    (_token_loop_ref(w2 * 2, c2, s2, False, [1, 2]) * base).sum().backward()
    for a, b in ((w, w2), (c1, c2), (s1, s2)):
        torch.testing.assert_close(a.grad, b.grad)

    # the version counter: a backward that saved x's old value raises, as after torch's in-place ops
    scale = torch.randn(B, S, H, D, requires_grad=True)
    with llmfast.backend(backend):
        x = torch.randn(B, S, H, D)
        z = x * scale                        # saves x for scale's gradient
        LF.rotary_embedding(x, cos, sin, inplace=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            LF.rotary_embedding(torch.randn(B, S, H, D, requires_grad=True), cos, sin, inplace=True)


def test_offsets_and_cu_seqlens_bad_input():
    x, cos = torch.randn(2, 3, 2, 8), torch.randn(5, 4)
    f = LF.rotary_embedding
    with pytest.raises(ValueError, match=r"seqlen_offsets = 3 .* outside the 5 rows"):
        f(x, cos, cos, seqlen_offsets=3)
    with pytest.raises(ValueError, match="seqlen_offsets = -1"):
        f(x, cos, cos, seqlen_offsets=-1)
    with pytest.raises(ValueError, match=r"seqlen_offsets\[1\] = 3 .* rows 3..5, outside the 5 rows"):
        f(x, cos, cos, seqlen_offsets=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"seqlen_offsets\[0\] = -1"):
        f(x, cos, cos, seqlen_offsets=torch.tensor([-1, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="seqlen_offsets .* int32/int64"):
        f(x, cos, cos, seqlen_offsets=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="seqlen_offsets"):
        f(x, cos, cos, seqlen_offsets=1.0)
    with pytest.raises(ValueError, match=r"seqlen_offsets must have shape \[2\]"):
        f(x, cos, cos, seqlen_offsets=torch.tensor([0, 1, 2]))
    xp, cu = torch.randn(7, 2, 8), torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32"):
        f(xp, cos, cos, cu_seqlens=cu.long(), max_seqlen=3)
    with pytest.raises(RuntimeError, match="more than max_seqlen = 2"):
        f(xp, cos, cos, cu_seqlens=cu, max_seqlen=2)
    with pytest.raises(TypeError, match="max_seqlen"):
        f(xp, cos, cos, cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="beyond the packed buffer"):
        f(xp[:5], cos, cos, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match=r"\[total, H, D\]"):
        f(x, cos, cos, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match=r"S_ro >= 6 \(max_seqlen\)"):   # flash-attn: S_ro >= max_seqlen
        f(xp, cos, cos, cu_seqlens=cu, max_seqlen=6)
    with pytest.raises(ValueError, match=r"seqlen_offsets = 3 .* \(max_seqlen\)"):
        f(xp, cos, cos, cu_seqlens=cu, max_seqlen=3, seqlen_offsets=3)
    # a tensor offset is checked against each segment's own length: segment 1 (3 tokens) at 2..4 fits
    f(xp, cos, cos, cu_seqlens=cu, max_seqlen=4, seqlen_offsets=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"seqlen_offsets\[1\] = 3"):
        f(xp, cos, cos, cu_seqlens=cu, max_seqlen=4, seqlen_offsets=torch.tensor([2, 3]))


@pytest.mark.skipif(not _BUILT, reason="llmfast._C not built")
def test_torch_compile_fullgraph_offsets_and_inplace():
    cos, sin = _flash_angles(8, 8, torch.float32)

    def f(x, offsets):
        a = LF.rotary_embedding(x, cos, sin, seqlen_offsets=2)
        b = LF.rotary_embedding(x, cos, sin, True, seqlen_offsets=offsets)
        c = LF.rotary_embedding(x * 1, cos, sin, inplace=True, seqlen_offsets=1)
        return (a * 2).sum() + b.square().mean() + c.sum()

    x, offsets = torch.randn(2, 5, 3, 8, requires_grad=True), torch.tensor([0, 3])
    with llmfast.backend("cpu"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        compiled(x, offsets).backward()
        got = x.grad.clone()
        x.grad = None
        f(x, offsets).backward()
        torch.testing.assert_close(got, x.grad)
        with pytest.raises(RuntimeError, match="seqlen_offsets out of range"):   # the device-side check
            compiled(x, torch.tensor([0, 4]))
