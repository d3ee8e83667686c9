"""The worker's copy of every open document: text and version, changed only by open/edit/close.

Documents are keyed by session and URI. A session is one daemon (its `rotary-session` metadata),
so two daemons sharing a worker may open the same URI with different texts without overwriting
each other; a client that names no session uses the shared session "". A session's documents
are dropped together when its daemon goes away (the service's lease, service.py).

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
# All sessions' documents together: a bound on the worker's memory for text (a daemon sends at
# most 2 M characters a document; dead daemons' documents are dropped by the lease).
MAX_TOTAL_CHARS = 200_000_000
MAX_DOCUMENTS = 10_000


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
    session: str = ""


@dataclass(frozen=True)
class Change:
    start: int
    end: int
    text: str


class DocumentStore:
    def __init__(self, max_chars: int = MAX_DOCUMENT_CHARS, max_total_chars: int = MAX_TOTAL_CHARS, max_documents: int = MAX_DOCUMENTS):
        self.max_chars = max_chars
        self.max_total_chars = max_total_chars
        self.max_documents = max_documents
        self._docs: dict[tuple[str, str], Document] = {}  # (session, uri) -> document
        self._total_chars = 0
        self._lock = threading.Lock()

    def open(self, uri: str, version: int, language_id: str, text: str, session: str = "") -> Document:
        self._check_size(uri, len(text))
        doc = Document(uri, version, language_id, text, session)
        with self._lock:
            old = self._docs.get((session, uri))
            total = self._total_chars - (len(old.text) if old else 0) + len(text)
            if total > self.max_total_chars or (old is None and len(self._docs) >= self.max_documents):
                raise DocumentTooLarge(
                    f"{uri}: the worker holds {len(self._docs)} documents of {self._total_chars} characters in all; "
                    f"opening this one would pass its limit of {self.max_documents} documents or {self.max_total_chars} characters"
                )
            self._docs[(session, uri)] = doc
            self._total_chars = total
        return doc

    def edit(self, uri: str, base_version: int, new_version: int, changes: list[Change], session: str = "") -> Document:
        check_change_count(uri, len(changes))
        with self._lock:
            doc = self._docs.get((session, uri))
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
        new_doc = Document(uri, new_version, doc.language_id, text, session)
        with self._lock:
            if self._docs.get((session, uri)) is not doc:  # replaced, edited or closed while we applied: nothing changes
                raise VersionMismatch(f"{uri}: the document changed during the edit; resend it")
            if self._total_chars + len(text) - len(doc.text) > self.max_total_chars:
                raise DocumentTooLarge(f"{uri}: the edit would pass the worker's limit of {self.max_total_chars} characters in all documents")
            self._docs[(session, uri)] = new_doc  # only after every change applied: a failed edit changes nothing
            self._total_chars += len(text) - len(doc.text)
        return new_doc

    def close(self, uri: str, session: str = "") -> bool:
        """Close one session's copy; True when no session has the URI open any more."""
        with self._lock:
            doc = self._docs.pop((session, uri), None)
            if doc is not None:
                self._total_chars -= len(doc.text)
            return not any(key[1] == uri for key in self._docs)

    def close_session(self, session: str) -> list[str]:
        """Drop every document of a session (its daemon went away); the URIs no session has open any more."""
        with self._lock:
            gone = [key for key in self._docs if key[0] == session]
            for key in gone:
                self._total_chars -= len(self._docs.pop(key).text)
            still_open = {key[1] for key in self._docs}
        return [uri for _, uri in gone if uri not in still_open]

    def get(self, uri: str, version: int | None = None, session: str = "") -> Document:
        with self._lock:
            doc = self._docs.get((session, uri))
        if doc is None:
            raise DocumentNotOpen(f"{uri} is not open in the worker")
        if version is not None and doc.version != version:
            raise VersionMismatch(f"{uri}: request is for version {version} but the worker has version {doc.version}")
        return doc

    def sessions(self) -> dict[str, int]:
        """Open documents per session."""
        with self._lock:
            counts: dict[str, int] = {}
            for session, _ in self._docs:
                counts[session] = counts.get(session, 0) + 1
            return counts

    @property
    def total_chars(self) -> int:
        return self._total_chars

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
