"""Snapshots: exact round trip, refusal of foreign or corrupt ones, and spill/restore under a memory budget."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from rotary.cache.plan import DocumentTokens
from rotary.cache.snapshot import SnapshotRefused, load_snapshot, save_snapshot
from rotary.cache.store import DocumentKV, KVStore

LAYERS, HEADS, DIM = 4, 3, 8


def make_cache(length: int, seed: int = 0, dtype=torch.float32) -> DynamicCache:
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(LAYERS):
        k = torch.randn(1, HEADS, length, DIM, generator=gen).to(dtype)
        v = torch.randn(1, HEADS, length, DIM, generator=gen).to(dtype)
        cache.update(k, v, i)
    return cache


def new_cache() -> DynamicCache:
    cache = DynamicCache()
    for i in range(LAYERS):  # the model's cache object has one layer slot per layer
        cache.update(torch.zeros(1, HEADS, 0, DIM), torch.zeros(1, HEADS, 0, DIM), i)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    tokens = DocumentTokens(range(10, 22), stale=[(3, 5)])
    cache = make_cache(12, dtype=dtype)
    path = tmp_path / "doc.msgpack"
    save_snapshot(path, tokens, cache, "model-a")
    name = str(dtype).removeprefix("torch.")
    got_tokens, got_cache = load_snapshot(path, "model-a", name, new_cache)
    assert got_tokens.token_ids == tokens.token_ids and got_tokens.stale_intervals == tokens.stale_intervals
    for a, b in zip(got_cache.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_foreign_model_dtype_and_corruption_are_refused(tmp_path):
    path = tmp_path / "doc.msgpack"
    save_snapshot(path, DocumentTokens(range(6)), make_cache(6), "model-a")
    with pytest.raises(SnapshotRefused, match="another model"):
        load_snapshot(path, "model-b", "float32", new_cache)
    with pytest.raises(SnapshotRefused, match="dtype"):
        load_snapshot(path, "model-a", "bfloat16", new_cache)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotRefused, match="checksum"):
        load_snapshot(path, "model-a", "float32", new_cache)
    path.write_bytes(b"\x93garbage")
    with pytest.raises(SnapshotRefused, match="unreadable"):
        load_snapshot(path, "model-a", "float32", new_cache)


def test_least_recently_used_spill_to_disk_and_come_back(tmp_path):
    one_doc = make_cache(16)
    per_doc = sum(layer.keys.nbytes + layer.values.nbytes for layer in one_doc.layers)
    store = KVStore(budget_bytes=int(per_doc * 2.5), spill_dir=tmp_path, identity="m", new_cache=new_cache)
    for i in range(3):
        store.put(f"file:///{i}.py", DocumentKV(tokens=DocumentTokens(range(i, i + 16)), cache=make_cache(16, seed=i)))
    assert len(store) == 2 and store.counters["spilled"] == 1
    assert store.snapshot_path("file:///0.py").exists()
    back = store.get("file:///0.py")  # restored from disk, not re-encoded
    assert back is not None and back.tokens.token_ids == tuple(range(0, 16))
    assert torch.equal(back.cache.layers[2].keys, make_cache(16, seed=0).layers[2].keys)
    assert store.counters["restored"] == 1


def test_refused_snapshot_is_deleted_and_rebuilt(tmp_path):
    store = KVStore(spill_dir=tmp_path, identity="new-model", new_cache=new_cache)
    save_snapshot(store.snapshot_path("file:///x.py"), DocumentTokens(range(4)), make_cache(4), "old-model")
    assert store.get("file:///x.py") is None
    assert not store.snapshot_path("file:///x.py").exists() and store.counters["refused"] == 1
