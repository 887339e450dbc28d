"""Models built from llmfast modules."""
