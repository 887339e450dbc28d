"""Drop-in replacements for ``torch.nn`` modules: same constructors, parameters and
``state_dict`` keys, forward through :mod:`llmfast.nn.functional`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast.nn import functional as F

__all__ = ["Softmax", "LogSoftmax"]


class Softmax(torch.nn.Softmax):
    """:class:`torch.nn.Softmax` running llmfast's fused softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` running llmfast's fused log_softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)
