"""RoPE (Hugging Face's apply_rotary_pos_emb on q and k): cases, providers, bytes moved.

Bytes (the minimum traffic, kernels/rope.py; s = bytes per element): forward reads q and k
and writes both outputs, ``2*(Nq + Nk)*s``, plus cos and sin once, ``2*B*S*D*s``; backward
reads and writes the gradients of both, the same again.

Providers: ``torch`` is Hugging Face's eager ``apply_rotary_pos_emb``
(``q * cos + rotate_half(q) * sin`` for q and k; transformers' own function when installed),
``torch_compile`` that function under ``torch.compile``, ``llmfast:<backend>``
``llmfast.nn.functional.apply_rotary_pos_emb``. Inputs are HF's: q [B, Hq, S, D] and k
[B, Hkv, S, D] as transposed views of [B, S, H, D] projections, cos/sin [B, S, D].

Measured with the kernels as landed in b882740 (this 2-core CPU, load average ~8 from other
jobs), one run of ``llmfast bench --op rope --rounds 5 --dtype float32 --dtype bfloat16``,
median ms and the ratio to HF's eager function:

    case      dtype     torch   torch_compile        llmfast:cpu
    fwd       float32   413.1   145.0 (2.85x)     68.7 (6.01x)
    fwd       bfloat16  122.2    50.2 (2.43x)     24.5 (4.99x)
    fwd+bwd   float32   787.8   298.0 (2.64x)    135.3 (5.82x)
    fwd+bwd   bfloat16  486.5   123.0 (3.96x)     56.1 (8.68x)

The forward is at the machine's memory ceiling here: it takes less time than
``q.clone(), k.clone()`` (fp32: 99 vs 112 ms; bf16: 21 vs 42 ms, same load).
"""
import torch

from llmfast import backends
from llmfast.nn import functional as LF

OP = "rope"

# (mode, (B, Hq, Hkv, S, D)): Llama-like (32 query heads, 8 kv heads, head dim 128)
_FULL = [("fwd", (4, 32, 8, 512, 128)), ("fwd+bwd", (4, 32, 8, 512, 128))]
_QUICK = [("fwd", (1, 8, 2, 64, 64)), ("fwd+bwd", (1, 8, 2, 64, 64))]


def cases(quick, device, dtypes):
    return [dict(name=f"{mode} q[{B},{Hq},{S},{D}] k[{B},{Hkv},{S},{D}]", mode=mode, shape=(B, Hq, Hkv, S, D),
                 dtype=dt) for mode, (B, Hq, Hkv, S, D) in (_QUICK if quick else _FULL) for dt in dtypes]


def providers(case, device):
    return ["torch_compile"]


def work(case):
    B, Hq, Hkv, S, D = case["shape"]
    s = torch.tensor([], dtype=case["dtype"]).element_size()
    one_way = 2 * B * S * (Hq + Hkv) * D * s + 2 * B * S * D * s
    return "GB/s", one_way * (2 if case["mode"] == "fwd+bwd" else 1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _hf_eager(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def hf_apply_rotary_pos_emb():
    """transformers' Llama apply_rotary_pos_emb, or the same formula when transformers is absent."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        return _hf_eager
    return apply_rotary_pos_emb


def _wrap(fn, case, device, dtype=None):
    B, Hq, Hkv, S, D = case["shape"]
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = dtype or case["dtype"]

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)
    q, k = rand(B, S, Hq, D).transpose(1, 2), rand(B, S, Hkv, D).transpose(1, 2)
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = (torch.arange(S, dtype=torch.float64)[None, :, None] + torch.randint(0, 4096, (B, 1, 1), generator=g)) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(device=device, dtype=dt), emb.sin().to(device=device, dtype=dt)
    if case["mode"] == "fwd":
        return lambda: fn(q, k, cos, sin)[0]
    q.requires_grad_(True)
    k.requires_grad_(True)
    dq, dk = rand(B, Hq, S, D), rand(B, Hkv, S, D)

    def step():
        return torch.autograd.grad(fn(q, k, cos, sin), (q, k), (dq, dk))[0]
    return step


def setup(provider, case, device):
    if provider == "torch":
        return _wrap(hf_apply_rotary_pos_emb(), case, device)
    if provider == "torch_compile":
        return _wrap(torch.compile(hf_apply_rotary_pos_emb(), dynamic=False), case, device)
    backend = provider.split(":", 1)[1]

    def fn(*args):
        with backends.backend(backend):
            return LF.apply_rotary_pos_emb(*args)
    return _wrap(fn, case, device)


def reference(case, device):
    return _wrap(_hf_eager, case, device, dtype=torch.float64)()


# ----------------------------------------------------------------------------------
# llmfast check


def _angles(x, S, W, per_row):
    """Deterministic angles in x's dtype and device: [B or 1, S, W] at positions 7 + 0..S-1 (+ row)."""
    pos = torch.arange(S, device=x.device, dtype=torch.float64) + 7
    if per_row:
        pos = pos[None, :] + 100 * torch.arange(x.shape[0], device=x.device, dtype=torch.float64)[:, None]
    else:
        pos = pos[None, :]
    return pos[..., None] * (1.0 / 10000.0 ** (torch.arange(W, device=x.device, dtype=torch.float64) / W))


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn). The angles are built
    inside ``fn`` from q's dtype (constants, so the kernels, not the torch path, are checked)."""
    def qk(device, dtype):
        return [torch.randn(2, 37, 6, 96, device=device).to(dtype).transpose(1, 2),
                torch.randn(2, 37, 2, 96, device=device).to(dtype).transpose(1, 2)]

    def x(device, dtype):
        return [torch.randn(3, 29, 5, 80, device=device).to(dtype)]

    def hf(q, k, R):
        f = _angles(q, q.shape[2], R // 2, per_row=True)
        emb = torch.cat((f, f), dim=-1)
        return LF.apply_rotary_pos_emb(q, k, emb.cos().to(q.dtype), emb.sin().to(q.dtype))

    def flash(x, interleaved):
        f = _angles(x, x.shape[1], 32, per_row=False)[0]  # [S, 32]: rotary_dim 64 of 80
        return LF.rotary_embedding(x, f.cos().to(x.dtype), f.sin().to(x.dtype), interleaved=interleaved)

    def flash_at(x, packed):
        # flash-attn's per-sequence seqlen_offsets, and packed sequences (29, 0, 1 and 40 tokens
        # of x's 87, the last 17 padding) with offsets up to the tables' last row (S_ro = 48)
        f = _angles(x, 48, 32, per_row=False)[0]
        c, s = f.cos().to(x.dtype), f.sin().to(x.dtype)
        if not packed:
            return LF.rotary_embedding(x, c, s, seqlen_offsets=torch.tensor([0, 19, 5], device=x.device))
        cu = torch.tensor([0, 29, 29, 30, 70], dtype=torch.int32, device=x.device)
        off = torch.tensor([3, 0, 47, 8], dtype=torch.int32, device=x.device)
        return LF.rotary_embedding(x.flatten(0, 1), c, s, True, cu_seqlens=cu, max_seqlen=40, seqlen_offsets=off)

    return [
        ("rope apply_rotary_pos_emb", qk, lambda q, k: hf(q, k, 96)),
        ("rope apply_rotary_pos_emb partial", qk, lambda q, k: hf(q, k, 32)),
        ("rope rotary_embedding", x, lambda t: flash(t, False)),
        ("rope rotary_embedding interleaved", x, lambda t: flash(t, True)),
        ("rope rotary_embedding seqlen_offsets", x, lambda t: flash_at(t, False)),
        ("rope rotary_embedding cu_seqlens", x, lambda t: flash_at(t, True)),
    ]
