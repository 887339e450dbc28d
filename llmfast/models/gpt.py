"""A small decoder-only Transformer (GPT) built from llmfast ops.

Shapes: B batch, L sequence, C = n_embd, H = n_head, D = C / H, V = vocab_size.

    idx [B, L] -> token embedding (+ learned positions, or RoPE inside attention)
    n_layer x pre-norm block:  h = norm(x); x += attn(h); h = norm(x); x += mlp(h)
    final norm -> LM head (weights tied to the token embedding)

Where llmfast saves work:

* every residual add is fused into the norm that reads the sum
  (``norm(delta, residual=x)`` returns ``(norm(x + delta), x + delta)``), so a block
  never makes a separate pass over the residual stream: the stream is carried as
  ``(delta, residual)`` from one norm to the next;
* attention is ``llmfast.nn.functional.flash_attention`` on [B, L, H, D] views of the
  fused QKV projection: no [B, H, L, L] score matrix is stored, and no transposes;
* training loss is ``fused_linear_cross_entropy`` on the final hidden states: the
  [B*L, V] logits are never materialised (nor their gradient).

Dropout, when asked for, is on the embeddings, on each residual branch, and on the
attention probabilities inside the flash kernel (its counter-based RNG regenerates the
same mask in backward, so nothing extra is stored).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import llmfast.nn as lnn
from llmfast.flash_attn import flash_attn_with_kvcache
from llmfast.nn import functional as F
from llmfast.ops import rope as rope_op

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig:
    vocab_size: int = 256          # byte-level by default
    block_size: int = 128          # longest context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"        # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    pos_embedding: str = "learned"  # "learned" | "rope"
    rope_base: float = 10000.0
    tie_weights: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.pos_embedding not in ("learned", "rope"):
            raise ValueError(f"pos_embedding must be 'learned' or 'rope', got {self.pos_embedding!r}")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head dimension")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return lnn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return lnn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class KVCache:
    """One layer's keys and values for ``GPT.generate``: k, v [B, block_size, H, D], allocated
    on first use in the dtype attention produces them in (the autocast dtype under autocast)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """Append k, v [B, L, H, D] at position ``start`` and attend q over the cache (causal)."""
        if self.k is None:
            B, _, H, D = k.shape
            self.k = k.new_zeros(B, self.block_size, H, D)
            self.v = v.new_zeros(B, self.block_size, H, D)
        return flash_attn_with_kvcache(q, self.k, self.v, k, v, cache_seqlens=start, causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.dropout

    def forward(self, x: Tensor, rope: Optional[tuple] = None, cache: Optional[KVCache] = None,
                start: int = 0) -> Tensor:
        """x [B, L, C]; with ``cache``, x holds positions start .. start + L - 1 and attends to the
        cached earlier positions too (decoding)."""
        B, L, C = x.shape
        # [B, L, 3C] -> q, k, v: [B, L, H, D] strided views, the layout flash_attention reads.
        q, k, v = self.c_attn(x).view(B, L, 3, self.n_head, C // self.n_head).unbind(2)
        if rope is not None:
            # NeoX pairing (i, i + D/2), angles [L, D/2] at this chunk's positions (KV cache: from start):
            # q and k in one rope call (one launch, one pass over the tables)
            cos, sin = (t.unsqueeze(0) for t in rope)
            q, k = rope_op.rope(q, k, cos, sin, 2 * cos.shape[-1], False)
        if cache is not None:
            y = cache.attend(q, k, v, start)
        else:
            y = F.flash_attention(q, k, v, causal=True, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.reshape(B, L, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(torch.nn.functional.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm block on the (delta, residual) stream: returns the MLP output and the residual
    it must still be added to; the next block's (or the final) norm does that add."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, delta: Tensor, residual: Optional[Tensor], rope=None, cache: Optional[KVCache] = None,
                start: int = 0) -> tuple[Tensor, Tensor]:
        if residual is None:  # first block: the embeddings are the residual stream
            residual, h = delta, self.ln_1(delta)
        else:
            # Keep the residual stream in its own dtype (fp32 under autocast): branch outputs
            # come back in the autocast dtype.
            h, residual = self.ln_1(delta.to(residual.dtype), residual)
        h, residual = self.ln_2(self.attn(h, rope, cache, start).to(residual.dtype), residual)
        return self.mlp(h), residual


class GPT(nn.Module):
    """Decoder-only language model; ``forward(idx, targets=None) -> (logits or None, loss or None)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if config.pos_embedding == "rope":
            D = config.n_embd // config.n_head
            inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # [L, D/2]
            self.register_buffer("rope_cos", angles.cos(), persistent=False)   # [L, D/2]
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's rule: residual projections start smaller, by 1/sqrt(2 * n_layer), so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: Tensor, caches: Optional[list] = None, start: int = 0) -> Tensor:
        """Final normed hidden states [B, L, C] of tokens idx [B, L] at positions start .. start + L - 1
        (``caches``: one KVCache per block holding positions 0 .. start - 1; decoding)."""
        B, L = idx.shape
        if start + L > self.config.block_size:
            raise ValueError(f"sequence of length {start + L} is longer than block_size {self.config.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + L, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + L], self.rope_sin[start:start + L])
        delta, residual = self.drop(x), None
        for i, block in enumerate(self.blocks):
            delta, residual = block(delta, residual, rope, None if caches is None else caches[i], start)
        h, _ = self.ln_f(delta.to(residual.dtype), residual)
        return h

    def _head(self, h: Tensor):
        """(h, lm_head weight) in the dtype autocast would give a Linear: the fused loss is a
        custom op that autocast does not see."""
        w = self.lm_head.weight
        dev = h.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            h, w = h.to(dt), w.to(dt)
        return h, w

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """idx, targets: [B, L] token ids. With targets: (None, mean cross-entropy) computed
        without materialising logits (targets == -100 are ignored). Without: (logits [B, L, V], None)."""
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(h), None
        h, w = self._head(h)
        loss = F.fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1))
        return None, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx [B, L]; returns [B, L + max_new_tokens].

        ``temperature`` 0 takes the most likely token; ``top_k`` samples among the k most likely.
        The context is cropped to the last ``block_size`` tokens.

        ``use_cache`` (default): the prompt runs once (prefill) into per-layer KV caches and
        each new token then costs one position (``llmfast.flash_attn.flash_attn_with_kvcache``)
        instead of the whole context. Once the context fills block_size, every step
        re-runs the cropped context, as without the cache (positions shift). ``use_cache=False``
        recomputes the context at every step.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        was_training = self.training
        self.eval()
        try:
            caches, pos = None, 0
            for _ in range(max_new_tokens):
                if not use_cache:
                    h = self.hidden(idx[:, -self.config.block_size:])
                elif caches is None or pos >= self.config.block_size:   # prefill (again, once cropped)
                    ctx = idx[:, -self.config.block_size:]
                    caches = [KVCache(self.config.block_size) for _ in self.blocks]
                    h, pos = self.hidden(ctx, caches, 0), ctx.shape[1]
                else:
                    h, pos = self.hidden(idx[:, -1:], caches, pos), pos + 1
                logits = self.lm_head(h[:, -1]).float()   # [B, V]
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
        finally:
            self.train(was_training)
        return idx
