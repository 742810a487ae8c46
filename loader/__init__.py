"""Model-weight store: ingest, aligned layout, residency and load/swap pipelines.

* :mod:`loader.safetensors_format`: strict safetensors header parser.
* :mod:`loader.store`: ``<data_dir>/models``: aligned data files + LMDB manifests.
* :mod:`loader.pipeline`: O_DIRECT reads in flight, bounded ring, per-tensor xxh3.
* :mod:`loader.arena`, :mod:`loader.residency`: DRAM arena, LRU + pins, swap, prefetch.
* :mod:`loader.service`, :mod:`loader.client`: the ``Models`` gRPC service and client
  (:mod:`loader.aio`: the client's asyncio twins).
* :mod:`loader.gpu`: host views to CUDA memory through pinned buffers.
* :mod:`loader.cli`: ``kvstore models add|ls|rm``.
* :mod:`loader.paths`: configured paths, ``~`` expanded as the daemon does.
"""
