"""What the worker has been told about each document, and the diffs still to send.

This module holds the daemon's one copy of each document the editor opened (the
text as the editor sent it; nothing is read from disk) and the worker's side:
per document the text the worker will have once pending changes are sent, the
version the worker acknowledged, and the changes (as code-point offsets) made
since. Edits are batched: a completion request flushes everything pending for
its document in one EditDocument, so a burst of keystrokes costs one message.
When the worker rejects an edit (it restarted, or a message was lost), the whole
document is sent again with OpenDocument; nothing is lost.

Versions sent to the worker are this module's own sequence numbers, never the
editor's: they grow strictly across every document, reopen and worker restart,
so an edit can only ever apply to the exact text it was computed against (an
editor that repeats or reorders its versions cannot make two texts share one).
Every acknowledgement is checked: the worker's length and CRC-32 (required) must
match the text the daemon expects, else the document is resent whole.

The pending list is bounded. Past MAX_PENDING_CHANGES changes, or past
MAX_PENDING_WORK_CHARS characters of copying for the worker, it collapses into
"send the whole document on the next flush": completions turned off, a worker in
its error state or a huge paste never make it grow without end. Skipped documents
(binary, or past MAX_DOCUMENT_CHARS: the worker's limit too, completion/rpc/wire.py) record nothing.

One didChange costs at most MAX_CHANGE_WORK_CHARS characters of copying: each of its
changes copies the text once, so a notification with many changes on a large text is
measured before any is applied (its changes x the text's length, plus what they
insert). Past that, or past MAX_CHANGES_AT_ONCE changes or MAX_DOCUMENT_CHARS inserted
characters, the document is out of sync: its text is dropped and it gets no
completions (and no later change) until the editor opens it again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from dataclasses import dataclass, field

import grpc

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.wire import MAX_DOCUMENT_CHARS, text_crc32

from .positions import line_starts, offset_at

log = logging.getLogger(__name__)

MAX_PENDING_CHANGES = 1000  # about 3 minutes of typing between two completions
MAX_PENDING_WORK_CHARS = 32_000_000  # pending changes x text length: the worker copies the text per change
MAX_CHANGES_AT_ONCE = 10_000  # in one didChange (a multi-cursor edit sends one per cursor)
MAX_CHANGE_WORK_CHARS = 200_000_000  # one didChange's changes x text length: a few tenths of a second of copying
# Answers to an EditDocument that mean "send the whole document instead".
EDIT_REFUSALS = (
    grpc.StatusCode.FAILED_PRECONDITION,  # another base version: the worker restarted or diverged
    grpc.StatusCode.NOT_FOUND,  # the worker does not have the document
    grpc.StatusCode.OUT_OF_RANGE,  # an offset past its text: it diverged
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # too many changes for one edit
)

_SURROGATE = re.compile("[\ud800-\udfff]")


def wire_text(text: str) -> str:
    """The text as the worker gets it: a lone surrogate (invalid UTF-16 from a client) becomes U+FFFD.

    Protobuf strings must be valid Unicode; one code point for one keeps every offset in place.
    """
    return text if text.isascii() or not _SURROGATE.search(text) else _SURROGATE.sub("\ufffd", text)


def ack_matches(ack: pb.DocumentAck, text: str) -> bool:
    """Does the worker's acknowledgement describe `text` (the wire text)? Its length and CRC-32 must
    both match: an acknowledgement without a CRC proves nothing about the text."""
    return ack.length == len(text) and ack.HasField("crc32") and ack.crc32 == text_crc32(text)


@dataclass
class WorkerCopy:
    uri: str
    language_id: str
    version: int  # the editor's version (logs only; the worker gets sequence numbers)
    text: str
    acked_version: int | None = None  # the worker's version of this text, once it acknowledged one
    resend: bool = True  # the worker must get the whole document (never had it, refused an edit, drifted)
    pending: list[pb.TextChange] = field(default_factory=list)
    epoch: int = 0  # bumped whenever `pending` is thrown away, so an in-flight flush leaves it alone
    skipped_reason: str | None = None  # binary or huge: never sent, never completed
    out_of_sync: bool = False  # an edit too large to apply arrived: no text until the editor reopens it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def collapse(self) -> None:
        """Forget the pending changes: the next flush sends the whole text instead."""
        self.pending.clear()
        self.resend = True
        self.epoch += 1


def unsupported_reason(text: str) -> str | None:
    if "\x00" in text:
        return "binary file (contains NUL characters)"
    if len(text) > MAX_DOCUMENT_CHARS:
        return f"file too large ({len(text)} characters, limit {MAX_DOCUMENT_CHARS})"
    return None


def too_large_to_apply(content_changes, length: int) -> str | None:
    """Why one didChange is too large to apply, or None: its count, what it inserts, and the copying
    it would cost (each change copies the text once), all measured without applying any."""
    count = len(content_changes)
    if count > MAX_CHANGES_AT_ONCE:
        return f"an edit of {count} changes at once (limit {MAX_CHANGES_AT_ONCE})"
    inserted = sum(len(getattr(change, "text", "")) for change in content_changes)
    if inserted > MAX_DOCUMENT_CHARS:
        return f"an edit inserting {inserted} characters (limit {MAX_DOCUMENT_CHARS})"
    if count * (length + inserted) > MAX_CHANGE_WORK_CHARS:
        return f"an edit of {count} changes on {length} characters (at most {MAX_CHANGE_WORK_CHARS} characters of copying)"
    return None


class DocumentSync:
    def __init__(self):
        self.docs: dict[str, WorkerCopy] = {}
        self.reopens = 0  # documents resent whole after a rejected edit or a worker restart
        self.drifts = 0  # acknowledgements that did not match the daemon's text (resent whole)
        self.collapses = 0  # pending lists that hit their bound (resent whole)
        self._versions = itertools.count(1)

    def opened(self, uri: str, version: int, language_id: str, text: str) -> WorkerCopy:
        old = self.docs.get(uri)
        # A reopen without a close shares the old copy's lock: its flush in flight ends first.
        copy = WorkerCopy(uri, language_id, version, text, lock=old.lock if old else asyncio.Lock())
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
        if copy.out_of_sync:
            return
        refused = too_large_to_apply(content_changes, len(copy.text))
        if refused:  # measured before anything is applied: one notification cannot keep the loop busy
            log.warning("%s: %s; no completions for it until it is opened again", uri, refused)
            copy.text, copy.out_of_sync, copy.skipped_reason = "", True, refused + "; reopen the file"
            copy.collapse()
            return
        if version is not None and version <= copy.version:
            log.warning("%s: out-of-order change to version %s after %s; applied anyway", uri, version, copy.version)
        text = copy.text
        record = not copy.skipped_reason  # also while resending: a flush in flight sends the text as it was
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
            if record:
                copy.pending.append(pb.TextChange(start=start, end=end, text=wire_text(change.text)))
        copy.text = text
        copy.version = version if version is not None else copy.version + 1
        was_skipped = copy.skipped_reason
        copy.skipped_reason = unsupported_reason(text)
        if copy.skipped_reason and not was_skipped:
            log.warning("%s: %s; no completions for it", uri, copy.skipped_reason)
        if copy.skipped_reason or was_skipped:
            copy.collapse()  # the worker never had it, or must not keep it: the whole text when it is back
        elif len(copy.pending) > MAX_PENDING_CHANGES or len(copy.pending) * len(text) > MAX_PENDING_WORK_CHARS:
            log.info("%s: %d changes pending; the whole document goes on the next flush", uri, len(copy.pending))
            self.collapses += 1
            copy.collapse()

    def opened_copy(self, uri: str, what: str) -> WorkerCopy | None:
        """The copy of a document the editor opened, or None (`what` is refused and logged): the daemon
        knows only the text the editor sent, and never reads a URI itself."""
        copy = self.docs.get(uri)
        if copy is None:
            log.warning("%s for %s refused: the editor never opened it (nothing is read from disk)", what, uri)
        return copy

    def closed(self, uri: str) -> WorkerCopy | None:
        return self.docs.pop(uri, None)

    def resend(self, uri: str) -> None:
        """The worker lost or diverged from the document: send it whole on the next flush."""
        copy = self.docs.get(uri)
        if copy is not None:
            self.reopens += 1
            copy.collapse()

    def worker_restarted(self) -> None:
        for copy in self.docs.values():
            copy.acked_version = None
            copy.collapse()

    async def flush(self, uri: str, stub) -> WorkerCopy | None:
        """Bring the worker's copy of `uri` up to date; return the copy (its acked_version is what the
        worker has), or None when the document was closed meanwhile.

        Changes that arrive while a call is in flight stay pending for the next flush.
        """
        copy = self.docs.get(uri)
        if copy is None:
            return None
        async with copy.lock:
            for _attempt in range(3):
                if self.docs.get(uri) is not copy:
                    return None  # closed or reopened while we waited
                if not copy.resend and not copy.pending:
                    return copy
                epoch, text, count = copy.epoch, wire_text(copy.text), len(copy.pending)
                version = next(self._versions)
                if copy.resend:
                    ack = await stub.OpenDocument(
                        pb.OpenDocumentRequest(uri=uri, version=version, language_id=copy.language_id, text=text),
                        timeout=30,
                    )
                else:
                    try:
                        ack = await stub.EditDocument(
                            pb.EditDocumentRequest(
                                uri=uri, base_version=copy.acked_version, new_version=version, changes=copy.pending[:count]
                            ),
                            timeout=10,
                        )
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in EDIT_REFUSALS:
                            raise
                        log.info("%s: worker refused the edit (%s); resending the document", uri, exc.details())
                        self.reopens += 1
                        copy.collapse()
                        continue
                copy.acked_version = version
                if copy.epoch == epoch:
                    del copy.pending[:count]
                    copy.resend = False
                if ack_matches(ack, text):
                    return copy
                log.warning(
                    "%s: the worker's copy drifted (length %d, expected %d); resending the document",
                    uri, ack.length, len(text),
                )
                self.drifts += 1
                self.reopens += 1
                copy.collapse()
            log.error("%s: the worker's copy still differs after 3 tries; no completion this time", uri)
            return None

    async def close_in_worker(self, copy: WorkerCopy, stub) -> None:
        async with copy.lock:  # after any flush in flight, so the close is the worker's last word
            try:
                await stub.CloseDocument(pb.CloseDocumentRequest(uri=copy.uri), timeout=5)
            except grpc.aio.AioRpcError as exc:
                log.debug("close of %s not delivered: %s", copy.uri, exc.details())
            except grpc.aio.UsageError as exc:  # the channel was replaced; the new worker never had it
                log.debug("close of %s not delivered: %s", copy.uri, exc)
