"""The op layer: torch.library registration, fake impls, autograd, backend choice.

``llmfast._C`` (when built) defines the ``llmfast::`` schemas and their CPU/CUDA
kernels; each ``llmfast/ops/<op>.py`` adds fake (meta) implementations and the
autograd formula to those schemas, registers the Triton kernels as custom ops of
their own, and exposes one function that picks the backend.
"""
from llmfast.backends import _extension

_extension()  # loads llmfast._C when present, which defines the native schemas

from llmfast.ops.attention import attention  # noqa: E402
from llmfast.ops.layer_norm import layer_norm  # noqa: E402
from llmfast.ops.rms_norm import rms_norm  # noqa: E402
from llmfast.ops.softmax import softmax  # noqa: E402
from llmfast.ops.cross_entropy import cross_entropy  # noqa: E402
from llmfast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402

__all__ = ["attention", "cross_entropy", "fused_linear_cross_entropy", "layer_norm", "rms_norm", "softmax"]
