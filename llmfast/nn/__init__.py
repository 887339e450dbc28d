"""llmfast's drop-in modules (``llmfast.nn``) and functions (``llmfast.nn.functional``)."""
from llmfast.nn import functional
from llmfast.nn.modules import *  # noqa: F401,F403
from llmfast.nn.modules import __all__ as _modules_all
from llmfast.nn.transformer import TransformerEncoderLayer

__all__ = ["functional", "TransformerEncoderLayer"] + list(_modules_all)
