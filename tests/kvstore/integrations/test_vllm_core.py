"""The engine-free half of the vLLM connector, with fakes: runs without vllm installed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.errors import DaemonUnavailable, ResourceExhausted
from kvstore.integrations.vllm_core import (
    BlockTransfer,
    ConnectorOptions,
    PagedBlocks,
    PrefixPlanner,
    kv_dtype_name,
    namespace_for,
    order_layers,
)
from kvstore.integrations.vllm_transfer import (
    ConnectorCounters,
    DaemonLink,
    check_block_nbytes,
    load_blocks,
    read_counters,
    save_blocks,
    transfer_keys,
)
from kvstore.keys import KeyInputError, Namespace
from tests.kvstore.integrations.fakes import FakeClient

BT = 4  # tokens per block in these tests


def _ns(**kw: Any) -> Namespace:
    args: dict[str, Any] = dict(
        model_id="tiny",
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        block_size=BT,
        kv_dtype=torch.bfloat16,
        layout="vllm_cpu",
    )
    args.update(kw)
    return namespace_for(**args)


def _paged(num_blocks: int = 16, seed: int = 0) -> PagedBlocks:
    g = torch.Generator().manual_seed(seed)
    # vLLM CPU layout per layer: [num_blocks, kv_heads, block_size, 2 * head_size]
    layers = [torch.randn(num_blocks, 2, BT, 16, generator=g).to(torch.bfloat16) for _ in range(2)]
    return PagedBlocks(layers)


# ---------------------------------------------------------------- namespace
def test_namespace_from_engine_facts() -> None:
    ns = _ns()
    assert ns.block_tokens == BT
    assert ns.kv_dtype == "bfloat16"
    assert ns.layout == "vllm_cpu"
    assert ns.block_nbytes == 2 * 2 * BT * 2 * 8 * 2
    # Same facts -> same keys in another engine; any difference -> other keys.
    toks = list(range(3 * BT))
    assert _ns().block_keys(toks) == ns.block_keys(toks)
    for change in (
        {"model_id": "other"},
        {"tp_rank": 1, "tp_size": 2},
        {"kv_dtype": "fp8"},
        {"block_size": 2 * BT},
        {"layout": "vllm_gpu"},
        {"tenant_salt": b"t1"},
    ):
        assert _ns(**change).block_keys(toks)[0] != ns.block_keys(toks)[0], change


@pytest.mark.parametrize(
    ("given", "name"),
    [
        (torch.bfloat16, "bfloat16"),
        (torch.float16, "float16"),
        (torch.float32, "float32"),
        ("auto_is_not_a_dtype", None),
        ("fp8_e4m3", "float8_e4m3fn"),
        ("fp8_e5m2", "float8_e5m2"),
        ("bfloat16", "bfloat16"),
    ],
)
def test_kv_dtype_names(given: Any, name: str | None) -> None:
    if name is None:
        with pytest.raises(ValueError, match="not supported by kvstore"):
            kv_dtype_name(given)
    else:
        assert kv_dtype_name(given) == name


def test_namespace_rejects_bad_geometry() -> None:
    with pytest.raises(KeyInputError, match="block_tokens"):
        _ns(block_size=0)
    with pytest.raises(KeyInputError, match="tp_rank"):
        _ns(tp_rank=2, tp_size=2)


def test_options_parse_and_reject_typos() -> None:
    o = ConnectorOptions.from_extra({"socket": "/s", "retry_s": 1, "stats_dir": "/d"})
    assert o.socket == "/s" and o.retry_s == 1.0 and o.timeout_s == 2.0
    assert ConnectorOptions.from_extra(None) == ConnectorOptions()
    with pytest.raises(ValueError, match="unknown kvstore connector option.*sokcet"):
        ConnectorOptions.from_extra({"sokcet": "/s"})
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        ConnectorOptions.from_extra({"timeout_s": 0})
    with pytest.raises(ValueError, match="retry_s must be > 0"):
        ConnectorOptions.from_extra({"retry_s": "5"})
    with pytest.raises(ValueError, match="socket must be a string"):
        ConnectorOptions.from_extra({"socket": 3})


# ---------------------------------------------------------------- planner
def test_lookup_never_claims_the_last_token() -> None:
    p = PrefixPlanner(BT)
    assert (
        p.lookup_blocks(prompt_len=3 * BT, num_tokens=3 * BT) == 2
    )  # last block holds the last token
    assert p.lookup_blocks(prompt_len=3 * BT + 1, num_tokens=3 * BT + 1) == 3
    assert p.lookup_blocks(prompt_len=BT - 1, num_tokens=BT - 1) == 0
    assert p.lookup_blocks(prompt_len=0, num_tokens=0) == 0


def test_load_plan_covers_only_blocks_beyond_the_local_hit() -> None:
    p = PrefixPlanner(BT)
    prompt = list(range(5 * BT + 2))
    p.record_lookup("r", prompt, hit_blocks=4)
    # the engine has 1 block locally: kvstore supplies blocks 1..3
    assert p.external_tokens("r", num_computed_tokens=BT) == 3 * BT
    p.on_alloc("r", [10, 11, 12, 13, 14, 15], num_external_tokens=3 * BT)
    (load,) = p.take_loads()
    assert load.start == 1 and load.block_ids == (11, 12, 13) and load.end == 4
    assert load.token_ids == tuple(prompt[: 4 * BT])
    assert p.take_loads() == []  # handed out once
    # the step computes the rest of the prompt: only blocks after the hit are saved
    t = p.on_scheduled(
        "r", num_computed_tokens=4 * BT, num_scheduled_tokens=BT + 2, prompt=prompt,
        block_ids=[10, 11, 12, 13, 14, 15],
    )  # fmt: skip
    assert t is not None and t.start == 4 and t.block_ids == (14,)
    assert t.token_ids == tuple(prompt[: 5 * BT])


def test_no_load_when_local_hit_is_as_long() -> None:
    p = PrefixPlanner(BT)
    p.record_lookup("r", list(range(4 * BT)), hit_blocks=2)
    assert p.external_tokens("r", num_computed_tokens=2 * BT) == 0
    assert p.external_tokens("r", num_computed_tokens=3 * BT) == 0
    p.on_alloc("r", [1, 2, 3, 4], num_external_tokens=0)
    assert p.take_loads() == []


def test_chunked_prefill_saves_each_chunk_once() -> None:
    p = PrefixPlanner(BT)
    prompt = list(range(6 * BT + 1))
    p.record_lookup("r", prompt, hit_blocks=0)
    t1 = p.on_scheduled(
        "r", num_computed_tokens=0, num_scheduled_tokens=2 * BT + 3, prompt=prompt,
        block_ids=[7, 8, 9],
    )  # fmt: skip
    assert t1 is not None and (t1.start, t1.block_ids) == (0, (7, 8))
    t2 = p.on_scheduled(
        "r", num_computed_tokens=2 * BT + 3, num_scheduled_tokens=4 * BT - 2,
        new_block_ids=[20, 21, 22, 23],
    )  # fmt: skip
    assert t2 is not None and (t2.start, t2.block_ids) == (2, (9, 20, 21, 22))
    # decode steps: nothing more (only prompt blocks are saved)
    assert p.on_scheduled("r", num_computed_tokens=6 * BT + 1, num_scheduled_tokens=1) is None
    p.finish("r")
    assert len(p) == 0


def test_resumed_request_replaces_block_ids_and_does_not_resave() -> None:
    p = PrefixPlanner(BT)
    prompt = list(range(3 * BT))
    p.on_scheduled(
        "r", num_computed_tokens=0, num_scheduled_tokens=3 * BT, prompt=prompt, block_ids=[1, 2, 3]
    )
    assert (
        p.on_scheduled("r", num_computed_tokens=0, num_scheduled_tokens=3 * BT, block_ids=[5, 6, 7])
        is None
    )


def test_save_and_load_switches() -> None:
    p = PrefixPlanner(BT, load=False, save=False)
    p.record_lookup("r", list(range(3 * BT)), hit_blocks=2)
    assert p.external_tokens("r", 0) == 0
    assert (
        p.on_scheduled("r", num_computed_tokens=0, num_scheduled_tokens=3 * BT, block_ids=[1, 2, 3])
        is None
    )


def test_untracked_requests_are_ignored() -> None:
    p = PrefixPlanner(BT)
    assert p.external_tokens("nope", 0) == 0
    p.on_alloc("nope", [1], num_external_tokens=BT)
    assert p.on_scheduled("nope", num_computed_tokens=0, num_scheduled_tokens=5) is None


def test_bad_alloc_is_an_error() -> None:
    p = PrefixPlanner(BT)
    p.record_lookup("r", list(range(4 * BT)), hit_blocks=3)
    with pytest.raises(ValueError, match="whole number"):
        p.on_alloc("r", [1, 2, 3, 4], num_external_tokens=BT + 1)
    with pytest.raises(ValueError, match="does not fit"):
        p.on_alloc("r", [1, 2], num_external_tokens=3 * BT)
    with pytest.raises(ValueError):
        PrefixPlanner(0)


# ---------------------------------------------------------------- paged copies
def test_gather_scatter_round_trip_is_exact() -> None:
    src, dst = _paged(seed=1), _paged(seed=2)
    buf = bytearray(src.block_nbytes)
    src.gather(3, buf)
    dst.scatter(9, memoryview(bytes(buf)))  # read-only source, like a pinned block
    for a, b in zip(src.layers, dst.layers, strict=True):
        assert torch.equal(a[3], b[9])
    # other blocks untouched
    assert not torch.equal(src.layers[0][9], dst.layers[0][9])
    # canonical order: layer 0's block bytes then layer 1's
    l0 = src.layers[0][3].contiguous().view(torch.uint8).reshape(-1)
    assert bytes(buf[: src.layer_nbytes]) == l0.numpy().tobytes()


def test_paged_copies_work_on_strided_layers() -> None:
    # all layers as views of one buffer, as vLLM's CPU backend allocates them
    big = torch.randn(16, 2, 2, BT, 16).to(torch.bfloat16)
    layers = [big[:, i] for i in range(2)]  # non-contiguous per layer
    paged = PagedBlocks(layers)
    buf = bytearray(paged.block_nbytes)
    paged.gather(5, buf)
    clone = PagedBlocks([torch.zeros(16, 2, BT, 16, dtype=torch.bfloat16) for _ in range(2)])
    clone.scatter(5, buf)
    assert all(torch.equal(a[5], b[5]) for a, b in zip(layers, clone.layers, strict=True))


def test_paged_rejects_bad_input() -> None:
    paged = _paged()
    with pytest.raises(ValueError, match="out of range"):
        paged.gather(16, bytearray(paged.block_nbytes))
    with pytest.raises(ValueError, match="bytes for a block"):
        paged.scatter(0, bytes(paged.block_nbytes - 1))
    with pytest.raises(ValueError, match="no KV cache layers"):
        PagedBlocks([])
    with pytest.raises(ValueError, match="one block size"):
        PagedBlocks([torch.zeros(4, 2, BT, 16), torch.zeros(4, 2, BT, 8)])
    with pytest.raises(ValueError, match="num_layers / dtype"):
        check_block_nbytes(_ns(num_layers=3), paged)
    check_block_nbytes(_ns(), paged)


def test_layers_in_model_order() -> None:
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(1) + i for i in (10, 2, 1)}
    assert [n.split(".")[2] for n, _ in order_layers(caches)] == ["1", "2", "10"]


# ---------------------------------------------------------------- transfers with a fake daemon
def _transfer(tokens: list[int], start: int, ids: Sequence[int]) -> BlockTransfer:
    return BlockTransfer("r", tuple(tokens[: (start + len(ids)) * BT]), start, tuple(ids))


def test_save_then_load_into_another_engine() -> None:
    ns, c = _ns(), FakeClient()
    tokens = list(range(100, 100 + 4 * BT))
    a, b = _paged(seed=1), _paged(seed=2)
    out = save_blocks(c, ns, a, _transfer(tokens, 0, [0, 1, 2, 3]))
    assert (out.new, out.present, out.busy) == (4, 0, 0)
    assert len(c.committed_sums) == 4 and all(c.committed_sums.values())
    again = save_blocks(c, ns, a, _transfer(tokens, 2, [2, 3]))  # dedup
    assert (again.new, again.present) == (0, 2)
    res = load_blocks(c, ns, b, _transfer(tokens, 1, [8, 9, 10]))
    assert res.loaded == 3 and res.failed_block_ids == ()
    for i, j in ((1, 8), (2, 9), (3, 10)):
        assert all(torch.equal(x[i], y[j]) for x, y in zip(a.layers, b.layers, strict=True))
    assert c.pins == {}  # every pin released


def test_save_chains_from_the_previous_block() -> None:
    ns = _ns()
    tokens = list(range(4 * BT))
    keys, parent = transfer_keys(ns, _transfer(tokens, 2, [5, 6]))
    full = ns.block_keys(tokens)
    assert keys == full[2:4] and parent == full[1]
    assert transfer_keys(ns, _transfer(tokens, 0, [5]))[1] is None
    with pytest.raises(ValueError, match="needs"):
        transfer_keys(ns, BlockTransfer("r", tuple(tokens[:BT]), 0, (1, 2)))


def test_block_failing_its_checksum_is_a_miss_and_recomputed() -> None:
    ns, c = _ns(), FakeClient()
    tokens = list(range(4 * BT))
    a, b = _paged(seed=1), _paged(seed=2)
    save_blocks(c, ns, a, _transfer(tokens, 0, [0, 1, 2, 3]))
    c.corrupt.add(ns.block_keys(tokens)[1])
    before = [t[12:15].clone() for t in b.layers]
    res = load_blocks(c, ns, b, _transfer(tokens, 0, [11, 12, 13, 14]))
    # block 0 loaded; the bad block and every later one are reported, none is copied
    assert res.loaded == 1 and res.failed_block_ids == (12, 13, 14)
    assert all(torch.equal(x[0], y[11]) for x, y in zip(a.layers, b.layers, strict=True))
    assert all(torch.equal(x, y[12:15]) for x, y in zip(before, b.layers, strict=True))
    assert c.pins == {}


def test_pins_lost_during_the_copy_fail_every_block() -> None:
    """The session ended while blocks were copied (release says LeaseLost): their slots
    may have been reused under the copy, so none of it is trusted: all recomputed."""
    ns, c = _ns(), FakeClient()
    tokens = list(range(3 * BT))
    save_blocks(c, ns, _paged(seed=1), _transfer(tokens, 0, [0, 1, 2]))
    c.lose_pins = True
    res = load_blocks(c, ns, _paged(seed=2), _transfer(tokens, 0, [4, 5, 6]))
    assert res.loaded == 0 and res.failed_block_ids == (4, 5, 6)


def test_wrong_sized_block_is_a_miss() -> None:
    ns, c = _ns(), FakeClient()
    tokens = list(range(2 * BT))
    keys = ns.block_keys(tokens)
    c.blocks[keys[0]] = bytes(ns.block_nbytes - 2)
    res = load_blocks(c, ns, _paged(), _transfer(tokens, 0, [1, 2]))
    assert res.loaded == 0 and res.failed_block_ids == (1, 2)


def test_daemon_down_raises_and_nothing_is_half_written() -> None:
    ns, c = _ns(), FakeClient()
    c.down = True
    tokens = list(range(2 * BT))
    with pytest.raises(DaemonUnavailable):
        load_blocks(c, ns, _paged(), _transfer(tokens, 0, [1, 2]))
    with pytest.raises(DaemonUnavailable):
        save_blocks(c, ns, _paged(), _transfer(tokens, 0, [1, 2]))
    c.down, c.full = False, True
    with pytest.raises(ResourceExhausted):
        save_blocks(c, ns, _paged(), _transfer(tokens, 0, [1, 2]))


def test_failed_copy_aborts_the_slots() -> None:
    ns, c = _ns(), FakeClient()
    tokens = list(range(2 * BT))
    with pytest.raises(ValueError, match="out of range"):
        save_blocks(c, ns, _paged(num_blocks=2), _transfer(tokens, 0, [1, 99]))
    assert c.pending == {} and c.blocks == {}


# ---------------------------------------------------------------- daemon link
def test_link_backs_off_after_failure_and_reconnects(tmp_path: Path) -> None:
    now = [0.0]
    made: list[FakeClient] = []
    sock = tmp_path / "kv.sock"

    def factory() -> FakeClient:
        made.append(FakeClient())
        return made[-1]

    link = DaemonLink(factory, str(sock), retry_s=5.0, clock=lambda: now[0])
    assert link.get() is None  # no socket: no connect attempt at all
    assert made == [] and link.failures == 1
    sock.touch()
    assert link.get() is None  # still backing off
    now[0] = 5.1
    c1 = link.get()
    assert c1 is made[0] and link.get() is c1
    link.failed(DaemonUnavailable("gone"))
    assert made[0].closed and link.get() is None
    now[0] = 11.0
    assert link.get() is made[1]
    link.close()
    assert made[1].closed


def test_link_factory_failure_is_quiet() -> None:
    def factory() -> FakeClient:
        raise DaemonUnavailable("nobody home")

    link = DaemonLink(factory, None, retry_s=1.0, clock=lambda: 0.0)
    assert link.get() is None and link.failures == 1


def test_counters_dump(tmp_path: Path) -> None:
    c = ConnectorCounters(loaded_blocks=3)
    c.dump(str(tmp_path / "s"), "worker")
    c.loaded_blocks = 5
    c.dump(None, "worker")  # off: nothing written
    c.dump("", "worker")
    got = read_counters(tmp_path / "s")
    assert list(got) == [f"worker-{os.getpid()}"]
    assert got[f"worker-{os.getpid()}"]["loaded_blocks"] == 3
    c.dump(str(tmp_path / "s"), "worker")  # the same file, replaced whole; no temp left
    assert read_counters(tmp_path / "s")[f"worker-{os.getpid()}"]["loaded_blocks"] == 5
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"worker-{os.getpid()}.json"]


def test_importing_kvstore_does_not_import_vllm() -> None:
    code = (
        "import sys, kvstore, kvstore.integrations, kvstore.integrations.vllm_core\n"
        "assert 'vllm' not in sys.modules, 'importing kvstore imported vllm'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


def test_blocks_interchange_with_paged_io() -> None:
    """Blocks stored by kvstore.paged_io (another engine's glue) load through the connector."""
    from kvstore.paged_io import load_into_paged, store_from_paged

    ns, c = _ns(), FakeClient()
    tokens = list(range(50, 50 + 3 * BT))
    a, b, back = _paged(seed=1), _paged(seed=2), _paged(seed=3)
    res = store_from_paged(c, ns, a.layers, [4, 5, 6], tokens, "vllm_cpu")
    assert res.new == 3
    out = load_blocks(c, ns, b, _transfer(tokens, 0, [7, 8, 9]))
    assert out.loaded == 3
    for i, j in ((4, 7), (5, 8), (6, 9)):
        assert all(torch.equal(x[i], y[j]) for x, y in zip(a.layers, b.layers, strict=True))
    # and the other way round: the connector's blocks load through paged_io
    tokens2 = list(range(900, 900 + 2 * BT))
    save_blocks(c, ns, a, _transfer(tokens2, 0, [1, 2]))
    assert load_into_paged(c, ns, back.layers, [10, 11], tokens2, "vllm_cpu") == 2 * BT
    assert all(torch.equal(x[2], y[11]) for x, y in zip(a.layers, back.layers, strict=True))
