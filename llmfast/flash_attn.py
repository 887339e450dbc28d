"""FlashAttention-2-compatible functions: ``from llmfast.flash_attn import flash_attn_func``.

A drop-in for ``flash_attn.flash_attn_interface`` (FlashAttention 2) that runs on CPU
tensors too. **Semantics are FlashAttention 2's, not torch's**:

* tensors are ``[B, S, H, D]`` (``flash_attn_func``) or packed ``[total, H, D]``
  (``flash_attn_varlen_func``); k/v may have fewer heads (GQA/MQA, ``H % Hkv == 0``);
* ``causal=True`` is aligned to the **bottom-right** corner when ``Sq != Sk`` (query i sees
  key j iff ``j <= i + Sk - Sq``; torch's ``is_causal`` in
  :func:`llmfast.nn.functional.scaled_dot_product_attention` is top-left);
* ``window_size=(left, right)``: query i sees key j iff
  ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``, inclusive, -1 = unbounded;
  ``causal=True`` sets ``right = 0``;
* ``softcap > 0``: scores become ``softcap * tanh(scores * softmax_scale / softcap)``
  (tanh saturates, so nothing overflows in fp16/bf16: the math is fp32);
* ``alibi_slopes`` fp32 ``[H]`` or ``[B, H]``: adds ``-slope * |i + Sk - Sq - j|`` to the
  (capped) scores;
* a query row that sees no key gives zeros (zero gradient), never NaN.

Beyond FlashAttention 2: ``sinks=`` ([H] logits, gpt-oss's attention sinks: each joins
its head's softmax denominator as an extra column that is then dropped; differentiable),
and every float dtype (fp32 too).

Where it runs: one call of :func:`llmfast.ops.attention.attention`, which picks the
fastest backend whose kernels implement the options used (``llmfast info``); the C++
CPU kernel implements causal, window, softcap and sinks, skipping blocks outside the
visible band. ALiBi is an additive ``[B, H, Sq, Sk]`` float mask built here (O(Sq·Sk)
memory); ``flash_attn_varlen_func`` runs one call per segment (correct, O(Σ len²) work,
a host sync to read ``cu_seqlens``, and a graph break under torch.compile).

``dropout_p`` uses llmfast's counter-based dropout (the same mask on every llmfast
backend, not FlashAttention's); ``deterministic`` is accepted and ignored (llmfast's
CPU kernels are deterministic). With ``return_attn_probs=True`` the result is
``(out, softmax_lse, S_dmask)`` as FlashAttention returns it: ``softmax_lse`` fp32
``[B, H, Sq]`` (varlen: ``[H, total_q]``), natural log, including the sink when given,
``-inf`` for a row that sees no key; ``S_dmask`` is an empty tensor (FlashAttention fills
it only for dropout tests; llmfast does not materialise the probabilities).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast.nn.functional import _check_attention_inputs
from llmfast.ops import attention as attention_op

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _check_options(name: str, window_size, softcap, alibi_slopes, sinks, q: Tensor, batch: int) -> tuple:
    """The window as (left, right) ints; raises on bad options (FlashAttention 2's rules)."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"{name}(): window_size must be a pair (left, right), got {window_size!r}") from None
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{name}(): window_size {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"{name}(): window_size {side} must be >= 0, or -1 for unbounded; got {w}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{name}(): softcap must be a float, got {type(softcap).__name__}")
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"{name}(): softcap must be finite and >= 0 (0 = off), got {softcap}")
    H = q.shape[-2]
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor):
            raise TypeError(f"{name}(): alibi_slopes must be a Tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise RuntimeError(f"{name}(): alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((H,), (batch, H)):
            raise RuntimeError(f"{name}(): alibi_slopes must be [H] or [B, H] = [{H}] or [{batch}, {H}], got "
                               f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise RuntimeError(f"{name}(): alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"{name}(): sinks must be a Tensor, got {type(sinks).__name__}")
        if not sinks.is_floating_point() or tuple(sinks.shape) != (H,):
            raise RuntimeError(f"{name}(): sinks must be a float [H] = [{H}] tensor, got {sinks.dtype} "
                               f"{tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise RuntimeError(f"{name}(): sinks is on {sinks.device} but q is on {q.device}")
    return left, right


def _check_qkv(name: str, q: Tensor, k: Tensor, v: Tensor, dims: int, dropout_p, softmax_scale) -> None:
    _check_attention_inputs(name, q, k, v, softmax_scale, dropout_p)
    layout = "[B, S, H, D]" if dims == 4 else "[total, H, D]"
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise RuntimeError(f"{name}(): q, k, v must be {dims}-D {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, "
                           f"{tuple(v.shape)}")
    if k.shape[:-1] != v.shape[:-1] or k.shape[-1] != q.shape[-1] or (dims == 4 and k.shape[0] != q.shape[0]):
        raise RuntimeError(f"{name}(): expected q {layout}, k and v with q's batch and head dim and one "
                           f"shape but the last; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    H, Hkv = q.shape[-2], k.shape[-2]
    if Hkv == 0 or H % Hkv != 0:
        raise RuntimeError(f"{name}(): the number of query heads ({H}) must be a multiple of the number of "
                           f"key/value heads ({Hkv})")


def _alibi_mask(slopes: Tensor, B: int, H: int, L: int, S: int) -> Tensor:
    """[B or 1, H, L, S] fp32 additive mask -slope·|i + S - L - j| (FlashAttention 2's ALiBi)."""
    i = torch.arange(L, device=slopes.device).view(L, 1) + (S - L)
    j = torch.arange(S, device=slopes.device).view(1, S)
    dist = (i - j).abs().to(torch.float32)
    slopes = slopes.view(-1, H, 1, 1)
    return -slopes * dist


def _attend(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, sinks):
    """[B, Sq, H, D] problem -> (out [B, Sq, H, Dv], lse [B, H, Sq]) on the canonical op."""
    B, L, H, _ = q.shape
    S = k.shape[1]
    mask = None if alibi_slopes is None else _alibi_mask(alibi_slopes, B, H, L, S)
    out, lse = attention_op.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                      scale=softmax_scale, is_causal=bool(causal), dropout_p=float(dropout_p),
                                      window=window, bottom_right=True, softcap=float(softcap), sinks=sinks)
    return out.transpose(1, 2), lse


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, sinks: Optional[Tensor] = None):
    """FlashAttention 2's ``flash_attn_func`` (bottom-right causal; see the module docstring).

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, Dv]``, one float
            dtype, ``H % Hkv == 0``.
        dropout_p: attention dropout (llmfast's Philox mask; use 0.0 for evaluation).
        softmax_scale: defaults to ``1/sqrt(D)``.
        causal: bottom-right aligned causal mask.
        window_size: ``(left, right)`` sliding window, -1 = unbounded.
        softcap: ``> 0`` caps the scaled scores with ``softcap * tanh(s / softcap)``.
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``.
        deterministic: accepted for compatibility (the CPU kernels are deterministic).
        return_attn_probs: also return ``softmax_lse`` fp32 ``[B, H, Sq]`` and an empty
            ``S_dmask``.
        sinks: llmfast extension, ``[H]`` per-head sink logits (gpt-oss).

    Returns ``out [B, Sq, H, Dv]``, or ``(out, softmax_lse, S_dmask)``.
    """
    name = "flash_attn_func"
    _check_qkv(name, q, k, v, 4, dropout_p, softmax_scale)
    window = _check_options(name, window_size, softcap, alibi_slopes, sinks, q, q.shape[0])
    out, lse = _attend(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, sinks)
    if return_attn_probs:
        return out, lse, q.new_empty((0,))
    return out


def _check_cu_seqlens(name: str, arg: str, cu: Tensor, total: int, max_seqlen, like: Tensor) -> list:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}(): {arg} must be a Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise RuntimeError(f"{name}(): {arg} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise RuntimeError(f"{name}(): {arg} must be 1-D [batch + 1], got shape {tuple(cu.shape)}")
    if cu.device != like.device:
        raise RuntimeError(f"{name}(): {arg} is on {cu.device} but q is on {like.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name}(): max_seqlen for {arg} must be an int, got {type(max_seqlen).__name__}")
    bounds = cu.tolist()  # a host sync: the segments decide the work
    if bounds[0] != 0:
        raise RuntimeError(f"{name}(): {arg} must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise RuntimeError(f"{name}(): {arg} must be non-decreasing, got {bounds}")
    if bounds[-1] > total:
        raise RuntimeError(f"{name}(): {arg}[-1] = {bounds[-1]} is beyond the packed buffer of {total} tokens")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise RuntimeError(f"{name}(): a segment of {arg} has {longest} tokens, more than max_seqlen = {max_seqlen}")
    return bounds


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, *, sinks: Optional[Tensor] = None):
    """FlashAttention 2's ``flash_attn_varlen_func`` on packed sequences (bottom-right causal per segment).

    Args:
        q: ``[total_q, H, D]``; k: ``[total_k, Hkv, D]``; v: ``[total_k, Hkv, Dv]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]``, starting at 0, non-decreasing,
            ``cu_seqlens[-1] <= total`` (tokens past it are not read: their output rows are
            zeros and their gradients zero). Segment b is ``q[cu_q[b]:cu_q[b+1]]`` against
            ``k[cu_k[b]:cu_k[b+1]]``; zero-length segments are allowed (they produce nothing,
            and a query segment facing no keys gives zeros).
        max_seqlen_q, max_seqlen_k: at least the longest segment (checked).
        The rest as :func:`flash_attn_func`; ``alibi_slopes`` ``[B, H]`` is per segment.

    Returns ``out [total_q, H, Dv]``, or ``(out, softmax_lse [H, total_q] fp32, S_dmask)``.

    This path runs one fused call per segment (O(Σ len²) work, not O(total²)), after a
    host sync that reads ``cu_seqlens``.
    """
    name = "flash_attn_varlen_func"
    _check_qkv(name, q, k, v, 3, dropout_p, softmax_scale)
    bq = _check_cu_seqlens(name, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q)
    bk = _check_cu_seqlens(name, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q)
    if len(bq) != len(bk):
        raise RuntimeError(f"{name}(): cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got "
                           f"{len(bq)} and {len(bk)}")
    batch = len(bq) - 1
    window = _check_options(name, window_size, softcap, alibi_slopes, sinks, q, batch)
    H, Dv = q.shape[1], v.shape[-1]
    outs, lses = [], []
    for b in range(batch):
        qs, ks, vs = q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]]
        if qs.shape[0] == 0:
            continue
        slopes = alibi_slopes if (alibi_slopes is None or alibi_slopes.dim() == 1) else alibi_slopes[b]
        o, lse = _attend(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout_p, softmax_scale, causal,
                         window, softcap, slopes, sinks)
        outs.append(o[0])
        lses.append(lse[0])
    tail = q.shape[0] - bq[-1]
    if tail or not outs:  # tokens past cu_seqlens_q[-1]: zeros, and lse -inf (no key seen)
        outs.append(q.new_zeros((tail, H, Dv)))
        lses.append(torch.full((H, tail), float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    if return_attn_probs:
        return out, (torch.cat(lses, 1) if len(lses) > 1 else lses[0]), q.new_empty((0,))
    return out
