"""Errors of the model-weight store.

Each maps onto one gRPC status code (``code``) so the service can turn any of them
into a status a person can act on without a blind ``except``.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every model-store error; ``code`` names the gRPC status."""

    code = "INTERNAL"


class ModelFormatError(ModelError):
    """A source file is not a valid safetensors file (the message says what is wrong)."""

    code = "INVALID_ARGUMENT"


class ModelExistsError(ModelError):
    """A model of that name is already registered."""

    code = "ALREADY_EXISTS"


class ModelNotFoundError(ModelError):
    """No model of that name is registered."""

    code = "NOT_FOUND"


class ModelChecksumError(ModelError):
    """Bytes read back do not match the manifest's checksum; names the tensor."""

    code = "DATA_LOSS"


class ModelBudgetError(ModelError):
    """The model does not fit the DRAM budget for models (after evicting what may go)."""

    code = "RESOURCE_EXHAUSTED"


class ModelStoreError(ModelError):
    """I/O or index failure in the store (disk full, unreadable data file...)."""

    code = "FAILED_PRECONDITION"
