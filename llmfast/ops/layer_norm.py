"""LayerNorm with an optional fused residual add: op registration, autograd, backend choice.

The kernels see a canonical problem: ``input`` [M, N] (N = prod(normalized_shape),
unit column stride, any row stride), an optional ``residual`` like it, and optional
``weight``/``bias`` [N] in the input's dtype or float32. With a residual the kernel
normalises ``s = input + residual`` (rounded to the input's dtype) and also returns
``s``: the pre-norm Transformer block's ``h = h + f(h); y = norm(h)`` in one pass.

Native kernels (cpu, cuda) are the C++ schemas ``llmfast::layer_norm_fwd/_bwd``; the
Triton kernels are ``llmfast::layer_norm_fwd_triton/_bwd_triton`` registered with
``torch.library.custom_op`` for the reason given in llmfast/ops/softmax.py (opcheck and
``torch.compile(fullgraph=True)`` hold under the Triton interpreter too; a single fused
kernel loses nothing by being opaque to Inductor).

Backward saves the normalised tensor (input, or ``summed``), weight, mean and rstd; the
gradient reaching ``summed`` is added to grad_input inside the backward kernel, and
that sum is also the residual's gradient. Weight/bias gradients come back in fp32
(two-stage deterministic sums) and are cast to the parameters' dtypes here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, has_native, native
from llmfast.ops._norm import F32_F16_BF16, grad_rows, numel, rows, stat_dtype

backends.register_op(OpSpec("layer_norm", native="llmfast::layer_norm_fwd", dtypes=F32_F16_BF16,
                            cpu_dtypes=F32_F16_BF16 + (torch.float64,)))


# ----------------------------------------------------------------------------------
# Registration: fake impls and autograd for the native schemas, custom ops for Triton


def _fwd_fake(input, residual, weight, bias, eps):
    M, N = input.shape
    st = stat_dtype(input.dtype)
    return (input.new_empty((M, N)), input.new_empty((M, N) if residual is not None else (0,)),
            input.new_empty((M,), dtype=st), input.new_empty((M,), dtype=st))


def _bwd_fake(grad_out, grad_summed, x, weight, mean, rstd, weight_grad, bias_grad):
    M, N = x.shape
    st = stat_dtype(x.dtype)
    return (x.new_empty((M, N)), x.new_empty((N if weight_grad else 0,), dtype=st),
            x.new_empty((N if bias_grad else 0,), dtype=st))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, summed, mean, rstd = output
    ctx.eps = eps
    ctx.has_res = residual is not None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(summed if ctx.has_res else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_summed, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_r, need_w, need_b, _ = ctx.needs_input_grad
        need_w = need_w and weight is not None
        need_b = need_b and ctx.has_bias
        if create_graph():  # double backward ahead: the reference formula, differentiable
            g = grad_rows(grad_out, x)
            dx, dw = reference.layer_norm_backward(g, x, weight, ctx.eps)
            if ctx.has_res and grad_summed is not None:
                dx = dx + grad_summed
            db = g.sum(0).to(ctx.bias_dtype) if need_b else None
            return (dx if need_x else None, dx if (ctx.has_res and need_r) else None,
                    dw.to(weight.dtype) if need_w else None, db, None)
        ds = grad_rows(grad_summed, x) if (ctx.has_res and grad_summed is not None) else None
        dx, dw, db = bwd_op(grad_rows(grad_out, x), ds, x, weight, mean, rstd, need_w, need_b)
        return (dx if need_x else None, dx if (ctx.has_res and need_r) else None,
                dw.to(weight.dtype) if need_w else None, db.to(ctx.bias_dtype) if need_b else None, None)
    return backward


if has_native("layer_norm_fwd"):
    torch.library.register_fake("llmfast::layer_norm_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::layer_norm_bwd")(_bwd_fake)
    torch.library.register_autograd("llmfast::layer_norm_fwd", _make_backward(native("layer_norm_bwd")),
                                    setup_context=_setup_context)


@torch.library.custom_op("llmfast::layer_norm_fwd_triton", mutates_args=())
def layer_norm_fwd_triton(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                          bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from llmfast.kernels.layer_norm import layer_norm_fwd
    return layer_norm_fwd(input, residual, weight, bias, eps)


@torch.library.custom_op("llmfast::layer_norm_bwd_triton", mutates_args=())
def layer_norm_bwd_triton(grad_out: Tensor, grad_summed: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                          mean: Tensor, rstd: Tensor, weight_grad: bool,
                          bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from llmfast.kernels.layer_norm import layer_norm_bwd
    return layer_norm_bwd(grad_out, grad_summed, x, weight, mean, rstd, weight_grad, bias_grad)


layer_norm_fwd_triton.register_fake(_fwd_fake)
layer_norm_bwd_triton.register_fake(_bwd_fake)
layer_norm_fwd_triton.register_autograd(_make_backward(layer_norm_bwd_triton), setup_context=_setup_context)


# ----------------------------------------------------------------------------------


def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, residual: Optional[Tensor] = None):
    """LayerNorm over the trailing ``normalized_shape`` dims of ``x`` (+ ``residual`` first).

    Returns the output, or ``(output, x + residual)`` with a residual. Arguments are
    assumed checked (``llmfast.nn.functional`` does that).
    """
    which = backends.resolve("layer_norm", x)
    if which == "torch" or x.numel() == 0:
        return reference.layer_norm(x, normalized_shape, weight, bias, eps, residual=residual)
    N = numel(normalized_shape)
    x2 = rows(x, N)
    r2 = rows(residual, N) if residual is not None else None
    w = weight.reshape(N) if weight is not None else None
    b = bias.reshape(N) if bias is not None else None
    op = layer_norm_fwd_triton if which == "triton" else native("layer_norm_fwd")
    y, s, _, _ = op(x2, r2, w, b, float(eps))
    y = y.view(x.shape)
    return y if residual is None else (y, s.view(x.shape))


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def affine(n, wdtype=None):
        def make(device, dtype):
            wd = wdtype or dtype
            return [torch.randn(3, 7, n, device=device).to(dtype), torch.randn(n, device=device).to(wd),
                    torch.randn(n, device=device).to(wd)]
        return make

    def with_residual(device, dtype):
        return [torch.randn(4, 9, 1000, device=device).to(dtype), torch.randn(4, 9, 1000, device=device).to(dtype),
                torch.randn(1000, device=device).to(dtype), torch.randn(1000, device=device).to(dtype)]

    def plain(device, dtype):
        return [torch.randn(5, 6, 16, 24, device=device).to(dtype) * 3 + 100]

    return [
        ("layer_norm", affine(781), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
        ("layer_norm fp32 params", affine(512, torch.float32), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
        ("layer_norm residual", with_residual, lambda x, r, w, b: F.layer_norm(x, (1000,), w, b, residual=r)),
        ("layer_norm 2-D shape", plain, lambda x: F.layer_norm(x, (16, 24))),
        ("layer_norm long row", affine(10000), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
    ]
