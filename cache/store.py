"""Which K/V belong to which document: per-document caches under a memory budget, spilled to disk.

cache/ owns every KV byte. A DocumentKV is one document's KVBuffer (token ids and K/V,
changed only together) plus its flags: changed since its snapshot (dirty), an idle refresh
in progress, and whether a request holds it right now (pinned). The store reads the flags
(an unpinned cache may be evicted, a dirty one is written when it is); the KV manager
(cache/manager.py) alone sets them, under the store's `lock` where eviction could see them
change (tests/test_owners.py checks it).

The store maps documents to them under a byte budget: the least recently used unpinned
documents spill to disk as snapshots and come back from there without re-encoding. With
owners (the worker's sessions), the owner holding the most bytes spills first, so one
session's caches never push out another's while it holds more.
Snapshots also outlive the worker: a restarted worker finds a reopened document's
snapshot and starts from it.

Disk I/O never runs on the model thread: snapshots are written by the store's own
writer thread (the model thread only copies a changed cache's K/V for it), evicted
caches go to that thread as they are, and restoring happens on the caller's thread
before a request reaches the model. A full disk or an unwritable folder turns
snapshots off for a while, with one warning; serving goes on.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .buffer import KVBuffer
from .pids import pid_alive
from .plan import DocumentTokens
from .snapshot import SnapshotRefused, load_snapshot, private_folder, save_snapshot

log = logging.getLogger(__name__)

WRITE_PAUSE_S = 300.0  # after a failed write (disk full, read-only folder), no snapshots for this long
STALE_TMP_S = 3600.0  # half-written snapshot files of processes that died are removed after this long


@dataclass(eq=False)  # found in a list by identity
class _Write:
    """A snapshot handed to the writer thread; `cancelled` when its document was closed meanwhile (drop)."""

    uri: str
    buffer: KVBuffer
    cancelled: bool = False


@dataclass
class DocumentKV:
    buffer: KVBuffer
    # The flags, set by the KV manager (cache/manager.py) only:
    dirty: bool = True  # changed since its snapshot was written
    refresh_position: int | None = None  # a background refresh in progress re-encodes from here
    pinned: bool = False  # a request holds it: not evicted, not copied for a snapshot

    @property
    def tokens(self) -> DocumentTokens:
        return self.buffer.tokens

    def nbytes(self) -> int:
        return self.buffer.nbytes()


class KVStore:
    """Per-document caches; least recently used ones spill to disk over the byte budget."""

    def __init__(
        self,
        budget_bytes: int = 1 << 30,
        spill_dir: Path | None = None,
        identity: str = "",
        dtype: str = "float32",
        layout: tuple[int, int, int] | None = None,
        device: torch.device | str = "cpu",
        disk_budget_bytes: int | None = None,
        owner: Callable[[str], str | None] | None = None,
    ):
        self.budget_bytes = budget_bytes
        # Who a key's cache belongs to (the worker's sessions: completion.documents.key_session). Over
        # the budget, the heaviest owner gives up its least recently used cache first, so one owner's
        # caches never push another's out while it holds more than they do. None: one plain LRU.
        self.owner = owner
        self.disk_budget_bytes = disk_budget_bytes if disk_budget_bytes is not None else 4 * budget_bytes
        self.spill_dir = spill_dir
        self.identity = identity
        self.dtype = dtype
        self.layout = layout  # (layers, kv_heads, head_dim) of the model: what a snapshot must fit
        self.device = device
        self._docs: OrderedDict[str, DocumentKV] = OrderedDict()
        # Requests (the model thread), restores (callers' threads) and closes (gRPC threads) all touch
        # the mapping; one lock guards it, never held across model work or disk I/O.
        self._lock = threading.RLock()
        self._writes: queue.Queue = queue.Queue()
        self._pending: dict[str, list[_Write]] = {}  # uri -> its writes not yet done (guarded by _lock)
        # Held by the writer while it decides and writes one snapshot, and by drop() while it unlinks
        # one: a write queued before a drop never lands after its unlink. Never taken on the model thread.
        self._write_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._paused_until = 0.0
        self.counters = {
            "evictions": 0, "spilled": 0, "restored": 0, "refused": 0, "snapshots_written": 0, "write_errors": 0,
        }
        if spill_dir is not None:
            self._prune_leftovers()

    # -- a request's cache -------------------------------------------------------

    def get(self, uri: str) -> DocumentKV | None:
        """The document's cache, brought back from its snapshot if it was spilled (disk I/O: call off the model thread)."""
        with self._lock:
            entry = self._docs.get(uri)
            if entry is not None:
                self._docs.move_to_end(uri)
                return entry
        restored = self._restore(uri)
        if restored is None:
            return None
        with self._lock:  # another thread may have created one meanwhile; the newer wins
            entry = self._docs.setdefault(uri, restored)
            self._docs.move_to_end(uri)
        return entry

    @property
    def lock(self) -> threading.RLock:
        """Held while the mapping changes or eviction reads the flags: the KV manager pins and unpins under it."""
        return self._lock

    def get_or_create(self, uri: str, create: Callable[[], KVBuffer]) -> DocumentKV:
        """The document's cache (an empty one created), most recently used (the KV manager pins it)."""
        with self._lock:
            entry = self._docs.get(uri)
            if entry is None:
                entry = self._docs[uri] = DocumentKV(buffer=create())
            self._docs.move_to_end(uri)
            return entry

    def put(self, uri: str, entry: DocumentKV) -> None:
        """Hold `entry` as the document's cache (replacing any other), most recently used."""
        with self._lock:
            self._docs[uri] = entry
            self._docs.move_to_end(uri)
            self._evict_over_budget()

    def keep(self, uri: str, entry: DocumentKV) -> None:
        """A request is done with the cache (the KV manager unpinned it): keep it, most recently used,
        unless the document was closed meanwhile; spill what is over the budget."""
        with self._lock:
            if self._docs.get(uri) is entry:
                self._docs.move_to_end(uri)
                self._evict_over_budget()

    def drop(self, uri: str) -> None:
        """Forget a document's cache, its snapshot included (it was closed): a snapshot of it handed
        to the writer and not yet written is cancelled, one being written is unlinked once it is."""
        with self._lock:
            self._docs.pop(uri, None)  # a copy of it taken for a snapshot just now is not queued (write_later)
            for write in self._pending.pop(uri, ()):
                write.cancelled = True
        if self.spill_dir is not None:
            with self._write_lock:
                self.snapshot_path(uri).unlink(missing_ok=True)

    def forget(self, uri: str) -> None:
        """Forget the cache in memory (a request failed half-way through it); a snapshot stays valid."""
        with self._lock:
            self._docs.pop(uri, None)

    def items(self) -> list[tuple[str, DocumentKV]]:
        with self._lock:
            return list(self._docs.items())

    def total_bytes(self) -> int:
        return sum(e.nbytes() for _, e in self.items())

    def stale_tokens(self) -> int:
        return sum(e.tokens.stale_count for _, e in self.items())

    def __len__(self) -> int:
        return len(self._docs)

    # -- snapshots -------------------------------------------------------------

    def snapshot_path(self, uri: str) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / (hashlib.sha256(uri.encode()).hexdigest()[:32] + ".msgpack")

    def takes_snapshots(self) -> bool:
        """Whether a snapshot handed over now would be written (a folder is set, writing is not paused)."""
        return self.spill_dir is not None and time.monotonic() >= self._paused_until

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every snapshot handed to the writer is on disk (shutdown)."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def write_later(self, uri: str, copy: KVBuffer, entry: DocumentKV) -> None:
        """Hand `copy` (of `entry`'s buffer, taken by the KV manager) to the writer thread, unless the
        document's cache is no longer `entry`: closed (drop), forgotten or replaced while it was copied."""
        with self._lock:
            if self._docs.get(uri) is entry:
                self._queue_write(uri, copy)

    def _queue_write(self, uri: str, buffer: KVBuffer) -> None:
        write = _Write(uri, buffer)
        with self._lock:
            self._pending.setdefault(uri, []).append(write)
        self._writes.put(write)
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="rotary-snapshots", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            write = self._writes.get()
            uri = write.uri
            try:
                with self._write_lock:
                    with self._lock:
                        pending = self._pending.get(uri, [])
                        if write in pending:
                            pending.remove(write)
                            if not pending:
                                del self._pending[uri]
                    if not write.cancelled and time.monotonic() >= self._paused_until:
                        save_snapshot(self.snapshot_path(uri), write.buffer, self.identity)
                        self.counters["snapshots_written"] += 1
                        self._prune_snapshots()
            except OSError as exc:  # disk full, read-only or vanished folder: serving goes on without snapshots
                self.counters["write_errors"] += 1
                self._paused_until = time.monotonic() + WRITE_PAUSE_S
                log.warning("snapshots off for %.0f s: cannot write to %s (%s)", WRITE_PAUSE_S, self.spill_dir, exc)
            except Exception:
                self.counters["write_errors"] += 1
                log.exception("snapshot of %s failed", uri)
            finally:
                self._writes.task_done()

    def _prune_snapshots(self) -> None:
        """Keep the snapshot folder under its budget (several times the memory budget), oldest out first."""
        files = []
        for p in self.spill_dir.glob("*.msgpack"):
            try:
                files.append((p.stat().st_mtime, p.stat().st_size, p))
            except FileNotFoundError:
                continue
        files.sort()
        total = sum(size for _, size, _ in files)
        limit = max(self.disk_budget_bytes, 1)
        while files and total > limit:
            _, size, oldest = files.pop(0)
            total -= size
            oldest.unlink(missing_ok=True)

    def _prune_leftovers(self) -> None:
        """Half-written files (`*.tmpPID`) of processes that are gone, or older than an hour."""
        try:
            private_folder(self.spill_dir)
            for tmp in self.spill_dir.glob("*.msgpack.tmp*"):
                pid = tmp.name.rsplit(".tmp", 1)[-1]
                gone = not pid.isdigit() or not pid_alive(int(pid))
                if gone or time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot prepare the snapshot folder %s: %s", self.spill_dir, exc)

    def _restore(self, uri: str) -> DocumentKV | None:
        if self.spill_dir is None or self.layout is None:
            return None
        path = self.snapshot_path(uri)
        if not path.exists():
            return None
        try:
            buffer = load_snapshot(path, self.identity, self.dtype, self.layout, self.device)
        except SnapshotRefused as exc:
            log.warning("snapshot of %s refused, rebuilding: %s", uri, exc)
            self.counters["refused"] += 1
            path.unlink(missing_ok=True)
            return None
        self.counters["restored"] += 1
        return DocumentKV(buffer=buffer, dirty=False)

    def _evict_over_budget(self) -> None:
        while self.total_bytes() > self.budget_bytes:
            victim = self._victim()
            if victim is None or len(self._docs) <= 1:
                return
            entry = self._docs.pop(victim)
            self.counters["evictions"] += 1
            if self.spill_dir is None or not entry.buffer.length or not entry.buffer.is_complete():
                continue
            self.counters["spilled"] += 1
            if entry.dirty:
                self._queue_write(victim, entry.buffer)  # no one else holds it now: written as it is

    def _victim(self) -> str | None:
        """The least recently used unpinned cache of the owner holding the most bytes (of any, without owners)."""
        unpinned = [key for key, entry in self._docs.items() if not entry.pinned]  # least recently used first
        if self.owner is None or not unpinned:
            return unpinned[0] if unpinned else None
        owners = {key: self.owner(key) for key in self._docs}
        held = Counter()
        for key, entry in self._docs.items():
            held[owners[key]] += entry.nbytes()
        heaviest = max({owners[key] for key in unpinned}, key=held.__getitem__)
        return next(key for key in unpinned if owners[key] == heaviest)
