"""The model thread on the real model: batching keeps each document's answer, drafts never change the
text, cancellation is seen between prefill chunks and between decode steps, nothing else touches the model."""

from __future__ import annotations

import functools
import itertools
import threading

import pytest

pytestmark = pytest.mark.model

DOCUMENTS = {
    "file:///add.py": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return",
    "file:///read.py": "import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        ",
    "file:///table.py": "ROWS = [\n    ('alpha', 1),\n    ('beta', 2),\n    ('gamma', 3),\n    ('delta',",
    "file:///point.py": "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y",
}


@functools.lru_cache(maxsize=1)
def engine():
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from tests.conftest import rotary_runner

    # Its own engine (its own scheduler and counters), on the session's runner.
    eng = CompletionEngine(rotary_runner(), KVStore(), prefill_chunk=64)
    eng.scheduler.prefill_round_s = 0.0  # one prefill step a round: the cancel tests below count rounds
    return eng


def complete(uri, text, drafter="none", max_tokens=24, mode="multi_line", is_cancelled=lambda: False, cache_mode="none"):
    from rotary.completion.engine import CompletionOptions

    options = CompletionOptions(max_tokens=max_tokens, mode=mode, drafter=drafter, cache_mode=cache_mode)
    chunks = list(engine().complete(uri, text, len(text), options, is_cancelled))
    return "".join(c.text for c in chunks), chunks[-1]


def test_batched_documents_get_the_answer_each_gets_alone():
    alone = {uri: complete(uri, text)[0] for uri, text in DOCUMENTS.items()}
    assert all(alone.values()), alone
    scheduler = engine().scheduler
    rounds_before, rows_before = scheduler.decode_rounds, scheduler.batched_rows
    together: dict[str, str] = {}
    start = threading.Barrier(len(DOCUMENTS))

    def run(uri, text):
        start.wait()
        together[uri] = complete(uri, text)[0]

    threads = [threading.Thread(target=run, args=item) for item in DOCUMENTS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone
    rounds = scheduler.decode_rounds - rounds_before
    rows = scheduler.batched_rows - rows_before
    assert rows / rounds > 1.5, f"decode steps were not batched: {rows} rows in {rounds} rounds"


@pytest.mark.parametrize("uri", sorted(DOCUMENTS))
def test_drafting_never_changes_the_text(uri):
    text = DOCUMENTS[uri]
    plain, plain_last = complete(uri, text, drafter="none", max_tokens=48)
    drafted, drafted_last = complete(uri, text, drafter="ngram", max_tokens=48)
    assert drafted == plain
    assert plain_last.stats.forwards == plain_last.stats.tokens_generated - 1  # one token per forward
    assert drafted_last.stats.forwards <= plain_last.stats.forwards


def test_repetitive_code_is_decoded_in_fewer_forwards():
    text = "".join(f"    '{name}': {name},\n" for name in ("alpha", "beta", "gamma", "delta", "epsilon"))
    text = "VALUES = {\n" + text + "    '"
    plain, plain_last = complete("file:///values.py", text, drafter="none", max_tokens=40)
    drafted, last = complete("file:///values.py", text, drafter="ngram", max_tokens=40)
    assert drafted == plain
    assert last.stats.drafts_accepted > 0 and last.stats.forwards < plain_last.stats.forwards


def cancel_at(call: int):
    """An is_cancelled that turns True at its `call`-th call (the scheduler asks once per round)."""
    calls = itertools.count(1)
    return lambda: next(calls) >= call


def test_cancel_during_prefill_stops_between_chunks_and_keeps_a_consistent_prefix():
    eng = engine()
    text = DOCUMENTS["file:///add.py"] * 12  # several 64-token prefill chunks
    uri = "file:///long-cancelled.py"
    ids = eng.build_context(text, len(text), 24).ids
    assert len(ids) > 4 * 64
    # Round 1 admits the request and runs its first chunk; round 2 its second; round 3 sees the cancel.
    reply, last = complete(uri, text, is_cancelled=cancel_at(3), cache_mode="edit_aware")
    assert (reply, last.stop_reason, last.stats.tokens_generated) == ("", "cancelled", 0)
    held = eng.kv_store.get(uri).tokens.token_ids
    assert held == tuple(ids[: 2 * 64]), len(held)  # exactly the chunks that ran, and nothing half-done
    # The next request reuses that prefix.
    _, last = complete(uri, text, max_tokens=2, cache_mode="edit_aware")
    assert last.stats.tokens_reused >= 2 * 64
    eng.kv_store.drop(uri)


def test_cancel_during_decoding_generates_nothing_after_the_cancel():
    # A short prompt: round 1 prefills all but the context's last token; round 2 ends the prefill and
    # its decoding forward feeds that token (the first token comes from its logits); every later round
    # decodes one token (no drafts). Cancelled at round 6: 4 tokens, none after.
    text = DOCUMENTS["file:///table.py"]
    full, _ = complete("file:///c.py", text, max_tokens=40, mode="multi_line")
    reply, last = complete("file:///c.py", text, max_tokens=40, mode="multi_line", is_cancelled=cancel_at(6))
    assert last.stop_reason == "cancelled"
    assert last.stats.tokens_generated == 4
    assert full.startswith(reply)  # what was streamed before the cancel is a prefix of the real answer


def test_a_round_runs_the_prefill_steps_of_every_waiting_request_within_its_budget():
    # Four requests arrive while the model thread is held; each needs its whole prefill and one token
    # (max_tokens=1). With a budget, one round runs all four prefills, and its decoding forward feeds
    # the four contexts' last tokens as one batch of four rows (the prefill leaves that token to it),
    # whose logits give the four answers; with no budget, one prefill step a round, so at least one
    # round per request. Either way each answer is the one it gets alone.
    scheduler = engine().scheduler
    texts = {f"file:///budget-{i}.py": text for i, text in enumerate(DOCUMENTS.values())}
    alone = {uri: complete(uri, text, max_tokens=1)[0] for uri, text in texts.items()}

    def rounds_for_all(budget: float) -> tuple[int, int, int]:
        scheduler.prefill_round_s = budget
        hold, held = threading.Event(), threading.Event()
        threading.Thread(target=lambda: scheduler.run_exclusive(lambda: (held.set(), hold.wait(60))), daemon=True).start()
        assert held.wait(60)
        answers: dict[str, str] = {}
        threads = [threading.Thread(target=lambda u=u, t=t: answers.update({u: complete(u, t, max_tokens=1)[0]})) for u, t in texts.items()]
        for t in threads:
            t.start()
        while scheduler.queue_depth < len(texts):
            threading.Event().wait(0.01)
        before = scheduler.rounds, scheduler.decode_rounds, scheduler.batched_rows
        hold.set()
        for t in threads:
            t.join(timeout=300)
        assert answers == alone
        return scheduler.rounds - before[0], scheduler.decode_rounds - before[1], scheduler.batched_rows - before[2]

    try:
        assert rounds_for_all(60.0) == (1, 1, len(texts))
        assert rounds_for_all(0.0)[0] >= len(texts)
    finally:
        scheduler.prefill_round_s = 0.0


def test_batched_rounds_share_a_budget_of_guesses(monkeypatch):
    # Repetitive code: alone, the n-gram drafter guesses many tokens a step. With no guesses left
    # for the round's rows, the same request guesses none, in one forward per token, and its text
    # is unchanged.
    from rotary.completion import steps as steps_module

    text = "".join(f"    '{name}': {name},\n" for name in ("alpha", "beta", "gamma", "delta", "epsilon"))
    text = "VALUES = {\n" + text + "    '"
    drafted, with_guesses = complete("file:///budget-values.py", text, drafter="ngram", max_tokens=40)
    monkeypatch.setattr(steps_module, "DRAFT_ROUND_BUDGET", 0)
    plain, without = complete("file:///budget-values.py", text, drafter="ngram", max_tokens=40)
    assert plain == drafted
    assert with_guesses.stats.tokens_drafted > 0 and without.stats.tokens_drafted == 0
    assert without.stats.forwards == without.stats.tokens_generated - 1


def test_health_and_stats_never_wait_for_a_busy_model_thread(monkeypatch):
    """What Health reads (queue_depth, busy_for) answers while the model thread is held inside a forward.

    The model thread's first forward of the request waits on an event (then the real forward runs),
    so the reads provably happen during a step: a reader thread answers before the release, the
    depth is 1 and busy_for is above 0. Fails if a read waited for the model thread (checked with
    busy_for going through run_exclusive: the reader never answered) or said 0 during a step."""
    eng = engine()
    scheduler = eng.scheduler
    model_thread, inside, release = [], threading.Event(), threading.Event()
    forward = eng.runner.forward

    def held_forward(*args, **kwargs):
        if model_thread and threading.get_ident() == model_thread[0] and not release.is_set():
            inside.set()
            release.wait()
        return forward(*args, **kwargs)

    def note_model_thread():  # is_cancelled runs on this engine's model thread before its steps
        if not model_thread:
            model_thread.append(threading.get_ident())
        return False

    monkeypatch.setattr(eng.runner, "forward", held_forward)  # the runner is the session's: put back after
    text = DOCUMENTS["file:///read.py"] * 10
    result, seen, answered = {}, {}, threading.Event()
    busy = threading.Thread(target=lambda: result.update(text=complete("file:///busy.py", text, max_tokens=64, is_cancelled=note_model_thread)[0]))
    busy.start()
    try:
        assert inside.wait(timeout=300), "the request never reached a forward"

        def read():  # what Health reads: no lock, no wait
            seen["depth"], seen["busy"] = scheduler.queue_depth, scheduler.busy_for()
            answered.set()

        threading.Thread(target=read, daemon=True).start()
        assert answered.wait(timeout=60), "reading the depth and the busy time waited for the model thread"
    finally:
        release.set()
        busy.join(timeout=300)
    assert seen["depth"] == 1 and seen["busy"] > 0, seen
    assert result["text"], "the held request did not finish with a suggestion"
    assert (scheduler.queue_depth, scheduler.busy_for()) == (0, 0.0)


def test_edits_of_waiting_requests_ride_in_the_decoding_forward_with_the_caches_each_gets_alone():
    # Each document gets a comment line inserted at its top while the cursor stays at its end (so the
    # edited tokens are encoded before cached ones, which move), each of a different length (so rows
    # are padded). The four requests wait while the model thread is held, then their edited tokens run
    # as extra rows of their first decoding forward. Against the same edit encoded in forwards of its
    # own (prepare_now: one forward per deferred call, then the last token alone), the caches hold the
    # same K/V (padding must not overwrite the cached tokens after an edit; a deferred row must see what
    # running first gives) and the answers equal each request's answer alone.
    import torch

    from rotary.completion.engine import CompletionOptions

    scheduler = engine().scheduler
    kv_store = engine().kv_store
    edits = {uri: (text, len(text), "# " + "note " * (i + 1) + "\n") for i, (uri, text) in enumerate(DOCUMENTS.items())}
    # No refresh of stale tokens: it would re-encode the tokens after the edit, hiding a clobbered one.
    options = CompletionOptions(max_tokens=4, mode="multi_line", drafter="none", cache_mode="edit_aware", refresh_window=0)

    def edited(text, cursor, insert):
        return insert + text, cursor + len(insert)

    def ask(uri, text, cursor):
        return "".join(c.text for c in engine().complete(uri, text, cursor, options))

    alone, reference_ids = {}, {}
    for uri, (text, cursor, insert) in edits.items():
        ask(uri + "-alone", text, cursor)
        alone[uri] = ask(uri + "-alone", *edited(text, cursor, insert))
        ask(uri + "-reference", text, cursor)
        reference_ids[uri] = engine().build_context(*edited(text, cursor, insert), options.max_tokens).ids
        engine().prepare_now(kv_store.get(uri + "-reference"), reference_ids[uri], options)
    for uri, (text, cursor, _) in edits.items():
        ask(uri + "-together", text, cursor)

    scheduler.prefill_round_s = 60.0
    try:
        hold, held = threading.Event(), threading.Event()
        threading.Thread(target=lambda: scheduler.run_exclusive(lambda: (held.set(), hold.wait(60))), daemon=True).start()
        assert held.wait(60)
        together: dict[str, str] = {}
        threads = [
            threading.Thread(target=lambda u=u, e=e: together.update({u: ask(u + "-together", *edited(*e))}))
            for u, e in edits.items()
        ]
        for t in threads:
            t.start()
        while scheduler.queue_depth < len(edits):
            threading.Event().wait(0.01)
        batches, in_decode, rounds = scheduler.deferred_batches, scheduler.deferred_in_decode, scheduler.decode_rounds
        hold.set()
        for t in threads:
            t.join(timeout=300)
    finally:
        scheduler.prefill_round_s = 0.0
    assert together == alone
    assert scheduler.deferred_in_decode - in_decode == len(edits) and scheduler.deferred_batches == batches
    assert scheduler.decode_rounds > rounds
    for uri in edits:
        n = len(reference_ids[uri])
        reference, b = kv_store.get(uri + "-reference").buffer, kv_store.get(uri + "-together").buffer
        assert b.token_ids[:n] == reference.token_ids == tuple(reference_ids[uri])
        torch.testing.assert_close(b.used()[:, :, :, :n], reference.used(), rtol=1e-4, atol=1e-4)
        for suffix in ("-alone", "-reference", "-together"):
            kv_store.drop(uri + suffix)


def test_a_request_that_repeats_a_recent_completion_takes_its_tokens_as_guesses(monkeypatch):
    # The same code in a second file (a copy, or the user typing it again): the model says what it
    # said before, and the worker's recent completion supplies the guesses; the text is unchanged.
    from rotary.completion.drafters import SpeculationPolicy

    # Verify every proposal (explore_every=1): this test is about where guesses come from, not how
    # many pay on this machine.
    monkeypatch.setattr(engine(), "speculation", SpeculationPolicy(explore_every=1))
    text = "import os\n\n\ndef list_python_files(root):\n    found = []\n    for name in sorted(os.listdir(root)):\n        if"
    plain, plain_last = complete("file:///first.py", text, drafter="none", max_tokens=32)
    again, last = complete("file:///second.py", text, drafter="ngram", max_tokens=32)
    assert again == plain and plain.strip()
    rates = engine().speculation.snapshot()["guess_rate"]
    assert any(kind.startswith("recent:") for kind in rates), rates
    assert last.stats.drafts_accepted > 0 and last.stats.forwards < plain_last.stats.forwards
