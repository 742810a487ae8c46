"""Generated gRPC stubs for ``proto/kvstore.proto``; regenerate with ``make proto``.

``tests/test_proto_sync.py`` fails when these files fall out of step with the proto.
"""
