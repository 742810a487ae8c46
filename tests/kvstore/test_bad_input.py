"""Bad input gets an actionable gRPC status, changes nothing, and the daemon keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from kvstore import Client, FailedPrecondition, InvalidArgument
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore._wire import register_req
from kvstore.keys import Namespace
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for


@pytest.fixture
def stub(daemon: DaemonProc) -> Iterator[tuple[pb_grpc.KVStoreStub, int, bytes]]:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        s = pb_grpc.KVStoreStub(ch)
        sid = s.OpenSession(pb.OpenSessionRequest(client_name="raw")).session_id
        ns_id = s.RegisterNamespace(register_req(sid, NS)).namespace_id
        yield s, sid, ns_id


def _code(fn: object, *a: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a)  # type: ignore[operator]
    return ei.value.code(), ei.value.details()


def _still_serving(daemon: DaemonProc) -> None:
    toks = np.arange(10_000, 10_032)
    with Client(daemon.socket) as c:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        assert c.lookup_tokens(NS, toks) == 32
    assert daemon.alive()


def test_wrong_block_size(daemon: DaemonProc, stub: tuple) -> None:
    s, sid, ns_id = stub
    keys = NS.block_keys(np.arange(32))
    req = pb.AllocateRequest(session_id=sid, namespace_id=ns_id, block_nbytes=123, keys=keys)
    code, msg = _code(s.Allocate, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "wrong block size" in msg and str(NS.block_nbytes) in msg
    # Through the client: a block of the wrong size is refused before anything is allocated.
    with Client(daemon.socket) as c:
        with pytest.raises(InvalidArgument, match="bytes"):
            c.store_tokens(NS, np.arange(32), [np.zeros(10, np.uint8)] * 2)
        assert c.stats()["blocks"] == 0
    _still_serving(daemon)


def test_unknown_namespace(daemon: DaemonProc, stub: tuple) -> None:
    s, sid, _ = stub
    req = pb.AllocateRequest(
        session_id=sid, namespace_id=b"\1" * 32, block_nbytes=NS.block_nbytes, keys=[b"\0" * 32]
    )
    code, msg = _code(s.Allocate, req)
    assert code == grpc.StatusCode.NOT_FOUND and "RegisterNamespace" in msg
    _still_serving(daemon)


def test_invalid_namespace_spec(daemon: DaemonProc, stub: tuple) -> None:
    s, sid, _ = stub
    spec = pb.NamespaceSpec(model_id="m", num_layers=0, num_kv_heads=1, head_dim=1, block_tokens=1)
    code, msg = _code(s.RegisterNamespace, pb.RegisterNamespaceRequest(session_id=sid, spec=spec))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "num_layers" in msg
    huge = Namespace("m", num_layers=64, num_kv_heads=64, head_dim=256, block_tokens=64)
    code, msg = _code(s.RegisterNamespace, register_req(sid, huge))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "slab" in msg


def test_commit_never_allocated_or_twice(daemon: DaemonProc, stub: tuple) -> None:
    s, sid, ns_id = stub
    keys = NS.block_keys(np.arange(32))
    code, msg = _code(s.Commit, pb.CommitRequest(session_id=sid, keys=keys))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "never allocated" in msg
    s.Allocate(
        pb.AllocateRequest(
            session_id=sid, namespace_id=ns_id, block_nbytes=NS.block_nbytes, keys=keys
        )
    )
    s.Commit(pb.CommitRequest(session_id=sid, keys=keys))
    code, msg = _code(s.Commit, pb.CommitRequest(session_id=sid, keys=keys))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already committed" in msg
    _still_serving(daemon)


def test_commit_of_another_sessions_slot(daemon: DaemonProc, stub: tuple) -> None:
    s, sid, ns_id = stub
    keys = NS.block_keys(np.arange(32))
    s.Allocate(
        pb.AllocateRequest(
            session_id=sid, namespace_id=ns_id, block_nbytes=NS.block_nbytes, keys=keys
        )
    )
    other = s.OpenSession(pb.OpenSessionRequest(client_name="other")).session_id
    code, msg = _code(s.Commit, pb.CommitRequest(session_id=other, keys=keys))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another session" in msg


def test_release_of_lease_another_session_owns(daemon: DaemonProc) -> None:
    toks = np.arange(32)
    with Client(daemon.socket) as a, Client(daemon.socket) as b:
        a.store_tokens(NS, toks, blocks_for(NS, toks))
        keys = NS.block_keys(toks)
        assert all(v is not None for v in a.acquire(keys))
        with pytest.raises(FailedPrecondition, match="not acquired by this session"):
            b.release(keys)
        # Nothing was released: a still holds both pins.
        assert a.stats()["sessions"]["pins"] == 2
        a.release(keys)
        with pytest.raises(FailedPrecondition):
            a.release(keys)  # twice
    _still_serving(daemon)


def test_malformed_keys(daemon: DaemonProc, stub: tuple) -> None:
    s, sid, ns_id = stub
    code, msg = _code(s.Lookup, pb.LookupRequest(session_id=sid, keys=[b"short"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "32 bytes" in msg
    k = b"\7" * 32
    dup = pb.AllocateRequest(
        session_id=sid, namespace_id=ns_id, block_nbytes=NS.block_nbytes, keys=[k, k]
    )
    code, msg = _code(s.Allocate, dup)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "duplicate" in msg
    bad_parent = pb.AllocateRequest(
        session_id=sid,
        namespace_id=ns_id,
        block_nbytes=NS.block_nbytes,
        keys=[k],
        parent_key=b"x",
    )
    assert _code(s.Allocate, bad_parent)[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _code(s.Commit, pb.CommitRequest(session_id=sid, keys=[k], checksums=[1, 2]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # The packed Lookup form: a ragged length, or two forms at once.
    code, msg = _code(s.Lookup, pb.LookupRequest(session_id=sid, packed_keys=k + b"\1" * 31))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "multiple of the 32-byte" in msg
    code, msg = _code(s.Lookup, pb.LookupRequest(session_id=sid, packed_keys=k, keys=[k]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "one of keys, packed_keys" in msg
    # The client checks each key before packing (31 + 33 bytes would pack to 64).
    with Client(daemon.socket) as c, pytest.raises(InvalidArgument, match=r"keys\[0\] is 31"):
        c.lookup([b"\1" * 31, b"\2" * 33])
    _still_serving(daemon)


def test_oversized_requests(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(
        "[server]\nmax_keys_per_request = 100\nmax_message_bytes = 1048576\n"
        '[[tiers]]\nname = "dram"\nkind = "dram"\ncapacity = "16MiB"\n'
    ).start()
    with grpc.insecure_channel(f"unix:{d.socket}") as ch:
        s = pb_grpc.KVStoreStub(ch)
        sid = s.OpenSession(pb.OpenSessionRequest()).session_id
        code, msg = _code(s.Lookup, pb.LookupRequest(session_id=sid, keys=[b"\0" * 32] * 101))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_keys_per_request" in msg
        code, _ = _code(s.Lookup, pb.LookupRequest(session_id=sid, keys=[b"\0" * 32] * 40_000))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the message size limit
    _still_serving(d)


def test_unknown_session(daemon: DaemonProc, stub: tuple) -> None:
    s, _, _ = stub
    code, msg = _code(s.Lookup, pb.LookupRequest(session_id=999_999, keys=[]))
    assert code == grpc.StatusCode.NOT_FOUND and "open a new session" in msg


def test_client_errors_without_daemon(tmp_path: object) -> None:
    from kvstore import DaemonUnavailable

    with pytest.raises(DaemonUnavailable, match="kvstore serve"):
        Client(f"{tmp_path}/nothing.sock", timeout=0.5)


def test_delete_statuses(daemon: DaemonProc) -> None:
    toks = np.arange(48)
    with Client(daemon.socket) as c:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        keys = NS.block_keys(toks)
        assert c.delete([keys[0]]) == ["HAS_CHILDREN"]
        assert c.acquire([keys[2]])[0] is not None
        assert c.delete([keys[2]]) == ["PINNED"]
        c.release([keys[2]])
        assert c.delete(keys) == ["OK", "OK", "OK"]
        assert c.delete(keys[:1]) == ["NOT_FOUND"]
        assert c.lookup_tokens(NS, toks) == 0
