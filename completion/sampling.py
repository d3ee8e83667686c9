"""Sampling (temperature, top-p) that drafts cannot bias: the speculative-sampling acceptance rule.

Greedy decoding keeps a guessed token when it is the argmax. Sampling keeps the model's
distribution p (after temperature and top-p) only if guesses are accepted by the rule of
speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for a drafter whose proposal q is
deterministic (q puts all its mass on the guess d):

- accept d with probability min(1, p(d) / q(d)) = p(d);
- on rejection, sample from the residual max(0, p - q) renormalised, which is p with d removed.

Then P(d) = p(d) and, for x != d, P(x) = (1 - p(d)) * p(x) / (1 - p(d)) = p(x): every position's
token has the model's distribution whatever the drafter guessed. Drafted and plain runs draw
different random numbers, so their texts differ; their distributions do not.
"""

from __future__ import annotations

import torch


class Sampler:
    """Temperature / top-p sampling with a seeded generator (one per request, so a run is reproducible)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0):
        assert temperature > 0, "temperature 0 is greedy decoding: use no sampler"
        assert 0 < top_p <= 1
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator().manual_seed(int(seed))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from: softmax(logits / T), cut to the top-p nucleus. [vocab]"""
        p = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(p, descending=True)
            before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each
            sorted_p[before >= self.top_p] = 0.0  # keep the smallest prefix whose mass reaches top_p
            p = torch.zeros_like(p).scatter_(0, order, sorted_p)
            p = p / p.sum()
        return p

    def choose(self, logits: torch.Tensor, guess: int | None = None) -> int:
        """A token drawn from the model's distribution; with a guess, by the acceptance rule above."""
        p = self.probs(logits).cpu()
        if guess is not None:
            u = float(torch.rand((), generator=self.generator))
            if u < float(p[guess]):
                return guess
            p = p.clone()
            p[guess] = 0.0
            if float(p.sum()) <= 0.0:  # p(guess) was 1 up to rounding: nothing else can be drawn
                return guess
        return int(torch.multinomial(p, 1, generator=self.generator))
