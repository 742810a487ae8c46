"""kvstore: KV-cache tiering and model-weight storage for LLM serving engines."""

from kvstore.aio_client import AsyncBlockLease, AsyncClient
from kvstore.client import BlockLease, Client
from kvstore.errors import (
    DaemonUnavailable,
    FailedPrecondition,
    InvalidArgument,
    KVStoreError,
    LeaseLost,
    NotFound,
    ResourceExhausted,
)
from kvstore.keys import BlockKey, Namespace

__all__ = [
    "AsyncBlockLease",
    "AsyncClient",
    "BlockKey",
    "BlockLease",
    "Client",
    "DaemonUnavailable",
    "FailedPrecondition",
    "InvalidArgument",
    "KVStoreError",
    "LeaseLost",
    "Namespace",
    "NotFound",
    "ResourceExhausted",
]
__version__ = "0.1.0"
