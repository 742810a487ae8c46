"""Data-movement kernels: paged KV gather/scatter and byte-plane split/merge.

Every CUDA kernel here has a CPU twin that CI runs; both produce identical bytes.
"""

from kernels.layouts import (
    DTYPE_NAMES,
    LAYOUTS,
    KernelInputError,
    PagedKV,
    describe_kv_caches,
)
from kernels.paged import gather_blocks, scatter_blocks

__all__ = [
    "DTYPE_NAMES",
    "LAYOUTS",
    "KernelInputError",
    "PagedKV",
    "describe_kv_caches",
    "gather_blocks",
    "scatter_blocks",
]
