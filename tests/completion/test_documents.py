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

    from rotary.completion.rpc.wire import text_crc32

    assert text_crc32("é😀") == zlib.crc32("é😀".encode())


def test_sessions_keep_their_own_copy_of_a_uri():
    store = DocumentStore()
    store.open("u", 1, "python", "text of a", session="a")
    store.open("u", 1, "python", "text of b", session="b")
    store.edit("u", 1, 2, [Change(0, 4, "TEXT")], session="a")
    assert store.get("u", session="a").text == "TEXT of a"
    assert store.get("u", session="b").text == "text of b" and store.get("u", session="b").version == 1
    with pytest.raises(DocumentNotOpen):
        store.get("u")  # the shared session "" never opened it
    store.close("u", session="b")
    assert store.get("u", session="a").text == "TEXT of a"  # a still has it open


def test_closing_a_session_drops_its_documents_and_names_them():
    store = DocumentStore()
    store.open("shared", 1, "python", "x", session="a")
    store.open("shared", 1, "python", "y", session="b")
    store.open("only-a", 1, "python", "zz", session="a")
    assert sorted(store.close_session("a")) == ["only-a", "shared"]
    assert store.sessions() == {"b": 1} and store.total_chars == 1
    with pytest.raises(DocumentNotOpen):
        store.get("only-a", session="a")


def test_all_documents_together_are_bounded():
    store = DocumentStore(max_total_chars=10, max_documents=3)
    store.open("a", 1, "python", "12345", session="s")
    store.open("a", 2, "python", "123456", session="s")  # reopening replaces: 6 in all
    with pytest.raises(DocumentTooLarge, match="limit"):
        store.open("b", 1, "python", "12345", session="t")  # 11 > 10
    store.open("b", 1, "python", "1234", session="t")
    with pytest.raises(DocumentTooLarge):
        store.open("c", 1, "python", "x")
    with pytest.raises(DocumentTooLarge):
        store.edit("b", 1, 2, [Change(0, 0, "x")], session="t")  # an edit may not grow past the bound either
    assert store.total_chars == 10 and store.get("b", session="t").text == "1234"
    store.close("a", session="s")
    store.open("c", 1, "python", "x")
    store.open("d", 1, "python", "")
    with pytest.raises(DocumentTooLarge, match="3 documents"):
        store.open("e", 1, "python", "")


def test_one_session_cannot_take_the_others_share():
    """A session holds at most its share of documents and characters; the others still open theirs.
    Before per-session shares, `greedy` filled the worker's bounds and `other` was refused."""
    store = DocumentStore(max_total_chars=100, max_documents=10, max_session_chars=40, max_session_documents=3)
    for i in range(3):
        store.open(f"u{i}", 1, "python", "x" * 10, session="greedy")
    with pytest.raises(DocumentTooLarge, match="session's limit of 3 documents"):
        store.open("u3", 1, "python", "", session="greedy")
    with pytest.raises(DocumentTooLarge, match="session's limit"):
        store.open("u0", 1, "python", "x" * 41, session="greedy")  # reopening bigger: past 40 characters
    with pytest.raises(DocumentTooLarge, match="session's limit of 40"):
        store.edit("u0", 1, 2, [Change(0, 0, "y" * 11)], session="greedy")  # 41 > 40
    assert store.get("u0", session="greedy").text == "x" * 10  # a refused edit changes nothing
    for i in range(3):
        store.open(f"u{i}", 1, "python", "z" * 10, session="other")
    store.close("u0", session="greedy")  # closing frees the share
    store.open("u3", 1, "python", "x" * 20, session="greedy")
    assert store.sessions() == {"greedy": 3, "other": 3} and store.total_chars == 70


def test_uris_the_worker_keeps_for_itself_are_refused():
    from rotary.completion.documents import ReservedUri

    store = DocumentStore()
    for call in (
        lambda: store.open("cache-key:x", 1, "python", "a"),
        lambda: store.edit("cache-key:x", 1, 2, []),
        lambda: store.get("cache-key:x"),
        lambda: store.close("cache-key:x"),
    ):
        with pytest.raises(ReservedUri, match="cache-key:"):
            call()
    assert len(store) == 0


def test_store_keys_name_their_session():
    from rotary.completion.documents import key_session, store_key

    assert store_key("a", "u") != store_key("b", "u") != store_key("", "u")
    assert key_session(store_key("a", "file:///x\x00y")) == "a" and key_session(store_key("", "u")) == ""
    assert key_session("bench-case-1") is None  # the engine's own callers' keys belong to no session
