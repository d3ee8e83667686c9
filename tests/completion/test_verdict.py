"""Abstention: the gate's arithmetic, its threshold choice, and a completion withheld end to end (worker and daemon)."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rotary.completion.calibrate import choose_threshold
from rotary.completion.verdict import FEATURES, Gate, auroc, line_features, measure
from tests.conftest import rotary_engine


def test_auroc_equals_the_pairwise_definition():
    scores = [0.9, 0.8, 0.8, 0.3, 0.2, 0.7, 0.1]
    labels = [True, False, True, False, True, True, False]
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp for n, ln in zip(scores, labels) if not ln]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, labels) == pytest.approx(expected)


def test_line_features_and_gate_score():
    features = line_features([math.log(0.9), math.log(0.4)], [2.0, 0.5])
    assert len(features) == len(FEATURES)
    assert features[1] == pytest.approx(math.log(0.4)) and features[4] == pytest.approx(0.5)
    gate = Gate([1.0] + [0.0] * 5, 0.0, 0.5)
    assert gate.score([0.0] * 6) == pytest.approx(0.5)
    assert Gate.from_dict(gate.as_dict()) == gate


@given(
    weights=st.lists(st.floats(-3, 3), min_size=len(FEATURES), max_size=len(FEATURES)),
    bias=st.floats(-3, 3),
    tokens=st.lists(st.tuples(st.floats(-12, 0), st.floats(0, 20)), min_size=1, max_size=24),
    data=st.data(),
)
@settings(max_examples=400, deadline=None)
def test_best_score_bounds_the_score_of_every_line_that_continues_the_tokens(weights, bias, tokens, data):
    # Whatever the weights and however the line goes on, the bound from a prefix of its tokens is at
    # least the score of the whole line: abstaining early on the bound never abstains on a line the
    # gate would have shown.
    gate = Gate(weights, bias, 0.5)
    logprobs, margins = [lp for lp, _ in tokens], [m for _, m in tokens]
    score = gate.score(line_features(logprobs, margins))
    k = data.draw(st.integers(1, len(tokens)))
    slack = data.draw(st.integers(0, 8))  # the bound may allow more tokens than the line has
    bound = gate.best_score(logprobs[:k], margins[:k], len(tokens) - k + slack, 20.0)
    assert bound >= score - 1e-12


def test_best_score_is_low_once_a_token_makes_the_line_hopeless():
    # The default model's gate (rotary calibrate on the stdlib) weighs the lowest token log-probability
    # most: one token at p = 1e-4 in a line leaves no way up to a 0.07 threshold, one at p = 0.9 does.
    gate = Gate([1.89, 1.76, -0.28, 0.15, -0.095, 0.064], 0.47, 0.07)
    assert gate.best_score([math.log(0.9), math.log(1e-4)], [3.0, 0.1], 40, 20.0) < 0.07
    assert gate.best_score([math.log(0.9), math.log(0.9)], [3.0, 3.0], 40, 20.0) > 0.07


def _decode_line(steps: list[tuple[int, float]], gate: Gate, early: bool):
    """Greedy decoding of a scripted line: step j puts most probability on token steps[j][0] (log-prob
    steps[j][1]); token 1 is a line break, every other token the letter x."""
    import torch

    from rotary.completion.decode import Generation
    from rotary.completion.prompt import Prompt
    from rotary.completion.stops import StopRules

    vocab = 5000

    def logits_for(j: int) -> torch.Tensor:
        token, logprob = steps[min(j, len(steps) - 1)]
        rest = math.log((1 - math.exp(logprob)) / (vocab - 1))  # the others share what is left
        out = torch.full((vocab,), rest)
        out[token] = max(logprob, rest + 1e-3)
        return out

    generation = Generation(
        prompt=Prompt(ids=[0], text_before="x = ", text_after=""),
        stops=StopRules("x = ", "", "multi_line"),
        max_tokens=40,
        eos_ids=frozenset(),
        decode_ids=lambda ids: "".join("\n" if i == 1 else "x" for i in ids),
        healing_mask=lambda remaining, forbidden: torch.ones(vocab, dtype=torch.bool),
        gate=gate.score,
        gate_bound=gate.best_score if early else None,
        abstain_below=gate.threshold,
    )
    generation.start(logits_for(0))
    while not generation.finished:
        fed = generation.to_feed([0])
        generation.verify(fed, torch.stack([logits_for(len(generation.generated) + j) for j in range(len(fed))]))
        generation.take_chunk()
    text = generation.take_chunk()
    return generation.stop_reason, generation.final_text, text, len(generation.generated)


def test_a_hopeless_line_is_abstained_on_early_with_the_same_verdict():
    gate = Gate([1.89, 1.76, -0.28, 0.15, -0.095, 0.064], 0.47, 0.07)  # the default model's gate
    hopeless = [(5, -0.01), (7, -8.0)] + [(6, -0.01)] * 8 + [(1, -0.01)]  # one very unlikely token, then sure ones
    whole = _decode_line(hopeless, gate, early=False)
    early = _decode_line(hopeless, gate, early=True)
    assert whole[:3] == early[:3] == ("abstained", "", "")
    assert early[3] == 2 and whole[3] > 10  # stopped at the hopeless token, not at the line's end
    sure = [(5, -0.01), (7, -0.2)] + [(6, -0.01)] * 8 + [(1, -0.01)]
    assert _decode_line(sure, gate, early=True) == _decode_line(sure, gate, early=False)
    assert _decode_line(sure, gate, early=True)[0] != "abstained"


def test_threshold_keeps_at_least_the_minimum_shown_and_the_best_exact_match():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    correct = [True, True, False, True, False, False, False, False]
    threshold = choose_threshold(scores, correct, 0.5)
    report = measure(scores, correct, threshold)
    assert report["shown_frac"] >= 0.5
    best = max(
        sum(correct[:k]) / k for k in range(4, len(scores) + 1)  # every cut that shows at least half
    )
    assert report["em_shown"] == pytest.approx(best, abs=1e-4)


engine = rotary_engine  # the session's one engine (tests/conftest.py)


@pytest.mark.model
def test_a_completion_the_gate_finds_likely_wrong_is_withheld_and_says_so():
    from rotary.completion.engine import CompletionOptions

    eng = engine()
    saved = eng.gate, eng.abstain_default
    eng.abstain_default = None  # the calibrated threshold, as a worker without $ROTARY_ABSTAIN_THRESHOLD has
    text = "def area(width, height):\n    return width"
    try:
        eng.gate = Gate([0.0] * len(FEATURES), -8.0, 0.5)  # scores every line ~0.0003
        chunks = list(eng.complete(None, text, len(text), CompletionOptions(mode="single_line", cache_mode="none")))
        assert [c.text for c in chunks] == [""] and chunks[-1].stop_reason == "abstained"
        assert 0 <= chunks[-1].stats.confidence < 0.01
        # The setting turns it off: the same request answers.
        off = CompletionOptions(mode="single_line", cache_mode="none", abstain_threshold=0.0)
        shown = "".join(c.text for c in eng.complete(None, text, len(text), off))
        assert shown.strip()
        eng.gate = Gate([0.0] * len(FEATURES), 8.0, 0.5)  # confident: shown
        chunks = list(eng.complete(None, text, len(text), CompletionOptions(mode="single_line", cache_mode="none")))
        assert "".join(c.text for c in chunks) == shown and chunks[-1].stats.confidence > 0.99
    finally:
        eng.gate, eng.abstain_default = saved


def test_the_daemon_shows_an_abstention_in_its_status_and_stats():
    from lsprotocol import types

    from rotary.lsp.server import RotaryServer
    from rotary.lsp.worker import READY
    from tests.fakes import FakeChunk, FakeStats, start_worker

    class AbstainingEngine:
        def __init__(self, base):
            self.__dict__.update(base.__dict__)
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def complete(self, uri, text, offset, options, is_cancelled=lambda: False, session=""):
            stats = FakeStats(**{name: 0 for name in FakeStats.__dataclass_fields__})
            stats.confidence = 0.12
            yield FakeChunk(text="", stop_reason="abstained", stats=stats)

    worker_server, service, address = start_worker()
    service.engine = AbstainingEngine(service.engine)
    statuses = []

    async def run():
        server = RotaryServer(address)

        class Writer:
            def write(self, data):
                statuses.append(data)

        server.protocol.set_writer(Writer())
        server.settings = server.settings.__class__(workerAddress=address, debounceMs=0)
        server.worker.start()
        for _ in itertools.repeat(None, 400):
            if server.worker.state == READY:
                break
            await asyncio.sleep(0.05)
        server.sync.opened("file:///a.py", 1, "python", "def f():\n    return")
        result = await server.complete("file:///a.py", types.Position(1, 10), "auto")
        counters = dict(server.counters)
        await server.worker.stop()
        return result, counters

    try:
        result, counters = asyncio.run(run())
    finally:
        worker_server.stop(0)
    assert result is None and counters["abstained"] == 1 and counters["suggestions"] == 0
    sent = b"".join(s if isinstance(s, bytes) else s.encode() for s in statuses).decode()
    assert "likely wrong (confidence 0.12)" in sent and '"lastResult": "abstained"' in sent
