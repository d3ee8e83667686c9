"""What the worker has been told about each document, and the diffs still to send.

pygls's workspace owns the editor's text. This module owns the worker's side:
per document the text the worker will have once pending changes are sent, the
version the worker acknowledged, and the changes (as code-point offsets) made
since. Edits are batched: a completion request flushes everything pending for
its document in one EditDocument, so a burst of keystrokes costs one message.
When the worker rejects an edit (it restarted, or a message was lost), the whole
document is sent again with OpenDocument; nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from rotary.completion.rpc import worker_pb2 as pb

from .positions import line_starts, offset_at

log = logging.getLogger(__name__)

MAX_DOCUMENT_CHARS = 2_000_000  # larger files are not sent to the worker (no completions there)


@dataclass
class WorkerCopy:
    uri: str
    language_id: str
    version: int
    text: str
    acked_version: int | None = None  # None: the worker must be sent the whole document
    pending: list[pb.TextChange] = field(default_factory=list)
    skipped_reason: str | None = None  # binary or huge: never sent, never completed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def unsupported_reason(text: str) -> str | None:
    if "\x00" in text:
        return "binary file (contains NUL characters)"
    if len(text) > MAX_DOCUMENT_CHARS:
        return f"file too large ({len(text)} characters, limit {MAX_DOCUMENT_CHARS})"
    return None


class DocumentSync:
    def __init__(self):
        self.docs: dict[str, WorkerCopy] = {}
        self.reopens = 0  # documents resent whole after a rejected edit or a worker restart

    def opened(self, uri: str, version: int, language_id: str, text: str) -> WorkerCopy:
        copy = WorkerCopy(uri, language_id, version, text)
        copy.skipped_reason = unsupported_reason(text)
        if copy.skipped_reason:
            log.warning("%s: %s; no completions for it", uri, copy.skipped_reason)
        self.docs[uri] = copy
        return copy

    def changed(self, uri: str, version: int, content_changes, encoding: str) -> None:
        """Apply LSP content changes (in order) to the worker copy, recording each as code-point offsets."""
        copy = self.docs.get(uri)
        if copy is None:
            raise KeyError(f"didChange for {uri}, which was never opened")
        if version is not None and version <= copy.version:
            log.warning("%s: out-of-order change to version %s after %s; applied anyway", uri, version, copy.version)
        text = copy.text
        for change in content_changes:
            rng = getattr(change, "range", None)
            if rng is None:  # whole-document replacement
                start, end = 0, len(text)
            else:
                starts = line_starts(text)
                start = offset_at(text, rng.start.line, rng.start.character, encoding, starts)
                end = offset_at(text, rng.end.line, rng.end.character, encoding, starts)
                if end < start:
                    start, end = end, start
            text = text[:start] + change.text + text[end:]
            copy.pending.append(pb.TextChange(start=start, end=end, text=change.text))
        copy.text = text
        copy.version = version if version is not None else copy.version + 1
        was_skipped = copy.skipped_reason
        copy.skipped_reason = unsupported_reason(text)
        if was_skipped and not copy.skipped_reason:
            copy.acked_version = None  # the worker never had it
            copy.pending.clear()

    def closed(self, uri: str) -> WorkerCopy | None:
        return self.docs.pop(uri, None)

    def worker_restarted(self) -> None:
        for copy in self.docs.values():
            copy.acked_version = None
            copy.pending.clear()

    async def flush(self, uri: str, stub) -> WorkerCopy:
        """Bring the worker's copy of `uri` up to date; return the copy (its version is what the worker has)."""
        copy = self.docs[uri]
        async with copy.lock:
            if copy.acked_version is not None and not copy.pending:
                return copy
            if copy.acked_version is not None:
                changes, version = list(copy.pending), copy.version
                try:
                    await stub.EditDocument(
                        pb.EditDocumentRequest(uri=uri, base_version=copy.acked_version, new_version=version, changes=changes),
                        timeout=10,
                    )
                    del copy.pending[: len(changes)]
                    copy.acked_version = version
                    return copy
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
                        raise
                    log.info("%s: worker refused the edit (%s); resending the document", uri, exc.details())
            self.reopens += copy.acked_version is not None
            # Snapshot: changes that arrive while the call is in flight stay pending for the next flush.
            text, version, already_in_text = copy.text, copy.version, len(copy.pending)
            await stub.OpenDocument(
                pb.OpenDocumentRequest(uri=uri, version=version, language_id=copy.language_id, text=text), timeout=30
            )
            del copy.pending[:already_in_text]
            copy.acked_version = version
            return copy

    async def close_in_worker(self, uri: str, stub) -> None:
        try:
            await stub.CloseDocument(pb.CloseDocumentRequest(uri=uri), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.debug("close of %s not delivered: %s", uri, exc.details())
