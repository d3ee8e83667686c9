"""The worker's copy of every open document: text and version, changed only by open/edit/close.

Documents are keyed by session and URI. A session is one daemon (its `rotary-session` metadata),
so two daemons sharing a worker may open the same URI with different texts without overwriting
each other; a client that names no session uses the shared session "". A session's documents
are dropped together when its daemon goes away (the service's lease, service.py). Everything the
worker keeps for a document besides its text (its KV cache, the cache's snapshot) is keyed by
session too (`store_key`): no session's text or cache ever reaches another's completions.

Each session holds at most a share of the worker's documents and characters (MAX_SESSION_DOCUMENTS,
MAX_SESSION_CHARS), so one session cannot fill the worker for the others.

Errors are typed so the gRPC layer can map each to a status code the daemon
acts on (a version mismatch makes the daemon resend the whole document).

A document holds at most MAX_DOCUMENT_CHARS characters, and one edit's work is bounded: at most
MAX_CHANGES_PER_EDIT changes, and at most MAX_EDIT_WORK_CHARS characters copied while applying
them (each change copies the text). These limits are the contract's (rpc/wire.py, which the
daemon reads too). Changes are applied outside the store's lock, and the result is kept only if
no other call replaced the document meanwhile, so a large edit never holds the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .rpc.wire import MAX_CHANGES_PER_EDIT, MAX_DOCUMENT_CHARS, MAX_EDIT_WORK_CHARS

# All sessions' documents together: a bound on the worker's memory for text (a document holds at
# most MAX_DOCUMENT_CHARS, 2 M characters; dead daemons' documents are dropped by the lease).
MAX_TOTAL_CHARS = 200_000_000
MAX_DOCUMENTS = 10_000
# One session's share of those: a daemon (or a `rotary complete` that never closed its files) cannot
# fill the worker for the others; eight sessions at their share reach the worker's bounds.
MAX_SESSION_CHARS = MAX_TOTAL_CHARS // 8
MAX_SESSION_DOCUMENTS = MAX_DOCUMENTS // 8
# CompleteText's caches live in the KV store beside the documents', under URIs of this prefix;
# URIs the worker keeps for itself are refused from documents, which would otherwise share them.
CACHE_KEY_PREFIX = "cache-key:"
RESERVED_URI_PREFIXES = (CACHE_KEY_PREFIX,)


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


class ReservedUri(DocumentError):
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
    def __init__(
        self,
        max_chars: int = MAX_DOCUMENT_CHARS,
        max_total_chars: int = MAX_TOTAL_CHARS,
        max_documents: int = MAX_DOCUMENTS,
        max_session_chars: int = MAX_SESSION_CHARS,
        max_session_documents: int = MAX_SESSION_DOCUMENTS,
    ):
        self.max_chars = max_chars
        self.max_total_chars = max_total_chars
        self.max_documents = max_documents
        self.max_session_chars = max_session_chars
        self.max_session_documents = max_session_documents
        self._docs: dict[tuple[str, str], Document] = {}  # (session, uri) -> document
        self._total_chars = 0
        self._session_chars: dict[str, int] = {}  # session -> characters of its documents
        self._session_docs: dict[str, int] = {}  # session -> its open documents
        self._lock = threading.Lock()

    def open(self, uri: str, version: int, language_id: str, text: str, session: str = "") -> Document:
        check_uri(uri)
        self._check_size(uri, len(text))
        doc = Document(uri, version, language_id, text, session)
        with self._lock:
            old = self._docs.get((session, uri))
            grows = len(text) - (len(old.text) if old else 0)
            new = old is None
            if self._session_chars.get(session, 0) + grows > self.max_session_chars or (
                new and self._session_docs.get(session, 0) >= self.max_session_documents
            ):
                raise DocumentTooLarge(
                    f"{uri}: this session holds {self._session_docs.get(session, 0)} documents of "
                    f"{self._session_chars.get(session, 0)} characters; opening this one would pass a session's limit of "
                    f"{self.max_session_documents} documents or {self.max_session_chars} characters (close some)"
                )
            if self._total_chars + grows > self.max_total_chars or (new and len(self._docs) >= self.max_documents):
                raise DocumentTooLarge(
                    f"{uri}: the worker holds {len(self._docs)} documents of {self._total_chars} characters in all; "
                    f"opening this one would pass its limit of {self.max_documents} documents or {self.max_total_chars} characters"
                )
            self._docs[(session, uri)] = doc
            self._count(session, grows, 1 if new else 0)
        return doc

    def edit(self, uri: str, base_version: int, new_version: int, changes: list[Change], session: str = "") -> Document:
        check_uri(uri)
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
            grows = len(text) - len(doc.text)
            if self._session_chars.get(session, 0) + grows > self.max_session_chars:
                raise DocumentTooLarge(f"{uri}: the edit would pass a session's limit of {self.max_session_chars} characters")
            if self._total_chars + grows > self.max_total_chars:
                raise DocumentTooLarge(f"{uri}: the edit would pass the worker's limit of {self.max_total_chars} characters in all documents")
            self._docs[(session, uri)] = new_doc  # only after every change applied: a failed edit changes nothing
            self._count(session, grows, 0)
        return new_doc

    def close(self, uri: str, session: str = "") -> None:
        """Close one session's copy (other sessions' copies of the URI stay open)."""
        check_uri(uri)
        with self._lock:
            doc = self._docs.pop((session, uri), None)
            if doc is not None:
                self._count(session, -len(doc.text), -1)

    def close_session(self, session: str) -> list[str]:
        """Drop every document of a session (its daemon went away); their URIs."""
        with self._lock:
            gone = [key for key in self._docs if key[0] == session]
            for key in gone:
                self._count(session, -len(self._docs.pop(key).text), -1)
        return [uri for _, uri in gone]

    def get(self, uri: str, version: int | None = None, session: str = "") -> Document:
        check_uri(uri)
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

    def _count(self, session: str, chars: int, documents: int) -> None:
        """Under the lock: a session's documents grew by `chars` characters and `documents` documents."""
        self._total_chars += chars
        self._session_chars[session] = self._session_chars.get(session, 0) + chars
        self._session_docs[session] = self._session_docs.get(session, 0) + documents
        if not self._session_docs[session]:
            del self._session_docs[session], self._session_chars[session]

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


def check_uri(uri: str) -> None:
    """Refuse a URI the worker keeps for itself (RESERVED_URI_PREFIXES)."""
    if uri.startswith(RESERVED_URI_PREFIXES):
        raise ReservedUri(f"{uri}: URIs starting with {' or '.join(RESERVED_URI_PREFIXES)} are kept by the worker; use another URI")


def store_key(session: str, uri: str) -> str:
    """The KV store's key of a session's document (also its snapshot's name): one cache per session
    and URI, never shared, so no session's text reaches another's answers. Sessions never contain
    a NUL (gRPC metadata is printable ASCII), so the key names its session unambiguously."""
    return f"{session}\x00{uri}"


def key_session(key: str) -> str | None:
    """The session a KV store key belongs to (`store_key`); None for a key the engine's own callers
    made (benchmarks, test generation's scratch caches), which belongs to no session."""
    session, sep, _ = key.partition("\x00")
    return session if sep else None
