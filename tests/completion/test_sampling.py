"""Sampling with drafts keeps the model's distribution: the speculative-sampling acceptance rule, checked
statistically on a small vocabulary without a model (fixed seeds: the checks are deterministic)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from rotary.completion.decode import Generation
from rotary.completion.prompt import Prompt
from rotary.completion.sampling import Sampler
from rotary.completion.stops import StopRules

# Chi-square critical values at p = 0.001 (the statistic of a correct sampler stays below them).
CHI2_001 = {3: 16.27, 7: 24.32, 63: 103.4}


def chi_square(counts: Counter, probs: dict, n: int) -> float:
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items() if p > 0)


def test_probs_apply_temperature_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(Sampler(1.0).probs(logits), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    assert torch.allclose(Sampler(1.0, top_p=0.8).probs(logits), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    cold = Sampler(0.5).probs(logits)
    assert torch.allclose(cold, torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365, atol=1e-5)


@pytest.mark.parametrize("guess", [None, 0, 3])
def test_one_token_keeps_the_distribution_whatever_the_guess(guess):
    p = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor(p))
    sampler = Sampler(1.0, seed=7)
    n = 10000
    counts = Counter(sampler.choose(logits, guess) for _ in range(n))
    assert chi_square(counts, dict(enumerate(p)), n) < CHI2_001[3], counts
    if guess is not None:  # the guess is accepted about p(guess) of the time (it is drawn with that probability)
        assert abs(counts[guess] / n - p[guess]) < 0.01


def test_a_guess_the_model_rules_out_is_never_kept():
    logits = torch.tensor([0.0, 0.0, float("-inf"), 0.0])
    sampler = Sampler(1.0, seed=1)
    assert all(sampler.choose(logits, 2) != 2 for _ in range(2000))


# A toy model over 4 tokens: a Markov chain, so each position's distribution depends on the prefix.
TABLE = torch.tensor([
    [2.0, 0.5, 0.1, -1.0],
    [0.0, 1.5, 0.3, 0.2],
    [-0.5, 0.0, 1.0, 1.2],
    [0.7, -0.3, 0.4, 0.0],
])


def toy_logits(prefix) -> torch.Tensor:
    return TABLE[prefix[-1] if prefix else 0]


def exact_sequences(length: int) -> dict:
    probs = {}
    for seq in itertools.product(range(4), repeat=length):
        p, prefix = 1.0, [0]
        for token in seq:
            p *= float(torch.softmax(toy_logits(prefix), -1)[token])
            prefix.append(token)
        probs[seq] = p
    return probs


class StubbornDrafter:
    """Always guesses token 3 (the least likely after 0): a biased, deterministic drafter."""

    def __init__(self):
        self.proposed = self.kept = 0

    def propose(self, tokens, k):
        return [3] * k

    def accepted(self, proposed, kept):
        self.proposed += proposed
        self.kept += kept


def sample_sequence(drafter, seed: int, length: int = 3) -> tuple[int, ...]:
    context = [0]
    generation = Generation(
        prompt=Prompt(ids=context, text_before="", text_after=""),
        stops=StopRules("", "", "multi_line"),
        max_tokens=length,
        eos_ids=frozenset(),
        decode_ids=lambda ids: "".join("abcd"[i] for i in ids),
        healing_mask=lambda remaining, forbidden: torch.ones(4, dtype=torch.bool),
        drafter=drafter,
        draft_tokens=2,
        sampler=Sampler(1.0, seed=seed),
    )
    generation.start(toy_logits(context))
    while not generation.finished:
        fed = generation.to_feed(context)
        prefix = context + generation.generated[:-1]
        logits = torch.stack([toy_logits(prefix + fed[: j + 1]) for j in range(len(fed))])
        generation.verify(fed, logits)
    return tuple(generation.generated[:length])


@pytest.mark.parametrize("drafted", [False, True])
def test_sequences_keep_the_model_distribution_with_and_without_drafts(drafted):
    from rotary.completion.drafters import NoDrafter

    n = 4000
    drafter = StubbornDrafter() if drafted else NoDrafter()
    counts = Counter(sample_sequence(drafter, seed) for seed in range(n))
    exact = exact_sequences(3)
    assert sum(counts.values()) == n
    assert chi_square(counts, exact, n) < CHI2_001[63], counts.most_common(5)
    if drafted:  # the drafts were really verified, and some kept
        assert drafter.proposed > n and 0 < drafter.kept < drafter.proposed


def test_greedy_generation_ignores_the_guess():
    """Without a sampler the choice is the argmax, as before the sampler existed."""
    context = [0]
    generation = Generation(
        prompt=Prompt(ids=context, text_before="", text_after=""),
        stops=StopRules("", "", "multi_line"),
        max_tokens=4,
        eos_ids=frozenset(),
        decode_ids=lambda ids: "".join("abcd"[i] for i in ids),
        healing_mask=lambda remaining, forbidden: torch.ones(4, dtype=torch.bool),
        drafter=StubbornDrafter(),
    )
    generation.start(toy_logits(context))
    while not generation.finished:
        fed = generation.to_feed(context)
        prefix = context + generation.generated[:-1]
        generation.verify(fed, torch.stack([toy_logits(prefix + fed[: j + 1]) for j in range(len(fed))]))
    expected, prefix = [], [0]
    for _ in range(4):
        expected.append(int(torch.argmax(toy_logits(prefix))))
        prefix.append(expected[-1])
    assert generation.generated == expected
