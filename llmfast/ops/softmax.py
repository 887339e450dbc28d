"""softmax / log_softmax: kernel declarations, autograd and the canonical form.

The kernels see a canonical problem: ``input`` [A, B, L, N] contiguous, softmax
over N, an optional mask viewed as [A, B, L, N] (bool, or float32 additive) with
strides 0 where it broadcasts, and ``is_causal`` over (L, N). :func:`softmax`
brings any call (any dim, any rank, any broadcast mask) to that form without
copying the input when it is already contiguous along ``dim``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, kernel


def _fwd_fake(input, scale, mask, is_causal, log):
    return torch.empty_like(input)


def _bwd_fake(grad_out, out, scale, log, masked):
    return torch.empty_like(out)


def _setup_context(ctx, inputs, output):
    _, scale, mask, is_causal, log = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.log, ctx.masked = scale, log, mask is not None or is_causal


def _backward(ctx, bwd, grad):
    (out,) = ctx.saved_tensors
    if create_graph():  # double backward ahead: the same formula in differentiable torch ops
        grad_in = reference.softmax_backward(grad, out, ctx.scale, ctx.log, ctx.masked)
    else:
        grad_in = bwd(grad.to(out.dtype).contiguous(), out, ctx.scale, ctx.log, ctx.masked)
    return grad_in, None, None, None, None


# grad_input from (grad_out, out); `masked` says positions at -inf / fully masked rows
# came from a mask and get zero gradient.
softmax_bwd = kernel("softmax_bwd", "(Tensor grad_out, Tensor out, float scale, bool log, bool masked) -> Tensor",
                     _bwd_fake, triton="softmax:softmax_bwd")
# softmax / log_softmax over the last dim of input [A, B, L, N] (contiguous). mask: None,
# or bool (True = keep) / float32 (additive) viewed as [A, B, L, N] with any strides (0
# for broadcast dims). is_causal keeps column j <= row l.
softmax_fwd = kernel("softmax_fwd", "(Tensor input, float scale, Tensor? mask, bool is_causal, bool log) -> Tensor",
                     _fwd_fake, triton="softmax:softmax_fwd", autograd=(softmax_bwd, _setup_context, _backward))

for _name in ("softmax", "log_softmax"):
    backends.register_op(OpSpec(_name, kernel=softmax_fwd))


# ----------------------------------------------------------------------------------
# Canonical form


def _merge_lead(sizes, strides):
    """Merge adjacent leading dims whose mask strides allow a single stride."""
    out = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out and out[-1][1] == stride * size:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out


def _canonical(x: Tensor, mask: Optional[Tensor]):
    """x [..., L, N] contiguous -> x4 [A, B, L, N]; mask (expanded to x) -> matching view."""
    L, N = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    if mask is None:
        return x.reshape(1, math.prod(lead), L, N), None
    groups = _merge_lead(lead, mask.stride()[:len(lead)])
    if len(groups) > 2:  # rare: a mask broadcast in a pattern that no 2 strides express
        mask = mask.contiguous()
        groups = _merge_lead(lead, mask.stride()[:len(lead)])
    groups = [(1, 0)] * (2 - len(groups)) + groups
    (A, _), (B, _) = groups
    # the merged dims have compatible strides, so this reshape is a view (no copy)
    return x.reshape(A, B, L, N), mask.reshape(A, B, L, N)


def softmax(x: Tensor, dim: int, *, scale: Optional[float] = None, mask: Optional[Tensor] = None,
            is_causal: bool = False, log: bool = False) -> Tensor:
    """Fused (log-)softmax over ``dim`` of ``x * scale`` with ``mask``/``is_causal``.

    Arguments are assumed checked (``llmfast.nn.functional`` does that); ``mask`` is
    broadcastable to ``x``; ``x`` is floating point.
    """
    which = backends.resolve("log_softmax" if log else "softmax", x)
    if which == "torch":
        return reference.softmax(x, dim, scale=scale, mask=mask, is_causal=is_causal, log=log)
    ndim = x.dim()
    if ndim == 0:
        return softmax(x.reshape(1), 0, scale=scale, mask=None if mask is None else mask.reshape(1),
                       is_causal=is_causal, log=log).reshape(())
    dim = dim % ndim
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(torch.float32)  # kernels read additive masks as fp32
    if is_causal and (ndim < 2 or dim != ndim - 1):
        # The causal mask lives on the last two dims; softmax runs elsewhere. Spell it out.
        if ndim < 2:
            raise ValueError("softmax: is_causal needs an input with at least 2 dims")
        keep = reference.causal_keep(x.shape[-2], x.shape[-1], x.device)
        mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                          else mask.masked_fill(~keep, float("-inf")))
        is_causal = False
    if mask is not None:
        mask = mask.expand(x.shape).movedim(dim, -1)
    xt = x.movedim(dim, -1).contiguous()
    if xt.dim() == 1:
        xt = xt.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    x4, m4 = _canonical(xt, mask)
    y = softmax_fwd.on(which, x.device.type)(x4, 1.0 if scale is None else float(scale), m4, is_causal, log)
    return y.reshape(x.movedim(dim, -1).shape).movedim(-1, dim)
