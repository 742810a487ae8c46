"""A deliberately naive block server: block bytes inside gRPC messages.

What a daemon without a shared-memory data path does; the throughput benchmark
measures it beside kvstore.  Run as ``python -m bench._naive_grpc SOCKET``.
"""

from __future__ import annotations

import sys
from concurrent import futures
from typing import Any

import grpc

_OPTS = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
]
STORE: dict[bytes, bytes] = {}


def _put(req: bytes, ctx: Any) -> bytes:
    STORE[req[:32]] = req[32:]
    return b""


def _get(req: bytes, ctx: Any) -> bytes:
    return STORE[req]


def serve(sock: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=_OPTS)
    handlers = {
        "Put": grpc.unary_unary_rpc_method_handler(_put),
        "Get": grpc.unary_unary_rpc_method_handler(_get),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("naive", handlers),))
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


class NaiveClient:
    def __init__(self, sock: str) -> None:
        self.ch = grpc.insecure_channel(f"unix:{sock}", options=_OPTS)
        grpc.channel_ready_future(self.ch).result(timeout=10)
        self.put = self.ch.unary_unary("/naive/Put")
        self.get = self.ch.unary_unary("/naive/Get")

    def close(self) -> None:
        self.ch.close()


if __name__ == "__main__":
    serve(sys.argv[1])
