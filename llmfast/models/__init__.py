"""Models built from llmfast modules."""
from llmfast.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
