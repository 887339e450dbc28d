"""softmax / log_softmax: op registration, autograd and backend choice.

The kernels see a canonical problem: ``input`` [A, B, L, N] contiguous, softmax
over N, an optional mask viewed as [A, B, L, N] (bool, or float32 additive) with
strides 0 where it broadcasts, and ``is_causal`` over (L, N). :func:`softmax`
brings any call (any dim, any rank, any broadcast mask) to that form without
copying the input when it is already contiguous along ``dim``.

Native kernels (cpu, cuda) are the C++ schemas ``llmfast::softmax_fwd/_bwd``; the
Triton kernels are registered here as ``llmfast::softmax_fwd_triton/_bwd_triton``
with ``torch.library.custom_op`` rather than ``triton_op``: ``custom_op`` passes
opcheck and ``torch.compile(fullgraph=True)`` under the Triton interpreter (where
``triton_op``'s fake-tensor tracing reads data pointers and fails), so the same
tests hold on CPU and GPU; Inductor treats the kernel as opaque, which costs
nothing for a single fused kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, has_native, native

_F32_F16_BF16 = (torch.float32, torch.float16, torch.bfloat16)
for _name in ("softmax", "log_softmax"):
    backends.register_op(OpSpec(_name, native="llmfast::softmax_fwd", dtypes=_F32_F16_BF16,
                                cpu_dtypes=_F32_F16_BF16 + (torch.float64,)))


# ----------------------------------------------------------------------------------
# Registration: fake impls and autograd for the native schemas, custom ops for Triton


def _fwd_fake(input, scale, mask, is_causal, log):
    return torch.empty_like(input)


def _bwd_fake(grad_out, out, scale, log, masked):
    return torch.empty_like(out)


def _setup_context(ctx, inputs, output):
    _, scale, mask, is_causal, log = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.log, ctx.masked = scale, log, mask is not None or is_causal


def _make_backward(bwd_op):
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        if create_graph():  # double backward ahead: the same formula in differentiable torch ops
            return reference.softmax_backward(grad, out, ctx.scale, ctx.log, ctx.masked), None, None, None, None
        grad_in = bwd_op(grad.to(out.dtype).contiguous(), out, ctx.scale, ctx.log, ctx.masked)
        return grad_in, None, None, None, None
    return backward


if has_native("softmax_fwd"):
    torch.library.register_fake("llmfast::softmax_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::softmax_bwd")(_bwd_fake)
    torch.library.register_autograd("llmfast::softmax_fwd", _make_backward(native("softmax_bwd")),
                                    setup_context=_setup_context)


@torch.library.custom_op("llmfast::softmax_fwd_triton", mutates_args=())
def softmax_fwd_triton(input: Tensor, scale: float, mask: Optional[Tensor], is_causal: bool, log: bool) -> Tensor:
    from llmfast.kernels.softmax import softmax_fwd
    return softmax_fwd(input, scale, mask, is_causal, log)


@torch.library.custom_op("llmfast::softmax_bwd_triton", mutates_args=())
def softmax_bwd_triton(grad_out: Tensor, out: Tensor, scale: float, log: bool, masked: bool) -> Tensor:
    from llmfast.kernels.softmax import softmax_bwd
    return softmax_bwd(grad_out, out, scale, log, masked)


softmax_fwd_triton.register_fake(_fwd_fake)
softmax_bwd_triton.register_fake(_bwd_fake)
softmax_fwd_triton.register_autograd(_make_backward(softmax_bwd_triton), setup_context=_setup_context)


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
    op = softmax_fwd_triton if which == "triton" else native("softmax_fwd")
    y = op(x4, 1.0 if scale is None else float(scale), m4, is_causal, log)
    return y.reshape(x.movedim(dim, -1).shape).movedim(-1, dim)


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def rows(device, dtype):
        return [torch.randn(2, 3, 9, 781, device=device).to(dtype)]

    def masked(device, dtype):
        x = torch.randn(2, 4, 9, 211, device=device).to(dtype)
        return [x, torch.rand(2, 1, 9, 211, device=device) > 0.3]

    return [
        ("softmax", rows, lambda x: F.softmax(x, -1)),
        ("softmax dim=1", rows, lambda x: F.softmax(x, 1)),
        ("softmax scale+mask", masked, lambda x, m: F.softmax(x, -1, scale=0.3, mask=m)),
        ("softmax causal", rows, lambda x: F.softmax(x, -1, is_causal=True)),
        ("log_softmax", rows, lambda x: F.log_softmax(x, -1)),
        ("log_softmax scale+mask", masked, lambda x, m: F.log_softmax(x, -1, scale=0.3, mask=m)),
    ]
