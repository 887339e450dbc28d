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
memory). ``flash_attn_varlen_func`` reads ``cu_seqlens`` on the host (its checks; a graph
break under torch.compile), then runs every segment in one call of the CPU kernel
(O(Σ len²) work, parallel over heads and query tiles of all segments), or, on the other
backends and with ALiBi or dropout, one call per segment.

``dropout_p`` uses llmfast's counter-based dropout (the same mask on every llmfast
backend, not FlashAttention's); ``deterministic`` is accepted and ignored (llmfast's
CPU kernels are deterministic). With ``return_attn_probs=True`` the result is
``(out, softmax_lse, S_dmask)`` as FlashAttention returns it: ``softmax_lse`` fp32
``[B, H, Sq]`` (varlen: ``[H, total_q]``), natural log, including the sink when given,
``-inf`` for a row that sees no key; ``S_dmask`` is an empty tensor (FlashAttention fills
it only for dropout tests; llmfast does not materialise the probabilities).

``flash_attn_with_kvcache`` (decoding over a contiguous or paged KV cache, appending new
keys in place) runs :func:`llmfast.ops.kvcache.kvcache_attention`, the split-KV decode
kernels of every backend, with the same semantics.

``apply_rotary_emb`` is ``flash_attn.layers.rotary.apply_rotary_emb`` (the same function as
:func:`llmfast.nn.functional.rotary_embedding`): ``interleaved``, ``inplace``,
``seqlen_offsets`` (int or per-sequence ``[B]``, checked against the tables' length) and
packed sequences (``cu_seqlens``, ``max_seqlen``), on the rope kernels of every backend.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from llmfast.nn.functional import _check_attention_inputs, _check_cu_seqlens, rotary_embedding
from llmfast.ops import attention as attention_op
from llmfast.ops import rope as rope_op
from llmfast.ops.kvcache import kvcache_attention

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "apply_rotary_emb"]

# flash_attn.layers.rotary.apply_rotary_emb: the same function as llmfast.nn.functional.rotary_embedding
apply_rotary_emb = rotary_embedding


def _check_window_softcap(name: str, window_size, softcap) -> tuple:
    """The window as (left, right) ints; raises on a bad window or softcap (FlashAttention 2's rules)."""
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
    return left, right


def _check_options(name: str, window_size, softcap, alibi_slopes, sinks, q: Tensor, batch: int) -> tuple:
    """The window as (left, right) ints; raises on bad options (FlashAttention 2's rules)."""
    left, right = _check_window_softcap(name, window_size, softcap)
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
    _check_attention_inputs(name, q, k, v, softmax_scale, dropout_p, names=("q", "k", "v"),
                            scale_arg="softmax_scale")
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

    On the ``cpu`` backend one kernel call runs every segment (in parallel over (head,
    query tile) tasks, O(Σ len²) work, not O(total²)); elsewhere, and with ``alibi_slopes``
    or ``dropout_p > 0`` on any backend, one fused call per segment. Both read
    ``cu_seqlens`` on the host first (the checks; a device sync on a GPU).
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
    fused = None
    if alibi_slopes is None and not dropout_p:  # ALiBi's dense mask and dropout run per segment below
        fused = attention_op.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale,
                                              is_causal=bool(causal), window=window, softcap=softcap, sinks=sinks)
    if fused is not None:
        out, lse = fused
        return (out, lse, q.new_empty((0,))) if return_attn_probs else out
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


# ----------------------------------------------------------------------------------
# KV-cache decoding

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _index(name: str, t, B: int, device) -> Optional[Tensor]:
    """A [B] int32 index tensor argument (None passes through)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"flash_attn_with_kvcache: {name} must be a torch.int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"flash_attn_with_kvcache: {name} must have dtype torch.int32, got {t.dtype}")
    if t.shape != (B,):
        raise ValueError(f"flash_attn_with_kvcache: {name} must have shape [batch_size={B}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"flash_attn_with_kvcache: {name} is on {t.device}, expected {device} (q's device)")
    return t


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, interleaved: bool) -> Tensor:
    """x [B, L, H, D] with its first R = 2 * cos.shape[1] dims rotated by the angles at pos [B, L].

    FlashAttention's convention: interleaved pairs (x[2i], x[2i+1]) (GPT-J) or halves
    (x[i], x[i + R/2]) (GPT-NeoX). The rope kernel (llmfast/ops/rope.py) on the gathered
    per-row angles [B, L, R/2]; math in fp32, result in x's dtype.
    """
    c, s = cos[pos], sin[pos]
    if c.dtype not in (x.dtype, torch.float32):
        c, s = c.float(), s.float()
    return rope_op.rope(x, None, c, s.to(c.dtype), 2 * cos.shape[1], interleaved)[0]


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention of q over a KV cache, appending new keys/values in place (FlashAttention 2 semantics).

    q: [B, Sq, Hq, D]. k_cache, v_cache: [B_cache, S_cache, Hkv, D], or paged
    [num_blocks, page_size, Hkv, D] with ``block_table`` [B, max_pages] int32 (any
    page_size >= 1); last dim contiguous. Hq % Hkv == 0 (GQA/MQA: query head h reads kv
    head h // (Hq // Hkv)).

    ``cache_seqlens`` (int, or [B] int32; None: the whole cache) keys are already in the
    cache. ``k``, ``v`` [B, Sk_new, Hkv, D] are written *in place* at positions
    cache_seqlens .. cache_seqlens + Sk_new - 1 (rotated first when ``rotary_cos`` /
    ``rotary_sin`` [S_rot, R/2] are given; q is rotated too, at positions
    cache_seqlens + i when causal or local, else at cache_seqlens; ``rotary_interleaved``
    pairs dims (0, 1), (2, 3), ... vs (0, R/2), ...). Attention then sees keys
    0 .. cache_seqlens + Sk_new - 1 of cache row ``cache_batch_idx[b]`` (default b),
    minus those before ``cache_leftpad[b]``.

    ``causal``: aligned to the bottom-right corner: query i sees keys up to
    cache_seqlens + Sk_new - Sq + i. ``window_size=(left, right)``: query i at position
    p sees keys in [p - left, p + right] (-1: unbounded). ``softcap`` > 0:
    scores = softcap * tanh(scores / softcap). ``alibi_slopes`` [Hq] or [B, Hq]: adds
    -slope * |p - j| to the score of key j. ``num_splits``: key-range splits (0: auto).
    A query with no visible key gives zeros (lse = -inf).

    Returns out [B, Sq, Hq, D], and lse [B, Hq, Sq] (fp32) when ``return_softmax_lse``.
    Forward only: raises RuntimeError when an input requires grad under grad mode.
    """
    fn = "flash_attn_with_kvcache"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {list(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, expected {q.device} (q's device)")
    B, Sq, Hq, D = q.shape
    NB, P, Hkv, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{fn}: v_cache has shape {list(v_cache.shape)}, expected k_cache's {list(k_cache.shape)}")
    if Dk != D:
        raise ValueError(f"{fn}: k_cache has head dim {Dk}, expected q's {D}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{fn}: q's {Hq} heads must be a multiple of the cache's {Hkv} kv heads")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and D > 1:
            raise ValueError(f"{fn}: {name} must have a contiguous last dimension (it is updated in place)")
    if any(isinstance(t, Tensor) and t.requires_grad for t in (q, k_cache, v_cache, k, v)) and torch.is_grad_enabled():
        raise RuntimeError(f"{fn} has no backward (as in FlashAttention); call it under torch.no_grad() "
                           "or pass tensors that do not require grad")
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
            raise TypeError(f"{fn}: block_table must be a torch.int32 tensor, got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"{fn}: block_table must have shape [batch_size={B}, max_pages], got "
                             f"{list(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"{fn}: block_table is on {block_table.device}, expected {q.device}")
        if cache_batch_idx is not None:
            raise ValueError(f"{fn}: cache_batch_idx and block_table cannot be used together (as in FlashAttention)")
        capacity = block_table.shape[1] * P
    else:
        capacity = P
    cache_batch_idx = _index("cache_batch_idx", cache_batch_idx, B, q.device)
    cache_leftpad = _index("cache_leftpad", cache_leftpad, B, q.device)
    if not paged and cache_batch_idx is None and NB != B:
        raise ValueError(f"{fn}: k_cache has batch size {NB}, expected q's {B} (or pass cache_batch_idx)")

    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v, or neither")
    Sk = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
            if t.shape != (B, t.shape[1] if t.dim() == 4 else -1, Hkv, D):
                raise ValueError(f"{fn}: {name} must have shape [batch_size={B}, seqlen_new, {Hkv}, {D}], got "
                                 f"{list(t.shape)}")
            if t.dtype != k_cache.dtype:
                raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected the cache's {k_cache.dtype}")
            if t.device != q.device:
                raise ValueError(f"{fn}: {name} is on {t.device}, expected {q.device}")
        if v.shape != k.shape:
            raise ValueError(f"{fn}: v has shape {list(v.shape)}, expected k's {list(k.shape)}")
        Sk = k.shape[1]

    uniform = None   # the one length of every row, when it is known on the host
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{fn}: appending k/v needs cache_seqlens (where the new keys go)")
        uniform = capacity
        seqlens = torch.full((B,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        uniform = cache_seqlens
        seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        seqlens = _index("cache_seqlens", cache_seqlens, B, q.device)

    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError(f"{fn}: pass both rotary_cos and rotary_sin, or neither")
        if k is None:
            raise ValueError(f"{fn}: rotary_cos/rotary_sin apply only when new k and v are passed")
        if rotary_cos.dim() != 2 or rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"{fn}: rotary_cos and rotary_sin must both be [seqlen_ro, rotary_dim / 2], got "
                             f"{list(rotary_cos.shape)} and {list(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > D:
            raise ValueError(f"{fn}: rotary_dim {2 * rotary_cos.shape[1]} exceeds the head dim {D}")
    window_size = _check_window_softcap(fn, window_size, softcap)
    local = window_size[0] >= 0 or window_size[1] >= 0
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
            raise TypeError(f"{fn}: alibi_slopes must be a float32 tensor")
        if alibi_slopes.shape not in ((Hq,), (B, Hq)):
            raise ValueError(f"{fn}: alibi_slopes must have shape [{Hq}] or [{B}, {Hq}], got "
                             f"{list(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"{fn}: alibi_slopes is on {alibi_slopes.device}, expected {q.device} (q's device)")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))):
        raise TypeError(f"{fn}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{fn}: num_splits must be an int >= 0, got {num_splits!r}")

    # Everything that would index out of bounds, checked before anything is written: on the
    # host when every row has the same length (an int cache_seqlens: decode loops such as
    # GPT.generate pay no device round trip), else with one device-to-host sync for all of it.
    total = seqlens.long() + Sk
    # rotary rows read: the new keys', and the queries' (at cache_seqlens + i when causal or local)
    reach = max(Sk, Sq if (causal or local) else 1)
    where = f"block_table's {block_table.shape[1]} pages of {P}" if paged else f"the cache's {P} slots"
    checks = []   # (bool tensor, message)
    if uniform is not None:
        if uniform < 0:
            raise ValueError(f"{fn}: cache_seqlens must be >= 0")
        if uniform + Sk > capacity:
            raise ValueError(f"{fn}: cache_seqlens + {Sk} new keys exceeds {where} (max {uniform + Sk})")
        if rotary and uniform + reach > rotary_cos.shape[0]:
            raise ValueError(f"{fn}: positions up to {uniform + reach - 1} need more than rotary_cos's "
                             f"{rotary_cos.shape[0]} rows")
    else:
        checks += [((seqlens < 0).any(), "cache_seqlens must be >= 0"),
                   ((total > capacity).any(), f"cache_seqlens + {Sk} new keys exceeds {where}")]
        if rotary:
            checks.append(((seqlens.long() + reach > rotary_cos.shape[0]).any(),
                           f"positions up to cache_seqlens + {reach} - 1 need more than rotary_cos's "
                           f"{rotary_cos.shape[0]} rows"))
    if cache_batch_idx is not None:
        checks.append((((cache_batch_idx < 0) | (cache_batch_idx >= NB)).any(),
                       f"cache_batch_idx must be in [0, {NB})"))
    if paged:
        need = (total + P - 1) // P                                          # pages each row uses
        used = torch.arange(block_table.shape[1], device=q.device)[None, :] < need[:, None]
        checks.append(((used & ((block_table < 0) | (block_table >= NB))).any(),
                       f"block_table holds page ids outside [0, {NB}) among the pages in use"))
    if cache_leftpad is not None:
        checks.append(((cache_leftpad < 0).any(), "cache_leftpad must be >= 0"))
    if checks:
        for flag, message in zip(torch.stack([c for c, _ in checks]).tolist(), (m for _, m in checks)):
            if flag:
                raise ValueError(f"{fn}: {message}")

    if k is not None:
        pos = seqlens.long()[:, None] + torch.arange(Sk, device=q.device)    # [B, Sk]
        if rotary:
            k = _rotate(k, rotary_cos, rotary_sin, pos, rotary_interleaved)
            qpos = (seqlens.long()[:, None] + torch.arange(Sq, device=q.device) if causal or local
                    else seqlens.long()[:, None].expand(B, Sq))
            q = _rotate(q, rotary_cos, rotary_sin, qpos, rotary_interleaved)
        if uniform is not None and not paged and cache_batch_idx is None:
            k_cache[:, uniform:uniform + Sk] = k   # every row appends at the same slots: two plain copies
            v_cache[:, uniform:uniform + Sk] = v
        elif paged:
            rows, slots = block_table.long().gather(1, pos // P), pos % P
            k_cache[rows, slots] = k
            v_cache[rows, slots] = v
        else:
            rows = (torch.arange(B, device=q.device) if cache_batch_idx is None else cache_batch_idx.long())
            rows, slots = rows[:, None].expand(B, Sk), pos
            k_cache[rows, slots] = k
            v_cache[rows, slots] = v

    if paged:
        table = block_table
    else:
        # A contiguous cache is a paged one with one page of S_cache slots per row: no copy.
        table = (torch.arange(B, dtype=torch.int32, device=q.device) if cache_batch_idx is None
                 else cache_batch_idx)[:, None]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse = kvcache_attention(q, k_cache, v_cache, table, total.to(torch.int32), cache_leftpad, alibi_slopes,
                                 scale=scale, causal=causal, window=window_size, softcap=softcap,
                                 num_splits=num_splits)
    return (out, lse) if return_softmax_lse else out
