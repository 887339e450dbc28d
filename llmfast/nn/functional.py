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

from llmfast import ops

__all__ = ["softmax", "log_softmax"]


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
