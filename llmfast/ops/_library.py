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


# Double backward. The kernels' backward ops are not themselves differentiable, so a
# backward run with ``create_graph=True`` (the only time autograd runs a backward with
# grad mode on) would hand back gradients with no graph: second derivatives silently
# wrong or missing. In that case the ops compute their backward from the torch
# reference instead, with differentiable torch ops. torch.compile traces backward
# with grad mode off, so compiled graphs keep the kernels.


def create_graph() -> bool:
    """True inside a backward that must itself be differentiable (``create_graph=True``)."""
    return torch.is_grad_enabled()


def grads_by_recompute(fn, inputs, needed, cotangents):
    """Gradients of ``fn(*inputs)`` (a tensor or a tuple) for the ``needed`` inputs, with graph.

    ``inputs`` are the saved tensors (None allowed); a needed one that does not require
    grad (only the cotangent does) is differentiated through a detached leaf copy.
    Returns one entry per input: the gradient, or None where not needed.
    """
    leaves = [t if (t is None or not need or t.requires_grad) else t.detach().requires_grad_()
              for t, need in zip(inputs, needed)]
    with torch.enable_grad():
        outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
    wrt = [t for t, need in zip(leaves, needed) if need and t is not None]
    if not pairs or not wrt:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], create_graph=True,
                                   allow_unused=True))
    out = []
    for t, need in zip(leaves, needed):
        g = next(got) if (need and t is not None) else None
        out.append(torch.zeros_like(t) if (g is None and need and t is not None) else g)
    return out
