"""No lost or misapplied edit: random LSP edit sequences through the daemon's sync code and the worker's store.

The property and its independent reference live in rotary.bench.soak (the soak command runs the same
property 10,000 times). Here: a few hundred sequences, then the cases the issue names one by one,
and (marked `model`) the cached token ids of a document after random edits against the tokenizer's.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from lsprotocol import types

from rotary.bench.soak import URI as SOAK_URI
from rotary.bench.soak import (
    InProcessWorker,
    check_sequence,
    reference_apply,
    run_sequence,
    strategies,
)
from rotary.lsp import sync as sync_module
from rotary.lsp.positions import offset_at, position_at
from rotary.lsp.sync import MAX_PENDING_CHANGES, DocumentSync

TEXT, ENCODING, OPS = strategies()
URI = "file:///p.py"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT, ENCODING, OPS)
def test_random_edit_sequences_leave_daemon_worker_and_reference_equal(initial, encoding, ops):
    check_sequence(initial, encoding, ops)


# -- line breaks and positions ---------------------------------------------------------------------


def test_a_lone_cr_ends_a_line_as_lsp_defines():
    assert offset_at("a\rb\nc", 1, 0) == 2
    assert offset_at("a\rb\nc", 2, 0) == 4
    assert offset_at("a\r\nb", 1, 0) == 3  # \r\n is one break
    assert offset_at("a\r\nb", 0, 9) == 1  # past the end of a line: before its break
    assert offset_at("a\u2028b\x0cc", 0, 4) == 4  # no line break in LSP
    assert position_at("a\rb\nc", 2) == (1, 0)
    assert position_at("a\r\nb", 2) == (0, 1)  # between \r and \n: the end of the line


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8", "utf-32"])
def test_positions_round_trip_at_every_character_boundary(encoding):
    text = "x😀\r\n\r\ré中\n\n𝔸b\r"
    for offset in range(len(text) + 1):
        if 0 < offset < len(text) and text[offset - 1 : offset + 1] == "\r\n":
            continue  # not a position
        line, character = position_at(text, offset, encoding)
        assert offset_at(text, line, character, encoding) == offset


def test_reference_and_daemon_agree_on_an_edit_across_a_crlf():
    change = types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(0, 1), end=types.Position(1, 1)), text="Z"
    )
    sync = DocumentSync()
    sync.opened(URI, 1, "python", "a\r\nb\rc")
    sync.changed(URI, 2, [change], "utf-16")
    assert sync.docs[URI].text == reference_apply("a\r\nb\rc", change, "utf-16") == "aZ\rc"


# -- versions, reopen, drift --------------------------------------------------------------------------


def _insert(line: int, character: int, text: str) -> types.TextDocumentContentChangePartial:
    pos = types.Position(line, character)
    return types.TextDocumentContentChangePartial(range=types.Range(start=pos, end=pos), text=text)


def test_repeated_and_out_of_order_versions_do_not_diverge():
    ops = [
        ("flush",),
        ("edit", [((0, 9, 0), (0, 9, 0), "A", False)], 0),  # the same version again
        ("flush",),
        ("edit", [((0, 0, 0), (0, 0, 0), "B", False)], -3),  # a lower version
        ("flush",),
        ("edit", [((0, 1, 0), (0, 1, 0), "C", False)], 1),
    ]
    reference, daemon, worker = asyncio.run(run_sequence("xyz", "utf-16", ops))
    assert reference == daemon == worker and "A" in reference and "B" in reference


def test_close_and_reopen_do_not_diverge():
    ops = [("flush",), ("edit", [((0, 1, 0), (0, 1, 0), "1", False)], 1), ("reopen",), ("reopen",),
           ("edit", [((0, 0, 0), (0, 0, 0), "2", False)], 1), ("flush",), ("reopen",)]
    reference, daemon, worker = asyncio.run(run_sequence("ab", "utf-8", ops))
    assert reference == daemon == worker == "2a1b"


def test_versions_sent_to_the_worker_grow_strictly_whatever_the_editor_says():
    sync, worker = DocumentSync(), InProcessWorker()
    seen = []
    original = worker.service.EditDocument

    def record(request, context):
        seen.append((request.base_version, request.new_version))
        return original(request, context)

    worker.service.EditDocument = record

    async def run():
        sync.opened(URI, 5, "python", "")
        await sync.flush(URI, worker)
        for editor_version in (5, 5, 4, 9):
            sync.changed(URI, editor_version, [_insert(0, 0, "x")], "utf-16")
            await sync.flush(URI, worker)

    asyncio.run(run())
    news = [new for _, new in seen]
    assert news == sorted(set(news)) and all(base < new for base, new in seen)


def test_an_acknowledgement_that_does_not_match_resends_the_document():
    async def run():
        sync, worker = DocumentSync(), InProcessWorker()
        sync.opened(URI, 1, "python", "abc")
        await sync.flush(URI, worker)
        worker.next_edit_fault = "misapply_shift"  # same length, another text: only the CRC-32 differs
        sync.changed(URI, 2, [_insert(0, 1, "Q")], "utf-16")
        await sync.flush(URI, worker)
        return sync, worker

    sync, worker = asyncio.run(run())
    assert sync.drifts == 1 and worker.text(URI) == "aQbc" == sync.docs[URI].text


def test_a_lone_surrogate_from_the_client_reaches_the_worker_as_a_replacement_character():
    async def run():
        sync, worker = DocumentSync(), InProcessWorker()
        sync.opened(URI, 1, "python", "a\ud800b")
        await sync.flush(URI, worker)
        sync.changed(URI, 2, [_insert(0, 3, "\udc00!")], "utf-16")
        await sync.flush(URI, worker)
        return sync, worker

    sync, worker = asyncio.run(run())
    assert worker.text(URI) == "a\ufffdb\ufffd!" and len(sync.docs[URI].text) == 5 and sync.drifts == 0


# -- bounded pending list ---------------------------------------------------------------------------


def test_pending_changes_collapse_into_a_resend_instead_of_growing():
    async def run():
        sync, worker = DocumentSync(), InProcessWorker()
        sync.opened(URI, 1, "python", "")
        await sync.flush(URI, worker)
        for version in range(2, 3 * MAX_PENDING_CHANGES):  # completions off: nothing flushes
            sync.changed(URI, version, [_insert(0, version, "x")], "utf-16")
            assert len(sync.docs[URI].pending) <= MAX_PENDING_CHANGES
        assert sync.collapses >= 2
        await sync.flush(URI, worker)
        return sync, worker

    sync, worker = asyncio.run(run())
    assert worker.text(URI) == sync.docs[URI].text == "x" * (3 * MAX_PENDING_CHANGES - 2)


def test_pending_work_is_bounded_for_a_large_document(monkeypatch):
    monkeypatch.setattr(sync_module, "MAX_PENDING_WORK_CHARS", 10_000)
    sync = DocumentSync()
    sync.opened(URI, 1, "python", "y" * 1000)
    sync.docs[URI].resend = False
    for version in range(2, 40):
        sync.changed(URI, version, [_insert(0, 0, "x")], "utf-16")
    assert len(sync.docs[URI].pending) * len(sync.docs[URI].text) <= 10_000 + len(sync.docs[URI].text)


def test_skipped_documents_record_no_changes():
    sync = DocumentSync()
    sync.opened(URI, 1, "python", "\x00binary")
    for version in range(2, 50):
        sync.changed(URI, version, [_insert(0, 0, "x")], "utf-16")
    assert sync.docs[URI].skipped_reason and sync.docs[URI].pending == []


def test_changes_during_a_whole_document_send_are_not_lost():
    class SlowOpen(InProcessWorker):
        async def OpenDocument(self, request, timeout=None):
            sync.changed(URI, 9, [_insert(0, 0, "late ")], "utf-16")  # arrives while the call is in flight
            return await super().OpenDocument(request, timeout)

    sync, worker = DocumentSync(), SlowOpen()
    sync.opened(URI, 1, "python", "text")

    async def run():
        await sync.flush(URI, worker)
        assert sync.docs[URI].pending  # still to send
        await sync.flush(URI, worker)

    asyncio.run(run())
    assert worker.text(URI) == sync.docs[URI].text == "late text"


def test_a_refused_edit_with_too_many_changes_is_answered_by_a_resend():
    class Refusing(InProcessWorker):
        async def EditDocument(self, request, timeout=None):
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "too many")

    sync, worker = DocumentSync(), Refusing()

    async def run():
        sync.opened(URI, 1, "python", "a")
        await sync.flush(URI, worker)
        sync.changed(URI, 2, [_insert(0, 1, "b")], "utf-16")
        await sync.flush(URI, worker)

    asyncio.run(run())
    assert worker.text(URI) == "ab" and sync.reopens == 1


# -- cached token ids against the tokenizer (the real model) ------------------------------------------


@pytest.fixture(scope="module")
def loaded_service():
    from rotary.completion.service import WorkerService

    service = WorkerService(cache_budget_mb=64)
    service._load()
    assert service.ready.is_set(), service.load_message
    return service


@pytest.mark.model
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(TEXT, ENCODING, OPS)
def test_cached_token_ids_after_random_edits_equal_the_tokenizers(loaded_service, initial, encoding, ops):
    """The document is completed at its end after every flush, so its KV cache follows the edits
    (edit-aware plans); each time, the ids the cache holds for the context are the tokenizer's ids
    of the worker's text, less the tokens taken back for healing (however many: healing has tests
    of its own, tests/completion/test_healing.py), and those read as the text less the healed text.

    Mutation check (2026-12-07): completion/engine.py build_context decoding the healed text from one
    token later (a character dropped) fails it ('aa' against 'aaa')."""
    from rotary.completion.engine import CompletionOptions
    from tests.conftest import reference_tokenizer

    tokenizer = reference_tokenizer()
    engine = loaded_service.engine

    def complete_and_check(worker: InProcessWorker) -> None:
        text = worker.text(SOAK_URI)
        for _ in engine.complete(SOAK_URI, text, len(text), CompletionOptions(max_tokens=1)):
            pass
        prompt = engine.build_context(text, len(text), 1)
        assert list(engine.kv_store.get(SOAK_URI).tokens.token_ids[: len(prompt.ids)]) == prompt.ids
        if text:  # (an empty document's context is the separator alone)
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert prompt.ids == ids[: len(prompt.ids)]
            assert tokenizer.decode(prompt.ids, clean_up_tokenization_spaces=False) + prompt.heal == text

    try:
        reference, daemon, worker = asyncio.run(run_sequence(initial, encoding, ops, on_flush=complete_and_check))
        assert reference == daemon == worker
    finally:
        engine.kv_store.drop(SOAK_URI)
