"""The worker's copy of every open document: text and version, changed only by open/edit/close.

Errors are typed so the gRPC layer can map each to a status code the daemon
acts on (a version mismatch makes the daemon resend the whole document).

One edit's work is bounded: at most MAX_CHANGES_PER_EDIT changes, and at most
MAX_EDIT_WORK_CHARS characters copied while applying them (each change copies the
text). Changes are applied outside the store's lock, and the result is kept only if
no other call replaced the document meanwhile, so a large edit never holds the lock.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

MAX_DOCUMENT_CHARS = 4_000_000  # larger files are refused; the daemon skips them too
# The daemon sends far fewer (it resends the whole document past its own, smaller bounds).
MAX_CHANGES_PER_EDIT = 10_000
MAX_EDIT_WORK_CHARS = 256_000_000  # about 0.1 s of copying


class DocumentError(Exception):
    """Base class of errors about a document request."""


class DocumentNotOpen(DocumentError):
    pass


class VersionMismatch(DocumentError):
    pass


class OffsetOutOfRange(DocumentError):
    pass


class DocumentTooLarge(DocumentError):
    pass


@dataclass(frozen=True)
class Document:
    uri: str
    version: int
    language_id: str
    text: str


@dataclass(frozen=True)
class Change:
    start: int
    end: int
    text: str


class DocumentStore:
    def __init__(self, max_chars: int = MAX_DOCUMENT_CHARS):
        self.max_chars = max_chars
        self._docs: dict[str, Document] = {}
        self._lock = threading.Lock()

    def open(self, uri: str, version: int, language_id: str, text: str) -> Document:
        self._check_size(uri, len(text))
        doc = Document(uri, version, language_id, text)
        with self._lock:
            self._docs[uri] = doc
        return doc

    def edit(self, uri: str, base_version: int, new_version: int, changes: list[Change]) -> Document:
        check_change_count(uri, len(changes))
        with self._lock:
            doc = self._docs.get(uri)
        if doc is None:
            raise DocumentNotOpen(f"{uri} is not open in the worker")
        if doc.version != base_version:
            raise VersionMismatch(f"{uri}: edit is based on version {base_version} but the worker has version {doc.version}")
        # The text never grows past its length plus everything inserted: a bound on the copying.
        work = len(changes) * (len(doc.text) + sum(len(ch.text) for ch in changes))
        if work > MAX_EDIT_WORK_CHARS:
            raise DocumentTooLarge(
                f"{uri}: {len(changes)} changes to a text of {len(doc.text)} characters is too much work for one edit; "
                "send the whole document with OpenDocument"
            )
        text = doc.text
        for ch in changes:
            if not (0 <= ch.start <= ch.end <= len(text)):
                raise OffsetOutOfRange(f"{uri}: change [{ch.start}, {ch.end}) is outside the text of {len(text)} characters")
            text = text[: ch.start] + ch.text + text[ch.end :]
        self._check_size(uri, len(text))
        new_doc = Document(uri, new_version, doc.language_id, text)
        with self._lock:
            if self._docs.get(uri) is not doc:  # replaced, edited or closed while we applied: nothing changes
                raise VersionMismatch(f"{uri}: the document changed during the edit; resend it")
            self._docs[uri] = new_doc  # only after every change applied: a failed edit changes nothing
        return new_doc

    def close(self, uri: str) -> None:
        with self._lock:
            self._docs.pop(uri, None)

    def get(self, uri: str, version: int | None = None) -> Document:
        with self._lock:
            doc = self._docs.get(uri)
        if doc is None:
            raise DocumentNotOpen(f"{uri} is not open in the worker")
        if version is not None and doc.version != version:
            raise VersionMismatch(f"{uri}: request is for version {version} but the worker has version {doc.version}")
        return doc

    def __len__(self) -> int:
        return len(self._docs)

    def _check_size(self, uri: str, n: int) -> None:
        if n > self.max_chars:
            raise DocumentTooLarge(f"{uri}: {n} characters is over the worker's limit of {self.max_chars}")


def check_change_count(uri: str, n: int) -> None:
    """Refuse an edit with too many changes (before anything is built from them)."""
    if n > MAX_CHANGES_PER_EDIT:
        raise DocumentTooLarge(
            f"{uri}: {n} changes in one edit is over the limit of {MAX_CHANGES_PER_EDIT}; "
            "send the whole document with OpenDocument"
        )


def text_crc32(text: str) -> int:
    """DocumentAck.crc32: CRC-32 of the text in UTF-8 (the daemon computes the same to compare)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))
