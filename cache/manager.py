"""The KV manager: the one owner of what the caches' flags say and of the policy around them.

It answers the questions the worker asks of cache/, and nothing else touches the flags of a
DocumentKV (`pinned`, `dirty`, `refresh_position`; tests/test_owners.py checks it):
- which cache a request uses: `acquire` pins the document's cache (creating an empty one),
  `release` unpins it, `discard` drops a cache a failed request may have left half-updated;
- "bring this document's cache to these ids": `bring_to`, one bounded step at a time (a
  PrefillStep each), reusing what the cache's reuse allows (Reuse: edit-aware PIE, prefix, none),
  deferring small encodes (a DeferredForward) for the scheduler to batch (cache/deferred.py),
  then re-encoding stale tokens in the window before the cursor;
- staleness and refresh: `background_step` refreshes stale documents chunk by chunk when the
  worker is idle (or a document is over its stale budget), most recently used first;
- snapshots: `snapshot_one` copies one changed, unpinned cache and hands it to the store's writer
  thread (cache/store.py does the disk I/O, off the model thread).

The model is reached only through the `Forward` callable it is given (cache/ never imports
models/), and every method that runs it is called on the model thread (completion/scheduler.py).
The store (cache/store.py) keeps the caches and evicts and spills them; it reads the flags.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Generator, Protocol

import torch

from .buffer import Forward, KVBuffer
from .deferred import DeferredForward, run_deferred
from .plan import DocumentTokens, common_prefix_length
from .store import DocumentKV, KVStore

REFRESH_CHUNK = 64  # tokens per background refresh step
# A step encoding at most this many tokens (the edited tokens after a keystroke, the refresh of stale
# ones near the cursor) waits for the round's decoding forward, where it runs as extra rows
# (completion/scheduler.py); a bigger one (a paste, a first open) runs before the request's next
# step, as a forward of that size is already efficient.
BATCHED_STEP_TOKENS = 64


class Reuse(enum.Enum):
    """What `bring_to` may reuse of a cache (the request's cache mode, completion/rpc/wire.py)."""

    EDIT_AWARE = "edit_aware"  # PIE: equal runs kept, moved keys re-rotated, stale ones near the cursor refreshed
    NO_ROTATION = "no_rotation"  # PIE without re-rotation nor refresh: the PIE paper's "conflict" baseline
    PREFIX = "prefix"  # the common prefix only
    NOTHING = "nothing"  # encode everything


@dataclass(frozen=True)
class PrefillStep:
    """What one step of `bring_to` hands the scheduler: its work was done (DONE), a deferred forward
    to keep with the request and run before anything reads its cache (`deferred`), or "run my
    deferred forward before my next step" (RUN_DEFERRED: that step reads the cache, or what was
    deferred is too big to wait for the decoding round)."""

    deferred: DeferredForward | None = None
    run_deferred: bool = False


DONE = PrefillStep()
RUN_DEFERRED = PrefillStep(run_deferred=True)

# A generator of steps whose return value is the logits after the last id (None: not fed).
PrefillSteps = Generator[PrefillStep, None, "torch.Tensor | None"]


class CacheCounts(Protocol):
    """What `bring_to` counts (the engine's CompletionStats has these fields)."""

    tokens_reused: int
    tokens_encoded: int
    tokens_rerotated: int
    stale_refreshed: int


class KVManager:
    """Pinning, bringing caches to ids, staleness, refresh and snapshots, over one KVStore."""

    def __init__(
        self,
        store: KVStore,
        new_buffer: Callable[[], KVBuffer],
        forward: Forward | None = None,
        *,
        inv_freq: torch.Tensor | None = None,
        convention: str = "half",
        edit_aware: bool = False,
        prefill_chunk: int = 256,
        stale_budget: int = 1024,
    ):
        self.store = store
        self.new_buffer = new_buffer
        self.forward = forward
        self.inv_freq, self.convention = inv_freq, convention
        # Models whose RoPE rotations do not compose cannot re-rotate cached keys exactly: prefix reuse.
        self.edit_aware_supported = edit_aware
        self.prefill_chunk = prefill_chunk  # tokens per forward when bringing a cache to its ids
        # More stale tokens than this in one document: refresh it in the background without waiting for idle.
        self.stale_budget = stale_budget
        self.background_refreshed = 0  # tokens refreshed by background steps

    # -- a request's cache (the model thread) ------------------------------------

    def acquire(self, key: str | None) -> DocumentKV:
        """The request's cache, pinned until `release` (None: a fresh one the store does not keep)."""
        if key is None:
            return DocumentKV(buffer=self.new_buffer())
        with self.store.lock:
            entry = self.store.get_or_create(key, self.new_buffer)
            entry.pinned = True
        return entry

    def release(self, key: str | None, entry: DocumentKV) -> None:
        """The request is done with its cache: unpinned, kept unless its document was closed meanwhile."""
        if key is None:
            return
        with self.store.lock:
            entry.pinned = False
            self.store.keep(key, entry)

    def discard(self, key: str | None, entry: DocumentKV | None) -> None:
        """A request failed: its cache may be half-updated, so it is dropped (the next request rebuilds)."""
        if key is None:
            return
        self.store.forget(key)
        if entry is not None:
            entry.pinned = False

    def bring_to(
        self, entry: DocumentKV, ids: list[int], counts: CacheCounts, reuse: Reuse, refresh_window: int,
        feed_last: bool = True,
    ) -> PrefillSteps:
        """Bring a cache to `ids`, one bounded piece of work per step; return the logits after the last id.

        Every id but the last is put in the cache as `reuse` allows; the last is fed on its own to
        get the logits the first generated token comes from (feed_last=False: it is left to the
        caller, the cache then holding ids[:-1], and None is returned). `refresh_window`: re-encode
        stale tokens among the last this many before the cursor (0: never). Abandoned between steps
        (cancelled), the cache holds a consistent prefix of the work, which the next request reuses.
        """
        buffer = entry.buffer
        context, last = ids[:-1], ids[-1:]
        entry.dirty = True
        entry.refresh_position = None  # the text moved: a background refresh starts over
        planned = reuse in (Reuse.EDIT_AWARE, Reuse.NO_ROTATION)
        if planned and not self.edit_aware_supported:
            reuse, planned = Reuse.PREFIX, False
        plan = buffer.tokens.plan(context) if planned else None
        if plan is not None and plan.tokens_reused:
            # Reuse what the plan keeps (moved keys re-rotated: PIE), encode the edited pieces. The
            # encoding is deferred, then run by the scheduler with other requests' (or at once if big).
            deferred = DeferredForward()
            buffer.apply(
                plan, context, deferred, inv_freq=self.inv_freq, convention=self.convention,
                rerotate=reuse is Reuse.EDIT_AWARE, chunk=self.prefill_chunk,
            )
            counts.tokens_reused, counts.tokens_encoded = plan.tokens_reused, plan.tokens_encoded
            counts.tokens_rerotated = plan.tokens_rerotated
            yield from self._handed_over(deferred)
            stale = buffer.tokens.stale_range_before(len(context), refresh_window) if refresh_window else None
            if stale is not None and reuse is Reuse.EDIT_AWARE:
                deferred = DeferredForward()
                counts.stale_refreshed = buffer.refresh(stale[0], None, deferred, chunk=self.prefill_chunk)
                yield from self._handed_over(deferred)
            if feed_last:
                yield RUN_DEFERRED  # the last id's forward below reads the cache
        else:
            keep = common_prefix_length(buffer.token_ids, context) if reuse is not Reuse.NOTHING and plan is None else 0
            buffer.rollback(keep)
            counts.tokens_reused, counts.tokens_encoded = keep, len(context) - keep
            for first in range(keep, len(context), self.prefill_chunk):
                buffer.extend(context[first : first + self.prefill_chunk], self.forward, logits=None)
                yield DONE
        counts.tokens_encoded += 1
        if not feed_last:
            return None
        out = buffer.extend(last, self.forward, logits="last")
        return out.logits[0]  # [vocab]

    def bring_to_now(
        self, entry: DocumentKV, ids: list[int], counts: CacheCounts, reuse: Reuse, refresh_window: int
    ) -> torch.Tensor:
        """`bring_to` to the end, each deferred forward run as soon as it is handed over (benchmarks and
        tests that set up a cache by hand, on the model thread)."""
        steps = self.bring_to(entry, ids, counts, reuse, refresh_window)
        while True:
            try:
                step = next(steps)
            except StopIteration as done:
                return done.value
            if step.deferred is not None:
                run_deferred([step.deferred], self.forward)

    @staticmethod
    def _handed_over(deferred: DeferredForward) -> PrefillSteps:
        """Hand a deferred forward to the scheduler; a big one (more than BATCHED_STEP_TOKENS) is to run
        before the next step rather than wait for the decoding round."""
        if deferred.calls:
            yield PrefillStep(deferred=deferred)
            if deferred.tokens > BATCHED_STEP_TOKENS:
                yield RUN_DEFERRED

    # -- background work (the model thread, when no request waits) ------------------------

    def over_stale_budget(self) -> bool:
        return any(entry.tokens.stale_count > self.stale_budget for _, entry in self.store.items())

    def background_step(self, idle: bool) -> str | None:
        """One bounded piece of background work when the worker is `idle` (or a document is over its
        stale budget); what it did, or None.

        Stale documents are refreshed chunk by chunk from their first stale token to the end
        (which leaves them exactly as a full recompute would), most recently used first; then, idle,
        a changed cache is copied and handed to the store's writer thread as a snapshot.
        """
        if not (idle or self.over_stale_budget()):
            return None
        for uri, entry in reversed(self.store.items()):
            if entry.refresh_position is None and entry.tokens.stale_count:
                entry.refresh_position = entry.tokens.stale_intervals[0][0]
            if entry.refresh_position is not None:
                start = entry.refresh_position
                end = min(start + REFRESH_CHUNK, len(entry.tokens))
                entry.buffer.refresh(start, end, self.forward)
                entry.refresh_position = end if end < len(entry.tokens) else None
                entry.dirty = True
                self.background_refreshed += end - start
                return f"refreshed {uri} [{start}, {end})"
        if idle:
            written = self.snapshot_one()
            return f"snapshot of {written}" if written else None
        return None

    def snapshot_one(self) -> str | None:
        """Copy one changed, unpinned cache and hand it to the store's writer; return its key, or None."""
        if not self.store.takes_snapshots():
            return None
        for uri, entry in self.store.items():
            if entry.dirty and not entry.pinned and entry.buffer.length and entry.buffer.is_complete():
                copy = KVBuffer.from_kv(entry.buffer.used().clone(), DocumentTokens(
                    entry.tokens.token_ids, stale=entry.tokens.stale_intervals))
                entry.dirty = False
                self.store.write_later(uri, copy, entry)
                return uri
        return None

    def snapshot_all(self) -> None:
        """Hand every changed cache to the writer (shutdown)."""
        while self.snapshot_one():
            pass
