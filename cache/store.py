"""The tensor side of per-document KV caches: which K/V tensors belong to which document.

cache/ owns every KV byte. A DocumentKV pairs the token ids whose K/V are cached
(positions 0..len-1, with their staleness) with the Hugging Face cache object
holding them. The store maps documents to them under a memory budget: the least
recently used documents spill to disk as snapshots and come back from there
without re-encoding. Snapshots also outlive the worker: a restarted worker
finds a reopened document's snapshot and starts from it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .plan import DocumentTokens
from .snapshot import SnapshotRefused, load_snapshot, save_snapshot

log = logging.getLogger(__name__)


@dataclass
class DocumentKV:
    tokens: DocumentTokens = field(default_factory=DocumentTokens)  # ids whose K/V are cached, and which are stale
    cache: Any = None  # transformers DynamicCache with len(tokens) positions
    dirty: bool = True  # changed since its snapshot was written
    refresh_position: int | None = None  # a background refresh in progress re-encodes from here

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers if layer.is_initialized)


class KVStore:
    """Per-document caches; least recently used ones spill to disk over the byte budget."""

    def __init__(
        self,
        budget_bytes: int = 1 << 30,
        spill_dir: Path | None = None,
        identity: str = "",
        dtype: str = "float32",
        new_cache: Callable[[], Any] | None = None,
        device: Any = "cpu",
        disk_budget_bytes: int | None = None,
    ):
        self.budget_bytes = budget_bytes
        self.disk_budget_bytes = disk_budget_bytes if disk_budget_bytes is not None else 4 * budget_bytes
        self.spill_dir = spill_dir
        self.identity = identity
        self.dtype = dtype
        self.new_cache = new_cache
        self.device = device
        self._docs: OrderedDict[str, DocumentKV] = OrderedDict()
        # Completions and background work hold the model lock; closing a document does not, so the
        # mapping itself has its own lock.
        self._lock = threading.RLock()
        self.counters = {"evictions": 0, "spilled": 0, "restored": 0, "refused": 0, "snapshots_written": 0}

    # -- lookup ------------------------------------------------------------

    def get(self, uri: str) -> DocumentKV | None:
        with self._lock:
            entry = self._docs.get(uri)
            if entry is not None:
                self._docs.move_to_end(uri)
                return entry
            entry = self._restore(uri)
            if entry is not None:
                self.put(uri, entry)
            return entry

    def put(self, uri: str, entry: DocumentKV) -> None:
        with self._lock:
            self._docs[uri] = entry
            self._docs.move_to_end(uri)
            self._evict_over_budget(keep=uri)

    def drop(self, uri: str) -> None:
        """Forget a document's cache, its snapshot included (it was closed)."""
        with self._lock:
            self._docs.pop(uri, None)
            if self.spill_dir is not None:
                self.snapshot_path(uri).unlink(missing_ok=True)

    def items(self) -> list[tuple[str, DocumentKV]]:
        with self._lock:
            return list(self._docs.items())

    def total_bytes(self) -> int:
        return sum(e.nbytes() for _, e in self.items())

    def stale_tokens(self) -> int:
        return sum(e.tokens.stale_count for _, e in self.items())

    def __len__(self) -> int:
        return len(self._docs)

    # -- snapshots ---------------------------------------------------------

    def snapshot_path(self, uri: str) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / (hashlib.sha256(uri.encode()).hexdigest()[:32] + ".msgpack")

    def write_snapshot(self, uri: str, entry: DocumentKV) -> bool:
        if self.spill_dir is None or entry.cache is None or not len(entry.tokens):
            return False
        save_snapshot(self.snapshot_path(uri), entry.tokens, entry.cache, self.identity)
        entry.dirty = False
        self.counters["snapshots_written"] += 1
        self._prune_snapshots()
        return True

    def write_dirty_snapshot(self) -> str | None:
        """Write the snapshot of one document changed since its last one; return its uri, or None."""
        for uri, entry in self.items():
            if entry.dirty and self.write_snapshot(uri, entry):
                return uri
        return None

    def _prune_snapshots(self) -> None:
        """Keep the snapshot folder under its budget (several times the memory budget), oldest out first."""
        files = sorted(self.spill_dir.glob("*.msgpack"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        limit = max(self.disk_budget_bytes, 1)
        while files and total > limit:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)

    def _restore(self, uri: str) -> DocumentKV | None:
        if self.spill_dir is None or self.new_cache is None:
            return None
        path = self.snapshot_path(uri)
        if not path.exists():
            return None
        try:
            tokens, cache = load_snapshot(path, self.identity, self.dtype, self.new_cache, self.device)
        except SnapshotRefused as exc:
            log.warning("snapshot of %s refused, rebuilding: %s", uri, exc)
            self.counters["refused"] += 1
            path.unlink(missing_ok=True)
            return None
        self.counters["restored"] += 1
        return DocumentKV(tokens=tokens, cache=cache, dirty=False)

    def _evict_over_budget(self, keep: str) -> None:
        while self.total_bytes() > self.budget_bytes and len(self._docs) > 1:
            oldest = next(iter(self._docs))
            if oldest == keep:
                break
            entry = self._docs.pop(oldest)
            self.counters["evictions"] += 1
            if entry.dirty and self.write_snapshot(oldest, entry):
                self.counters["spilled"] += 1
            elif not entry.dirty and self.spill_dir is not None:
                self.counters["spilled"] += 1
