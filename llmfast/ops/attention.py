"""attention: op registration, autograd and backend choice.

The kernels see a canonical problem: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S,
Dv] with H % Hkv == 0 (GQA), last dims contiguous and any other strides (so packed
QKV views and broadcast batch dims cost no copy), an optional mask viewed as
[B, H, L, S] (bool, or float32 additive; strides 0 where it broadcasts), is_causal
(top-left), dropout_p and a seed. They return out [B, H, L, Dv] and lse [B, H, L]
(fp32). :func:`attention` brings a checked call to that form.

Native kernels (cpu, cuda) are the C++ schemas ``llmfast::attention_fwd/_bwd``; the
Triton kernels are registered here as ``llmfast::attention_fwd_triton/_bwd_triton``
with ``torch.library.custom_op`` rather than ``triton_op``: ``custom_op`` passes
opcheck and ``torch.compile(fullgraph=True)`` under the Triton interpreter (where
``triton_op``'s fake-tensor tracing reads data pointers and fails), so the same tests
hold on CPU and GPU; Inductor treats the fused kernel as opaque, which costs nothing.

lse is returned without gradient (as in flash-attn): the backward formulas take only
grad_out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, grads_by_recompute, has_native, native

_F32_F16_BF16 = (torch.float32, torch.float16, torch.bfloat16)
backends.register_op(OpSpec(
    "attention", native="llmfast::attention_fwd", dtypes=_F32_F16_BF16,
    notes={
        "cpu": "fp16/bf16 computed in fp32; dropout fused (Philox, same mask as triton); "
               "float64 and masks that need a gradient run on torch",
        "triton": "dropout fused (Philox); bf16 dots upcast to fp32 under TRITON_INTERPRET",
        "torch": "reference: materialises the L x S scores",
    }))


# ----------------------------------------------------------------------------------
# Registration: fake impls and autograd for the native schemas, custom ops for Triton


def _fwd_fake(q, k, v, mask, scale, is_causal, dropout_p, seed):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.args = (scale, is_causal, dropout_p, seed)
    ctx.mark_non_differentiable(lse)


def _recompute_backward(ctx, grad_out, q, k, v, mask, scale, is_causal, dropout_p, seed):
    """(dq, dk, dv) with graph, for double backward: the reference (same dropout mask) differentiated."""
    def fn(q_, k_, v_):
        return reference.attention(q_, k_, v_, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                   seed=seed)[0]
    return tuple(grads_by_recompute(fn, (q, k, v), ctx.needs_input_grad[:3], (grad_out,)))


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if create_graph():
            return _recompute_backward(ctx, grad_out, q, k, v, mask, *ctx.args) + (None,) * 5
        dq, dk, dv = bwd_op(grad_out.to(out.dtype).contiguous(), q, k, v, out, lse, mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None
    return backward


if has_native("attention_fwd"):
    torch.library.register_fake("llmfast::attention_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::attention_bwd")(_bwd_fake)
    torch.library.register_autograd("llmfast::attention_fwd", _make_backward(native("attention_bwd")),
                                    setup_context=_setup_context)


@torch.library.custom_op("llmfast::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                         dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    from llmfast.kernels.attention import attention_fwd
    return attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed)


@torch.library.custom_op("llmfast::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float,
                         seed: int) -> tuple[Tensor, Tensor, Tensor]:
    from llmfast.kernels.attention import attention_bwd
    return attention_bwd(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed)


attention_fwd_triton.register_fake(_fwd_fake)
attention_bwd_triton.register_fake(_bwd_fake)
attention_fwd_triton.register_autograd(_make_backward(attention_bwd_triton), setup_context=_setup_context)


# Dropout with a seed drawn inside the call (scaled_dot_product_attention, the module's
# training mode): the seed travels as an int64 scalar tensor, read with .item() only
# inside these ops, so torch.compile(fullgraph=True) traces the draw (torch.randint)
# instead of guarding on a data-dependent Python int, and every call gets a fresh mask.
# The kernels are the same; ``backend`` picks them.


def _kernel_ops(backend: str):
    if backend == "triton":
        return attention_fwd_triton, attention_bwd_triton
    return native("attention_fwd"), native("attention_bwd")


@torch.library.custom_op("llmfast::attention_fwd_seeded", mutates_args=())
def attention_fwd_seeded(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                         dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _kernel_ops(backend)[0](q, k, v, mask, scale, is_causal, dropout_p, int(seed.item()))


@torch.library.custom_op("llmfast::attention_bwd_seeded", mutates_args=())
def attention_bwd_seeded(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float, seed: Tensor,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel_ops(backend)[1](grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, int(seed.item()))


@attention_fwd_seeded.register_fake
def _(q, k, v, mask, scale, is_causal, dropout_p, seed, backend):
    return _fwd_fake(q, k, v, mask, scale, is_causal, dropout_p, 0)


@attention_bwd_seeded.register_fake
def _(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed, backend):
    return _bwd_fake(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, 0)


def _seeded_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.args = (scale, is_causal, dropout_p)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _seeded_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    if create_graph():
        return _recompute_backward(ctx, grad_out, q, k, v, mask, *ctx.args, seed) + (None,) * 6
    dq, dk, dv = attention_bwd_seeded(grad_out.to(out.dtype).contiguous(), q, k, v, out, lse, mask, *ctx.args, seed,
                                      ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd_seeded.register_autograd(_seeded_backward, setup_context=_seeded_setup_context)


# ----------------------------------------------------------------------------------
# Canonical form


def draw_seed() -> Tensor:
    """A dropout seed (int64 scalar tensor) from torch's default CPU generator, so
    ``torch.manual_seed`` fixes it; traceable by torch.compile."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
              is_causal: bool = False, dropout_p: float = 0.0, seed: Optional[int] = None):
    """Fused attention on canonical shapes; returns ``(out [B, H, L, Dv], lse [B, H, L] fp32)``.

    Arguments are assumed checked (``llmfast.nn.functional`` does that): q [B, H, L, D],
    k [B, Hkv, S, D], v [B, Hkv, S, Dv] of one float dtype with H % Hkv == 0; ``mask``
    broadcastable to [B, H, L, S], bool (True = attend) or additive float.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    which = backends.resolve("attention", q)
    if which != "torch" and mask is not None and mask.requires_grad:
        which = "torch"  # the kernels give no gradient for an additive mask; autograd through the reference does
    seed = 0 if seed is None else seed  # an int, or a tensor from draw_seed()
    if which == "torch" or dropout_p >= 1:
        return reference.attention(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                   seed=seed)
    B, H, L, _ = q.shape
    S = k.shape[2]
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.to(torch.float32)  # kernels read additive masks as fp32
        mask = mask.expand(B, H, L, S)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    if isinstance(seed, Tensor):
        return attention_fwd_seeded(q, k, v, mask, scale, bool(is_causal), dropout_p, seed, which)
    return _kernel_ops(which)[0](q, k, v, mask, scale, bool(is_causal), dropout_p, int(seed))


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def qkv(B, H, Hkv, L, S, D, Dv=None):
        def make(device, dtype):
            return [torch.randn(B, H, L, D, device=device).to(dtype),
                    torch.randn(B, Hkv, S, D, device=device).to(dtype),
                    torch.randn(B, Hkv, S, Dv or D, device=device).to(dtype)]
        return make

    def masked(device, dtype):
        q, k, v = qkv(2, 4, 4, 37, 53, 64)(device, dtype)
        m = torch.rand(2, 1, 37, 53, device=device) > 0.3
        m[:, :, 5] = False  # a row that sees no key
        return [q, k, v, m]

    def packed(device, dtype):
        x = torch.randn(2, 45, 3, 4, 40, device=device).to(dtype)
        return [x]

    def flash_packed(x):  # q, k, v as strided views of one [B, L, 3, H, D] tensor
        q, k, v = x.unbind(2)
        return F.flash_attention(q, k, v, causal=True)

    return [
        ("attention", qkv(2, 4, 4, 67, 93, 64), lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        ("attention causal", qkv(1, 4, 4, 130, 130, 64),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("attention gqa 8:2 d=80", qkv(1, 8, 2, 33, 71, 80),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        ("attention mask", masked, lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
        ("attention packed qkv", packed, flash_packed),
        ("attention d=256 L=1", qkv(2, 2, 2, 1, 129, 256),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
    ]
