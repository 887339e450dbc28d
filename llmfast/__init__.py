"""llmfast: fused Transformer kernels for PyTorch (Triton, CUDA and C++ CPU backends)."""
from llmfast import backends
from llmfast.backends import BackendUnavailableError, available, backend

# Importing the op modules registers their torch.library ops (and loads llmfast._C
# when it is built; a Triton- or torch-only install imports without it).
from llmfast import ops  # noqa: E402
from llmfast import nn  # noqa: E402
from llmfast import flash_attn  # noqa: E402
from llmfast.nn.functional import perplexity  # noqa: E402
from llmfast.patch import PatchHandle, patch  # noqa: E402  (binds llmfast.patch to the function)

__version__ = "0.1.0"
__all__ = ["backend", "available", "backends", "BackendUnavailableError", "flash_attn", "nn", "ops", "perplexity", "patch",
           "PatchHandle", "__version__"]
