"""kvcache: decode attention over a (paged) KV cache — kernel declaration, reference, canonical form.

The kernels see one canonical problem, FlashAttention 2's (bottom-right causal)
semantics on a paged cache:

* q [B, Sq, Hq, D] (last dim contiguous, other strides free);
* k_pages, v_pages [NB, P, Hkv, D] (last dim contiguous, other strides free): NB
  pages of P key rows each (any P >= 1). A contiguous cache [B_cache, S_cache, Hkv, D]
  is the paged one with P = S_cache and block_table[b] = [cache_batch_idx[b]]: the
  same tensor, no copy;
* block_table [B, MP] int32 (contiguous): key j of batch row b lives in page
  block_table[b, j // P], slot j % P;
* seqlens [B] int32: keys 0 .. seqlens[b] - 1 exist; kv_start [B] int32 (optional,
  FlashAttention's cache_leftpad): keys before it are invisible;
* query i sits at position p_i = seqlens[b] - Sq + i; key j is visible iff
  kv_start[b] <= j < seqlens[b], and j <= p_i when causal, and
  p_i - window_left <= j <= p_i + window_right for the sides that are >= 0;
* score s = scale * q·k; softcap > 0: s = softcap * tanh(s / softcap); alibi [B, Hq]
  fp32 (optional): s -= slope * |p_i - j|; out = softmax over visible keys of s, times
  v; lse = log sum exp s (fp32, natural log). A row with no visible key gives zeros
  and lse = -inf.

Split-KV (flash-decoding): the visible key range of each (batch row, kv head) is cut
into num_splits chunks (0: the kernel's heuristic) processed in parallel, each with
its own running max and sum, then combined with the log-sum-exp trick; an empty or
all-masked split has lse = -inf and contributes nothing. The G = Hq / Hkv query heads
of one kv head (times the Sq queries) are one block of rows, so each K/V row is read
once for all of them.

Forward only: decoding needs no gradient (FlashAttention's kernel has none either).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends
from llmfast.backends import OpSpec
from llmfast.ops._library import kernel


def _fwd_fake(q, k_pages, v_pages, block_table, seqlens, kv_start, alibi, scale, causal, window_left, window_right,
              softcap, num_splits):
    B, Sq, Hq, D = q.shape
    return q.new_empty((B, Sq, Hq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


# The canonical problem of the module docstring. q: [B, Sq, Hq, D]; k_pages/v_pages: [NB, P, Hkv, D]
# (q's dtype); block_table: [B, MP] int32; seqlens: [B] int32; kv_start: None or [B] int32; alibi:
# None or [B, Hq] fp32. window_left/right: -1 = unbounded. Returns out [B, Sq, Hq, D] (contiguous,
# q's dtype) and lse [B, Hq, Sq] fp32.
kvcache_fwd = kernel(
    "kvcache_fwd", "(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor seqlens, Tensor? kv_start, "
    "Tensor? alibi, float scale, bool causal, int window_left, int window_right, float softcap, int num_splits) "
    "-> (Tensor, Tensor)", _fwd_fake, triton="kvcache:kvcache_fwd")

backends.register_op(OpSpec(
    "kvcache", kernel=kvcache_fwd, cpu_dtypes=None,
    notes={"cpu": "fp16/bf16 caches read as is, math in fp32; split-KV over threads",
           "torch": "reference: gathers the pages and materialises the Sq x S scores"}))


# ----------------------------------------------------------------------------------
# Reference (the torch backend, and the float64 oracle of the tests)


def visible(seqlens: Tensor, kv_start: Optional[Tensor], Sq: int, S: int, causal: bool, window_left: int,
            window_right: int) -> Tensor:
    """[B, Sq, S] bool: key j visible to query i of batch row b (bottom-right aligned)."""
    dev = seqlens.device
    n = seqlens.long()[:, None, None]
    j = torch.arange(S, device=dev)[None, None, :]
    pos = n - Sq + torch.arange(Sq, device=dev)[None, :, None]   # [B, Sq, 1] absolute query positions
    keep = j < n
    if kv_start is not None:
        keep = keep & (j >= kv_start.long()[:, None, None])
    if causal:
        keep = keep & (j <= pos)
    if window_left >= 0:
        keep = keep & (j >= pos - window_left)
    if window_right >= 0:
        keep = keep & (j <= pos + window_right)
    return keep


def reference(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens: Tensor,
              kv_start: Optional[Tensor], alibi: Optional[Tensor], scale: float, causal: bool, window_left: int,
              window_right: int, softcap: float) -> tuple[Tensor, Tensor]:
    """The canonical problem in torch ops, math in q's dtype (float64 in the tests); (out, lse)."""
    B, Sq, Hq, D = q.shape
    NB, P, Hkv, _ = k_pages.shape
    S = block_table.shape[1] * P
    G = Hq // Hkv
    # Entries of block_table past a row's pages may hold anything: clamp them for the gather;
    # the keys they give are invisible.
    bt = block_table.long().clamp(0, max(NB - 1, 0))
    keep = visible(seqlens, kv_start, Sq, S, causal, window_left, window_right)   # [B, Sq, S]
    exists = keep.any(1)[:, :, None, None]                                          # [B, S, 1, 1]
    # Slots no query sees may hold garbage (NaN): zero them so 0 * NaN never reaches out.
    k = torch.where(exists, k_pages[bt].reshape(B, S, Hkv, D), 0).to(q.dtype)
    v = torch.where(exists, v_pages[bt].reshape(B, S, Hkv, D), 0).to(q.dtype)
    k = k.repeat_interleave(G, dim=2).transpose(1, 2)                               # [B, Hq, S, D]
    v = v.repeat_interleave(G, dim=2).transpose(1, 2)
    s = (q.transpose(1, 2) @ k.transpose(-1, -2)) * scale                           # [B, Hq, Sq, S]
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if alibi is not None:
        pos = seqlens.long()[:, None] - Sq + torch.arange(Sq, device=q.device)      # [B, Sq]
        dist = (pos[:, :, None] - torch.arange(S, device=q.device)).abs()           # [B, Sq, S]
        s = s - alibi.to(s.dtype).expand(B, Hq)[:, :, None, None] * dist[:, None].to(s.dtype)
    s = s.masked_fill(~keep[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                                # -inf: no visible key
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])          # 0 where masked
    out = (p @ v).transpose(1, 2)                                                   # [B, Sq, Hq, D]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.contiguous(), lse.to(lse_dtype)


# ----------------------------------------------------------------------------------
# Entry point (the canonical problem, checked by llmfast.flash_attn)


def kvcache_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens: Tensor,
                      kv_start: Optional[Tensor] = None, alibi: Optional[Tensor] = None, *, scale: float,
                      causal: bool = False, window: tuple = (-1, -1), softcap: float = 0.0,
                      num_splits: int = 0) -> tuple[Tensor, Tensor]:
    """Decode attention on the canonical problem; ``(out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)``.

    Arguments are assumed checked (``llmfast.flash_attn.flash_attn_with_kvcache`` does that).
    """
    which = backends.resolve("kvcache", q)
    wl, wr = int(window[0]), int(window[1])
    if which == "torch" or k_pages.shape[1] == 0:   # a cache of no slots: nothing to read (kernels take pages >= 1)
        return reference(q, k_pages, v_pages, block_table, seqlens, kv_start, alibi, float(scale), bool(causal),
                         wl, wr, float(softcap))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if alibi is not None:
        alibi = alibi.to(torch.float32).expand(q.shape[0], q.shape[2]).contiguous()
    return kvcache_fwd.on(which, q.device.type)(
        q, k_pages, v_pages, block_table.contiguous(), seqlens.contiguous(),
        None if kv_start is None else kv_start.contiguous(), alibi, float(scale), bool(causal), wl, wr,
        float(softcap), int(num_splits))
