"""Abstention: the gate's arithmetic, its threshold choice, and a completion withheld end to end (worker and daemon)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import math

import pytest

from rotary.completion.calibrate import auroc
from rotary.completion.verdict import FEATURES, Gate, choose_threshold, line_features, measure


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


@functools.lru_cache(maxsize=1)
def engine():
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner

    return CompletionEngine(ModelRunner(load_model(None)), KVStore())


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

        def complete(self, uri, text, offset, options, is_cancelled=lambda: False):
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
