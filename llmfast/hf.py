"""Hugging Face transformers integration: llmfast attention behind ``AttentionInterface``.

transformers (5.x) models look up their attention function by name,
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``, and
build their masks with ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``.
:func:`register` adds ``"llmfast"`` to both; :func:`llmfast.patch` then points a
model's config at it. Nothing here imports transformers at module import:
transformers is an optional dependency.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ATTN_IMPLEMENTATION = "llmfast"


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention calling convention, run by ``llmfast.nn.functional.scaled_dot_product_attention``.

    query: [B, H, Lq, D]; key/value: [B, Hkv, Lk, D]; attention_mask: None, or a bool
    (True = attend) / additive float mask broadcastable to [B, H, Lq, Lk], as transformers'
    ``sdpa_mask`` builds it. Returns ([B, Lq, H, D] contiguous, None): the layout the
    models reshape into their output projection.
    """
    from llmfast.nn import functional as F

    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"llmfast attention does not support `{unsupported}`; "
                             f"use attn_implementation='eager' for this model")
    if kwargs.get("position_bias") is not None:
        raise ValueError("llmfast attention does not support `position_bias`; use attn_implementation='eager'")
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # The mask builder returns None exactly when plain causal attention is what's meant
    # (no padding, no sliding window in reach); a single query token sees every key.
    is_causal = bool(is_causal) and attention_mask is None and q_len > 1
    if is_causal and kv_len > q_len:
        # A causal mask without a given mask aligns to the top-left corner (torch's rule), so
        # keys past the last query would be visible to nobody: they are padding of an empty
        # static cache during prefill.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    # GQA: llmfast's kernels read the shared key/value heads in place instead of repeat_kv copies.
    enable_gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Make ``attn_implementation="llmfast"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    # Our kernel takes what torch's SDPA takes (bool "attend" masks, or None meaning causal),
    # so the models build their masks the SDPA way. Without a mask entry, transformers
    # would build no mask at all for an unknown implementation and padding would leak.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
