"""cross_entropy (class-index targets): kernel declarations, autograd, backend choice.

The kernels see a canonical problem: ``logits`` [N, C] contiguous, ``target`` [N]
int64, class ``weight`` None or [C] in the accumulation dtype (fp32; fp64 for fp64
logits). They return the per-row loss [N] and log-sum-exp [N, 2] (hi + lo: the rounded
value and its rounding error, so the backward's exp(x - lse) stays accurate at large
|x|), in the accumulation dtype; the reduction over rows ('mean' divides by the sum of
the target weights) is plain torch here, so its autograd hands the kernels' backward a
per-row gradient and the same kernels serve every reduction.

Probability (float) targets are served by the torch reference on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import acc_dtype, create_graph, grads_by_recompute, kernel

REDUCTIONS = ("none", "mean", "sum")


def _fwd_fake(logits, target, weight, ignore_index, label_smoothing):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, 2, dtype=acc)


def _bwd_fake(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, target, weight, lse)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _backward(ctx, bwd, grad_loss, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    if create_graph():  # double backward ahead: differentiate torch's per-row loss instead
        def rows(x):
            return torch.nn.functional.cross_entropy(x.to(lse.dtype), target, weight, ignore_index=ctx.ignore_index,
                                                     reduction="none", label_smoothing=ctx.label_smoothing)
        (grad,) = grads_by_recompute(rows, (logits,), (True,), (grad_loss.to(lse.dtype),))
        return grad.to(logits.dtype), None, None, None, None
    # 'mean'/'sum' hand back an expanded scalar: the kernels want a dense [N] row
    g = grad_loss.to(lse.dtype).contiguous()
    return bwd(g, logits, target, weight, lse, ctx.ignore_index, ctx.label_smoothing), None, None, None, None


_ARGS = "Tensor target, Tensor? weight, int ignore_index, float label_smoothing"
# grad_logits [N, C] (logits dtype) = grad_loss[i] * dloss_i/dlogits[i], recomputing the
# probabilities from (logits, lse [N, 2]) in one pass; grad_loss: [N] accumulation dtype.
cross_entropy_bwd = kernel(
    "cross_entropy_bwd", "(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing) -> Tensor", _bwd_fake, triton="cross_entropy:cross_entropy_bwd")
# One row per token, torch's definition (label smoothing included). logits: [N, C]
# contiguous; target: [N] int64, each in [0, C) or == ignore_index (anything else
# raises); weight: None or [C] in the accumulation dtype. Returns (loss [N], lse [N, 2])
# in the accumulation dtype: loss_i = (1-eps) w_t (lse_i - x_it) + eps/C sum_c w_c
# (lse_i - x_ic) with eps = label_smoothing; lse_i = lse[i, 0] + lse[i, 1] (hi = the
# rounded log-sum-exp, lo = its rounding error). loss and lse are 0 on ignored rows.
cross_entropy_fwd = kernel(
    "cross_entropy_fwd", f"(Tensor logits, {_ARGS}) -> (Tensor, Tensor)", _fwd_fake,
    triton="cross_entropy:cross_entropy_fwd", autograd=(cross_entropy_bwd, _setup_context, _backward))
# cross_entropy_fwd that also overwrites logits with d(sum_i loss_i)/dlogits: the loss
# half of the fused linear + cross-entropy, where a chunk's logits buffer is reused for
# its gradient. CUDA/Triton do not check targets here (the caller does, once).
cross_entropy_fwd_grad = kernel(
    "cross_entropy_fwd_grad", f"(Tensor(a!) logits, {_ARGS}) -> (Tensor, Tensor)", _fwd_fake,
    triton="cross_entropy:cross_entropy_fwd_grad", mutates=("logits",))

_PROB_NOTE = "probability (float) targets run on the torch reference"
backends.register_op(OpSpec("cross_entropy", kernel=cross_entropy_fwd,
                            notes={"triton": _PROB_NOTE, "cuda": _PROB_NOTE, "cpu": _PROB_NOTE}))


def target_weights(target: Tensor, weight: Optional[Tensor], ignore_index: int, dtype: torch.dtype) -> Tensor:
    """[N] weight of each row in a 'mean': w[target] (1 without weights), 0 where ignored."""
    keep = target != ignore_index
    if weight is None:
        return keep.to(dtype)
    return torch.where(keep, weight.to(dtype).gather(0, target.masked_fill(~keep, 0)), 0)


def reduce_rows(loss: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str) -> Tensor:
    """torch's reduction of per-row losses; 'mean' divides by the summed target weights (NaN if all ignored).

    The sums run in float64 and the result is rounded once to ``loss.dtype``: a float32
    ``loss.sum()`` over 64 rows of ~10 was ~2x less accurate than torch's own 'sum' (whose
    nll_loss accumulates more carefully), and the gap grows with the row count. One value
    per row: the float64 pass costs nothing next to the kernel.
    """
    if reduction == "none":
        return loss
    total = loss.sum(dtype=torch.float64)
    if reduction == "mean":
        total = total / target_weights(target, weight, ignore_index, torch.float64).sum()
    return total.to(loss.dtype)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float, out_dtype: torch.dtype) -> Tensor:
    """Cross-entropy of logits ``input`` (classes on dim 1, or [C]) against class indices ``target``.

    Arguments are assumed checked (``llmfast.nn.functional`` does that). Returns the loss
    in ``out_dtype``, shaped like ``target`` for 'none', a scalar otherwise.
    """
    which = backends.resolve("cross_entropy", input)
    if which == "torch":
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    # canonical [N, C] rows: a view for [N, C]; [N, C, d...] moves the classes last (a copy)
    x = input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1)
    x = x.reshape(-1, C).contiguous()
    t = target.reshape(-1).to(torch.int64).contiguous()
    w = None if weight is None else weight.to(acc_dtype(input.dtype)).contiguous()
    loss, _ = cross_entropy_fwd.on(which, x.device.type)(x, t, w, int(ignore_index), float(label_smoothing))
    out = reduce_rows(loss, t, w, ignore_index, reduction).to(out_dtype)
    return out.reshape(target.shape) if reduction == "none" else out
