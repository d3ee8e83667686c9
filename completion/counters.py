"""The worker's request counters (what its Stats reports of completions, edits, sessions), under one lock.

gRPC threads count; Stats reads a copy. The latencies of the last 1000 completions that were not
cancelled are kept for the percentiles.
"""

from __future__ import annotations

import threading

from .request import Chunk

COUNTERS = (
    "completions", "completions_cancelled", "completions_failed", "completions_empty", "completions_abstained",
    "tokens_generated", "tokens_drafted", "drafts_accepted", "forwards", "tokens_reused", "tokens_encoded",
    "tokens_rerotated", "stale_refreshed", "edits", "edits_rejected", "tests_generated", "sessions_expired",
    "documents_expired",
)


class WorkerCounters:
    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._latencies_ms: list[float] = []
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> int:
        return self._counts[key]

    def count(self, key: str) -> None:
        self.add(**{key: 1})

    def add(self, **amounts: int) -> None:
        """Several counters moved together (a reader never sees one without the others)."""
        with self._lock:
            for key, n in amounts.items():
                self._counts[key] += n

    def record(self, chunk: Chunk) -> None:
        """A completion's last chunk: its outcome, its stats, its latency."""
        s = chunk.stats
        with self._lock:
            counts = self._counts
            counts["completions_cancelled" if chunk.stop_reason == "cancelled" else "completions"] += 1
            counts["tokens_generated"] += s.tokens_generated
            counts["tokens_reused"] += s.tokens_reused
            counts["tokens_encoded"] += s.tokens_encoded
            counts["tokens_rerotated"] += s.tokens_rerotated
            counts["stale_refreshed"] += s.stale_refreshed
            counts["tokens_drafted"] += s.tokens_drafted
            counts["drafts_accepted"] += s.drafts_accepted
            counts["forwards"] += s.forwards
            if chunk.stop_reason == "abstained":
                counts["completions_abstained"] += 1
            if chunk.stop_reason != "cancelled":
                self._latencies_ms = (self._latencies_ms + [s.total_ms])[-1000:]

    def snapshot(self) -> tuple[dict[str, int], list[float]]:
        """A copy of the counts, and the kept latencies sorted."""
        with self._lock:
            return dict(self._counts), sorted(self._latencies_ms)
