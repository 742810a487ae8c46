"""kvstore: KV-cache tiering and model-weight storage for LLM serving engines."""

from kvstore.keys import BlockKey, Namespace

__all__ = ["BlockKey", "Namespace"]
__version__ = "0.1.0"
