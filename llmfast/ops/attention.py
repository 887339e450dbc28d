"""attention: kernel declarations, autograd, backend choice and the canonical form.

The kernels see a canonical problem: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S,
Dv] with H % Hkv == 0 (GQA), last dims contiguous and any other strides (so packed
QKV views and broadcast batch dims cost no copy), an optional mask viewed as
[B, H, L, S] (bool, or float32 additive; strides 0 where it broadcasts), is_causal
(top-left), dropout_p and a seed. They return out [B, H, L, Dv] and lse [B, H, L]
(fp32). :func:`attention` brings a checked call to that form.

lse is returned without gradient (as in flash-attn): the backward formulas take only
grad_out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, grads_by_recompute, kernel


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


def _backward(ctx, bwd, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if create_graph():
        return _recompute_backward(ctx, grad_out, q, k, v, mask, *ctx.args) + (None,) * 5
    dq, dk, dv = bwd(grad_out.to(out.dtype).contiguous(), q, k, v, out, lse, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


# Returns (dq, dk, dv) shaped like q, k, v (dk/dv summed over each GQA group).
attention_bwd = kernel(
    "attention_bwd", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
    "float scale, bool is_causal, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)", _bwd_fake,
    triton="attention:attention_bwd")
# softmax(q k^T * scale + mask) v, tile by tile with an online softmax. q: [B, H, L, D],
# k: [B, Hkv, S, D], v: [B, Hkv, S, Dv]; H % Hkv == 0 (GQA: query head h reads kv head
# h / (H / Hkv)). Last dims contiguous, other strides free. mask: None, or bool (True =
# attend) / float32 (additive) viewed as [B, H, L, S] with any strides. is_causal keeps
# key j <= query i (top-left, torch.tril). dropout_p > 0 drops probabilities with a
# counter-based RNG keyed by `seed`, so backward regenerates the same mask. The draw is
# the same on every backend: element (b, h, i, j) is kept iff word 0 of Philox4x32-10
# with counter (j, i, b*H + h, 0) and key (seed & 0xffffffff, seed >> 32) is >=
# floor(dropout_p * 2^32) (uint32 compare), and kept probabilities are scaled by
# 1 / (1 - dropout_p); lse is that of the undropped softmax (reference.dropout_keep is
# the executable spec). Callers handle dropout_p >= 1. Returns out [B, H, L, Dv]
# (contiguous, input dtype) and lse [B, H, L] (float32; -inf for a row with no visible
# key, whose out is zeros and whose gradients are zero).
attention_fwd = kernel(
    "attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, float dropout_p, "
    "int seed) -> (Tensor, Tensor)", _fwd_fake, triton="attention:attention_fwd",
    autograd=(attention_bwd, _setup_context, _backward))

backends.register_op(OpSpec(
    "attention", kernel=attention_fwd, cpu_dtypes=None,
    notes={
        "cpu": "fp16/bf16 computed in fp32; dropout fused (Philox, same mask as triton); "
               "float64 and masks that need a gradient run on torch",
        "triton": "dropout fused (Philox); bf16 dots upcast to fp32 under TRITON_INTERPRET",
        "torch": "reference: materialises the L x S scores",
    }))


# Dropout with a seed drawn inside the call (scaled_dot_product_attention, the module's
# training mode): the seed travels as an int64 scalar tensor, read with .item() only
# inside these ops, so torch.compile(fullgraph=True) traces the draw (torch.randint)
# instead of guarding on a data-dependent Python int, and every call gets a fresh mask.
# The kernels are the same; ``backend`` picks them.


@torch.library.custom_op("llmfast::attention_fwd_seeded", mutates_args=())
def attention_fwd_seeded(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                         dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return attention_fwd.on(backend, q.device.type)(q, k, v, mask, scale, is_causal, dropout_p, int(seed.item()))


@torch.library.custom_op("llmfast::attention_bwd_seeded", mutates_args=())
def attention_bwd_seeded(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float, seed: Tensor,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return attention_bwd.on(backend, q.device.type)(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p,
                                                    int(seed.item()))


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
    return attention_fwd.on(which, q.device.type)(q, k, v, mask, scale, bool(is_causal), dropout_p, int(seed))

