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


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    """``torch.nn.functional.layer_norm``; with ``residual``, of ``s = x + residual``
    (in x's dtype), returning ``(out, s)``."""
    s = x if residual is None else x + residual
    out = torch.nn.functional.layer_norm(s, list(normalized_shape), weight, bias, eps)
    return out if residual is None else (out, s)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None):
    """``torch.nn.functional.rms_norm``; with ``residual``, of ``s = x + residual``
    (in x's dtype), returning ``(out, s)``. ``eps=None`` is ``torch.finfo(x.dtype).eps``."""
    s = x if residual is None else x + residual
    out = torch.nn.functional.rms_norm(s, list(normalized_shape), weight, eps)
    return out if residual is None else (out, s)
