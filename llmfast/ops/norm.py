"""LayerNorm and RMSNorm (one kernel, ``centered`` or not) with an optional fused residual add.

The kernels see a canonical problem: ``input`` [M, N] (N = prod(normalized_shape),
unit column stride, any row stride), an optional ``residual`` like it, and optional
``weight``/``bias`` [N] in the input's dtype or float32. With a residual the kernel
normalises ``s = input + residual`` (rounded to the input's dtype) and also returns
``s``: the pre-norm Transformer block's ``h = h + f(h); y = norm(h)`` in one pass.

LayerNorm is the ``centered`` norm: ``(s - mean) * rstd * w + b`` with ``rstd =
1/sqrt(var + eps)``; RMSNorm is ``s * rstd * w`` with ``rstd = 1/sqrt(mean(s^2) +
eps)``, no bias and no mean. One kernel per language serves both, the switch a
compile-time constant.

Backward saves the normalised tensor (input, or ``summed``), weight, mean and rstd; the
gradient reaching ``summed`` is added to grad_input inside the backward kernel, and
that sum is also the residual's gradient. Weight/bias gradients come back in the
accumulation dtype (two-stage deterministic sums) and are cast to the parameters'
dtypes here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import acc_dtype, create_graph, kernel


def _fwd_fake(input, residual, weight, bias, eps, centered):
    M, N = input.shape
    st = acc_dtype(input.dtype)
    return (input.new_empty((M, N)), input.new_empty((M, N) if residual is not None else (0,)),
            input.new_empty((M if centered else 0,), dtype=st), input.new_empty((M,), dtype=st))


def _bwd_fake(grad_out, grad_summed, x, weight, mean, rstd, centered, weight_grad, bias_grad):
    M, N = x.shape
    st = acc_dtype(x.dtype)
    return (x.new_empty((M, N)), x.new_empty((N if weight_grad else 0,), dtype=st),
            x.new_empty((N if bias_grad else 0,), dtype=st))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, centered = inputs
    _, summed, mean, rstd = output
    ctx.eps, ctx.centered = eps, centered
    ctx.has_res = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(summed if ctx.has_res else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _grad_rows(g, like: Tensor):
    """An incoming gradient ([M, N]) in the layout the kernels take; zeros when autograd passes None."""
    if g is None:
        return torch.zeros_like(like)
    return g if (g.shape[1] <= 1 or g.stride(1) == 1) else g.contiguous()


def _backward(ctx, bwd, grad_out, grad_summed, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b, _, _ = ctx.needs_input_grad
    need_w = need_w and weight is not None
    need_b = need_b and ctx.bias_dtype is not None
    g = _grad_rows(grad_out, x)
    if create_graph():  # double backward ahead: the reference formula, differentiable
        dx, dw = reference.norm_backward(g, x, weight, ctx.eps, ctx.centered)
        if ctx.has_res and grad_summed is not None:
            dx = dx + grad_summed
        db = g.sum(0) if need_b else None
    else:
        ds = _grad_rows(grad_summed, x) if (ctx.has_res and grad_summed is not None) else None
        dx, dw, db = bwd(g, ds, x, weight, mean, rstd, ctx.centered, need_w, need_b)
    return (dx if need_x else None, dx if (ctx.has_res and need_r) else None,
            dw.to(weight.dtype) if need_w else None, db.to(ctx.bias_dtype) if need_b else None, None, None)


# x: the tensor the forward normalised (input, or summed). grad_summed: the gradient
# reaching `summed`, added to grad_input (it is also the residual's gradient). Returns
# (grad_input [M, N] in x's dtype, grad_weight [N], grad_bias [N]); the last two in the
# accumulation dtype, summed over rows deterministically (per-block partial sums, then
# one ordered sum), and empty unless weight_grad / bias_grad.
norm_bwd = kernel(
    "norm_bwd", "(Tensor grad_out, Tensor? grad_summed, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
    "bool centered, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)", _bwd_fake,
    triton="norm:norm_bwd")
# input: [M, N], unit column stride, any row stride. residual: None or [M, N] of input's
# dtype; with it the kernels normalise s = input + residual rounded to input's dtype (so
# the output is exactly the norm of the returned s) and return s as `summed`, else an
# empty tensor. weight/bias: None or [N], input's dtype or float32 (bias only when
# centered). mean ([M], empty unless centered) and rstd ([M]) in the accumulation dtype.
norm_fwd = kernel(
    "norm_fwd", "(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool centered) "
    "-> (Tensor out, Tensor summed, Tensor mean, Tensor rstd)", _fwd_fake, triton="norm:norm_fwd",
    autograd=(norm_bwd, _setup_context, _backward))


def _add_fake(input, residual, out, weight, bias, eps, centered):
    return None


# The in-place variant for inference loops (vLLM's fused_add_rms_norm contract): with a
# residual, residual <- input + residual (rounded to the dtype) and out <- norm(residual);
# without one, out <- norm(input). out=None writes the output over input. Every tensor is
# [M, N] rows (unit column stride, any row stride); out never overlaps residual (checked
# above the kernel). No statistics, no allocation, no autograd (llmfast.ops.norm.norm_
# routes differentiable calls to torch's in-place ops instead).
norm_add_ = kernel(
    "norm_add_", "(Tensor(a!) input, Tensor(b!)? residual, Tensor(c!)? out, Tensor? weight, Tensor? bias, "
    "float eps, bool centered) -> ()", _add_fake, triton="norm:norm_add_", mutates=("input", "residual", "out"))

for _name in ("layer_norm", "rms_norm"):
    backends.register_op(OpSpec(_name, kernel=norm_fwd))


def _rows(t: Tensor, N: int) -> Tensor:
    """``t`` as [M, N] with unit column stride: a view when the layout allows, else a copy.

    The kernels take any row stride, so a slice like ``x[..., :N]`` of a wider tensor
    is read in place.
    """
    t2 = t.reshape(-1, N)
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _param(t: Optional[Tensor], N: int) -> Optional[Tensor]:
    """A weight/bias as the kernels read it: [N], dense. An expanded parameter (stride 0, as
    ``w.expand(N)``) is copied: the Triton kernel read N elements past a 1-element one."""
    return None if t is None else t.reshape(N).contiguous()


def _norm(op, x, normalized_shape, weight, bias, eps, residual, centered):
    which = backends.resolve(op, x)
    if which == "torch" or x.numel() == 0:
        if centered:
            return reference.layer_norm(x, normalized_shape, weight, bias, eps, residual=residual)
        return reference.rms_norm(x, normalized_shape, weight, eps, residual=residual)
    N = math.prod(normalized_shape)
    r2 = _rows(residual, N) if residual is not None else None
    w, b = _param(weight, N), _param(bias, N)
    y, s, _, _ = norm_fwd.on(which, x.device.type)(_rows(x, N), r2, w, b, float(eps), centered)
    y = y.view(x.shape)
    return y if residual is None else (y, s.view(x.shape))


def _rows_view(t: Tensor, N: int) -> Optional[Tensor]:
    """``t`` as [M, N] rows sharing its memory (unit column stride), or None when no view exists."""
    try:
        t2 = t.view(-1, N)
    except RuntimeError:
        return None
    return t2 if (N <= 1 or t2.stride(1) == 1) else None


def _rms_defaults(x: Tensor, weight: Optional[Tensor], eps: Optional[float]):
    """torch's rms_norm defaults: eps = the math dtype's epsilon; a weight in a third dtype read as float32."""
    math_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if eps is None:
        # not finfo(bfloat16).eps = 2^-7, which would swamp the mean square of small rows
        eps = torch.finfo(math_dtype).eps
    if weight is not None and weight.dtype not in (x.dtype, math_dtype):
        weight = weight.to(math_dtype)
    return weight, eps


def norm_(op: str, x: Tensor, normalized_shape, weight, bias, eps, residual, out, centered):
    """The in-place norm: ``residual += x`` (if given), then ``out`` (default ``x``) = norm of it.

    Returns ``out`` (``x`` when None), or ``(out, residual)`` with a residual. Arguments are
    assumed checked (``llmfast.nn.functional`` does that). With autograd recording, or a
    layout no kernel can write in place, it runs torch's differentiable in-place ops.
    """
    dst = x if out is None else out
    N = math.prod(normalized_shape)
    which = backends.resolve(op, x)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias))
    views = [_rows_view(t, N) if t is not None else None for t in (x, residual, out)]
    if which == "torch" or grads or x.numel() == 0 or any(v is None and t is not None
                                                           for v, t in zip(views, (x, residual, out))):
        s = x if residual is None else residual.add_(x)
        dst.copy_(reference.layer_norm(s, normalized_shape, weight, bias, eps) if centered
                  else reference.rms_norm(s, normalized_shape, weight, eps))
    else:
        w, b = _param(weight, N), _param(bias, N)
        norm_add_.on(which, x.device.type)(views[0], views[1], views[2], w, b, float(eps), centered)
    return dst if residual is None else (dst, residual)


def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, residual: Optional[Tensor] = None):
    """LayerNorm over the trailing ``normalized_shape`` dims of ``x`` (+ ``residual`` first).

    Returns the output, or ``(output, x + residual)`` with a residual. Arguments are
    assumed checked (``llmfast.nn.functional`` does that).
    """
    return _norm("layer_norm", x, normalized_shape, weight, bias, eps, residual, True)


def rms_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None,
             residual: Optional[Tensor] = None):
    """RMSNorm over the trailing ``normalized_shape`` dims of ``x`` (+ ``residual`` first).

    Returns the output, or ``(output, x + residual)`` with a residual. Arguments are
    assumed checked (``llmfast.nn.functional`` does that). ``eps=None`` is torch's
    default, the epsilon of the math dtype (float32's for fp16/bf16 inputs); a weight
    in another dtype than ``x`` is read as float32 for fp16/bf16 inputs (the cast is
    differentiable, so its gradient arrives in the weight's own dtype).
    """
    if x.is_complex():
        return reference.rms_norm(x, normalized_shape, weight, eps, residual=residual)
    weight, eps = _rms_defaults(x, weight, eps)
    return _norm("rms_norm", x, normalized_shape, weight, None, eps, residual, False)


def layer_norm_(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5, *, residual=None, out=None):
    """In-place LayerNorm (see :func:`norm_`)."""
    return norm_("layer_norm", x, normalized_shape, weight, bias, eps, residual, out, True)


def rms_norm_(x: Tensor, normalized_shape, weight=None, eps: Optional[float] = None, *, residual=None, out=None):
    """In-place RMSNorm (see :func:`norm_`), with torch's eps and weight-dtype defaults."""
    weight, eps = _rms_defaults(x, weight, eps)
    return norm_("rms_norm", x, normalized_shape, weight, None, eps, residual, out, False)
