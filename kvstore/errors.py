"""Client-side exceptions, one per gRPC status a person can act on."""

from __future__ import annotations

import grpc


class KVStoreError(Exception):
    """Base of every error the client raises."""

    code: grpc.StatusCode | None = None


class DaemonUnavailable(KVStoreError):
    """The daemon is not running, not reachable at the socket, or went away."""

    code = grpc.StatusCode.UNAVAILABLE


class LeaseLost(KVStoreError):
    """Pins were not held until their release: the session that took them ended first
    (the daemon restarted, the session expired, the client reconnected or closed).

    The daemon released those pins when the session ended, so it may since have
    reused their slots for other blocks: bytes read through the views may be another
    block's.  Discard what was read under them and fetch again (or recompute).
    """

    code = grpc.StatusCode.ABORTED

    def __init__(self, n: int, why: str = "the session that held them ended") -> None:
        super().__init__(
            f"{n} pin(s) were lost before their release ({why}): bytes read through "
            "their views may have changed, discard them and fetch again"
        )
        self.lost = n


class InvalidArgument(KVStoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(KVStoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(KVStoreError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(KVStoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE: dict[grpc.StatusCode, type[KVStoreError]] = {
    c.code: c
    for c in (DaemonUnavailable, InvalidArgument, ResourceExhausted, NotFound, FailedPrecondition)
    if c.code is not None
}


# Codes that mean the daemon did not answer.  CANCELLED: the clients never cancel a
# call they wait on (the sync ones cannot; an asyncio cancellation raises
# CancelledError, not an RpcError), so it is the server cancelling, i.e. stopping.
_GONE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def from_rpc_error(err: grpc.RpcError) -> KVStoreError:
    """Maps a gRPC error to the matching :class:`KVStoreError` subclass."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, KVStoreError) if code is not None else KVStoreError
    if code in _GONE:
        cls = DaemonUnavailable
    exc = cls(f"{details} [{code.name if code is not None else 'UNKNOWN'}]")
    exc.code = code
    return exc
