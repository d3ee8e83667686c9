"""A deferred forward: the K/V writes of one document's small encode, recorded now and run later, batched.

A keystroke's edit is a few tokens to encode (and a few stale ones to refresh near the cursor),
whose forward alone costs nearly as much as twenty documents' together. So the KV manager
brings a cache to its new ids with a DeferredForward as the buffer's `Forward`: `apply` and
`refresh` move the ids at once and the recorder keeps the calls (which only write K/V; their
logits are not used). Until they run, the buffer's ids are ahead of its K/V: the scheduler
runs them before anything reads the buffer, either as extra rows of the round's decoding
forward (`writes_of`, when they `can_ride`) or in forwards of their own, several documents'
k-th calls batched (`run_deferred`).
"""

from __future__ import annotations

from typing import Sequence

from .buffer import Forward, KVBuffer, padded_rows


class DeferredForward:
    """A `Forward` that records the calls of one buffer's `apply` or `refresh` instead of running them.

    The calls must run in order and before anything reads the buffer (run_deferred, or writes_of
    in a decoding round's forward)."""

    def __init__(self) -> None:
        self.calls: list[tuple[KVBuffer, int, list[int]]] = []  # (buffer, first slot, ids), in call order

    def __call__(self, *, caches, starts, lengths=None, ids=None, logits=None, logit_rows=None):
        assert ids is not None and lengths is None and logit_rows is None and len(caches) == 1
        self.calls.append((caches[0], int(starts[0]), [int(i) for i in ids.reshape(-1)]))
        return None

    @property
    def tokens(self) -> int:
        return sum(len(ids) for _, _, ids in self.calls)

    def merge(self, later: DeferredForward) -> None:
        """Take `later`'s calls (of the same buffer, recorded after these) after this one's."""
        assert not later.calls or not self.calls or later.calls[0][0] is self.calls[0][0], "one buffer per recorder"
        self.calls.extend(later.calls)
        later.calls = []


def can_ride(deferred: DeferredForward) -> bool:
    """Whether the deferred calls may run as rows of one forward and give what running them in order gives.

    In one forward each row attends to the K/V every row wrote in the same layer. Calls in order
    that go strictly forward through the document (each starts past the previous one's end) only
    attend to what earlier calls wrote, as in order; a call at or before an earlier one would see
    that call's tokens already changed (or write the same slots twice).
    """
    ends = [(start, start + len(ids)) for _, start, ids in deferred.calls]
    return all(prev_end <= start for (_, prev_end), (start, _) in zip(ends, ends[1:]))


def writes_of(deferred: Sequence[DeferredForward]) -> list[tuple[KVBuffer, int, list[int]]]:
    """The deferred calls as K/V-only rows of one forward (extend_batch's `writes`), taken from their
    recorders; each must `can_ride`."""
    rows = []
    for d in deferred:
        assert can_ride(d), "deferred calls that overlap or go backwards must run in their own forwards"
        rows.extend(d.calls)
        d.calls = []
    return rows


def run_deferred(deferred: Sequence[DeferredForward], forward: Forward) -> None:
    """Run the deferred calls of several buffers (one recorder each): the k-th call of every buffer
    in one batched forward (rows right-padded; the padding writes no K/V), k = 0, 1, ..."""
    buffers = [d.calls[0][0] for d in deferred if d.calls]
    assert len({id(b) for b in buffers}) == len(buffers), "a buffer appears twice"
    for k in range(max((len(d.calls) for d in deferred), default=0)):
        calls = [d.calls[k] for d in deferred if len(d.calls) > k]
        padded, lengths = padded_rows([ids for _, _, ids in calls], calls[0][0].device)
        caches, starts = [buffer for buffer, _, _ in calls], [start for _, start, _ in calls]
        for cache, start in zip(caches, starts):
            cache.reserve(start + padded.shape[1])
        forward(ids=padded, caches=caches, starts=starts, lengths=lengths, logits=None)
    for d in deferred:
        d.calls.clear()
