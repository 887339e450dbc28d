"""Drop-in replacements for ``torch.nn`` modules: same constructors, parameters and
``state_dict`` keys, forward through :mod:`llmfast.nn.functional`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast.nn import functional as F

__all__ = ["Softmax", "LogSoftmax", "LayerNorm", "RMSNorm", "MultiheadAttention", "CrossEntropyLoss", "GatedMLP",
           "SwiGLU", "gated_activation"]


class Softmax(torch.nn.Softmax):
    """:class:`torch.nn.Softmax` running llmfast's fused softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` running llmfast's fused log_softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` (same constructor, parameters and ``state_dict`` keys)
    running llmfast's fused kernel.

    ``forward(input, residual=None)``: with a residual, returns
    ``(norm(input + residual), input + residual)`` from one pass over memory.
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` (same constructor, parameters and ``state_dict`` keys)
    running llmfast's fused kernel.

    ``forward(input, residual=None)``: with a residual, returns
    ``(norm(input + residual), input + residual)`` from one pass over memory.
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose attention runs llmfast's fused kernel.

    Same constructor, parameters and ``state_dict`` keys (it is a subclass), so
    ``load_state_dict`` works both ways. With ``need_weights=False`` the projections
    run as in torch and the attention itself goes through
    :func:`llmfast.nn.functional.scaled_dot_product_attention`; when the weights are
    asked for, torch's own forward runs (the fused kernel never forms them).
    Masks follow torch: ``key_padding_mask`` [N, S] and ``attn_mask`` [L, S] or
    [N·num_heads, L, S], bool (True = not allowed) or additive float; ``is_causal`` is
    a hint that ``attn_mask`` is the causal mask (torch requires the mask with it).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        tF = torch.nn.functional
        is_batched = tF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = tF._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                              other_type=tF._none_or_dtype(attn_mask), other_name="attn_mask",
                                              target_type=query.dtype)
        attn_mask = tF._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                       target_type=query.dtype, check_other=False)
        if is_batched and not self.batch_first:  # [L, N, E] -> [N, L, E] views
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        elif not is_batched:  # unbatched [L, E]
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        out = self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal)  # [N, L, E]
        if not is_batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """query [N, L, E], key/value [N, S, Ek/Ev]; masks canonical (float, additive) or None."""
        N, L, E = query.shape
        H, hd = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint says attn_mask is causal: the kernel's causal mode replaces it
        else:
            is_causal = False
        # in-projection: one GEMM for self-attention with packed weights; q, k, v are then
        # strided views of [N, L, 3, H, hd] (the kernel takes them without a copy)
        if self._qkv_same_embed_dim and query is key and key is value:
            qkv = torch.nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.unflatten(-1, (3, H, hd)).unbind(2)
        else:
            if self._qkv_same_embed_dim:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.chunk(3)
            q = torch.nn.functional.linear(query, w_q, b_q).unflatten(-1, (H, hd))
            k = torch.nn.functional.linear(key, w_k, b_k).unflatten(-1, (H, hd))
            v = torch.nn.functional.linear(value, w_v, b_v).unflatten(-1, (H, hd))
        # masks -> [N or 1, H or 1, L, S] (additive float)
        if attn_mask is not None:
            S = key.shape[1]
            want = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should "
                                   f"be {torch.Size(want)}.")
            attn_mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(N, H, L, S)
        extra = []  # key columns appended by bias_k/bias_v and add_zero_attn
        if self.bias_k is not None and self.bias_v is not None:
            extra.append((self.bias_k.view(1, 1, H, hd).expand(N, 1, H, hd),
                          self.bias_v.view(1, 1, H, hd).expand(N, 1, H, hd)))
        if self.add_zero_attn:
            z = k.new_zeros(N, 1, H, hd)
            extra.append((z, z))
        for bk, bv in extra:
            k, v = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
            if attn_mask is not None:
                attn_mask = torch.nn.functional.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = torch.nn.functional.pad(key_padding_mask, (0, 1))
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(N, 1, 1, -1)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(N, L, E)  # [N, H, L, hd] -> [N, L, E]
        return torch.nn.functional.linear(out, self.out_proj.weight, self.out_proj.bias)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` running llmfast's fused cross-entropy.

    Same constructor, ``weight`` buffer and ``state_dict`` as torch's.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


# Hugging Face ``hidden_act`` names -> GatedMLP activations (gelu_new is the tanh form too).
_HF_GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                         "gelu": "gelu"}
GATED_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def gated_activation(hidden_act: str) -> str:
    """The :class:`GatedMLP` activation for a Hugging Face ``config.hidden_act`` name.

    ``"silu"``/``"swish"`` -> ``"silu"``, ``"gelu_pytorch_tanh"``/``"gelu_new"`` ->
    ``"gelu_tanh"``, ``"gelu"`` -> ``"gelu"``; anything else raises ValueError.
    """
    try:
        return _HF_GATED_ACTIVATIONS[hidden_act]
    except (KeyError, TypeError):
        raise ValueError(f"gated_activation(): no fused gated activation for hidden_act={hidden_act!r}; known: "
                         f"{sorted(_HF_GATED_ACTIVATIONS)}") from None


class GatedMLP(torch.nn.Module):
    """The gated MLP of Llama, Mistral, Qwen, Gemma and Phi-3: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    The gating runs llmfast's fused :func:`~llmfast.nn.functional.swiglu` /
    :func:`~llmfast.nn.functional.geglu`. Submodules are plain ``torch.nn.Linear``:
    ``gate_proj``, ``up_proj`` and ``down_proj``, or with ``packed=True`` one
    ``gate_up_proj`` (``[2 * intermediate_size, hidden_size]``, gate rows first, as
    Phi-3's) and ``down_proj``, so a Hugging Face ``LlamaMLP`` / ``GemmaMLP`` (or
    ``Phi3MLP``) ``state_dict`` loads as is (``bias`` is their ``mlp_bias``).

    ``activation``: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` (GeGLU, Gemma's
    ``gelu_pytorch_tanh``) or ``"gelu"`` (exact GeGLU); :func:`gated_activation`
    translates a Hugging Face ``hidden_act``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, activation: str = "silu",
                 packed: bool = False, device=None, dtype=None):
        super().__init__()
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
        factory = dict(device=device, dtype=dtype)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation, self.packed = activation, bool(packed)
        if self.packed:
            self.gate_up_proj = torch.nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, **factory)
        else:
            self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
            self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def _gated(self, gate: Tensor, up: Optional[Tensor]) -> Tensor:
        if self.activation == "silu":
            return F.swiglu(gate, up)
        return F.geglu(gate, up, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:
            return self.down_proj(self._gated(self.gate_up_proj(x), None))
        return self.down_proj(self._gated(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, packed={self.packed}"


class SwiGLU(GatedMLP):
    """:class:`GatedMLP` with the silu activation (Llama's MLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, packed: bool = False,
                 device=None, dtype=None):
        super().__init__(hidden_size, intermediate_size, bias=bias, activation="silu", packed=packed, device=device,
                         dtype=dtype)
