"""Helpers shared by the op modules for torch.library registration."""
from __future__ import annotations

import torch

from llmfast.backends import _extension


def has_native(name: str) -> bool:
    """True when llmfast._C defines the schema ``llmfast::<name>``."""
    ext, _ = _extension()
    return ext is not None and hasattr(torch.ops.llmfast, name)


def native(name: str):
    """The OpOverloadPacket ``torch.ops.llmfast.<name>``."""
    return getattr(torch.ops.llmfast, name)
