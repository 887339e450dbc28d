"""``llmfast.nn.TransformerEncoderLayer``: torch's encoder layer on llmfast attention and LayerNorm.

Kept out of ``modules.py`` (the thin one-op modules) because it composes several ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast.nn import functional as F

__all__ = ["TransformerEncoderLayer"]


def _mha_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, heads: int,
              q_len: int, k_len: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn.MultiheadAttention's two masks (True = *masked out*, or additive float) as one
    SDPA mask (True = *attend*, or additive float) broadcastable to [B, H, Lq, Lk].

    attn_mask: [Lq, Lk] or [B*H, Lq, Lk]; key_padding_mask: [B, Lk]. Two bool masks stay bool
    (no float mask is materialised); a float one turns the other into -inf/0.
    """
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask.view(1, 1, q_len, k_len) if attn_mask.dim() == 2
                     else attn_mask.view(batch, heads, q_len, k_len))
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(batch, 1, 1, k_len))
    if not parts:
        return None
    for m in parts:
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"only bool and floating types of masks are supported, got {m.dtype}")
    if all(m.dtype == torch.bool for m in parts):
        masked = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return ~masked
    out = None
    for m in parts:
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        out = m if out is None else out + m
    return out


def _add_norm(delta: Tensor, residual: Tensor, ln: torch.nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """(ln(residual + delta), residual + delta) in one fused pass. Under autocast a branch
    comes back in bf16/fp16 while the residual stream is fp32: the sum is taken in the promoted
    dtype, as torch's ``x + branch`` would."""
    dt = torch.promote_types(delta.dtype, residual.dtype)
    return F.layer_norm(delta.to(dt), ln.normalized_shape, ln.weight, ln.bias, ln.eps, residual=residual.to(dt))


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """:class:`torch.nn.TransformerEncoderLayer` built from llmfast attention and LayerNorm.

    Same constructor, parameters and ``state_dict`` keys as torch's (it *is* torch's
    module with another forward): ``self_attn.in_proj_weight`` feeds
    ``llmfast.nn.functional.scaled_dot_product_attention``, and each residual add is
    fused into the LayerNorm that follows it (``layer_norm(..., residual=)``), so the
    sum is never a separate pass over memory. ``src_mask`` / ``src_key_padding_mask``
    / ``is_causal`` mean what they mean for torch; ``is_causal=True`` without a
    ``src_mask`` gives causal attention (torch raises there). A query that sees no
    key gives zeros, where torch gives NaN.
    """

    # torch.nn.TransformerEncoder turns padded batches into nested tensors (and then calls
    # torch's fused C++ layer) when this is 1 or 2; our forward takes dense tensors only, so
    # the encoder must always see the slow-path answer. A data descriptor wins over the
    # instance attribute torch's __init__ sets, also on a module retyped by llmfast.patch.
    @property
    def activation_relu_or_gelu(self) -> int:
        return 0

    @activation_relu_or_gelu.setter
    def activation_relu_or_gelu(self, value) -> None:
        pass

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:
            raise NotImplementedError("llmfast.nn.TransformerEncoderLayer takes dense (padded) tensors, "
                                      "not nested tensors")
        unbatched = src.dim() == 2
        if unbatched:  # [L, E]: torch accepts it; masks are then [L, L] / [H, L, L] and [L]
            src = src.unsqueeze(0 if self.self_attn.batch_first else 1)
            if src_key_padding_mask is not None:
                src_key_padding_mask = src_key_padding_mask.unsqueeze(0)
        x = src if self.self_attn.batch_first else src.transpose(0, 1)   # [B, L, E]
        ln1, ln2 = self.norm1, self.norm2
        if self.norm_first:
            # x + sa(norm1(x)), then (x + sa) + ff(norm2(x + sa)): the first sum is fused into norm2.
            a = self._llmfast_sa(F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps),
                                 src_mask, src_key_padding_mask, is_causal)
            h, x = _add_norm(a, x, ln2)
            out = x + self._ff_block(h)
        else:
            # norm1(x + sa(x)), then norm2(h + ff(h)): both sums fused into their norms.
            h, _ = _add_norm(self._llmfast_sa(x, src_mask, src_key_padding_mask, is_causal), x, ln1)
            out, _ = _add_norm(self._ff_block(h), h, ln2)
        if not self.self_attn.batch_first:
            out = out.transpose(0, 1)
        return out.squeeze(0 if self.self_attn.batch_first else 1) if unbatched else out

    def _llmfast_sa(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    is_causal: bool) -> Tensor:
        """Self-attention of x [B, L, E] with self_attn's packed projection; returns dropout1(out) [B, L, E]."""
        mha = self.self_attn
        B, L, E = x.shape
        H = mha.num_heads
        qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        # [B, L, 3, H, D] -> three [B, H, L, D] views: no copies before the kernel.
        q, k, v = qkv.view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)
        if is_causal and key_padding_mask is None:
            attn_mask = None  # torch's rule: with the hint and no padding mask, the hint wins
        elif is_causal and attn_mask is None:
            attn_mask = ~torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        else:
            is_causal = False
        mask = _mha_mask(attn_mask, key_padding_mask, B, H, L, L, x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=mha.dropout if self.training else 0.0,
                                           is_causal=is_causal and mask is None)
        o = o.transpose(1, 2).reshape(B, L, E)
        return self.dropout1(torch.nn.functional.linear(o, mha.out_proj.weight, mha.out_proj.bias))
