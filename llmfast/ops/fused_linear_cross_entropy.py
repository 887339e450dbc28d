"""fused_linear_cross_entropy: the LM head and the loss, chunk by chunk over tokens.

``loss = cross_entropy(hidden @ weight.T + bias, target)`` without the [N, V] logits:
tokens go through in chunks of ``chunk_size`` rows; each chunk's logits [chunk, V] are
produced by the backend's matmul into one reused buffer, the fused cross-entropy
kernel turns them into (loss, lse) and, when gradients are wanted, overwrites them in
place with d(sum loss)/dlogits, which two more matmuls turn into that chunk's share of
the gradients:

    grad_hidden[chunk] = dlogits @ weight              [chunk, H]
    grad_weight       += dlogits.T @ hidden[chunk]     [V, H], accumulated in fp32
    grad_bias         += dlogits.sum(0)                [V],    accumulated in fp32

With ``softcap`` c > 0 (Gemma 2's final-logit soft-capping) the loss is taken of
``c * tanh(logits / c)``: the cap is applied where each chunk's logits are formed, and
the chunk's dlogits are multiplied by ``1 - tanh^2`` before the two matmuls (the tanh
is kept in a second [chunk, V] buffer, since the loss kernel overwrites the first).

So the gradients are computed during the forward (the Liger approach: no second
projection in backward) and saved; backward scales them by the incoming scalar
gradient (times 1/sum of target weights for 'mean'). This needs the loss to be a sum over
rows; for reduction='none' the per-row gradients are unknown in forward, so nothing is
computed then and backward recomputes each chunk's logits instead. Peak extra memory:
one [chunk, V] logits buffer (two in the recompute path) plus gradients the size of
the parameters; never N x V. All reductions are sums of matmuls in a fixed order:
deterministic.

Backends: the matmuls are torch's on every backend; the loss part is the backend's
fused kernel (``llmfast::cross_entropy_fwd_grad`` on cpu/cuda, the Triton kernel on
triton). The op is one ``torch.library.custom_op`` (opaque to Inductor, which would
otherwise materialise what we avoid) with fake impl and autograd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import acc_dtype
from llmfast.ops.cross_entropy import (cross_entropy_bwd, cross_entropy_fwd, cross_entropy_fwd_grad, reduce_rows,
                                       target_weights)

_NOTE = "projection by torch matmuls in chunks of tokens, loss by the fused kernel"
backends.register_op(OpSpec("fused_linear_cross_entropy", kernel=cross_entropy_fwd_grad,
                            notes={"triton": _NOTE, "cuda": _NOTE, "cpu": _NOTE}))

# grad_mask bits: which gradients the forward computes (0 = none)
GRAD_HIDDEN, GRAD_WEIGHT, GRAD_BIAS = 1, 2, 4


def default_chunk_size(N: int, H: int, V: int) -> int:
    """Rows per chunk: the chunk's logits [chunk, V] about the size of hidden [N, H]
    (so the peak stays near what the activations already take), a power of two, and at
    least 256 rows (or N) so each matmul is large enough to run near peak."""
    chunk = triton_next_pow2(max(1, math.ceil(N / max(1, math.ceil(V / max(H, 1))))))
    return max(1, min(N, max(chunk, 256)))


def triton_next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _check_targets(target: Tensor, V: int, ignore_index: int):
    # One reduction and one host sync per call: the per-chunk kernels on cuda/triton
    # do not check (the cpu one does, for free), and must never see a bad index.
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise IndexError(f"fused_linear_cross_entropy: target {first} is out of bounds for {V} classes "
                         f"(targets must be in [0, {V}) or equal ignore_index={ignore_index})")


def _loss_kernels(which: str, device_type: str):
    """(fwd, fwd_grad, bwd) per-chunk loss kernels of a backend, called below autograd."""
    return tuple(k.on(which, device_type) for k in (cross_entropy_fwd, cross_entropy_fwd_grad, cross_entropy_bwd))


def _logits_into(buf: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: float,
                 tanh_buf: Optional[Tensor] = None) -> Tensor:
    """buf[:n] = h @ weight.T (+ bias), soft-capped to c * tanh(. / c) when softcap = c > 0;
    returns that [n, V] view (contiguous). tanh_buf[:n] receives the tanh when given."""
    out = buf[: h.shape[0]]
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)
    if softcap:
        # In the logits' dtype, op by op, as the unfused model computes it (Gemma 2: / c, tanh, * c).
        th = out if tanh_buf is None else torch.div(out, softcap, out=tanh_buf[: h.shape[0]])
        if tanh_buf is None:
            th.div_(softcap)
        th.tanh_()
        torch.mul(th, softcap, out=out)
    return out


def _uncap_(dl: Tensor, th: Tensor) -> Tensor:
    """dl *= d(c tanh(x/c))/dx = 1 - tanh^2 (th holds the tanh; it is overwritten)."""
    return dl.mul_(th.square_().neg_().add_(1))


def _accumulate(dl: Tensor, h: Tensor, weight: Tensor, gh_rows: Optional[Tensor], gw: Optional[Tensor],
                gb: Optional[Tensor]):
    """One chunk's share of the gradients from its dlogits [n, V]."""
    if gh_rows is not None:
        torch.mm(dl, weight, out=gh_rows)
    if gw is not None:
        if gw.dtype == dl.dtype:
            gw.addmm_(dl.t(), h)  # in place: no [V, H] temporary
        else:  # fp16/bf16: each chunk's product rounds once, the sum runs in fp32
            gw.add_(torch.mm(dl.t(), h))
    if gb is not None:
        gb.add_(dl.sum(0, dtype=gb.dtype))


def _or_empty(g: Optional[Tensor], like: Tensor, dtype=None) -> Tensor:
    # custom ops return tensors, not None: a gradient not computed is a fresh [0] tensor
    if g is None:
        return like.new_empty(0)
    return g if dtype is None else g.to(dtype)


def _grads_fake(hidden, weight, bias, grad_mask):
    return (torch.empty_like(hidden) if grad_mask & GRAD_HIDDEN else hidden.new_empty(0),
            torch.empty_like(weight) if grad_mask & GRAD_WEIGHT else hidden.new_empty(0),
            torch.empty_like(bias) if (grad_mask & GRAD_BIAS and bias is not None) else hidden.new_empty(0))


@torch.library.custom_op("llmfast::fused_linear_cross_entropy_fwd", mutates_args=())
def fused_linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                   class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                                   softcap: float, reduction: str, grad_mask: int, chunk_size: int, backend: str
                                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V]?, target [N] int64, class_weight [C] acc dtype;
    softcap: c > 0 caps the logits to c * tanh(logits / c), 0 leaves them alone.

    Returns (loss, lse [N, 2], grad_hidden, grad_weight, grad_bias): loss is reduced
    ('mean' | 'sum': a scalar; 'none': [N]) in the accumulation dtype; the gradients are
    those of the *summed* loss (backward applies 'mean''s 1/weight) for the inputs named
    by grad_mask (not with 'none'), else [0].
    """
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    _check_targets(target, V, ignore_index)
    fwd, fwd_grad, _ = _loss_kernels(backend, hidden.device.type)
    loss = hidden.new_empty(N, dtype=acc)
    lse = hidden.new_empty(N, 2, dtype=acc)
    gh = torch.empty_like(hidden) if grad_mask & GRAD_HIDDEN else None
    gw = weight.new_zeros(V, H, dtype=acc) if grad_mask & GRAD_WEIGHT else None
    gb = weight.new_zeros(V, dtype=acc) if (grad_mask & GRAD_BIAS and bias is not None) else None
    if N > 0:
        buf = hidden.new_empty(min(chunk_size, N), V)  # the only [chunk, V] tensor (two with softcap), reused
        tanh_buf = torch.empty_like(buf) if softcap and grad_mask else None
        for n0 in range(0, N, chunk_size):
            n1 = min(N, n0 + chunk_size)
            h, t = hidden[n0:n1], target[n0:n1]
            logits = _logits_into(buf, h, weight, bias, softcap, tanh_buf)
            if grad_mask:
                l, e = fwd_grad(logits, t, class_weight, ignore_index, label_smoothing)  # logits := dlogits
                if softcap:
                    _uncap_(logits, tanh_buf[: n1 - n0])
                _accumulate(logits, h, weight, None if gh is None else gh[n0:n1], gw, gb)
            else:
                l, e = fwd(logits, t, class_weight, ignore_index, label_smoothing)
            loss[n0:n1] = l
            lse[n0:n1] = e
    return (reduce_rows(loss, target, class_weight, ignore_index, reduction), lse, _or_empty(gh, hidden),
            _or_empty(gw, hidden, weight.dtype), _or_empty(gb, hidden, None if bias is None else bias.dtype))


@fused_linear_cross_entropy_fwd.register_fake
def _fwd_fake(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, softcap, reduction,
              grad_mask, chunk_size, backend):
    N, H = hidden.shape
    acc = acc_dtype(hidden.dtype)
    loss = hidden.new_empty(N, dtype=acc) if reduction == "none" else hidden.new_empty((), dtype=acc)
    return (loss, hidden.new_empty(N, 2, dtype=acc), *_grads_fake(hidden, weight, bias, grad_mask))


@torch.library.custom_op("llmfast::fused_linear_cross_entropy_bwd", mutates_args=())
def fused_linear_cross_entropy_bwd(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   target: Tensor, class_weight: Optional[Tensor], lse: Tensor, ignore_index: int,
                                   label_smoothing: float, softcap: float, grad_mask: int, chunk_size: int,
                                   backend: str
                                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The recompute path: gradients from a per-row grad_rows [N] (acc dtype), chunk by chunk."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    _, _, bwd = _loss_kernels(backend, hidden.device.type)
    gh = torch.empty_like(hidden) if grad_mask & GRAD_HIDDEN else None
    gw = weight.new_zeros(V, H, dtype=acc) if grad_mask & GRAD_WEIGHT else None
    gb = weight.new_zeros(V, dtype=acc) if (grad_mask & GRAD_BIAS and bias is not None) else None
    if N > 0 and grad_mask:
        buf = hidden.new_empty(min(chunk_size, N), V)
        for n0 in range(0, N, chunk_size):
            n1 = min(N, n0 + chunk_size)
            h = hidden[n0:n1]
            logits = _logits_into(buf, h, weight, bias, softcap)
            dl = bwd(grad_rows[n0:n1], logits, target[n0:n1], class_weight, lse[n0:n1], ignore_index,
                     label_smoothing)
            if softcap:  # the capped logits are no longer needed: they become the tanh
                _uncap_(dl, logits.div_(softcap))
            _accumulate(dl, h, weight, None if gh is None else gh[n0:n1], gw, gb)
    return (_or_empty(gh, hidden), _or_empty(gw, hidden, weight.dtype),
            _or_empty(gb, hidden, None if bias is None else bias.dtype))


@fused_linear_cross_entropy_bwd.register_fake
def _bwd_fake(grad_rows, hidden, weight, bias, target, class_weight, lse, ignore_index, label_smoothing, softcap,
              grad_mask, chunk_size, backend):
    return _grads_fake(hidden, weight, bias, grad_mask)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, softcap, reduction, grad_mask,
     chunk_size, backend) = inputs
    loss, lse, gh, gw, gb = output
    ctx.mark_non_differentiable(lse, gh, gw, gb)
    ctx.grad_mask, ctx.reduction, ctx.has_bias = grad_mask, reduction, bias is not None
    ctx.ignore_index, ctx.label_smoothing, ctx.softcap = ignore_index, label_smoothing, softcap
    ctx.chunk_size, ctx.backend = chunk_size, backend
    # d loss / d(sum of rows): 1, or 1/sum of target weights for 'mean'. When every
    # target is ignored that sum is 0 and the loss NaN, but (as in torch) the gradient is
    # 0, not 0 * (1/0): the scale is 0 then.
    if reduction == "mean":
        total = target_weights(target, class_weight, ignore_index, lse.dtype).sum()
        scale = torch.where(total > 0, 1 / total, 0)
    else:
        scale = lse.new_ones(())
    if grad_mask:  # gradients already computed: keep only them
        ctx.save_for_backward(gh, gw, gb, scale)
    else:
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse, scale)


def _scale(saved: Tensor, g: Tensor) -> Tensor:
    # Out of place: scaling the saved tensor in place would spare one parameter-sized
    # buffer at backward time, but it mutates an output of the op after the fact, which
    # opcheck rejects and AOT autograd's partitioner cannot trace.
    return saved * g.to(saved.dtype)


def _backward(ctx, grad_loss, _g_lse, _g_gh, _g_gw, _g_gb):
    want = ctx.needs_input_grad
    if ctx.grad_mask:
        gh, gw, gb, scale = ctx.saved_tensors
        g = grad_loss.reshape(()) * scale
        dh = _scale(gh, g) if want[0] and ctx.grad_mask & GRAD_HIDDEN else None
        dw = _scale(gw, g) if want[1] and ctx.grad_mask & GRAD_WEIGHT else None
        db = _scale(gb, g) if want[2] and ctx.has_bias and ctx.grad_mask & GRAD_BIAS else None
    else:
        hidden, weight, bias, target, class_weight, lse, scale = ctx.saved_tensors
        rows = grad_loss.to(lse.dtype) * scale
        rows = rows if ctx.reduction == "none" else rows.expand(hidden.shape[0])
        mask = (GRAD_HIDDEN if want[0] else 0) | (GRAD_WEIGHT if want[1] else 0) | (GRAD_BIAS if want[2] else 0)
        gh, gw, gb = fused_linear_cross_entropy_bwd(rows.contiguous(), hidden, weight, bias, target, class_weight,
                                                    lse, ctx.ignore_index, ctx.label_smoothing, ctx.softcap, mask,
                                                    ctx.chunk_size, ctx.backend)
        dh = gh if mask & GRAD_HIDDEN else None
        dw = gw if mask & GRAD_WEIGHT else None
        db = gb if (mask & GRAD_BIAS and ctx.has_bias) else None
    return dh, dw, db, None, None, None, None, None, None, None, None, None


fused_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------
# Entry point


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                               class_weight: Optional[Tensor], ignore_index: int, reduction: str,
                               label_smoothing: float, chunk_size: Optional[int], out_dtype: torch.dtype,
                               softcap: float = 0.0) -> Tensor:
    """hidden [..., H], weight [V, H], target [...] class indices, bias [V]?, class_weight [V]?,
    softcap >= 0 (0: none); arguments checked by the caller. Returns the loss in ``out_dtype``
    (shaped like target for 'none')."""
    which = backends.resolve("fused_linear_cross_entropy", hidden)
    if which == "torch":
        return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                                    label_smoothing, class_weight, softcap).to(out_dtype)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).contiguous()
    t = target.reshape(-1).to(torch.int64).contiguous()
    cw = None if class_weight is None else class_weight.to(acc_dtype(hidden.dtype)).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    N, V = h.shape[0], w.shape[0]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(N, H, V)
    grad_mask = 0
    if torch.is_grad_enabled() and reduction != "none":
        grad_mask = ((GRAD_HIDDEN if h.requires_grad else 0) | (GRAD_WEIGHT if w.requires_grad else 0)
                     | (GRAD_BIAS if b is not None and b.requires_grad else 0))
    loss, *_ = fused_linear_cross_entropy_fwd(h, w, b, t, cw, int(ignore_index), float(label_smoothing),
                                              float(softcap), reduction, grad_mask, chunk, which)
    loss = loss.to(out_dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss
