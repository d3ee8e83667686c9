"""The rules the daemon and the worker both obey (completion/rpc/wire.py), checked on both sides at once.

Before the module existed the daemon skipped documents past 2 M characters while the worker took
4 M, and each side spelled the modes in its own tables: test_the_document_limit_is_one_boundary_on_both_sides
failed then (the worker accepted 2 M + 1 characters that the daemon refuses to send).
"""

from __future__ import annotations

import zlib

import pytest
from lsprotocol import types

from rotary.completion.documents import Change, DocumentStore, DocumentTooLarge
from rotary.completion.rpc import wire
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.convert import verdict_options
from rotary.testgen.generate import check_request
from rotary.testgen.languages import TestGenError
from rotary.completion.text_request import InvalidArgument, check_complete_text
from rotary.lsp import sync
from rotary.lsp.settings import COMPLETION_MODES, DECODING_MODES, Settings, parse_settings


def test_the_document_limit_is_one_boundary_on_both_sides():
    at_limit = "x" * wire.MAX_DOCUMENT_CHARS
    past_it = at_limit + "x"
    store = DocumentStore()

    # At the limit: the daemon sends it and every request of the worker takes it.
    assert sync.unsupported_reason(at_limit) is None
    assert sync.too_large_to_apply([types.TextDocumentContentChangeWholeDocument(text=at_limit)], 0) is None
    store.open("file:///at.py", 1, "python", at_limit)
    check_complete_text(pb.CompleteTextRequest(text=at_limit, offset=0), max_tokens_limit=512)
    check_request(pb.GenerateTestsRequest(text=at_limit, path="at.py", qualname="f"))

    # One character more: the daemon does not send it, and the worker refuses it wherever it comes.
    assert "file too large" in sync.unsupported_reason(past_it)
    assert "inserting" in sync.too_large_to_apply([types.TextDocumentContentChangeWholeDocument(text=past_it)], 0)
    with pytest.raises(DocumentTooLarge, match=f"limit of {wire.MAX_DOCUMENT_CHARS}"):
        store.open("file:///past.py", 1, "python", past_it)
    with pytest.raises(DocumentTooLarge, match=f"limit of {wire.MAX_DOCUMENT_CHARS}"):  # grown by an edit
        store.edit("file:///at.py", 1, 2, [Change(0, 0, "x")])
    with pytest.raises(InvalidArgument, match="^text: "):
        check_complete_text(pb.CompleteTextRequest(text=past_it, offset=0), max_tokens_limit=512)
    with pytest.raises(TestGenError, match="^text: "):
        check_request(pb.GenerateTestsRequest(text=past_it, path="past.py", qualname="f"))
    assert store.get("file:///at.py").text == at_limit  # the refused edit changed nothing


def test_the_daemon_stays_within_what_one_edit_may_carry():
    """Past its own bounds the daemon resends the whole document, so the worker never has to refuse its edits."""
    assert sync.MAX_PENDING_CHANGES <= wire.MAX_CHANGES_PER_EDIT
    assert sync.MAX_PENDING_WORK_CHARS <= wire.MAX_EDIT_WORK_CHARS


@pytest.mark.parametrize("text", ["", "abc", "é😀\r\n", "a\x00b"])
def test_the_checksum_is_crc32_of_the_utf8_text(text):
    assert wire.text_crc32(text) == zlib.crc32(text.encode("utf-8"))


def test_the_checksum_of_a_lone_surrogate_is_that_of_its_own_bytes():
    # The daemon replaces lone surrogates before sending (sync.wire_text); the checksum never fails on one.
    assert wire.text_crc32("a\ud800") == zlib.crc32(b"a\xed\xa0\x80")


def test_every_mode_has_one_row_and_every_enum_value_one_mode():
    assert sorted(wire.COMPLETION_MODE_BY_WIRE) == sorted(pb.CompletionMode.values())
    assert sorted(wire.CACHE_MODE_BY_WIRE) == sorted(pb.CacheMode.values())
    # Each spelling names one mode: no two rows share a setting, a name or a wire value.
    n = len(wire.COMPLETION_MODES)
    assert len(wire.COMPLETION_MODE_BY_SETTING) == len(wire.COMPLETION_MODE_BY_NAME) == len(wire.COMPLETION_MODE_BY_WIRE) == n
    assert len(wire.CACHE_MODE_BY_NAME) == len(wire.CACHE_MODE_BY_WIRE) == len(wire.CACHE_MODES)
    assert len(wire.DECODING_MODE_BY_SETTING) == len({m[1:] for m in wire.DECODING_MODES}) == len(wire.DECODING_MODES)


@pytest.mark.parametrize("setting", COMPLETION_MODES)
def test_a_completion_mode_setting_reaches_the_worker_as_the_same_mode(setting):
    settings, warnings = parse_settings({"completionMode": setting})
    assert not warnings
    name = settings.worker_mode()  # what the daemon asks for
    sent = wire.COMPLETION_MODE_BY_NAME[name].wire  # what goes on the wire
    assert wire.COMPLETION_MODE_BY_WIRE[sent].name == name == wire.COMPLETION_MODE_BY_SETTING[setting].name


@pytest.mark.parametrize(
    "setting, early_exit, drafter",
    [("lossless", False, "ngram"), ("earlyExit", True, "ngram"), ("plain", False, "none")],
)
def test_a_decoding_mode_setting_reaches_the_engine_as_documented(setting, early_exit, drafter):
    assert setting in DECODING_MODES and parse_settings({"decodingMode": setting}) == (Settings(decodingMode=setting), [])
    mode = wire.DECODING_MODE_BY_SETTING[setting]
    options = verdict_options(pb.CompleteOptions(early_exit=mode.early_exit, plain_decoding=mode.plain_decoding))
    assert (options["early_exit"], options["drafter"]) == (early_exit, drafter)
