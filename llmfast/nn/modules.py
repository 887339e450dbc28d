"""Drop-in replacements for ``torch.nn`` modules: same constructors, parameters and
``state_dict`` keys, forward through :mod:`llmfast.nn.functional`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast.nn import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss"]


class Softmax(torch.nn.Softmax):
    """:class:`torch.nn.Softmax` running llmfast's fused softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` running llmfast's fused log_softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` running llmfast's fused cross-entropy.

    Same constructor, ``weight`` buffer and ``state_dict`` as torch's.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)
