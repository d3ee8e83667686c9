import pytest

from rotary.completion.documents import (
    Change,
    DocumentNotOpen,
    DocumentStore,
    DocumentTooLarge,
    OffsetOutOfRange,
    VersionMismatch,
)


def test_edits_apply_in_order_and_bump_the_version():
    store = DocumentStore()
    store.open("u", 1, "python", "hello world")
    doc = store.edit("u", 1, 2, [Change(0, 5, "goodbye"), Change(13, 13, "!")])
    assert (doc.text, doc.version) == ("goodbye world!", 2)


def test_wrong_base_version_is_refused_and_changes_nothing():
    store = DocumentStore()
    store.open("u", 3, "python", "abc")
    with pytest.raises(VersionMismatch):
        store.edit("u", 2, 4, [Change(0, 0, "x")])
    assert store.get("u").text == "abc"


def test_out_of_range_change_loses_nothing():
    store = DocumentStore()
    store.open("u", 1, "python", "abc")
    with pytest.raises(OffsetOutOfRange):
        store.edit("u", 1, 2, [Change(0, 1, "z"), Change(2, 9, "")])
    assert store.get("u").text == "abc" and store.get("u").version == 1


def test_unknown_document_and_size_limit():
    store = DocumentStore(max_chars=10)
    with pytest.raises(DocumentNotOpen):
        store.edit("nope", 1, 2, [])
    with pytest.raises(DocumentTooLarge):
        store.open("big", 1, "python", "x" * 11)
