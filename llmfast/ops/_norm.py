"""Pieces shared by llmfast/ops/layer_norm.py and llmfast/ops/rms_norm.py."""
from __future__ import annotations

import math

import torch
from torch import Tensor

F32_F16_BF16 = (torch.float32, torch.float16, torch.bfloat16)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """mean/rstd and weight-gradient dtype of the kernels: fp32, fp64 for double inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows(t: Tensor, N: int) -> Tensor:
    """``t`` as [M, N] with unit column stride: a view when the layout allows, else a copy.

    The kernels take any row stride, so a slice like ``x[..., :N]`` of a wider tensor
    is read in place.
    """
    t2 = t.reshape(-1, N)
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def grad_rows(g, like: Tensor):
    """An incoming gradient ([M, N]) in the layout the kernels take; zeros when autograd passes None."""
    if g is None:
        return torch.zeros_like(like)
    return g if (g.shape[1] <= 1 or g.stride(1) == 1) else g.contiguous()


def numel(shape) -> int:
    return math.prod(shape)
