"""cross_entropy (class-index targets): op registration, autograd and backend choice.

The kernels see a canonical problem: ``logits`` [N, C] contiguous, ``target`` [N]
int64, class ``weight`` None or [C] in the accumulation dtype (fp32; fp64 for fp64
logits). They return the per-row loss [N] and log-sum-exp [N, 2] (hi + lo: the rounded
value and its rounding error, so the backward's exp(x - lse) stays accurate at large
|x|), in the accumulation dtype; the reduction over rows ('mean' divides by the sum of the target weights) is
plain torch here, so its autograd hands the kernels' backward a per-row gradient and
the same kernels serve every reduction.

Native kernels (cpu, cuda) are the C++ schemas ``llmfast::cross_entropy_fwd/_bwd``;
the Triton kernels are registered as ``llmfast::cross_entropy_fwd_triton/_bwd_triton``
with ``torch.library.custom_op`` rather than ``triton_op``, as for softmax: custom_op
passes opcheck and ``torch.compile(fullgraph=True)`` under the Triton interpreter,
which ``triton_op`` does not (its fake tracing reads data pointers); Inductor treats
the single fused kernel as opaque, which costs nothing.

Probability (float) targets are served by the torch reference on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, grads_by_recompute, has_native, native

_F32_F16_BF16 = (torch.float32, torch.float16, torch.bfloat16)
_PROB_NOTE = "probability (float) targets run on the torch reference"
backends.register_op(OpSpec("cross_entropy", native="llmfast::cross_entropy_fwd", dtypes=_F32_F16_BF16,
                            cpu_dtypes=_F32_F16_BF16 + (torch.float64,),
                            notes={"triton": _PROB_NOTE, "cuda": _PROB_NOTE, "cpu": _PROB_NOTE}))

REDUCTIONS = ("none", "mean", "sum")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (and loss/lse) dtype for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------
# Registration: fake impls and autograd for the native schemas, custom ops for Triton


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


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, _grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        if create_graph():  # double backward ahead: differentiate torch's per-row loss instead
            def rows(x):
                return torch.nn.functional.cross_entropy(x.to(lse.dtype), target, weight, ignore_index=ctx.ignore_index,
                                                         reduction="none", label_smoothing=ctx.label_smoothing)
            (grad,) = grads_by_recompute(rows, (logits,), (True,), (grad_loss.to(lse.dtype),))
            return grad.to(logits.dtype), None, None, None, None
        # 'mean'/'sum' hand back an expanded scalar: the kernels want a dense [N] row
        g = grad_loss.to(lse.dtype).contiguous()
        grad = bwd_op(g, logits, target, weight, lse, ctx.ignore_index, ctx.label_smoothing)
        return grad, None, None, None, None
    return backward


if has_native("cross_entropy_fwd"):
    torch.library.register_fake("llmfast::cross_entropy_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::cross_entropy_bwd")(_bwd_fake)
    torch.library.register_fake("llmfast::cross_entropy_fwd_grad")(_fwd_fake)
    torch.library.register_autograd("llmfast::cross_entropy_fwd", _make_backward(native("cross_entropy_bwd")),
                                    setup_context=_setup_context)


@torch.library.custom_op("llmfast::cross_entropy_fwd_triton", mutates_args=())
def cross_entropy_fwd_triton(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                             label_smoothing: float) -> tuple[Tensor, Tensor]:
    from llmfast.kernels.cross_entropy import cross_entropy_fwd
    return cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing)


@torch.library.custom_op("llmfast::cross_entropy_bwd_triton", mutates_args=())
def cross_entropy_bwd_triton(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                             ignore_index: int, label_smoothing: float) -> Tensor:
    from llmfast.kernels.cross_entropy import cross_entropy_bwd
    return cross_entropy_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing)


cross_entropy_fwd_triton.register_fake(_fwd_fake)
cross_entropy_bwd_triton.register_fake(_bwd_fake)
cross_entropy_fwd_triton.register_autograd(_make_backward(cross_entropy_bwd_triton), setup_context=_setup_context)


def fwd_op(which: str):
    """The autograd-aware per-row forward of backend ``which`` (cpu, cuda or triton)."""
    return cross_entropy_fwd_triton if which == "triton" else native("cross_entropy_fwd")


def fwd_grad_fn(which: str):
    """(logits, target, weight, ignore_index, eps) -> (loss, lse), writing d(sum loss)/dlogits over logits.

    Called inside other ops' implementations only (no autograd, no fake tracing).
    """
    if which == "triton":
        from llmfast.kernels.cross_entropy import cross_entropy_fwd_grad
        return cross_entropy_fwd_grad
    return native("cross_entropy_fwd_grad")


def target_weights(target: Tensor, weight: Optional[Tensor], ignore_index: int, dtype: torch.dtype) -> Tensor:
    """[N] weight of each row in a 'mean': w[target] (1 without weights), 0 where ignored."""
    keep = target != ignore_index
    if weight is None:
        return keep.to(dtype)
    return torch.where(keep, weight.to(dtype).gather(0, target.masked_fill(~keep, 0)), 0)


def reduce_rows(loss: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                out_dtype: torch.dtype) -> Tensor:
    """torch's reduction of per-row losses; 'mean' divides by the summed target weights (NaN if all ignored)."""
    if reduction == "none":
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return (total / target_weights(target, weight, ignore_index, loss.dtype).sum()).to(out_dtype)


# ----------------------------------------------------------------------------------
# Entry point


def cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float, which: str, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Cross-entropy of ``logits`` [N, C] against class indices ``target`` [N] on backend ``which``.

    Arguments are assumed checked and canonical (``llmfast.nn.functional`` does that):
    logits contiguous, target int64, weight None or [C] in ``acc_dtype(logits.dtype)``.
    Returns the loss in ``out_dtype`` (default ``logits.dtype``): [N] for 'none', a scalar otherwise.
    """
    loss, _ = fwd_op(which)(logits, target, weight, int(ignore_index), float(label_smoothing))
    return reduce_rows(loss, target, weight, ignore_index, reduction, out_dtype or logits.dtype)


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def rows(C, N=13):
        def make(device, dtype):
            x = (torch.randn(N, C, device=device) * 2).to(dtype)
            t = torch.randint(0, C, (N,), device=device)
            t[::4] = -100
            return [x, t]
        return make

    def spatial(device, dtype):  # [N, C, d] with class dim 1
        return [torch.randn(3, 37, 5, device=device).to(dtype), torch.randint(0, 37, (3, 5), device=device)]

    def weighted(x, t):
        w = torch.linspace(0.5, 2.0, x.shape[-1], device=x.device)
        return F.cross_entropy(x, t, weight=w, label_smoothing=0.1)

    return [
        ("cross_entropy mean", rows(1000), lambda x, t: F.cross_entropy(x, t)),
        ("cross_entropy sum V=32001", rows(32001, 3), lambda x, t: F.cross_entropy(x, t, reduction="sum")),
        ("cross_entropy none", rows(2), lambda x, t: F.cross_entropy(x, t, reduction="none")),
        ("cross_entropy weight+smooth", rows(1000), weighted),
        ("cross_entropy [N,C,d]", spatial, lambda x, t: F.cross_entropy(x, t, label_smoothing=0.05)),
    ]
