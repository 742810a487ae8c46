"""Keys are stable across processes and hash seeds, and never collide across namespaces."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvstore.keys import KEY_BYTES, KeyInputError, Namespace, block_key, unpack_keys
from tests.kvstore.helpers import ROOT

NS = Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16)
TOKENS = list(range(100, 164))


def _keys_in_subprocess(seed: str, algo: str = "sha256") -> list[str]:
    code = (
        "from kvstore.keys import Namespace\n"
        f"ns = Namespace('llama', num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,"
        f" hash_algo={algo!r})\n"
        f"print(' '.join(k.hex() for k in ns.block_keys({TOKENS!r})))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("algo", ["sha256", "xxh3_128"])
def test_keys_identical_across_hash_seeds(algo: str) -> None:
    a = _keys_in_subprocess("1", algo)
    b = _keys_in_subprocess("12345", algo)
    assert a == b and len(a) == 4
    ns = Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                   hash_algo=algo)  # fmt: skip
    assert [k.hex() for k in ns.block_keys(TOKENS)] == a


def test_known_vector() -> None:
    # Pinned so that a change of encoding (which would orphan every stored block) is noticed.
    digest = "f050e10c1b070c978581a99c3294d465fa8a12fe6a7f3f2f19bdd17b159669e7"
    assert NS.digest().hex() == digest and len(NS.digest()) == KEY_BYTES
    keys = NS.block_keys(TOKENS)
    assert keys[0].hex() == "07885e549f7e4ff8a94af100f826a61655da6bbb7db5a34492592b7db131978d"
    assert keys[3].hex() == "0677a9865eef7faaa74a3784f07cf802c7b7c443f72058c0fb4c22d3eccbfd0e"
    assert block_key(bytes.fromhex(digest), TOKENS[:16]) == keys[0]
    xxh = Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                    hash_algo="xxh3_128")  # fmt: skip
    assert xxh.block_keys(TOKENS)[0].hex() == (
        "9a800a03f53776059eded3d9cc0c2b19b8a983f7c4a5b0fbc222266b4d561ee2"
    )


def test_chain_and_prefix_property() -> None:
    keys = NS.block_keys(TOKENS)
    assert len(keys) == 4 and all(len(k) == KEY_BYTES for k in keys)
    # A longer sequence with the same prefix has the same leading keys.
    assert NS.block_keys(TOKENS + [1, 2, 3] * 10)[:4] == keys
    # Partial trailing block is not keyed.
    assert NS.block_keys(TOKENS[:31]) == keys[:1]
    # Continuing from a parent gives the same keys as hashing from the start.
    assert NS.block_keys(TOKENS[32:], parent=keys[1]) == keys[2:]
    # Numpy arrays and lists hash the same.
    assert NS.block_keys(np.array(TOKENS, dtype=np.int64)) == keys


def test_different_namespaces_and_salts_never_share_keys() -> None:
    variants = [
        NS,
        Namespace("llama-2", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16),
        Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                  kv_dtype="float16"),
        Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16, tp_rank=1,
                  tp_size=2),
        Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                  tenant_salt=b"tenant-a"),
        Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                  tenant_salt=b"tenant-b"),
        Namespace("llama", num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                  layout="vllm_cpu"),
    ]  # fmt: skip
    seen: set[bytes] = set()
    for ns in variants:
        keys = ns.block_keys(TOKENS)
        assert not seen.intersection(keys)
        seen.update(keys)


def test_bad_tokens_and_namespaces() -> None:
    with pytest.raises(KeyInputError, match="2\\*\\*32"):
        NS.block_keys([-1] * 16)
    with pytest.raises(KeyInputError, match="integers"):
        NS.block_keys([0.5] * 16)
    with pytest.raises(KeyInputError, match="one-dimensional"):
        NS.block_keys(np.zeros((2, 16), dtype=np.int64))
    with pytest.raises(KeyInputError, match="kv_dtype"):
        Namespace("m", num_layers=1, num_kv_heads=1, head_dim=1, block_tokens=1, kv_dtype="fp7")
    with pytest.raises(KeyInputError, match="tp_rank"):
        Namespace("m", num_layers=1, num_kv_heads=1, head_dim=1, block_tokens=1, tp_rank=2)
    with pytest.raises(KeyInputError, match="parent"):
        block_key(b"short", [1])


def test_block_nbytes_and_roundtrip() -> None:
    assert NS.block_nbytes == 4 * 2 * 16 * 2 * 64 * 2
    assert Namespace.from_dict(NS.to_dict()) == NS
    salted = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=1, block_tokens=1,
                       tenant_salt=b"\x00\xff")  # fmt: skip
    assert Namespace.from_dict(salted.to_dict()).digest() == salted.digest()


def test_unpack_keys_keeps_trailing_zero_bytes() -> None:
    keys = [b"\1" * 31 + b"\0", b"\0" * 32, bytes(range(32))]
    assert unpack_keys(b"".join(keys)) == keys
    assert unpack_keys(b"") == []
    with pytest.raises(KeyInputError, match="whole number"):
        unpack_keys(b"\1" * 33)
