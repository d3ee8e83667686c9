"""The worker's copy of every open document: text and version, changed only by open/edit/close.

Errors are typed so the gRPC layer can map each to a status code the daemon
acts on (a version mismatch makes the daemon resend the whole document).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

MAX_DOCUMENT_CHARS = 4_000_000  # larger files are refused; the daemon skips them too


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
        with self._lock:
            doc = self._docs.get(uri)
            if doc is None:
                raise DocumentNotOpen(f"{uri} is not open in the worker")
            if doc.version != base_version:
                raise VersionMismatch(
                    f"{uri}: edit is based on version {base_version} but the worker has version {doc.version}"
                )
            text = doc.text
            for ch in changes:
                if not (0 <= ch.start <= ch.end <= len(text)):
                    raise OffsetOutOfRange(
                        f"{uri}: change [{ch.start}, {ch.end}) is outside the text of {len(text)} characters"
                    )
                text = text[: ch.start] + ch.text + text[ch.end :]
            self._check_size(uri, len(text))
            new_doc = Document(uri, new_version, doc.language_id, text)
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
