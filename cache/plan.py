"""Bookkeeping for KV caches that survive edits (Positional Integrity Encoding, PIE).

Pure Python on purpose: no torch here, so every decision to keep, shift or encode
can be tested exactly on lists of ints, without a model (the tensor side lives in
cache/buffer.py and kernels/rope_shift.py).

Vocabulary. The cache holds K/V for the token ids of the *old* text at positions
0..n-1. After edits the text is re-tokenized into the *new* ids. An UpdatePlan is
an ordered list of segments that covers the new ids exactly once, left to right:

- KEEP   old [s, e) stays at positions [s, e): nothing to do.
- SHIFT  old [s, e) moves to new [s + delta, e + delta): its keys are re-rotated by
         delta (RoPE composes: R_delta R_p = R_(p+delta)); its values are untouched.
- ENCODE new [s, e) has no reusable K/V and must be run through the model.

Why ids and not characters: byte-pair encoding re-segments the text next to an
edit (typing inside an identifier changes the token that holds it), so the only
safe unit of reuse is an equal run of *token ids*.

Staleness. Positions fix RoPE, not meaning: from layer 1 up, the K/V of a token
reused after the first edited position were computed while attending to the old
text. Those tokens are "stale". DocumentTokens tracks them as intervals of new
positions so that a policy (the KV manager's stale-token budget and refresh of the window
before the cursor, cache/manager.py) can decide when to re-encode them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

# Equal runs in the middle of a diff shorter than this are encoded rather than
# reused: a run of 1-3 tokens is often a coincidence (",", " self", "\n    ") whose
# K/V came from an unrelated context, and encoding a few tokens is cheap.
DEFAULT_MIN_MATCH = 4

Interval = tuple[int, int]  # half-open [start, end) of token positions


class SegmentKind(str, Enum):
    KEEP = "keep"
    SHIFT = "shift"
    ENCODE = "encode"


@dataclass(frozen=True)
class Segment:
    """One piece of the new token sequence and where its K/V come from.

    `new_start`/`new_end` locate the piece in the new sequence. Reused pieces (KEEP,
    SHIFT) also carry `old_start`, the position their cached K/V sit at today;
    ENCODE pieces have none. Build them with Segment.keep / .shift / .encode.
    """

    kind: SegmentKind
    new_start: int
    new_end: int
    old_start: int | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.new_start < self.new_end, f"empty or negative segment: {self!r}"
        if self.kind is SegmentKind.ENCODE:
            assert self.old_start is None, "an ENCODE segment has no old K/V"
        else:
            assert self.old_start is not None and self.old_start >= 0, f"reused segment needs old_start: {self!r}"
            # KEEP means "same positions", SHIFT means "moved": the kind must agree
            # with the delta so that executors can skip the rotation for KEEP.
            assert (self.kind is SegmentKind.KEEP) == (self.delta == 0), f"kind disagrees with delta: {self!r}"

    @classmethod
    def keep(cls, start: int, end: int) -> Segment:
        """Old [start, end) stays where it is."""
        return cls(SegmentKind.KEEP, start, end, start)

    @classmethod
    def shift(cls, old_start: int, old_end: int, delta: int) -> Segment:
        """Old [old_start, old_end) moves by `delta` positions (delta != 0)."""
        return cls(SegmentKind.SHIFT, old_start + delta, old_end + delta, old_start)

    @classmethod
    def encode(cls, new_start: int, new_end: int) -> Segment:
        """New [new_start, new_end) must be run through the model."""
        return cls(SegmentKind.ENCODE, new_start, new_end)

    @classmethod
    def reuse(cls, old_start: int, old_end: int, new_start: int) -> Segment:
        """KEEP or SHIFT, whichever the positions call for."""
        delta = new_start - old_start
        return cls.keep(old_start, old_end) if delta == 0 else cls.shift(old_start, old_end, delta)

    @property
    def length(self) -> int:
        return self.new_end - self.new_start

    @property
    def is_reused(self) -> bool:
        return self.kind is not SegmentKind.ENCODE

    @property
    def old_end(self) -> int | None:
        return None if self.old_start is None else self.old_start + self.length

    @property
    def delta(self) -> int:
        """How far the cached K/V move (new position - old position); 0 for ENCODE."""
        return 0 if self.old_start is None else self.new_start - self.old_start

    def __repr__(self) -> str:
        if self.kind is SegmentKind.ENCODE:
            return f"encode(new[{self.new_start}:{self.new_end}))"
        if self.kind is SegmentKind.KEEP:
            return f"keep([{self.new_start}:{self.new_end}))"
        return f"shift(old[{self.old_start}:{self.old_end}) by {self.delta:+d})"


@dataclass(frozen=True)
class UpdatePlan:
    """How to turn a cache of `old_length` positions into one of `new_length`.

    `stale_from` is the first new position whose reused K/V attended to changed text
    (the end of the common prefix), or None when the plan makes nothing newly stale
    (identical text, a sliding window). Reused tokens at or after it become stale.
    """

    old_length: int
    new_length: int
    segments: tuple[Segment, ...]
    stale_from: int | None = None

    def __post_init__(self) -> None:
        # The executor trusts these invariants blindly when it moves tensors.
        position = 0
        claimed_old: list[Interval] = []
        for segment in self.segments:
            assert segment.new_start == position, f"segments must tile the new sequence: gap or overlap at {position}"
            position = segment.new_end
            if segment.is_reused:
                assert segment.old_end <= self.old_length, f"{segment!r} reads past the old cache ({self.old_length})"
                claimed_old.append((segment.old_start, segment.old_end))
        assert position == self.new_length, f"segments cover {position} of {self.new_length} new tokens"
        claimed_old.sort()
        for (_, end), (start, _) in zip(claimed_old, claimed_old[1:]):
            assert end <= start, "two segments reuse the same old K/V"

    @property
    def tokens_encoded(self) -> int:
        """Tokens that need a forward pass: the cost of the update."""
        return sum(s.length for s in self.segments if s.kind is SegmentKind.ENCODE)

    @property
    def tokens_kept(self) -> int:
        """Tokens reused at their old positions (no work)."""
        return sum(s.length for s in self.segments if s.kind is SegmentKind.KEEP)

    @property
    def tokens_rerotated(self) -> int:
        """Tokens reused at new positions (one elementwise key rotation each)."""
        return sum(s.length for s in self.segments if s.kind is SegmentKind.SHIFT)

    @property
    def tokens_reused(self) -> int:
        return self.tokens_kept + self.tokens_rerotated

    def encode_ranges(self) -> list[Interval]:
        """New-position ranges to run through the model, in order."""
        return [(s.new_start, s.new_end) for s in self.segments if s.kind is SegmentKind.ENCODE]

    def shifts_at_new_positions(self) -> list[tuple[int, int, int]]:
        """(start, end, delta) of every SHIFT, in new positions: rotate after moving K/V."""
        return [(s.new_start, s.new_end, s.delta) for s in self.segments if s.kind is SegmentKind.SHIFT]

    def newly_stale_intervals(self) -> list[Interval]:
        """New positions that this plan reuses after the first edit."""
        if self.stale_from is None:
            return []
        stale = []
        for s in self.segments:
            if s.is_reused and s.new_end > self.stale_from:
                stale.append((max(s.new_start, self.stale_from), s.new_end))
        return _normalize(stale)


# ---------------------------------------------------------------------------
# Planning


def common_prefix_length(old_ids: Sequence[int], new_ids: Sequence[int]) -> int:
    limit = min(len(old_ids), len(new_ids))
    i = 0
    while i < limit and old_ids[i] == new_ids[i]:
        i += 1
    return i


def common_suffix_length(old_ids: Sequence[int], new_ids: Sequence[int], *, limit: int | None = None) -> int:
    """Length of the common tail, at most `limit` (so it never overlaps a common prefix)."""
    bound = min(len(old_ids), len(new_ids)) if limit is None else limit
    i = 0
    while i < bound and old_ids[-1 - i] == new_ids[-1 - i]:
        i += 1
    return i


def plan_update(old_ids: Sequence[int], new_ids: Sequence[int], *, min_match: int = DEFAULT_MIN_MATCH) -> UpdatePlan:
    """Diff cached ids against re-tokenized ids and say what to keep, shift and encode.

    The common prefix is kept and the common suffix shifted (as in PIE). Between
    them, equal runs of at least `min_match` ids are reused too, so several edits
    made between two requests coalesce into one plan: each unchanged run is shifted
    by the sum of the length changes of the edits before it.
    """
    assert min_match >= 1, "min_match must be at least 1"
    old_ids = list(old_ids)
    new_ids = list(new_ids)
    prefix = common_prefix_length(old_ids, new_ids)
    # Bounded so that prefix and suffix never claim the same token: with
    # old = "a a" and new = "a a a" the prefix takes both old tokens.
    suffix = common_suffix_length(old_ids, new_ids, limit=min(len(old_ids), len(new_ids)) - prefix)
    old_middle_end = len(old_ids) - suffix
    new_middle_end = len(new_ids) - suffix

    reused: list[tuple[int, int, int]] = []  # (old_start, old_end, new_start), increasing in both
    if prefix:
        reused.append((0, prefix, 0))
    old_middle = old_ids[prefix:old_middle_end]
    new_middle = new_ids[prefix:new_middle_end]
    if old_middle and new_middle:
        # autojunk=False: code repeats tokens (indentation, newlines) far more than
        # prose, and the junk heuristic would hide exactly those runs.
        matcher = difflib.SequenceMatcher(None, old_middle, new_middle, autojunk=False)
        for old_at, new_at, size in matcher.get_matching_blocks():
            if size >= min_match:
                reused.append((prefix + old_at, prefix + old_at + size, prefix + new_at))
    if suffix:
        reused.append((old_middle_end, len(old_ids), new_middle_end))

    segments: list[Segment] = []
    position = 0
    for old_start, old_end, new_start in reused:
        if new_start > position:
            segments.append(Segment.encode(position, new_start))
        segments.append(Segment.reuse(old_start, old_end, new_start))
        position = new_start + (old_end - old_start)
    if position < len(new_ids):
        segments.append(Segment.encode(position, len(new_ids)))

    identical = old_ids == new_ids
    return UpdatePlan(
        old_length=len(old_ids),
        new_length=len(new_ids),
        segments=tuple(_merge_adjacent(segments)),
        stale_from=None if identical else prefix,
    )


def _merge_adjacent(segments: list[Segment]) -> list[Segment]:
    """Fuse neighbours that are one operation (two encodes, or two reuses that are contiguous in old and new)."""
    merged: list[Segment] = []
    for segment in segments:
        if merged:
            last = merged[-1]
            if last.kind is SegmentKind.ENCODE and segment.kind is SegmentKind.ENCODE:
                merged[-1] = Segment.encode(last.new_start, segment.new_end)
                continue
            if last.is_reused and segment.is_reused and last.old_end == segment.old_start and last.delta == segment.delta:
                merged[-1] = Segment.reuse(last.old_start, segment.old_end, last.new_start)
                continue
        merged.append(segment)
    return merged


# ---------------------------------------------------------------------------
# Per-document state


class DocumentTokens:
    """The token ids whose K/V are cached for one document, and which of them are stale.

    Positions are cache positions 0..len-1. Stale positions are kept as sorted,
    disjoint, half-open intervals. The object changes only through apply() (or the
    append() / truncate()) and mark_refreshed(), so an executor that fails half-way
    through a plan can simply not apply it.
    """

    def __init__(self, token_ids: Iterable[int] = (), *, stale: Iterable[Interval] = ()):
        self._ids: tuple[int, ...] = tuple(token_ids)
        self._stale: list[Interval] = _normalize(stale)
        assert not self._stale or self._stale[-1][1] <= len(self._ids), "stale interval past the end of the document"

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"DocumentTokens({len(self._ids)} tokens, stale={self._stale})"

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self._ids

    @property
    def stale_intervals(self) -> tuple[Interval, ...]:
        return tuple(self._stale)

    @property
    def stale_count(self) -> int:
        return sum(end - start for start, end in self._stale)

    def plan(self, new_ids: Sequence[int], *, min_match: int = DEFAULT_MIN_MATCH) -> UpdatePlan:
        """What it takes to bring the cache to `new_ids` (does not change this object)."""
        return plan_update(self._ids, new_ids, min_match=min_match)

    def apply(self, plan: UpdatePlan, new_ids: Sequence[int]) -> None:
        """Record that the executor carried out `plan`, so the cache now holds `new_ids`.

        Staleness carried by reused tokens moves with them; tokens the plan reuses
        after its first edit become stale; encoded tokens are fresh.
        """
        new_ids = tuple(new_ids)
        assert plan.old_length == len(self._ids), f"plan is for {plan.old_length} cached tokens, cache has {len(self._ids)}"
        assert plan.new_length == len(new_ids), f"plan is for {plan.new_length} new tokens, got {len(new_ids)}"
        carried: list[Interval] = []
        for segment in plan.segments:
            if not segment.is_reused:
                continue
            assert self._ids[segment.old_start : segment.old_end] == new_ids[segment.new_start : segment.new_end], (
                f"{segment!r} reuses K/V of different token ids"
            )
            for start, end in _intersect(self._stale, [(segment.old_start, segment.old_end)]):
                carried.append((start + segment.delta, end + segment.delta))
        self._ids = new_ids
        self._stale = _normalize(carried + plan.newly_stale_intervals())

    def append(self, new_ids: Sequence[int]) -> None:
        """Record tokens encoded right after the cached ones (decoding): fresh, nothing moves."""
        self._ids = self._ids + tuple(new_ids)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (rejected draft tokens rolled back); their staleness is kept."""
        assert 0 <= length <= len(self._ids), f"cannot truncate {len(self._ids)} tokens to {length}"
        if length < len(self._ids):
            self._stale = _subtract(self._stale, (length, len(self._ids)))
            self._ids = self._ids[:length]

    def mark_refreshed(self, start: int, end: int) -> None:
        """Positions [start, end) were re-encoded against the current text: no longer stale.

        Tokens after `end` that were fresh stay fresh: they attended to the stale
        K/V, a second-order effect this accounting deliberately ignores.
        """
        assert 0 <= start <= end <= len(self._ids), f"refresh [{start}, {end}) outside the document"
        self._stale = _subtract(self._stale, (start, end))

    def stale_range_before(self, cursor: int, window: int) -> Interval | None:
        """The smallest [start, end) holding every stale token in [cursor - window, cursor).

        Re-encoding this range refreshes what the model will attend to most when
        completing at `cursor`; None when that window is clean.
        """
        assert window >= 0 and 0 <= cursor <= len(self._ids)
        inside = _intersect(self._stale, [(max(0, cursor - window), cursor)])
        if not inside:
            return None
        return inside[0][0], inside[-1][1]


# ---------------------------------------------------------------------------
# Interval arithmetic on sorted, disjoint, half-open intervals


def _normalize(intervals: Iterable[Interval]) -> list[Interval]:
    """Sort, drop empties, and merge overlapping or touching intervals."""
    result: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[0] < i[1]):
        assert start >= 0
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


def _intersect(intervals: list[Interval], others: list[Interval]) -> list[Interval]:
    return _normalize(
        (max(a, c), min(b, d)) for a, b in intervals for c, d in others if max(a, c) < min(b, d)
    )


def _subtract(intervals: list[Interval], removed: Interval) -> list[Interval]:
    cut_start, cut_end = removed
    result: list[Interval] = []
    for start, end in intervals:
        if start < cut_start:
            result.append((start, min(end, cut_start)))
        if end > cut_end:
            result.append((max(start, cut_end), end))
    return _normalize(result)
