"""The ``torch`` backend: every op written with plain PyTorch ops.

These functions define llmfast's semantics. Tests run them in float64 as the
reference, and in the input's dtype as "PyTorch's own error" for the
FlashAttention tolerance rule; ``llmfast bench`` reports errors against them.
"""
from __future__ import annotations

import torch


def causal_keep(L: int, S: int, device) -> torch.Tensor:
    """[L, S] bool, True where column j <= row i (``torch.tril``, top-left aligned)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def softmax(x, dim=-1, *, scale=None, mask=None, is_causal=False, log=False):
    """softmax/log_softmax of ``x * scale`` with a bool/additive ``mask`` and causal mask.

    Positions a mask removes get probability 0 (log-prob -inf) and zero gradient; a
    row with no visible position gives zeros (and zero gradient), never NaN. With no
    mask this is exactly ``torch.softmax``.
    """
    z = x if scale is None else x * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if is_causal:
        z = z.masked_fill(~causal_keep(z.shape[-2], z.shape[-1], z.device), float("-inf"))
    out = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
    if mask is not None or is_causal:
        dead = torch.isneginf(z)
        if log:  # the constant branch of masked_fill carries no gradient
            out = out.masked_fill(dead, float("-inf"))
        out = out.masked_fill(dead.all(dim, keepdim=True), 0.0)
    return out


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """:func:`torch.nn.functional.cross_entropy`: llmfast's semantics are torch's.

    ``weight`` may be of any float dtype (it is cast to the input's, which torch requires).
    """
    if weight is not None:
        weight = weight.to(input.dtype)
    return torch.nn.functional.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                                             reduction=reduction, label_smoothing=label_smoothing)


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, class_weight=None):
    """``cross_entropy(hidden @ weight.T + bias, target)`` with the vocabulary last.

    hidden: [..., H]; weight: [V, H]; bias: [V]; target: [...]. The logits [..., V] exist
    in full here: this is the unfused definition.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), class_weight, ignore_index,
                         reduction, label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss
