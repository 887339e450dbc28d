"""Drop-in replacements for ``torch.nn.functional``, backed by llmfast kernels.

Each function has torch's signature and semantics (plus keyword-only extras such
as ``scale=``/``mask=``/``is_causal=`` for softmax), checks its arguments with
torch-style errors, and calls :mod:`llmfast.ops`, which picks the backend.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from llmfast import ops

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm"]


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
    for arg, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype != input.dtype and not (p.dtype == torch.float32 and input.dtype in _HALF):
            raise RuntimeError(f"layer_norm(): mixed dtype: {arg} is {p.dtype} but input is {input.dtype}; expected "
                               f"{input.dtype}" + (" or torch.float32" if input.dtype in _HALF else ""))
    return ops.layer_norm(input, shape, weight, bias, float(eps), residual=residual)


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
        eps: added to the mean square; None means ``torch.finfo(input.dtype).eps``.
        residual (keyword): a tensor like ``input``; returns ``(normalized, input + residual)``.
    """
    shape = _check_norm_args("rms_norm", input, normalized_shape, {"weight": weight}, eps, residual)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if weight is not None and weight.dtype != input.dtype:
        # The kernels read the input's dtype or float32; the cast is differentiable, so
        # weight.grad still arrives in the weight's own dtype.
        target = torch.float32 if input.dtype in _HALF else input.dtype
        if weight.dtype != target:
            weight = weight.to(target)
    return ops.rms_norm(input, shape, weight, float(eps), residual=residual)
