"""Serving-engine integrations.

Each engine's glue lives in its own module and imports that engine only there
(``kvstore.integrations.vllm`` imports vllm; importing ``kvstore`` or this package
never does).  The engine-free halves (namespace derivation, block bookkeeping,
the paged copy and the fault handling) live beside them so the default test run
covers them without the engine installed.
"""
