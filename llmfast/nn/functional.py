"""Drop-in replacements for ``torch.nn.functional``, backed by llmfast kernels.

Each function has torch's signature and semantics (plus keyword-only extras such
as ``scale=``/``mask=``/``is_causal=`` for softmax), checks its arguments with
torch-style errors, and calls :mod:`llmfast.ops`, which picks the backend.
"""
from __future__ import annotations

import operator
import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from llmfast import reference
from llmfast.ops import attention as attention_op
from llmfast.ops import cross_entropy as cross_entropy_op
from llmfast.ops import fused_linear_cross_entropy as flce_op
from llmfast.ops import glu as glu_op
from llmfast.ops import norm as norm_op
from llmfast.ops import rope as rope_op
from llmfast.ops import softmax as softmax_op

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "layer_norm_", "rms_norm_",
           "scaled_dot_product_attention", "flash_attention", "cross_entropy", "fused_linear_cross_entropy", "perplexity",
           "swiglu", "geglu", "apply_rotary_pos_emb", "rotary_embedding"]


def _check_float(name: str, arg: str, t: Tensor):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}(): argument '{arg}' must be a Tensor, not {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}(): argument '{arg}' must be a floating point tensor, got {t.dtype}")


def _softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    # torch.nn.functional._get_softmax_dim: the legacy implicit choice, with its warning
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  "Change the call to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_common(name, input, dim, stacklevel, dtype, scale, mask, is_causal, log):
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be a Tensor, not {type(input).__name__}")
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"{name}(): argument 'dtype' must be a floating point torch.dtype, got {dtype!r}")
        input = input.to(dtype)  # torch casts before the operation
    _check_float(name, "input", input)
    if dim is None:
        dim = _softmax_dim(name, input.dim(), stacklevel)
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name}(): argument 'dim' must be int, not {type(dim).__name__}")
    rank = max(input.dim(), 1)
    if not -rank <= dim < rank:
        raise IndexError(f"{name}(): Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], "
                         f"but got {dim})")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{name}(): argument 'scale' must be a number, not {type(scale).__name__}")
    if is_causal and input.dim() < 2:
        raise ValueError(f"{name}(): is_causal=True needs an input of at least 2 dims, got {input.dim()}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name}(): argument 'mask' must be a Tensor, not {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{name}(): mask must be bool (True = keep) or floating point (additive), got {mask.dtype}")
        if mask.device != input.device:
            raise ValueError(f"{name}(): mask is on {mask.device} but input is on {input.device}")
        try:
            ok = torch.broadcast_shapes(mask.shape, input.shape) == input.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name}(): mask of shape {tuple(mask.shape)} is not broadcastable to the "
                             f"input's shape {tuple(input.shape)}")
    return softmax_op.softmax(input, dim, scale=scale, mask=mask, is_causal=bool(is_causal), log=log)


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype: Optional[torch.dtype] = None,
            *, scale: Optional[float] = None, mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    r"""Softmax over ``dim``, like :func:`torch.nn.functional.softmax`, with fused extras.

    Args:
        input: floating point tensor.
        dim: the dimension softmax runs along.
        dtype: if given, ``input`` is cast to it before the operation, and the result has it.
        scale (keyword): multiplies ``input`` first (e.g. ``1/sqrt(d)``).
        mask (keyword): broadcastable to ``input``; bool (True = keep) or additive float.
        is_causal (keyword): keep only column ``j <= i`` over the last two dims (``torch.tril``).

    A row in which a mask leaves no position gives zeros (and zero gradient), never NaN.
    Math happens in fp32 for fp16/bf16 inputs.
    """
    return _softmax_common("softmax", input, dim, _stacklevel, dtype, scale, mask, is_causal, log=False)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype: Optional[torch.dtype] = None,
                *, scale: Optional[float] = None, mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    r"""Log-softmax over ``dim``, like :func:`torch.nn.functional.log_softmax`, with softmax's extras.

    Masked positions give ``-inf`` with zero gradient; a fully masked row gives zeros.
    """
    return _softmax_common("log_softmax", input, dim, _stacklevel, dtype, scale, mask, is_causal, log=True)


# ----------------------------------------------------------------------------------
# LayerNorm / RMSNorm

_HALF = (torch.float16, torch.bfloat16)


def _normalized_shape(name: str, normalized_shape) -> tuple:
    if not isinstance(normalized_shape, (list, tuple)):  # torch.Size is a tuple
        raise TypeError(f"{name}(): argument 'normalized_shape' must be tuple of ints, "
                        f"not {type(normalized_shape).__name__}")
    out = []
    for i, d in enumerate(normalized_shape):
        if isinstance(d, bool) or isinstance(d, float):
            raise TypeError(f"{name}(): argument 'normalized_shape' must be tuple of ints, but found element of "
                            f"type {type(d).__name__} at pos {i}")
        try:
            out.append(operator.index(d))
        except TypeError:
            raise TypeError(f"{name}(): argument 'normalized_shape' must be tuple of ints, but found element of "
                            f"type {type(d).__name__} at pos {i}") from None
    if not out:
        raise RuntimeError(f"{name}(): Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                           f"least one element, but got normalized_shape = []")
    return tuple(out)


def _check_norm_args(name: str, input, normalized_shape, params: dict, eps, residual) -> tuple:
    """torch's checks for layer_norm/rms_norm, plus the residual's; returns normalized_shape as a tuple."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be a Tensor, not {type(input).__name__}")
    _check_float(name, "input", input)
    shape = _normalized_shape(name, normalized_shape)
    k = len(shape)
    if input.dim() < k or tuple(input.shape[-k:]) != shape:
        raise RuntimeError(f"{name}(): Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    for arg, p in params.items():
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}(): argument '{arg}' must be a Tensor or None, not {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise RuntimeError(f"{name}(): Expected {arg} to be of same shape as normalized_shape, but got {arg} of "
                               f"shape {list(p.shape)} and normalized_shape = {list(shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{name}(): argument '{arg}' must be a floating point tensor, got {p.dtype}")
        if p.device != input.device:
            raise RuntimeError(f"{name}(): {arg} is on {p.device} but input is on {input.device}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise TypeError(f"{name}(): argument 'eps' must be a number, not {type(eps).__name__}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{name}(): argument 'residual' must be a Tensor or None, not {type(residual).__name__}")
        if residual.shape != input.shape:
            raise RuntimeError(f"{name}(): residual of shape {list(residual.shape)} must have the input's shape "
                               f"{list(input.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{name}(): residual dtype {residual.dtype} must match the input's dtype {input.dtype}")
        if residual.device != input.device:
            raise RuntimeError(f"{name}(): residual is on {residual.device} but input is on {input.device}")
    return shape


def _check_layer_norm_dtypes(name: str, input: Tensor, weight, bias):
    """torch's rule: weight and bias in the input's dtype, or both float32 for a float16/bfloat16 input."""
    for arg, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype != input.dtype and not (p.dtype == torch.float32 and input.dtype in _HALF):
            raise RuntimeError(f"{name}(): mixed dtype: {arg} is {p.dtype} but input is {input.dtype}; expected "
                               f"{input.dtype}" + (" or torch.float32" if input.dtype in _HALF else ""))
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise RuntimeError(f"{name}(): mixed dtype: weight is {weight.dtype} but bias is {bias.dtype}; expected "
                           "one dtype for both (as torch.nn.functional.layer_norm)")


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, residual: Optional[Tensor] = None):
    r"""Layer normalisation over the trailing ``normalized_shape`` dims, like
    :func:`torch.nn.functional.layer_norm`, with a fused residual add.

    Args:
        input: floating point tensor ``[*, *normalized_shape]``.
        normalized_shape: the trailing shape normalised over (a list/tuple of ints).
        weight, bias: ``normalized_shape`` tensors in the input's dtype, or float32 for a
            float16/bfloat16 input (as torch allows); either may be None.
        eps: added to the variance.
        residual (keyword): a tensor like ``input``. The kernel normalises
            ``s = input + residual`` and returns ``(normalized, s)`` in one pass.

    Statistics are fp32 for fp16/bf16 inputs; the output has the input's dtype.
    """
    shape = _check_norm_args("layer_norm", input, normalized_shape, {"weight": weight, "bias": bias}, eps, residual)
    _check_layer_norm_dtypes("layer_norm", input, weight, bias)
    return norm_op.layer_norm(input, shape, weight, bias, float(eps), residual=residual)


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, residual: Optional[Tensor] = None):
    r"""Root-mean-square normalisation over the trailing ``normalized_shape`` dims, like
    :func:`torch.nn.functional.rms_norm`, with a fused residual add.

    Args:
        input: floating point tensor ``[*, *normalized_shape]``.
        normalized_shape: the trailing shape normalised over (a list/tuple of ints).
        weight: a ``normalized_shape`` tensor or None. Any floating dtype, as in torch:
            the output keeps the input's dtype (a weight in another dtype is read as
            float32 for fp16/bf16 inputs, else in the input's dtype).
        eps: added to the mean square; None means ``torch.finfo(dtype).eps`` of the math
            dtype (float32 for fp16/bf16 inputs), as in torch.
        residual (keyword): a tensor like ``input``; returns ``(normalized, input + residual)``.
    """
    if isinstance(input, Tensor) and input.is_complex():  # torch's rms_norm takes complex input: it checks it
        return norm_op.rms_norm(input, normalized_shape, weight, eps, residual=residual)
    shape = _check_norm_args("rms_norm", input, normalized_shape, {"weight": weight}, eps, residual)
    return norm_op.rms_norm(input, shape, weight, None if eps is None else float(eps), residual=residual)


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the bytes that ``a``'s and ``b``'s elements span intersect (addresses: two
    storages never share any)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + (sum((n - 1) * st for n, st in zip(a.shape, a.stride())) + 1) * a.element_size()
    b1 = b0 + (sum((n - 1) * st for n, st in zip(b.shape, b.stride())) + 1) * b.element_size()
    return a0 < b1 and b0 < a1


def _check_inplace_norm(name: str, input, residual, out):
    """What the in-place norms add to the norm checks: out like input, no overlaps that would corrupt the result."""
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}(): argument 'out' must be a Tensor or None, not {type(out).__name__}")
        if out.shape != input.shape or out.dtype != input.dtype or out.device != input.device:
            raise RuntimeError(f"{name}(): out must be like input ({input.dtype}{list(input.shape)} on "
                               f"{input.device}), got {out.dtype}{list(out.shape)} on {out.device}")
    if torch.compiler.is_compiling():
        return  # data pointers are not traceable; the overlap checks run eagerly
    if out is not None:
        same = out.data_ptr() == input.data_ptr() and out.stride() == input.stride()
        if not same and _overlap(out, input):
            raise ValueError(f"{name}(): out partially overlaps input; pass input itself (or out=None) to "
                             f"write over it, or a separate buffer")
    if residual is not None:
        if _overlap(residual, input):
            raise ValueError(f"{name}(): residual overlaps input; the sum is written into residual, so they must "
                             f"be separate tensors")
        if out is not None and _overlap(residual, out):
            raise ValueError(f"{name}(): out overlaps residual; residual receives input + residual and out the "
                             f"normalised sum, so they must be separate tensors")


def layer_norm_(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
                out: Optional[Tensor] = None):
    r"""In-place :func:`layer_norm` for inference loops: no fresh allocations.

    With ``residual``: ``residual <- input + residual``, then ``out <- layer_norm(residual)``
    (vLLM's ``fused_add_rms_norm`` contract; ``out=None`` writes over ``input``); returns
    ``(out, residual)``. Without: ``out <- layer_norm(input)``, returns ``out``. One pass
    over memory, no statistics saved. Under autograd (an argument requires grad) it runs
    torch's differentiable in-place ops instead, with their usual in-place rules.
    ``residual`` and ``out`` must not overlap ``input`` or each other (``out`` may be
    ``input`` itself).
    """
    shape = _check_norm_args("layer_norm_", input, normalized_shape, {"weight": weight, "bias": bias}, eps, residual)
    _check_inplace_norm("layer_norm_", input, residual, out)
    _check_layer_norm_dtypes("layer_norm_", input, weight, bias)
    return norm_op.layer_norm_(input, shape, weight, bias, float(eps), residual=residual, out=out)


def rms_norm_(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
              eps: Optional[float] = None, *, residual: Optional[Tensor] = None, out: Optional[Tensor] = None):
    r"""In-place :func:`rms_norm` for inference loops: no fresh allocations.

    With ``residual``: ``residual <- input + residual``, then ``out <- rms_norm(residual)``
    (vLLM's ``fused_add_rms_norm(input, residual, weight, eps)`` with ``out=None``, which
    writes over ``input``); returns ``(out, residual)``. Without: ``out <- rms_norm(input)``,
    returns ``out``. Same rules as :func:`layer_norm_`.
    """
    shape = _check_norm_args("rms_norm_", input, normalized_shape, {"weight": weight}, eps, residual)
    _check_inplace_norm("rms_norm_", input, residual, out)
    return norm_op.rms_norm_(input, shape, weight, None if eps is None else float(eps), residual=residual, out=out)


# Attention


def _check_attention_inputs(name: str, query, key, value, scale, dropout_p, names=("query", "key", "value"),
                            scale_arg="scale"):
    """torch's checks of SDPA's tensors and scalars; ``names``/``scale_arg``: what the caller
    calls them (flash_attn's ``q, k, v`` and ``softmax_scale``), so messages name its arguments."""
    q_, k_, v_ = names
    for arg, t in zip(names, (query, key, value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}(): argument '{arg}' must be Tensor, not {type(t).__name__}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected {q_}, {k_}, and {v_} to have the same dtype, but got {q_}.dtype: "
                           f"{query.dtype} {k_}.dtype: {key.dtype} and {v_}.dtype: {value.dtype} instead.")
    if not query.is_floating_point():
        raise RuntimeError(f"{name}(): {q_}, {k_} and {v_} must be floating point tensors, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"Expected {q_}, {k_}, and {v_} to have the same device type, but got {q_}.device: "
                           f"{query.device} {k_}.device: {key.device} and {v_}.device: {value.device} instead.")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{name}(): argument '{scale_arg}' must be float, not {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name}(): argument 'dropout_p' must be float, not {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{name}(): dropout_p must be in [0, 1], got {dropout_p}")


def _check_mask(name: str, mask, query: Tensor, shape) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}(): argument 'attn_mask' must be Tensor, not {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {mask.dtype} and  query.dtype: {query.dtype} instead.")
    if mask.device != query.device:
        raise RuntimeError(f"{name}(): attn_mask is on {mask.device} but query is on {query.device}")
    if mask.dim() < 2:  # as torch, which indexes the mask's dims -2 and -1
        raise RuntimeError(f"{name}(): attn_mask must have at least 2 dims [..., L, S], got shape "
                           f"{tuple(mask.shape)}")
    try:
        ok = torch.broadcast_shapes(mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise RuntimeError(f"{name}(): attn_mask of shape {tuple(mask.shape)} is not broadcastable to the "
                           f"attention scores' shape {tuple(shape)}")


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    r"""Fused attention, like :func:`torch.nn.functional.scaled_dot_product_attention`.

    ``softmax(query @ keyᵀ * scale + attn_mask) @ value`` without materialising the
    scores. query ``[..., L, E]``, key ``[..., S, E]``, value ``[..., S, Ev]``; the
    batch dims broadcast. ``attn_mask`` broadcasts to ``[..., L, S]``: bool (True =
    attend) or additive float. ``is_causal`` keeps key ``j <= i`` (top-left,
    ``torch.tril``). ``enable_gqa`` shares each key/value head (dim -3) across a group
    of query heads. ``scale`` defaults to ``1/sqrt(E)``. Dropout, when ``dropout_p >
    0``, is drawn with a counter-based RNG seeded from torch's default generator.

    A query row that sees no key returns zeros (zero gradient), never NaN. A float
    ``attn_mask`` that requires grad runs on the torch backend (the kernels give no
    mask gradient).
    """
    name = "scaled_dot_product_attention"
    _check_attention_inputs(name, query, key, value, scale, dropout_p)
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(f"Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    L, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    if key.shape[-1] != E:
        raise RuntimeError(f"{name}(): query and key must have the same embedding dim (dim -1), got query "
                           f"{tuple(query.shape)} and key {tuple(key.shape)}")
    if key.shape[-2] != S:
        raise RuntimeError(f"{name}(): key and value must have the same sequence length (dim -2), got key "
                           f"{tuple(key.shape)} and value {tuple(value.shape)}")
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    try:
        if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and value.dim() >= 3:
            H, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
            if Hk == 0 or Hv == 0 or H % Hk != 0 or H % Hv != 0:
                raise RuntimeError("Number of heads in key and value must divide the number of heads in query")
            batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
            if Hk != Hv:  # rare: give both the query's head count
                key, value = key.repeat_interleave(H // Hk, -3), value.repeat_interleave(H // Hv, -3)
                Hk = H
            lead = tuple(batch) + (H,)
            k_lead = tuple(batch) + (Hk,)
        else:
            lead = k_lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    except RuntimeError as e:
        if "Number of heads" in str(e):
            raise
        raise RuntimeError(f"{name}(): the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and "
                           f"value {tuple(value.shape)} do not broadcast ({e})") from None
    if attn_mask is not None:
        _check_mask(name, attn_mask, query, lead + (L, S))
    H = lead[-1] if lead else 1
    Hk = k_lead[-1] if k_lead else 1
    # [..., H, L, E] -> [B, H, L, E]: a view for rank <= 4 (broadcast batch dims keep stride 0)
    B = math.prod(lead[:-1])
    q4 = query.expand(lead + (L, E)).reshape(B, H, L, E)
    k4 = key.expand(k_lead + (S, E)).reshape(B, Hk, S, E)
    v4 = value.expand(k_lead + (S, Ev)).reshape(B, Hk, S, Ev)
    m4 = None if attn_mask is None else attn_mask.expand(lead + (L, S)).reshape(B, H, L, S)
    out, _ = attention_op.attention(q4, k4, v4, m4, scale=scale, is_causal=bool(is_causal), dropout_p=float(dropout_p))
    return out.reshape(lead + (L, Ev))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                    dropout_p: float = 0.0, return_lse: bool = False, attn_mask: Optional[Tensor] = None,
                    seed: Optional[int] = None):
    r"""Fused attention in the ``[B, L, H, D]`` layout most LLM code uses (flash-attn's).

    Args:
        q: ``[B, L, H, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with
            ``H % Hkv == 0`` (grouped-query attention when ``Hkv < H``). Only the last
            dim needs to be contiguous: views of a packed ``[B, L, 3, H, D]`` tensor
            (``qkv.unbind(2)``) run without a copy.
        causal: keep key ``j <= i`` (top-left, as ``torch.tril``).
        scale: defaults to ``1/sqrt(D)``.
        dropout_p: attention dropout; ``seed`` fixes its mask (default: drawn from
            torch's generator).
        return_lse: also return the log-sum-exp ``[B, H, L]`` (float32, no gradient;
            ``-inf`` for a row that sees no key).
        attn_mask: optional, broadcastable to ``[B, H, L, S]``; bool (True = attend) or
            additive float.

    Returns ``out [B, L, H, Dv]`` (a transposed view of a contiguous ``[B, H, L, Dv]``),
    and ``lse`` when asked.
    """
    name = "flash_attention"
    _check_attention_inputs(name, q, k, v, scale, dropout_p, names=("q", "k", "v"))
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise RuntimeError(f"{name}(): q, k, v must be 4-D [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                           f"{tuple(v.shape)}")
    B, L, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or k.shape[3] != D:
        raise RuntimeError(f"{name}(): expected q [B, L, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv]; got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    S, Hkv = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise RuntimeError(f"{name}(): the number of query heads ({H}) must be a multiple of the number of "
                           f"key/value heads ({Hkv})")
    if attn_mask is not None:
        _check_mask(name, attn_mask, q, (B, H, L, S))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{name}(): seed must be an int, got {type(seed).__name__}")
    out, lse = attention_op.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, scale=scale,
                             is_causal=bool(causal), dropout_p=float(dropout_p), seed=seed)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


# cross-entropy


def _autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``t``'s device type, or None."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _loss_dtype(input: Tensor) -> torch.dtype:
    # Under autocast torch runs cross_entropy in fp32 (its fp32 op list) and returns fp32;
    # the kernels already compute in fp32, so only the result's dtype follows that rule.
    if input.dtype in (torch.float16, torch.bfloat16) and _autocast_dtype(input) is not None:
        return torch.float32
    return input.dtype


def _check_reduction(size_average, reduce, reduction) -> str:
    if size_average is not None or reduce is not None:  # the legacy arguments win, as in torch (with its warning)
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in cross_entropy_op.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _check_smoothing(name, label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{name}(): label_smoothing must be a float, not {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def _check_target(name, target: Tensor, device):
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}(): argument 'target' must be a Tensor, not {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"{name}(): expected target dtype to be Long or Byte (class indices), or floating point "
                           f"(class probabilities), but got {target.dtype}")
    if target.device != device:
        raise ValueError(f"{name}(): target is on {target.device} but input is on {device}")


def _check_class_weight(name, weight, C, device, arg="weight", like="input"):
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name}(): {arg} must be a floating point Tensor, got "
                        f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != C:
        raise RuntimeError(f"{arg} tensor should be defined either for all {C} classes or no classes but got "
                           f"{arg} tensor of shape: {list(weight.shape)}")
    if weight.requires_grad:  # as torch: nll_loss has no derivative for its weight
        raise RuntimeError(f"{name}(): class weights ({arg}) cannot require grad (the loss is not differentiable "
                           "with respect to them, as in torch)")
    if weight.device != device:
        raise ValueError(f"{name}(): {arg} is on {weight.device} but {like} is on {device}")


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    r"""Cross-entropy between logits and targets, like :func:`torch.nn.functional.cross_entropy`.

    Class-index targets run the fused kernels: input [N, C], [C] or [N, C, d1, ...]
    (classes on dim 1) with target [N], [] or [N, d1, ...] (int64 or uint8); every
    ``reduction``; per-class ``weight``; ``ignore_index`` ('mean' over only ignored
    targets is NaN, as in torch); ``label_smoothing`` as torch defines it (with
    ``weight``, each class's smoothing term is weighted by its own weight). One pass per
    row with an online log-sum-exp; the gradient is recomputed in one pass without a
    softmax tensor. Math in fp32 for fp16/bf16 input; the loss has the input's dtype.

    Probability (floating point) targets run torch's implementation. A target outside
    ``[0, C)`` that is not ``ignore_index`` raises ``IndexError``.
    """
    reduction = _check_reduction(size_average, reduce, reduction)
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)


def _cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                   label_smoothing: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`cross_entropy` with the loss in ``out_dtype`` (default: torch's, the input's) for
    class-index targets on the kernels."""
    name = "cross_entropy"
    _check_float(name, "input", input)
    _check_smoothing(name, label_smoothing)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{name}(): ignore_index must be an int, not {type(ignore_index).__name__}")
    if input.dim() == 0:
        raise ValueError(f"{name}(): input must have a class dimension, got a 0-dim tensor")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_class_weight(name, weight, C, input.device)
    if isinstance(target, Tensor) and target.is_floating_point():  # class probabilities: torch's implementation
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    _check_target(name, target, input.device)
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(f"{name}(): for a 1-D input of {C} classes the target must be a 0-dim class index, got "
                             f"shape {tuple(target.shape)}")
    else:
        if target.dim() == 0 or target.shape[0] != input.shape[0]:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0] if target.dim() else 'a 0-dim target'}).")
        expected = (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"{name}(): expected target of shape {expected} for input of shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return cross_entropy_op.cross_entropy(input, target, weight, ignore_index, reduction, float(label_smoothing),
                                          out_dtype or _loss_dtype(input))


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_size: Optional[int] = None, *, class_weight: Optional[Tensor] = None,
                               softcap: Optional[float] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""``cross_entropy(hidden @ weight.T + bias, target)`` without ever holding the logits.

    Args:
        hidden: [..., H] final hidden states (floating point).
        weight: [V, H] the LM head (``nn.Linear(H, V).weight``), hidden's dtype.
        target: [...] class indices (int64/uint8) matching hidden's leading dims.
        bias: optional [V].
        ignore_index, reduction, label_smoothing: as :func:`cross_entropy`.
        chunk_size: tokens per chunk (default: chunk logits about the size of ``hidden``,
            at least 256 rows). Peak extra memory is one [chunk_size, V] logits buffer
            plus the parameter-sized gradients, never [N, V].
        class_weight (keyword): optional per-class weights [V] (``cross_entropy``'s ``weight``).
        softcap (keyword): c > 0 takes the loss of ``c * tanh(logits / c)`` instead of the
            logits (Gemma 2's ``final_logit_softcapping``), computed in the logits' dtype
            as the unfused model does; None (or 0) applies no cap.
        dtype (keyword): the loss's dtype (default: hidden's; float32 under autocast). The
            loss is accumulated in fp32 either way: ``dtype=torch.float32`` returns it
            without rounding to fp16/bf16 (Hugging Face's losses are fp32).

    Gradients flow to ``hidden``, ``weight`` and ``bias``. With 'mean'/'sum' they are
    computed chunk by chunk during the forward (no second projection in backward); with
    'none' the backward recomputes each chunk's logits.
    """
    name = "fused_linear_cross_entropy"
    _check_float(name, "hidden", hidden)
    _check_float(name, "weight", weight)
    low = _autocast_dtype(hidden)
    if low is not None:  # as F.linear under autocast: the projection runs in the autocast dtype
        hidden, weight = hidden.to(low), weight.to(low)
        bias = None if bias is None or not isinstance(bias, Tensor) else bias.to(low)
    reduction = _check_reduction(None, None, reduction)
    _check_smoothing(name, label_smoothing)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{name}(): ignore_index must be an int, not {type(ignore_index).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}(): expected hidden [..., H] and weight [V, H], got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"{name}(): weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, "
                        f"{hidden.device})")
    V, H = weight.shape
    if bias is not None:
        _check_float(name, "bias", bias)
        if bias.shape != (V,) or bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"{name}(): bias must be [{V}] of hidden's dtype and device, got {tuple(bias.shape)} "
                             f"{bias.dtype} on {bias.device}")
    _check_target(name, target, hidden.device)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}(): target of shape {tuple(target.shape)} does not match hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{name}(): chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_class_weight(name, class_weight, V, hidden.device, "class_weight", "hidden")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"{name}(): softcap must be a float or None, not {type(softcap).__name__}")
        if not (softcap >= 0 and math.isfinite(softcap)):
            raise ValueError(f"{name}(): softcap must be a finite number >= 0 (0 or None: no cap), got {softcap}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{name}(): dtype must be a floating point torch.dtype or None, got {dtype!r}")
    return flce_op.fused_linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index, reduction,
                                              float(label_smoothing), chunk_size, dtype or _loss_dtype(hidden),
                                              float(softcap or 0.0))


def perplexity(input: Tensor, target: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    r"""Perplexity: ``exp`` of the mean token cross-entropy, padding excluded.

    ``perplexity(logits, target)``: logits [..., V] with the vocabulary *last* (a language
    model's output) against target [...]; tokens equal to ``ignore_index`` do not count.
    ``perplexity(mean_loss)``: the exponential of an already averaged token loss.
    Returns a 0-dim float32 tensor (NaN when every token is ignored).
    """
    _check_float("perplexity", "input", input)
    if target is None:
        return input.detach().float().exp()
    if input.dim() < 1:
        raise ValueError("perplexity(): input (the logits) must have a vocabulary dimension")
    if not isinstance(target, Tensor):
        raise TypeError(f"perplexity(): argument 'target' must be a Tensor or None, not {type(target).__name__}")
    V = input.shape[-1]
    t = target.reshape(-1)
    # the kernels' float32 row losses (not rounded to a half input's dtype), then the mean and
    # exp in float64, rounded once: exp turns a float32 mean loss's own rounding (half an ulp
    # of ~10) into 5e-7 relative, twice torch's error at a perplexity of 5e4, and a bf16 one
    # into 1.5%
    rows = _cross_entropy(input.reshape(-1, V), t, None, ignore_index, "none", 0.0, torch.float32)
    count = (t != ignore_index).sum()
    return (rows.double().sum() / count).exp().float()


# ----------------------------------------------------------------------------------
# Gated activations


def _glu_common(name: str, gate, up, act: int) -> Tensor:
    _check_float(name, "gate", gate)
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2 != 0:
            raise RuntimeError(f"{name}(): a packed gate (up=None) is [..., 2 * intermediate]: its last dim must be "
                               f"even, got shape {list(gate.shape)}")
    else:
        _check_float(name, "up", up)
        if up.shape != gate.shape:
            raise RuntimeError(f"{name}(): gate and up must have the same shape, got gate {list(gate.shape)} and "
                               f"up {list(up.shape)}")
        if up.dtype != gate.dtype:
            raise TypeError(f"{name}(): gate and up must have the same dtype, got gate {gate.dtype} and up {up.dtype}")
        if up.device != gate.device:
            raise RuntimeError(f"{name}(): gate is on {gate.device} but up is on {up.device}")
    return glu_op.glu(gate, up, act)


def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    r"""SwiGLU: ``silu(gate) * up`` in one fused pass (the Llama/Mistral/Qwen MLP's gating).

    Args:
        gate: floating point tensor ``[..., I]``: the gate projection's output.
        up: a tensor like ``gate`` (the up projection's output), or None for the *packed*
            form: then ``gate`` is one ``[..., 2I]`` projection, the gate in its first half
            and up in its second (``gate, up = gate.chunk(2, -1)``: what a fused
            ``gate_up_proj`` such as Phi-3's gives). Its halves are read in place, and its
            gradient is one ``[..., 2I]`` tensor.

    Same values and gradients as ``torch.nn.functional.silu(gate) * up`` (no
    broadcasting: the shapes must match). Math is fp32 for fp16/bf16 inputs, the output
    rounded once; backward recomputes ``silu(gate)`` from the saved inputs, so nothing
    but ``gate`` and ``up`` is kept between forward and backward.
    """
    return _glu_common("swiglu", gate, up, glu_op.SILU)


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "tanh") -> Tensor:
    r"""GeGLU: ``gelu(gate, approximate) * up`` in one fused pass (the Gemma MLP's gating).

    Args:
        gate, up: as in :func:`swiglu` (``up=None``: ``gate`` is the packed ``[..., 2I]``
            projection, gate first, up second).
        approximate: torch's names: ``"tanh"`` (the default here, as Gemma's
            ``gelu_pytorch_tanh``) or ``"none"`` (the exact erf form).

    Same values and gradients as ``torch.nn.functional.gelu(gate, approximate=approximate) * up``;
    math is fp32 for fp16/bf16 inputs and the backward recomputes the activation from
    the saved inputs.
    """
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu(): approximate must be 'tanh' or 'none' (torch's gelu names), got {approximate!r}")
    return _glu_common("geglu", gate, up, glu_op.GELU_TANH if approximate == "tanh" else glu_op.GELU)


# ----------------------------------------------------------------------------------
# Packed sequences (FlashAttention's varlen cu_seqlens): attention and rotary embedding


def _check_cu_seqlens(name: str, arg: str, cu: Tensor, total: int, max_seqlen, like: Tensor,
                      like_name: str = "q") -> list:
    """The bounds of packed segments as a host list (one sync): int32 [batch + 1], from 0, non-decreasing,
    ``cu[-1] <= total``, no segment longer than ``max_seqlen`` (FlashAttention's varlen arguments)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}(): {arg} must be a Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise RuntimeError(f"{name}(): {arg} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise RuntimeError(f"{name}(): {arg} must be 1-D [batch + 1], got shape {tuple(cu.shape)}")
    if cu.device != like.device:
        raise RuntimeError(f"{name}(): {arg} is on {cu.device} but {like_name} is on {like.device}")
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


# ----------------------------------------------------------------------------------
# Rotary position embedding


def _check_angles(name: str, cos, sin, like: Tensor, like_name: str) -> None:
    _check_float(name, "cos", cos)
    _check_float(name, "sin", sin)
    if sin.dim() != cos.dim() or sin.shape[-1:] != cos.shape[-1:]:
        raise ValueError(f"{name}(): cos and sin must have the same rank and last dim, got cos {list(cos.shape)} "
                         f"and sin {list(sin.shape)}")
    for arg, t in (("cos", cos), ("sin", sin)):
        if t.device != like.device:
            raise RuntimeError(f"{name}(): {arg} is on {t.device} but {like_name} is on {like.device}")


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                         unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    r"""Hugging Face's ``apply_rotary_pos_emb``: ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``.

    Args:
        q: ``[B, Hq, S, D]`` (``unsqueeze_dim=1``, HF's layout; any strides, such as the
            transposed view of a ``[B, S, H, D]`` projection) or ``[B, S, Hq, D]``
            (``unsqueeze_dim=2``).
        k: like q with its own head count ``Hkv`` (grouped-query attention, ``Hkv = 1`` too).
        cos, sin: ``[B or 1, S, R]``, what HF's rotary embedding module returns: one value per
            feature, ``cat(freqs, freqs)`` (positions may differ per batch row, start anywhere).
            ``R < D`` is partial rotary (Phi-3's, GPT-NeoX's ``rotary_pct``): the first R features
            are rotated and the rest pass through.
        unsqueeze_dim: where the head dim of q and k is (1 or 2), as in Hugging Face.

    Same results as Hugging Face's function (NeoX pairing, feature i with i + R/2), whatever
    cos/sin hold; the output dtype is torch's promotion of q (k) with cos and sin. One fused
    kernel rotates q and k, math in fp32, each output rounded once; backward is the same kernel
    (the transpose of the rotation) and saves only cos and sin. cos/sin that require grad take
    the torch path, differentiable in them too.
    """
    name = "apply_rotary_pos_emb"
    _check_float(name, "q", q)
    _check_float(name, "k", k)
    _check_angles(name, cos, sin, q, "q")
    if k.device != q.device:
        raise RuntimeError(f"{name}(): q is on {q.device} but k is on {k.device}")
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"{name}(): unsqueeze_dim must be 1 (q, k [B, H, S, D]) or 2 (q, k [B, S, H, D]), "
                         f"got {unsqueeze_dim!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name}(): q and k must be 4-D, got q {list(q.shape)} and k {list(k.shape)}")
    heads_first = unsqueeze_dim in (1, -3)
    qc, kc = (q.transpose(1, 2), k.transpose(1, 2)) if heads_first else (q, k)  # [B, S, H, D] views
    B, S, _, D = qc.shape
    if kc.shape[0] != B or kc.shape[1] != S or kc.shape[3] != D:
        raise ValueError(f"{name}(): q {list(q.shape)} and k {list(k.shape)} must agree in batch, sequence and "
                         f"head dim")
    for t in (cos, sin):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S:
            raise ValueError(f"{name}(): cos and sin must be [{B} or 1, {S}, rotary_dim], got cos {list(cos.shape)} "
                             f"and sin {list(sin.shape)}")
    R = cos.shape[-1]
    if R % 2 or R > D or R == 0:
        raise ValueError(f"{name}(): the last dim of cos/sin (rotary_dim) must be even and at most the head dim "
                         f"{D}, got {R}")
    angles = torch.promote_types(cos.dtype, sin.dtype)
    dq, dk = torch.promote_types(q.dtype, angles), torch.promote_types(k.dtype, angles)
    if dq == dk:
        qo, ko = rope_op.rope(qc.to(dq), kc.to(dq), cos.to(dq), sin.to(dq), R, False)
    else:
        qo, _ = rope_op.rope(qc.to(dq), None, cos.to(dq), sin.to(dq), R, False)
        ko, _ = rope_op.rope(kc.to(dk), None, cos.to(dk), sin.to(dk), R, False)
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if heads_first else (qo, ko)


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None) -> Tensor:
    r"""flash-attn's ``apply_rotary_emb`` (``flash_attn.layers.rotary``), FlashAttention's semantics.

    Also importable as ``llmfast.flash_attn.apply_rotary_emb`` (the same function), the
    drop-in for ``from flash_attn.layers.rotary import apply_rotary_emb``.

    Args:
        x: ``[B, S, H, D]``, or packed ``[total, H, D]`` when ``cu_seqlens`` is given (any strides).
        cos, sin: ``[S_ro, rotary_dim / 2]``, one angle per pair, or ``[B, S_ro, rotary_dim / 2]``
            (per sequence; llmfast's extension); x's dtype or float32. ``S_ro`` must be at least S
            (``max_seqlen`` when packed), as in flash-attn.
        interleaved: pair features ``(2i, 2i + 1)`` (GPT-J) instead of ``(i, i + rotary_dim / 2)``
            (GPT-NeoX, the default).
        inplace: write the result into x and return x. Autograd sees an in-place op (x's version
            counter is bumped: a backward that needs x's old value raises, and a leaf that
            requires grad is refused, as for torch's in-place ops); gradients flow through it.
            llmfast computes the rotation out of place and copies its first ``rotary_dim``
            features back (one extra pass over them).
        seqlen_offsets: int, or int32/int64 tensor ``[B]``: sequence b uses the rows
            ``offsets[b] .. offsets[b] + S - 1`` of cos/sin (decoding with a KV cache). Checked to
            stay inside the tables, never read out of bounds: an int needs ``0 <= offset`` and
            ``offset + S <= S_ro`` (``S = max_seqlen`` when packed, flash-attn's rule); a tensor
            needs ``0 <= offsets[b]`` and ``offsets[b] + len_b <= S_ro`` for every sequence, which
            costs one host sync in eager mode (under torch.compile, a device-side assert instead).
        cu_seqlens: int32 ``[batch + 1]``, from 0, non-decreasing, ``cu_seqlens[-1] <= total``:
            segment b is ``x[cu_seqlens[b]:cu_seqlens[b + 1]]`` and its tokens take positions
            ``0, 1, ...`` (plus ``seqlen_offsets[b]``). Tokens past ``cu_seqlens[-1]`` pass through
            unchanged. Read on the host (one sync; a graph break under torch.compile), as
            :func:`llmfast.flash_attn.flash_attn_varlen_func` does.
        max_seqlen: with ``cu_seqlens``: at least the longest segment (checked); ignored without it, as in
            flash-attn.

    Features ``rotary_dim..D`` pass through. Output in x's dtype, math in fp32; differentiable
    in x (and in cos/sin, on the torch path, when they require grad).
    """
    name = "rotary_embedding"
    _check_float(name, "x", x)
    _check_angles(name, cos, sin, x, "x")
    packed = cu_seqlens is not None
    if x.dim() != (3 if packed else 4):
        raise ValueError(f"{name}(): x must be " + ("[total, H, D] (packed: cu_seqlens is given)" if packed else
                                                    "[B, S, H, D]") + f", got {list(x.shape)}")
    if packed:
        bounds = _check_cu_seqlens(name, "cu_seqlens", cu_seqlens, x.shape[0], max_seqlen, x, "x")
        B, S, lengths = len(bounds) - 1, max_seqlen, [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        B, S = x.shape[:2]
    D = x.shape[-1]
    for t in (cos, sin):
        if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] not in (1, B)) or t.shape[-2] < S:
            raise ValueError(f"{name}(): cos and sin must be [S_ro, rotary_dim / 2] or [{B}, S_ro, rotary_dim / 2] "
                             f"with S_ro >= {S}" + (" (max_seqlen)" if packed else "") +
                             f", got cos {list(cos.shape)} and sin {list(sin.shape)}")
    R = 2 * cos.shape[-1]
    if R > D or R == 0:
        raise ValueError(f"{name}(): rotary_dim {R} (2 * cos.shape[-1]) must be in [2, head dim {D}]")
    for arg, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name}(): {arg} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"{name}(): cos and sin must have the same dtype, got {cos.dtype} and {sin.dtype}")
    S_ro = cos.shape[-2]
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}(): seqlen_offsets must be an int or an int32/int64 tensor, got "
                            f"{seqlen_offsets.dtype}")
        if seqlen_offsets.shape != (B,):
            raise ValueError(f"{name}(): seqlen_offsets must have shape [{B}] (one offset per sequence), got "
                             f"{list(seqlen_offsets.shape)}")
        if seqlen_offsets.device != x.device:
            raise RuntimeError(f"{name}(): seqlen_offsets is on {seqlen_offsets.device} but x is on {x.device}")
        ends = seqlen_offsets + (torch.tensor(lengths, dtype=seqlen_offsets.dtype, device=x.device) if packed else S)
        if torch.compiler.is_compiling():  # no host read inside a graph: the check runs on the device
            torch._assert_async(((seqlen_offsets >= 0) & (ends <= S_ro)).all(),
                                f"{name}(): seqlen_offsets out of range of the {S_ro} rows of cos/sin")
        else:
            for b, (o, e) in enumerate(zip(seqlen_offsets.tolist(), ends.tolist())):  # the one host sync
                if o < 0 or e > S_ro:
                    raise ValueError(f"{name}(): seqlen_offsets[{b}] = {o} puts sequence {b} at rows {o}..{e - 1}, "
                                     f"outside the {S_ro} rows of cos/sin")
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"{name}(): seqlen_offsets must be an int or an int32/int64 tensor, got "
                        f"{type(seqlen_offsets).__name__}")
    elif seqlen_offsets < 0 or seqlen_offsets + S > S_ro:
        raise ValueError(f"{name}(): seqlen_offsets = {seqlen_offsets} puts the sequences at rows {seqlen_offsets}.."
                         f"{seqlen_offsets + S - 1}" + (" (max_seqlen)" if packed else "") +
                         f", outside the {S_ro} rows of cos/sin")
    return rope_op.apply_rotary(x, cos, sin, bool(interleaved), bool(inplace), seqlen_offsets,
                                cu_seqlens, bounds[-1] if packed else 0)
