"""RMSNorm with an optional fused residual add: op registration, autograd, backend choice.

Same canonical problem and registration scheme as llmfast/ops/layer_norm.py:
``input`` [M, N] (unit column stride, any row stride), optional ``residual`` like it,
optional ``weight`` [N] in the input's dtype or float32; the native schemas are
``llmfast::rms_norm_fwd/_bwd`` (cpu, cuda) and the Triton ones
``llmfast::rms_norm_fwd_triton/_bwd_triton`` (``custom_op``, see llmfast/ops/softmax.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, has_native, native
from llmfast.ops._norm import F32_F16_BF16, grad_rows, numel, rows, stat_dtype

backends.register_op(OpSpec("rms_norm", native="llmfast::rms_norm_fwd", dtypes=F32_F16_BF16,
                            cpu_dtypes=F32_F16_BF16 + (torch.float64,)))


def _fwd_fake(input, residual, weight, eps):
    M, N = input.shape
    return (input.new_empty((M, N)), input.new_empty((M, N) if residual is not None else (0,)),
            input.new_empty((M,), dtype=stat_dtype(input.dtype)))


def _bwd_fake(grad_out, grad_summed, x, weight, rstd, weight_grad):
    M, N = x.shape
    return x.new_empty((M, N)), x.new_empty((N if weight_grad else 0,), dtype=stat_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _, summed, rstd = output
    ctx.eps = eps
    ctx.has_res = residual is not None
    ctx.save_for_backward(summed if ctx.has_res else x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_summed, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_r, need_w, _ = ctx.needs_input_grad
        need_w = need_w and weight is not None
        if create_graph():  # double backward ahead: the reference formula, differentiable
            dx, dw = reference.rms_norm_backward(grad_rows(grad_out, x), x, weight, ctx.eps)
            if ctx.has_res and grad_summed is not None:
                dx = dx + grad_summed
            return (dx if need_x else None, dx if (ctx.has_res and need_r) else None,
                    dw.to(weight.dtype) if need_w else None, None)
        ds = grad_rows(grad_summed, x) if (ctx.has_res and grad_summed is not None) else None
        dx, dw = bwd_op(grad_rows(grad_out, x), ds, x, weight, rstd, need_w)
        return (dx if need_x else None, dx if (ctx.has_res and need_r) else None,
                dw.to(weight.dtype) if need_w else None, None)
    return backward


if has_native("rms_norm_fwd"):
    torch.library.register_fake("llmfast::rms_norm_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::rms_norm_bwd")(_bwd_fake)
    torch.library.register_autograd("llmfast::rms_norm_fwd", _make_backward(native("rms_norm_bwd")),
                                    setup_context=_setup_context)


@torch.library.custom_op("llmfast::rms_norm_fwd_triton", mutates_args=())
def rms_norm_fwd_triton(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from llmfast.kernels.rms_norm import rms_norm_fwd
    return rms_norm_fwd(input, residual, weight, eps)


@torch.library.custom_op("llmfast::rms_norm_bwd_triton", mutates_args=())
def rms_norm_bwd_triton(grad_out: Tensor, grad_summed: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                        rstd: Tensor, weight_grad: bool) -> tuple[Tensor, Tensor]:
    from llmfast.kernels.rms_norm import rms_norm_bwd
    return rms_norm_bwd(grad_out, grad_summed, x, weight, rstd, weight_grad)


rms_norm_fwd_triton.register_fake(_fwd_fake)
rms_norm_bwd_triton.register_fake(_bwd_fake)
rms_norm_fwd_triton.register_autograd(_make_backward(rms_norm_bwd_triton), setup_context=_setup_context)


# ----------------------------------------------------------------------------------


def rms_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: float = 1e-6,
             residual: Optional[Tensor] = None):
    """RMSNorm over the trailing ``normalized_shape`` dims of ``x`` (+ ``residual`` first).

    Returns the output, or ``(output, x + residual)`` with a residual. Arguments are
    assumed checked and ``eps`` resolved (``llmfast.nn.functional`` does both); ``weight``
    is in ``x``'s dtype or float32.
    """
    which = backends.resolve("rms_norm", x)
    if which == "torch" or x.numel() == 0:
        return reference.rms_norm(x, normalized_shape, weight, eps, residual=residual)
    N = numel(normalized_shape)
    x2 = rows(x, N)
    r2 = rows(residual, N) if residual is not None else None
    w = weight.reshape(N) if weight is not None else None
    op = rms_norm_fwd_triton if which == "triton" else native("rms_norm_fwd")
    y, s, _ = op(x2, r2, w, float(eps))
    y = y.view(x.shape)
    return y if residual is None else (y, s.view(x.shape))


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def weighted(n, wdtype=None):
        def make(device, dtype):
            return [torch.randn(3, 7, n, device=device).to(dtype), torch.randn(n, device=device).to(wdtype or dtype)]
        return make

    def with_residual(device, dtype):
        return [torch.randn(4, 9, 1000, device=device).to(dtype), torch.randn(4, 9, 1000, device=device).to(dtype),
                torch.randn(1000, device=device).to(dtype)]

    def plain(device, dtype):
        return [torch.randn(5, 6, 16, 24, device=device).to(dtype)]

    return [
        ("rms_norm", weighted(781), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
        ("rms_norm fp32 weight", weighted(512, torch.float32), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
        ("rms_norm residual", with_residual, lambda x, r, w: F.rms_norm(x, (1000,), w, 1e-6, residual=r)),
        ("rms_norm 2-D shape", plain, lambda x: F.rms_norm(x, (16, 24), eps=1e-6)),
        ("rms_norm long row", weighted(10000), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
    ]
