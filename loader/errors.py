"""Errors of the model-weight store.

Each maps onto one gRPC status code (``code``) so the service can turn any of them
into a status a person can act on without a blind ``except``.

Every one is a :class:`kvstore.errors.KVStoreError` (``except KVStoreError`` catches
model errors too, as it does every other client error), and those with a matching
kvstore class derive from it as well: ``ModelNotFoundError`` is a ``NotFound``,
``ModelBudgetError`` a ``ResourceExhausted``, ``ModelFormatError`` an
``InvalidArgument``, ``ModelStoreError`` a ``FailedPrecondition``,
``ModelUnavailableError`` a ``DaemonUnavailable``, ``ModelPinLost`` a ``LeaseLost``.
"""

from __future__ import annotations

import grpc

from kvstore.errors import (
    DaemonUnavailable,
    FailedPrecondition,
    InvalidArgument,
    KVStoreError,
    LeaseLost,
    NotFound,
    ResourceExhausted,
)


class ModelError(KVStoreError):
    """Base class of every model-store error; ``code`` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Set on errors from the daemon: the call's session is gone (the daemon went away
    # or restarted, or the session ended); a client reconnects and retries on it.
    session_lost: bool = False


class ModelFormatError(ModelError, InvalidArgument):
    """A source file is not a valid safetensors file (the message says what is wrong)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelExistsError(ModelError):
    """A model of that name is already registered."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ModelNotFoundError(ModelError, NotFound):
    """No model of that name is registered (or, for a swap, held by the session)."""

    code = grpc.StatusCode.NOT_FOUND


class ModelChecksumError(ModelError):
    """Bytes read back do not match the manifest's checksum; names the tensor."""

    code = grpc.StatusCode.DATA_LOSS


class ModelBudgetError(ModelError, ResourceExhausted):
    """The model does not fit the DRAM budget for models (after evicting what may go)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelStoreError(ModelError, FailedPrecondition):
    """I/O or index failure in the store (disk full, unreadable data file...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelUnavailableError(ModelError, DaemonUnavailable):
    """The daemon did not answer a Models call (not running, or it went away)."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelPinLost(ModelError, LeaseLost):
    """The session that pinned the model ended before the pin's release, and the
    daemon did not keep the pin for the client's new session (it restarted, or the
    client came back after ``models.pin_grace_s``): the model's extent may have been
    reused meanwhile, so tensors read from it may have changed.  Load it again."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, name: str) -> None:
        KVStoreError.__init__(
            self,
            f"the pin of model {name!r} ended with its session before this release (the "
            "daemon restarted, or the client reconnected after models.pin_grace_s): "
            "tensors read from it since may have changed; load it again",
        )
        self.lost = 1
        self.model = name
