"""Drafters: cheap guesses of the next tokens, which the model then verifies in one forward pass.

Decoding is a speculative loop whose plain greedy form is a drafter that never guesses.
A drafter proposes up to k tokens given the tokens so far; the verify step keeps the
longest prefix greedy decoding would have produced and discards the rest, so the output
is identical whatever the drafter (see decode.py). A drafter only decides how many
forward passes that output costs.

On this machine a decode step is dominated by per-op overhead: one forward over 8 tokens
costs well under twice one token, so every accepted guess is nearly free.
"""

from __future__ import annotations

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

    def __init__(self, max_n: int = 4, min_n: int = 2):
        assert 1 <= min_n <= max_n
        self.max_n, self.min_n = max_n, min_n
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
                return self._tokens[after : min(after + k, end)]
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
        # Index n-grams that end at position p - 1 (followed by tokens[p]) for every p up to the
        # last token: the current tail itself must not match its own (latest) occurrence.
        for p in range(max(self._indexed, 1), len(self._tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if p - n >= 0:
                    self._index[tuple(self._tokens[p - n : p])] = p
        self._indexed = len(self._tokens)
