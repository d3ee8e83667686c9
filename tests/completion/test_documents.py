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


def test_an_edit_with_too_many_changes_is_refused_before_any_work():
    from rotary.completion.documents import MAX_CHANGES_PER_EDIT

    store = DocumentStore()
    store.open("u", 1, "python", "abc")
    with pytest.raises(DocumentTooLarge, match="OpenDocument"):
        store.edit("u", 1, 2, [Change(0, 0, "x")] * (MAX_CHANGES_PER_EDIT + 1))
    assert store.get("u").text == "abc" and store.get("u").version == 1


def test_the_copying_of_one_edit_is_bounded(monkeypatch):
    from rotary.completion import documents

    monkeypatch.setattr(documents, "MAX_EDIT_WORK_CHARS", 1000)
    store = DocumentStore()
    store.open("u", 1, "python", "y" * 200)
    store.edit("u", 1, 2, [Change(0, 0, "x")] * 4)  # 4 x 204 characters: fine
    with pytest.raises(DocumentTooLarge, match="too much work"):
        store.edit("u", 2, 3, [Change(0, 0, "x")] * 5)
    assert store.get("u").version == 2


def test_an_edit_that_loses_a_race_changes_nothing():
    store = DocumentStore()
    store.open("u", 1, "python", "abc")

    class Sneaky(str):  # the document is replaced while the changes are being applied
        def __len__(self):
            store.open("u", 7, "python", "other")
            return str.__len__(self)

    with pytest.raises(VersionMismatch, match="changed during the edit"):
        store.edit("u", 1, 2, [Change(0, 0, Sneaky("x"))])
    assert store.get("u").text == "other" and store.get("u").version == 7


def test_crc32_of_the_text():
    import zlib

    from rotary.completion.documents import text_crc32

    assert text_crc32("é😀") == zlib.crc32("é😀".encode())
