"""Hugging Face transformers integration: attention, rotary embedding, Gemma's norm and the causal-LM loss.

transformers (5.x) models look up their attention function by name,
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``, and
build their masks with ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``.
:func:`register` adds ``"llmfast"`` to both; :func:`llmfast.patch` then points a
model's config at it. Decoding (a few query tokens against the model's own cache, no
gradient) runs the split-KV decode kernel on the cache's K/V, with transformers' mask
(left padding, sliding window) translated into the kernel's rule; prefill and training
run the attention kernel. :func:`route` points a modelling file's module-level
``apply_rotary_pos_emb`` at :func:`apply_rotary_pos_emb` (llmfast's rope kernel), with a
count of holders so that undo restores the original exactly. :class:`OffsetRMSNorm` runs
Gemma's ``(1 + weight)`` RMSNorm;
:func:`causal_lm_class` makes the ``<Family>ForCausalLM`` subclass whose training
forward takes the loss through ``fused_linear_cross_entropy`` (:data:`CAUSAL_LM_HEADS`
says how each family's head differs). Nothing here imports transformers at module
import: transformers is an optional dependency.
"""
from __future__ import annotations

import functools
import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

ATTN_IMPLEMENTATION = "llmfast"


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention calling convention, run by ``llmfast.nn.functional.scaled_dot_product_attention``
    (with ``sliding_window``, ``softcap`` or ``s_aux`` sinks: by the fused op directly).

    query: [B, H, Lq, D]; key/value: [B, Hkv, Lk, D]; attention_mask: None, or a bool
    (True = attend) / additive float mask broadcastable to [B, H, Lq, Lk], as transformers'
    ``sdpa_mask`` builds it. Returns ([B, Lq, H, D] contiguous, None): the layout the
    models reshape into their output projection.

    Padded query rows: a query that sees no key (a left-padded position: the mask hides every
    key from it) gets zeros, FlashAttention's rule and torch SDPA's. transformers' eager
    attention gives such a row the uniform average of all the values instead (its softmax over
    scores that the mask's dtype-minimum swallowed; with gpt-oss's sinks the sink takes all the
    weight and eager gives zeros too). Only padded positions differ: no real query ever sees a
    padded key, so every real position's output and every gradient that flows from real
    positions agree with eager. The one place a padded row reaches a loss is transformers'
    label shift (the last padded position predicts the first real token when that label is not
    -100); its prediction is garbage under either rule, and matching eager there would need the
    full score row of every padded query with its softmax gradient, for nothing a model learns.
    """
    from llmfast.nn import functional as F
    from llmfast.ops import attention as attention_op

    if kwargs.get("position_bias") is not None:
        raise ValueError("llmfast attention does not support `position_bias`; use attn_implementation='eager'")
    # Mistral/Gemma 2/3/gpt-oss: sliding_window W (key j visible iff i - W < j <= i), softcap
    # (Gemma 2's attn_logit_softcapping), s_aux (gpt-oss's per-head sinks, [H])
    sliding_window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # The mask builder returns None exactly when plain causal attention is what's meant
    # (no padding, no sliding window in reach); a single query token sees every key.
    is_causal = bool(is_causal) and attention_mask is None and q_len > 1
    if q_len <= DECODE_MAX_QUERIES and kv_len > q_len and sinks is None:
        out = _decode(query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, softcap)
        if out is not None:
            return out, None
    if is_causal and kv_len > q_len:
        # A causal mask without a given mask aligns to the top-left corner (torch's rule), so
        # keys past the last query would be visible to nobody: they are padding of an empty
        # static cache during prefill.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if sliding_window is not None or softcap is not None or sinks is not None:
        # A given mask already holds the window (and the cache positions); without one the
        # window is passed as (W - 1, 0) on the causal rows so the kernel skips the blocks
        # outside it. q [B, H, L, D] and k/v [B, Hkv, S, D] are already the op's canonical form.
        window = (int(sliding_window) - 1, -1) if (sliding_window is not None and is_causal) else (-1, -1)
        out, _ = attention_op.attention(query, key, value, attention_mask, scale=scaling, is_causal=is_causal,
                                        dropout_p=float(dropout), window=window, softcap=float(softcap or 0.0),
                                        sinks=sinks)
        return out.transpose(1, 2).contiguous(), None
    # GQA: llmfast's kernels read the shared key/value heads in place instead of repeat_kv copies.
    enable_gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


# Decoding: a block of at most this many query tokens against a longer key sequence (the
# model's cache: DynamicCache, StaticCache, sliding-window layers) goes to the split-KV decode
# kernel, which reads each K/V row once for all the query heads of its group; longer query
# blocks (prefill) go to the attention kernel, which tiles the queries too.
DECODE_MAX_QUERIES = 16


def _decode(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], dropout: float,
            scaling: Optional[float], is_causal: bool, sliding_window, softcap) -> Optional[Tensor]:
    """Decode attention by ``llmfast.ops.kvcache`` on the cache's K/V as they are: [B, Lq, H, D], or None
    when this call is not a decode problem the kernel states exactly (the caller then runs the general path).

    The K/V transformers hands over ([B, Hkv, S, D], the cache after its update) are the kernel's
    contiguous cache seen as B pages of S keys, [B, S, Hkv, D] by a transpose: no copy. The mask is
    translated into the kernel's visibility rule (:func:`_decode_visibility`) and used only when
    that rule reproduces it exactly.
    """
    from llmfast.ops import kvcache

    if dropout or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return None  # the decode kernel has no backward (and no dropout)
    if not (query.dtype == key.dtype == value.dtype and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and query.device == key.device == value.device and key.shape[-1] == value.shape[-1] == query.shape[-1]
            and key.stride(-1) == 1 and value.stride(-1) == 1 and query.shape[1] % key.shape[1] == 0):
        return None
    B, _, q_len, D = query.shape
    rule = _decode_visibility(attention_mask, B, q_len, key.shape[2], is_causal, sliding_window, query.device)
    if rule is None:
        return None
    seqlens, kv_start, causal, window = rule
    table = torch.arange(B, dtype=torch.int32, device=query.device)[:, None]   # [B, 1]: row b is page b
    out, _ = kvcache.kvcache_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), table,
                                       seqlens, kv_start, scale=D ** -0.5 if scaling is None else float(scaling),
                                       causal=causal, window=window, softcap=float(softcap or 0.0))
    return out   # [B, Lq, Hq, D] contiguous


# The models pass one mask object to every layer of a forward: its translation is kept for the
# next layers (a weak reference, so a freed mask is never mistaken for a new one at its address).
_last_visibility: list = [None, None, None]   # [weakref to the mask, the other arguments, the rule]


def _decode_visibility(mask: Optional[Tensor], B: int, q_len: int, kv_len: int, is_causal: bool, sliding_window,
                       device) -> Optional[tuple]:
    """``(seqlens [B] int32, kv_start [B] int32 or None, causal, window)`` under which the kvcache
    kernel's rule (bottom-right aligned: query i sits at seqlens[b] - q_len + i) shows each query the
    keys transformers' ``mask`` shows it, or None when no such rule exists.

    No mask: the rule this module's general path applies (``is_causal`` already folded in: q_len 1
    sees every key; a causal block is top-left aligned, so its keys past q_len are the unfilled
    slots of an empty static cache). A bool mask [B or 1, 1, Lq, S] (True = attend): left padding
    gives kv_start (the first key any query sees), the cache's filled length gives seqlens (one
    past the last key any query sees), a sliding window W gives window (W - 1, -1); the rule is
    then rebuilt and compared with the mask, so a mask of any other shape (per-head, chunked,
    bidirectional blocks, a float bias) falls back instead of being approximated.
    """
    from llmfast.ops import kvcache

    window = (int(sliding_window) - 1, -1) if sliding_window is not None else (-1, -1)
    if mask is None:
        if not is_causal:
            return torch.full((B,), kv_len, dtype=torch.int32, device=device), None, False, (-1, -1)
        return torch.full((B,), q_len, dtype=torch.int32, device=device), None, True, window
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (q_len, kv_len) \
            or mask.shape[0] not in (1, B):
        return None
    args = (B, q_len, kv_len, sliding_window)
    ref, memo_args, rule = _last_visibility
    if ref is not None and ref() is mask and memo_args == args:
        return rule
    seen = mask[:, 0].expand(B, q_len, kv_len)
    keys = seen.any(1)                                                    # [B, S]: seen by some query
    some = keys.any(1)
    first = keys.int().argmax(1)
    last = kv_len - 1 - keys.flip(1).int().argmax(1)
    seqlens = torch.where(some, last + 1, 0).to(torch.int32)
    kv_start = torch.where(some, first, 0).to(torch.int32)
    rule = None
    if torch.equal(kvcache.visible(seqlens, kv_start, q_len, kv_len, True, window[0], window[1]), seen):
        rule = (seqlens, kv_start if bool(kv_start.any()) else None, True, window)
    _last_visibility[:] = [weakref.ref(mask), args, rule]
    return rule


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


# ----------------------------------------------------------------------------------
# Rotary embedding: the modelling files' module-level apply_rotary_pos_emb

# transformers' signature of apply_rotary_pos_emb (Llama's, and Phi-3's partial-rotary form)
HF_ROPE_PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``, run by llmfast's rope kernel.

    Llama's semantics, and Phi-3's: cos/sin narrower than the head rotate its first
    ``cos.shape[-1]`` features and pass the rest through (``llmfast.nn.functional.apply_rotary_pos_emb``).
    """
    from llmfast.nn import functional as F

    return F.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


# Module attributes routed to llmfast while some patch holds them:
# (module name, attribute) -> [the original object, ids of the models holding it].
_ROUTED: dict = {}


def rotary_module(model: torch.nn.Module) -> tuple[Optional[str], Optional[str]]:
    """(name of the modelling module whose ``apply_rotary_pos_emb`` ``model``'s attention calls, None),
    or (None, why it cannot be routed)."""
    name = type(model).__module__
    module = sys.modules.get(name)
    routed = _ROUTED.get((name, "apply_rotary_pos_emb"))
    fn = routed[0] if routed else getattr(module, "apply_rotary_pos_emb", None)  # the original's signature
    if fn is None:
        return None, f"{name} has no module-level apply_rotary_pos_emb"
    try:
        params = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = ()
    if params != HF_ROPE_PARAMETERS:
        return None, f"{name}.apply_rotary_pos_emb takes {params}, not {HF_ROPE_PARAMETERS}"
    return name, None


def route(module_name: str, attr: str, replacement, holder: object):
    """Point ``<module_name>.<attr>`` at ``replacement`` on behalf of model ``holder``; returns
    the undo, or None when ``holder`` already holds it (a model is patched once).

    The module attribute is global (every model of that family in the process calls it),
    so holders are counted: the original object comes back, identical, when the last
    model that routed it is undone, in whatever order the patches are undone.
    """
    key = (module_name, attr)
    module = sys.modules[module_name]
    if key not in _ROUTED:
        _ROUTED[key] = [getattr(module, attr), set()]
        setattr(module, attr, replacement)
    holders = _ROUTED[key][1]
    if id(holder) in holders:
        return None
    holders.add(id(holder))

    def undo():
        holders.discard(id(holder))
        if not holders and key in _ROUTED and _ROUTED[key][1] is holders:
            setattr(module, attr, _ROUTED.pop(key)[0])
    return undo


# ----------------------------------------------------------------------------------
# Norms: Gemma's RMSNorm


class OffsetRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm, ``(x / rms(x)) * (1 + weight)``, run by llmfast's RMSNorm kernel.

    Gemma's semantics exactly: the normalised row and its product with ``1 + weight`` are
    both computed in fp32 and rounded to the input's dtype once (Llama rounds the
    normalised row first, then multiplies). The kernel is handed ``1 + weight.float()``, an
    fp32 [N] tensor, which it reads in fp32 for fp16/bf16 inputs; the addition is part of
    the autograd graph, so the module's ``weight`` stays the model's Parameter and keeps
    training. ``state_dict`` keys are Gemma's (``weight``).
    """

    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        from llmfast.nn import functional as F

        return F.rms_norm(x, tuple(self.weight.shape), 1.0 + self.weight.float(), self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, scale=1 + weight"


# ----------------------------------------------------------------------------------
# The causal-LM loss: lm_head + cross-entropy through fused_linear_cross_entropy


@dataclass(frozen=True)
class CausalLMHead:
    """How a family's ``<Family>ForCausalLM.forward`` turns the last hidden state into a loss.

    Every family listed in :data:`CAUSAL_LM_HEADS` computes ``logits = lm_head(hidden)``
    (bias if the Linear has one), optionally soft-caps them, and takes transformers'
    ``ForCausalLMLoss``; these are the differences the fused forward reproduces.
    """

    softcap: Optional[str] = None    # config attribute with the final-logit soft-cap (None: no cap)
    router_aux: bool = False         # MoE: loss += router_aux_loss_coef * load_balancing_loss_func(...)
    output: str = "CausalLMOutputWithPast"   # transformers.modeling_outputs class returned


# model_type -> its head. Verified by tests/test_patch.py (loss and every gradient match
# the unpatched model) and tests/test_hf_convergence.py.
CAUSAL_LM_HEADS = {
    "llama": CausalLMHead(),
    "mistral": CausalLMHead(),
    "mixtral": CausalLMHead(router_aux=True, output="MoeCausalLMOutputWithPast"),
    "qwen2": CausalLMHead(),
    "qwen3": CausalLMHead(),
    "gemma": CausalLMHead(),
    "gemma2": CausalLMHead(softcap="final_logit_softcapping"),
    "gemma3_text": CausalLMHead(softcap="final_logit_softcapping"),   # Gemma3ForCausalLM
    "phi3": CausalLMHead(),
}


def causal_lm_loss(hidden: Tensor, head: torch.nn.Linear, labels: Optional[Tensor], *, softcap: Optional[float] = None,
                   num_items_in_batch=None, ignore_index: int = -100, shift_labels: Optional[Tensor] = None,
                   **_unused) -> Tensor:
    """transformers' ``ForCausalLMLoss(head(hidden), labels, ...)`` without the [tokens, vocab] logits.

    hidden: [B, L, H] (after ``logits_to_keep``); labels: [B, L], shifted here as
    transformers does (position i predicts labels[i + 1]; the last position is ignored),
    or ``shift_labels`` [B, L] already shifted. ``num_items_in_batch`` (gradient
    accumulation): the sum of the token losses divided by it, else their mean over
    non-ignored tokens. The loss is fp32, as transformers' (it upcasts the logits).
    """
    from llmfast.nn import functional as F

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    H = hidden.shape[-1]
    loss = F.fused_linear_cross_entropy(hidden.reshape(-1, H), head.weight, shift_labels.reshape(-1).to(hidden.device),
                                        head.bias, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                                        dtype=torch.float32)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _slice_logits_to_keep(hidden: Tensor, logits_to_keep) -> Tensor:
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers < 5: the models slice inline, this way
        index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, index, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _causal_lm_forward(self, *args, **kwargs):
    """The patched ``<Family>ForCausalLM.forward``.

    Training with labels (``labels`` given, ``self.training`` and grad enabled): the base
    model runs as usual, then the loss goes through ``fused_linear_cross_entropy``, so the
    [B, L, vocab] logits never exist; the output's ``logits`` is None then (as Liger's).
    Anything else (no labels, eval mode, no_grad: generation and evaluation) is the
    family's own forward, logits included. Forward hooks on ``lm_head`` do not fire on
    the fused path (it reads ``lm_head.weight``/``bias``, never calls the module), and a
    model whose ``loss_function`` was replaced gets transformers' causal-LM loss there.
    """
    base = type(self)._llmfast_base
    try:
        arguments = dict(_signature(base).bind(self, *args, **kwargs).arguments)
    except TypeError:  # a bad call: the family's forward raises its own error
        return base.forward(self, *args, **kwargs)
    extra = dict(arguments.pop("kwargs", {}))
    if arguments.get("labels") is None or not (self.training and torch.is_grad_enabled()):
        return base.forward(self, *args, **kwargs)

    import transformers.modeling_outputs as outputs_mod

    spec = CAUSAL_LM_HEADS[self.config.model_type]
    arguments.pop("self")
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if spec.router_aux and arguments.get("output_router_logits") is None:
        arguments["output_router_logits"] = self.config.output_router_logits

    # as the family's forward: named arguments and **kwargs to the base model, **kwargs to the loss
    outputs = getattr(self, self.base_model_prefix)(**arguments, **extra)
    hidden = _slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    softcap = getattr(self.config, spec.softcap, None) if spec.softcap else None
    loss = causal_lm_loss(hidden, self.get_output_embeddings(), labels, softcap=softcap, **extra)

    fields = {}
    if spec.router_aux and arguments["output_router_logits"]:
        balance = sys.modules[base.__module__].load_balancing_loss_func
        aux = balance(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                      arguments.get("attention_mask"))
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
        fields["aux_loss"] = aux
    cls = getattr(outputs_mod, spec.output)
    # cache / hidden_states / attentions / router_logits: whatever the base model returned
    fields.update({k: v for k, v in outputs.items() if k in cls.__dataclass_fields__ and k not in ("logits", "loss")})
    out = cls(loss=loss, logits=None, **fields)
    return out if return_dict else out.to_tuple()


_SIGNATURES: dict = {}
_CAUSAL_LM_CLASSES: dict = {}


def _signature(base: type) -> inspect.Signature:
    sig = _SIGNATURES.get(base)
    if sig is None:  # follows functools.wraps' __wrapped__ through transformers' decorators
        sig = _SIGNATURES[base] = inspect.signature(base.forward)
    return sig


def causal_lm_class(base: type) -> type:
    """The subclass of ``base`` (a ``<Family>ForCausalLM``) whose forward is :func:`_causal_lm_forward`.

    One per base class. It keeps the base's name, qualname and module, so
    ``save_pretrained`` writes the family's architecture name and a pickled model
    loads as the plain family class.
    """
    cls = _CAUSAL_LM_CLASSES.get(base)
    if cls is None:
        forward = functools.wraps(base.forward)(_causal_lm_forward)
        del forward.__wrapped__  # our signature is (*args, **kwargs): bound against the base's inside
        cls = type(base.__name__, (base,), {"forward": forward, "_llmfast_base": base, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__,
                                            "__doc__": f"{base.__name__} with llmfast's fused causal-LM loss."})
        _CAUSAL_LM_CLASSES[base] = cls
    return cls
