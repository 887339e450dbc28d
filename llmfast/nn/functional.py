"""Drop-in replacements for ``torch.nn.functional``, backed by llmfast kernels.

Each function has torch's signature and semantics (plus keyword-only extras such
as ``scale=``/``mask=``/``is_causal=`` for softmax), checks its arguments with
torch-style errors, and calls :mod:`llmfast.ops`, which picks the backend.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, ops, reference
from llmfast.ops.cross_entropy import REDUCTIONS, acc_dtype

__all__ = ["softmax", "log_softmax", "cross_entropy", "fused_linear_cross_entropy", "perplexity"]


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
    return ops.softmax(input, dim, scale=scale, mask=mask, is_causal=bool(is_causal), log=log)


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
    if reduction not in REDUCTIONS:
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


def _check_class_weight(name, weight, C, device):
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name}(): weight must be a floating point Tensor, got "
                        f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != C:
        raise RuntimeError(f"weight tensor should be defined either for all {C} classes or no classes but got "
                           f"weight tensor of shape: {list(weight.shape)}")
    if weight.requires_grad:  # as torch: nll_loss has no derivative for its weight
        raise RuntimeError(f"{name}(): class weights cannot require grad (the loss is not differentiable with "
                           "respect to them, as in torch)")
    if weight.device != device:
        raise ValueError(f"{name}(): weight is on {weight.device} but input is on {device}")


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
    name = "cross_entropy"
    _check_float(name, "input", input)
    reduction = _check_reduction(size_average, reduce, reduction)
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
    which = backends.resolve("cross_entropy", input)
    if which == "torch":
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    # canonical [N, C] rows: a view for [N, C]; [N, C, d...] moves the classes last (a copy)
    x = input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1)
    x = x.reshape(-1, C).contiguous()
    t = target.reshape(-1).to(torch.int64).contiguous()
    w = None if weight is None else weight.to(acc_dtype(input.dtype)).contiguous()
    out = ops.cross_entropy(x, t, w, ignore_index, reduction, float(label_smoothing), which, _loss_dtype(input))
    return out.reshape(target.shape) if reduction == "none" else out


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_size: Optional[int] = None, *, class_weight: Optional[Tensor] = None) -> Tensor:
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
    _check_class_weight(name, class_weight, V, hidden.device)
    which = backends.resolve("fused_linear_cross_entropy", hidden)
    if which == "torch":
        return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                                    label_smoothing, class_weight)
    h = hidden.reshape(-1, H).contiguous()
    t = target.reshape(-1).to(torch.int64).contiguous()
    cw = None if class_weight is None else class_weight.to(acc_dtype(hidden.dtype)).contiguous()
    out = ops.fused_linear_cross_entropy(h, weight.contiguous(), t, None if bias is None else bias.contiguous(), cw,
                                         ignore_index, reduction, float(label_smoothing), chunk_size, which,
                                         _loss_dtype(hidden))
    return out.reshape(target.shape) if reduction == "none" else out


def perplexity(input: Tensor, target: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    r"""Perplexity: ``exp`` of the mean token cross-entropy, padding excluded.

    ``perplexity(logits, target)``: logits [..., V] with the vocabulary *last* (a language
    model's output) against target [...]; tokens equal to ``ignore_index`` do not count.
    ``perplexity(mean_loss)``: the exponential of an already averaged token loss.
    Returns a 0-dim float32 tensor (NaN when every token is ignored).
    """
    if target is None:
        return input.detach().float().exp()
    if input.dim() < 1:
        raise ValueError("perplexity(): logits must have a vocabulary dimension")
    V = input.shape[-1]
    loss = cross_entropy(input.reshape(-1, V), target.reshape(-1), ignore_index=ignore_index, reduction="mean")
    return loss.float().exp()
