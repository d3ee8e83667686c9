"""Drafters: cheap guesses of the next tokens, which the model then verifies in one forward pass.

Decoding is a speculative loop whose plain greedy form is a drafter that never guesses.
A drafter proposes up to k tokens given the tokens so far; the verify step keeps the
longest prefix greedy decoding would have produced and discards the rest, so the output
is identical whatever the drafter (see decode.py). A drafter only decides how many
forward passes that output costs.

What a guess costs depends on the machine: on a GPU or an AMX CPU a forward over 9 tokens costs
about one of a single token, so guesses are nearly free; on a 2-core AVX2 CPU it costs ~3 (1 thread:
1 token 49 ms, 2-3 94 ms, 4-5 118-126 ms, 7-9 150-156 ms), so a guess pays only when it is usually
right. `SpeculationPolicy` decides how many guesses to verify from both, measured as the worker runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol, Sequence


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k guesses of the tokens that follow `tokens` (the context and what was generated so far)."""
        ...

    def accepted(self, proposed: int, kept: int) -> None:
        """Feedback after a verify step: `kept` of `proposed` guesses were right."""
        ...


class NoDrafter:
    """Plain greedy decoding: one token per forward pass."""

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        return []

    def accepted(self, proposed: int, kept: int) -> None:
        pass


class NgramDrafter:
    """Prompt lookup: find where the last n tokens occurred before and propose what followed there.

    Code repeats itself (identifiers, call shapes, whole lines), so the continuation of an
    earlier occurrence of the current n-gram is often the continuation now. The longest n
    (from `max_n` down to `min_n`) with an earlier occurrence wins, and of its occurrences
    the most recent. The index grows with the tokens, so a lookup costs O(n), not O(length).
    """

    def __init__(self, max_n: int = 4, min_n: int = 2, sources: TokenSources | None = None, exclude: str | None = None):
        assert 1 <= min_n <= max_n
        self.max_n, self.min_n = max_n, min_n
        # Where to look when the request's own tokens have no match: its session's recent completions
        # and other documents (`exclude`: this request's own document, already looked at).
        self.sources, self.exclude = sources, exclude
        # The evidence behind the last proposal: where the n-gram matched and its length, e.g. "self:3"
        # (None: no match). SpeculationPolicy counts acceptance per evidence: longer matches, and
        # matches in the request's own text, are right more often.
        self.evidence: str | None = None
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> the position just after its latest occurrence
        self._indexed = 0  # tokens[:_indexed] are in the index
        self._tokens: list[int] = []
        self.proposed = 0
        self.kept = 0

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        self._sync(tokens)
        end = len(self._tokens)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            after = self._index.get(tuple(self._tokens[end - n :]))
            if after is not None and after < end:
                self.evidence = f"self:{n}"
                return self._tokens[after : min(after + k, end)]
        found = self.sources.lookup(self._tokens, k, self.min_n, self.max_n, self.exclude) if self.sources else None
        if found is not None:
            self.evidence, guesses = found
            return guesses
        self.evidence = None
        return []

    def accepted(self, proposed: int, kept: int) -> None:
        self.proposed += proposed
        self.kept += kept

    def _sync(self, tokens: Sequence[int]) -> None:
        """Bring the index up to `tokens`; every n-gram ending before the last token is indexed."""
        if len(tokens) < self._indexed or list(tokens[: self._indexed]) != self._tokens[: self._indexed]:
            self._index.clear()
            self._indexed = 0
        self._tokens = list(tokens)
        index_ngrams(self._index, self._tokens, self._indexed, self.min_n, self.max_n)
        self._indexed = len(self._tokens)


def index_ngrams(index: dict[tuple[int, ...], int], tokens: Sequence[int], start: int, min_n: int, max_n: int) -> dict:
    """Add to `index` every n-gram (min_n <= n <= max_n) of `tokens` that ends at a position p - 1 >= start - 1
    and is followed by a token (tokens[p]): n-gram -> p, its latest continuation. The n-grams ending at the
    last token are left out: the current tail must not match itself, and it has no continuation."""
    for p in range(max(start, 1), len(tokens)):
        for n in range(min_n, max_n + 1):
            if p - n >= 0:
                index[tuple(tokens[p - n : p])] = p
    return index


def ngram_index(tokens: Sequence[int], min_n: int, max_n: int) -> dict[tuple[int, ...], int]:
    """n-gram (min_n <= n <= max_n) -> the position just after its latest occurrence with a continuation."""
    return index_ngrams({}, tokens, 0, min_n, max_n)


class TokenSources:
    """Token sequences besides a request's own where its n-gram drafter may find a continuation: the
    session's recent completions (each with the end of the context it followed: a request after a
    keystroke often regenerates most of the last completion) and its other open documents (files of
    one project share names and lines). One per session (a daemon), owned by the engine, used on the
    model thread: another session's text never decides a session's guesses (their number, in each
    reply's stats, would tell what the other session's files contain).

    Each source's n-gram index is built once per version. A document that changed is re-indexed at
    most every `reindex_s` seconds: until then its older index still proposes guesses, which the
    model verifies like any other (a stale guess costs a rejected row, never a wrong token).
    """

    def __init__(
        self,
        documents: Callable[[], list[tuple[str, Sequence[int]]]] = list,
        *,
        recent: int = 16,
        context_tail: int = 8,
        reindex_s: float = 5.0,
        min_n: int = 3,
        max_n: int = 4,
    ):
        self.documents, self.context_tail, self.reindex_s = documents, context_tail, reindex_s
        self.min_n, self.max_n = min_n, max_n
        self._recent: deque[tuple[tuple[int, ...], dict]] = deque(maxlen=recent)  # newest last
        self._docs: dict[str, tuple[float, tuple[int, ...], dict]] = {}  # uri -> (built at, tokens, index)

    def add_completion(self, context: Sequence[int], generated: Sequence[int]) -> None:
        """Remember a completion's tokens after the end of the context it continued."""
        tokens = (*context[-self.context_tail :], *generated)
        if len(generated) >= 1 and len(tokens) > self.min_n:
            self._recent.append((tokens, ngram_index(tokens, self.min_n, self.max_n)))

    def clear(self) -> None:
        self._recent.clear()
        self._docs.clear()

    def lookup(self, tokens: Sequence[int], k: int, min_n: int, max_n: int, exclude: str | None = None):
        """("recent:n" or "other:n", up to k guesses) for the longest tail of `tokens` (at most max_n, at
        least min_n, within the indexed sizes) found in a recent completion (newest first) or another
        document; None if none has it."""
        sources = [("recent", t, index) for t, index in reversed(self._recent)]
        sources += [("other", t, index) for t, index in self._document_indices(exclude)]
        for n in range(min(max_n, self.max_n, len(tokens)), max(min_n, self.min_n) - 1, -1):
            tail = tuple(tokens[len(tokens) - n :])
            for kind, source, index in sources:
                after = index.get(tail)
                if after is not None and after < len(source):
                    return f"{kind}:{n}", list(source[after : after + k])
        return None

    def _document_indices(self, exclude: str | None) -> list[tuple[tuple[int, ...], dict]]:
        now = time.monotonic()
        out, alive = [], set()
        for uri, ids in self.documents():
            alive.add(uri)
            if uri == exclude:
                continue
            held = self._docs.get(uri)
            # A document's ids are one immutable tuple until it changes: identity says "unchanged"
            # without reading it (this runs at every decoding step that lacks a match of its own).
            if held is None or (held[1] is not ids and now - held[0] >= self.reindex_s):
                tokens = tuple(ids)
                held = self._docs[uri] = (now, tokens, ngram_index(tokens, self.min_n, self.max_n))
            out.append((held[1], held[2]))
        for uri in set(self._docs) - alive:  # closed or evicted documents
            del self._docs[uri]
        return out


class StepCosts:
    """What a decoding forward costs by the number of tokens it feeds, measured: a moving average of
    seconds per forward for each token count seen, kept apart per `setting` (the thread count the
    forward ran on: one thread's 8 tokens and two threads' 8 tokens are different prices). Only
    ratios are used.

    A count not seen yet is estimated from its measured neighbours (linear between two; past the last,
    growing by `prior_slope` of a one-token step per token). The prior is optimistic on purpose: a
    policy that believes a size is cheap tries it once, and then knows.
    """

    def __init__(self, prior_slope: float = 0.1, smoothing: float = 0.2):
        self.prior_slope, self.smoothing = prior_slope, smoothing
        self._seconds: dict[Hashable, dict[int, float]] = {}  # setting -> tokens fed -> moving average of seconds

    def record(self, tokens: int, seconds: float, setting: Hashable = None) -> None:
        table = self._seconds.setdefault(setting, {})
        old = table.get(tokens)
        if old is None:
            table[tokens] = seconds
        else:
            # One stalled forward (another process took the core) moves the average by a bounded step.
            seconds = min(max(seconds, old / 3), old * 3)
            table[tokens] = old + self.smoothing * (seconds - old)

    def estimate(self, tokens: int, setting: Hashable = None) -> float:
        """Seconds for a forward of `tokens` tokens (in the prior's units while nothing is measured).
        Never less than a measured forward of fewer tokens: feeding more cannot make a forward cheaper,
        whatever a noisy average says (else a policy would add guesses that are never kept)."""
        seen = self._seconds.get(setting, {})
        return max([self._interpolated(tokens, seen), *(s for t, s in seen.items() if t < tokens)])

    def _interpolated(self, tokens: int, seen: dict[int, float]) -> float:
        if tokens in seen:
            return seen[tokens]
        below = max((t for t in seen if t < tokens), default=None)
        above = min((t for t in seen if t > tokens), default=None)
        if below is not None and above is not None:
            low, high = seen[below], seen[above]
            return low + (high - low) * (tokens - below) / (above - below)
        anchor = below if below is not None else above
        prior = lambda t: 1.0 + self.prior_slope * (t - 1)  # noqa: E731
        if anchor is None:
            return prior(tokens)
        return seen[anchor] * prior(tokens) / prior(anchor)

    def relative(self, tokens: int, base: int, setting: Hashable = None) -> float:
        """Cost of a forward of `tokens` tokens in forwards of `base` tokens."""
        return self.estimate(tokens, setting) / self.estimate(base, setting)

    def snapshot(self) -> dict:
        """{setting: {tokens: ms}} (read from other threads: copies first)."""
        return {
            str(setting): {str(t): round(s * 1000, 1) for t, s in sorted(dict(table).items())}
            for setting, table in sorted(dict(self._seconds).items(), key=lambda item: str(item[0]))
        }


class SpeculationPolicy:
    """How many of a drafter's guesses to verify, from how often such guesses are kept and what the
    extra rows cost on this machine; both are measured while the worker runs (one policy per session,
    sharing the worker's StepCosts: what a forward costs is the machine's, what guesses are worth is
    the session's own, so no session's guesses slow another's completions).

    A guess is kept only if every guess before it was, so with a guess-by-guess acceptance rate `a`,
    verifying k guesses yields 1 + a + a^2 + ... + a^k tokens on average, for a forward of 1 + k
    tokens. In a batched round of `base` documents (one token each) the round yields base + E[kept]
    tokens for a forward of base + k. The policy picks the k with the most tokens per second. The
    rate is counted per kind of evidence (an n-gram drafter's source and match length, "self:3",
    "recent:4": longer matches, and matches in the request's own text, are right more often),
    starting from `prior_rate` worth `prior_weight` guesses.

    A kind whose guesses do not pay is not verified, so its rate would never be measured again; every
    `explore_every`-th proposal that the policy would drop is verified whole all the same. Which
    guesses are verified never changes the text (decode.py), only how many forwards it takes.
    """

    def __init__(
        self,
        costs: StepCosts | None = None,
        *,
        prior_rate: float = 0.7,
        prior_weight: float = 4.0,
        explore_every: int = 16,
    ):
        self.costs = costs or StepCosts()
        self.prior_rate, self.prior_weight, self.explore_every = prior_rate, prior_weight, explore_every
        self._kept: dict[Hashable, float] = {}
        self._missed: dict[Hashable, float] = {}
        self._dropped = 0  # proposals dropped since the last exploring one
        self.explored = 0

    def rate(self, evidence: Hashable) -> float:
        """P(a guess is right | the guesses before it in the same proposal were), for this evidence."""
        kept, missed = self._kept.get(evidence, 0.0), self._missed.get(evidence, 0.0)
        return (kept + self.prior_rate * self.prior_weight) / (kept + missed + self.prior_weight)

    def draft_length(self, evidence: Hashable, available: int, base: int = 1, setting: Hashable = None) -> int:
        """How many of `available` proposed guesses to verify beside `base` tokens of other rows, in a
        forward that runs on `setting` (StepCosts)."""
        if available <= 0:
            return 0
        a = self.rate(evidence)
        best_k, best = 0, base / self.costs.estimate(base, setting)
        expected, p = 0.0, 1.0
        for k in range(1, available + 1):
            p *= a
            expected += p
            value = (base + expected) / self.costs.estimate(base + k, setting)
            if value > best:
                best_k, best = k, value
        if best_k == 0:
            self._dropped += 1
            if self._dropped >= self.explore_every:
                self._dropped, self.explored = 0, self.explored + 1
                return available
        return best_k

    def snapshot(self) -> dict:
        """What the policy has learnt, for the worker's stats (read from other threads: copies first)."""
        kept, missed = dict(self._kept), dict(self._missed)
        return {
            "guess_rate": {str(e): round(self.rate(e), 3) for e in sorted(kept, key=str)},
            "guesses_judged": {str(e): int(kept[e] + missed.get(e, 0)) for e in sorted(kept, key=str)},
            "forward_ms_by_tokens": self.costs.snapshot(),  # {threads: {tokens: ms}}
            "explored": self.explored,
        }

    def record(self, evidence: Hashable, kept: int, missed: bool) -> None:
        """After a verify: `kept` guesses were right, then one was wrong (`missed`) or none was left."""
        self._kept[evidence] = self._kept.get(evidence, 0.0) + kept
        self._missed[evidence] = self._missed.get(evidence, 0.0) + (1.0 if missed else 0.0)
