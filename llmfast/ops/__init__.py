"""The op layer: kernel declarations, fake impls, autograd, backend choice, canonical forms.

Each ``llmfast/ops/<op>.py`` declares its kernels once with
:func:`llmfast.ops._library.kernel` (the native ``llmfast::`` schema whose CPU/CUDA
kernels ``llmfast._C`` registers, the Triton twin, fakes and autograd) and exposes
the entry functions ``llmfast.nn.functional`` calls. Importing this package imports
every op module; the names here are the modules (``llmfast.ops.norm``), not their
functions.
"""
from llmfast.ops import (  # noqa: F401
    attention, cross_entropy, fused_linear_cross_entropy, glu, kvcache, norm, rope, softmax)

__all__ = ["attention", "cross_entropy", "fused_linear_cross_entropy", "glu", "kvcache", "norm", "rope", "softmax"]
