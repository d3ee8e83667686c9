"""The completion lifecycle shared by textDocument/inlineCompletion and textDocument/completion.

One request goes through four steps, each a method of `Completions`:
1. take its turn (`_take_turn`): it becomes its document's newest request, the older request's call
   in flight is cancelled down to the worker's decoding loop, and it waits out the debounce; a
   newer request of the same document supersedes it (no suggestion);
2. find the worker (`_ready_stub`): a worker that is not ready means no suggestion, except for an
   explicitly invoked request, which waits for the model (bounded; the load shows as $/progress);
3. ask the worker (`_ask_worker`): flush the document's pending edits (lsp/sync.py), then stream
   the answer of one Complete call; a worker that lost the document gets it again, once;
4. record it (`_record`): latency, counters, the status bar.

Nothing that goes wrong between the daemon and the worker reaches the editor as an error
(`_failed` maps every failure to a counter and a log line; the request gets no suggestion). A
document closed while its request is pending ends the request quietly too: no suggestion for a
text the editor no longer has, no error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Callable

import grpc
from lsprotocol import types

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.wire import COMPLETION_MODE_BY_NAME, DECODING_MODE_BY_SETTING

from .positions import offset_at, position_at
from .settings import Settings
from .status import Status
from .sync import DocumentSync
from .worker import INVOKED_WAIT_S, LOADING, STARTING, WorkerConnection, own_task_cancelled

log = logging.getLogger(__name__)

COMPLETION_TIMEOUT_S = 60
# Answers to a Complete that mean the worker lost or diverged from the document: send it whole, try once more.
LOST_DOCUMENT = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
# Answers that say the worker is unavailable (not an error of this request): counted, and the worker is watched.
WORKER_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class Completions:
    def __init__(
        self,
        sync: DocumentSync,
        worker: WorkerConnection,
        status: Status,
        settings: Callable[[], Settings],
        encoding: Callable[[], str],
    ):
        """`settings` and `encoding`: the current ones (they change with the client's settings and initialize)."""
        self.sync, self.worker, self.status = sync, worker, status
        self.settings, self.encoding = settings, encoding
        self.requests = itertools.count(1)
        self.latest_request: dict[str, int] = {}  # uri -> newest request number (older ones give up)
        self.calls: dict[str, grpc.aio.Call] = {}  # uri -> the gRPC call in flight
        self.counters = {
            "requests": 0,
            "superseded": 0,
            "suggestions": 0,
            "empty": 0,
            "abstained": 0,
            "worker_unavailable": 0,
            "errors": 0,
            "shown": 0,
            "shown_chars": 0,
            "accepted": 0,
            "accepted_partial": 0,
            "accepted_chars": 0,
        }
        self.latencies_ms: list[float] = []
        self.last_completion: dict | None = None  # its stop reason and cache stats (reused, encoded, re-rotated, refreshed)

    async def complete(self, uri: str, position: types.Position, mode: str, invoked: bool = False) -> tuple[str, dict] | None:
        """The suggestion at `position` and its stats, or None (no suggestion, whatever the reason).

        `invoked`: the user asked explicitly (a key press, not typing). Such a request made while
        the worker starts or loads its model waits for it (bounded, cancellable; the client sees
        the load as $/progress) instead of returning nothing at once.
        """
        self.counters["requests"] += 1
        started = time.perf_counter()
        copy = self.sync.opened_copy(uri, "completion")
        if not self.settings().enabled or copy is None or copy.skipped_reason:
            return None
        number = await self._take_turn(uri)
        if number is None:
            return None
        stub = await self._ready_stub(uri, number, invoked)
        if stub is None:
            return None
        copy = self.sync.docs.get(uri)
        if copy is None:  # closed during the debounce or the wait for the worker
            return None
        offset = offset_at(copy.text, position.line, position.character, self.encoding())
        answer = await self._ask_worker(uri, number, offset, mode, stub)
        if answer is None:
            return None
        self.worker.mark_served()
        if self.sync.docs.get(uri) is not copy:
            log.info("completion %s: %s was closed while the worker answered; no suggestion", number, uri)
            return None
        return self._record(uri, number, started, *answer)

    def _superseded(self, uri: str, number: int) -> bool:
        """Whether a newer request of the document took over from request `number` (counted)."""
        if self.latest_request.get(uri) == number:
            return False
        self.counters["superseded"] += 1
        return True

    async def _take_turn(self, uri: str) -> int | None:
        """This request's number once its debounce is over; None when a newer one superseded it."""
        number = next(self.requests)
        self.latest_request[uri] = number
        previous = self.calls.pop(uri, None)
        if previous is not None:
            previous.cancel()  # cancel-previous, down to the worker's decoding loop
        debounce_ms = self.settings().debounceMs
        if debounce_ms:
            await asyncio.sleep(debounce_ms / 1000)
        return None if self._superseded(uri, number) else number

    async def _ready_stub(self, uri: str, number: int, invoked: bool):
        """The ready worker's stub; None when it is not ready (said in the status) or a newer request took over."""
        stub = self.worker.ready_stub()
        if stub is None and invoked:
            self.status.send("loading", f"waiting for the model: {self.worker.message}")
            stub = await self.worker.wait_ready(INVOKED_WAIT_S)
            if self._superseded(uri, number):
                return None
        if stub is None:
            self.counters["worker_unavailable"] += 1
            self.status.send("loading" if self.worker.state in (STARTING, LOADING) else "error", self.worker.message)
        return stub

    async def _ask_worker(self, uri: str, number: int, offset: int, mode: str, stub) -> tuple[str, object] | None:
        """Flush the document's edits and stream one Complete: (its text, its last chunk), or None."""
        for attempt in range(2):
            try:
                copy = await self.sync.flush(uri, stub)
                if copy is None:
                    return None  # closed meanwhile
                if copy.pending or self._superseded(uri, number):
                    return None  # the text moved on while we flushed; a newer request will come
                call = stub.Complete(
                    self._request(uri, copy.acked_version, offset, number, mode),
                    timeout=COMPLETION_TIMEOUT_S,  # a hung worker must not hang the editor's request
                )
                self.calls[uri] = call
                parts, last = [], None
                async for chunk in call:
                    parts.append(chunk.text)
                    last = chunk
                return "".join(parts), last
            except grpc.aio.AioRpcError as exc:
                if attempt == 0 and exc.code() in LOST_DOCUMENT:
                    self.sync.resend(uri)  # the worker lost or diverged from the document: resend it
                    continue
                return self._failed(exc, uri, number)
            except (asyncio.CancelledError, Exception) as exc:  # whatever it is, no suggestion rather than an error
                return self._failed(exc, uri, number)
            finally:
                if self.calls.get(uri) is not None and self.latest_request.get(uri) == number:
                    self.calls.pop(uri, None)
        return None

    def _request(self, uri: str, version: int, offset: int, number: int, mode: str) -> pb.CompleteRequest:
        settings = self.settings()
        decoding = DECODING_MODE_BY_SETTING[settings.decodingMode]
        return pb.CompleteRequest(
            uri=uri,
            version=version,
            offset=offset,
            request_id=str(number),
            options=pb.CompleteOptions(
                max_tokens=settings.maxTokens,
                mode=COMPLETION_MODE_BY_NAME[mode].wire,
                cache=pb.CACHE_MODE_EDIT_AWARE if settings.editAwareCache else pb.CACHE_MODE_PREFIX,
                early_exit=decoding.early_exit,
                plain_decoding=decoding.plain_decoding,
                # Negative: the threshold calibrated for the model (the field left unset).
                **({"abstain_threshold": settings.abstainThreshold} if settings.abstainThreshold >= 0 else {}),
                **({"exit_threshold": settings.exitThreshold} if settings.exitThreshold >= 0 else {}),
            ),
        )

    def _failed(self, exc: BaseException, uri: str, number: int) -> None:
        """A call that gave no answer, counted and logged: superseded, worker unavailable, or an error.

        grpc.aio also raises asyncio.CancelledError out of a call whose channel a worker restart
        closed: that one is answered (no suggestion); only the request's own cancellation propagates."""
        superseded = self.latest_request.get(uri) != number
        if isinstance(exc, asyncio.CancelledError):
            if superseded:
                self.counters["superseded"] += 1
            elif own_task_cancelled():
                raise exc
            else:
                self.counters["worker_unavailable"] += 1
        elif isinstance(exc, grpc.aio.UsageError):  # a stub of a channel closed by a restart
            self.counters["worker_unavailable"] += 1
            log.info("completion %s: the worker connection was replaced (%s)", number, exc)
        elif isinstance(exc, grpc.aio.AioRpcError):
            if exc.code() == grpc.StatusCode.CANCELLED and superseded:
                self.counters["superseded"] += 1
            elif exc.code() in WORKER_UNAVAILABLE:
                self.counters["worker_unavailable"] += 1
                self.worker.report_failure(exc)
            else:
                self.counters["errors"] += 1
                log.error("completion failed: %s %s", exc.code().name, exc.details())
        else:
            self.counters["errors"] += 1
            log.error("completion %s failed", number, exc_info=exc)
        return None

    def _record(self, uri: str, number: int, started: float, text: str, last) -> tuple[str, dict] | None:
        """Latency, counters and status of an answered request; the suggestion, or None (empty, abstained)."""
        latency = (time.perf_counter() - started) * 1000
        self.status.last_latency_ms = round(latency, 1)
        self.latencies_ms = (self.latencies_ms + [latency])[-1000:]
        stats = {"stop_reason": last.stop_reason if last else "", **_stats_dict(last.stats if last else None)}
        self.last_completion = {"uri": uri, "latency_ms": round(latency, 1), "chars": len(text), "text": text, **stats}
        log.info("completion %s: %d chars in %.0f ms (%s) %s", number, len(text), latency, stats["stop_reason"], stats)
        if stats["stop_reason"] == "abstained":
            # Said, never silent: the status shows it, stats count it, the abstainThreshold setting turns it off.
            self.counters["abstained"] += 1
            confidence = stats.get("confidence", -1)
            self.status.send("ready", f"no suggestion: likely wrong (confidence {confidence:.2f})", "abstained")
            return None
        self.counters["suggestions" if text else "empty"] += 1
        self.status.send("ready", self.worker.message, "suggestion" if text else "empty")
        return (text, stats) if text else None


def inline_completion_list(text: str, position: types.Position) -> types.InlineCompletionList:
    """Ghost text at `position`; accepting it runs rotary.suggestionAccepted (the acceptance counters)."""
    return types.InlineCompletionList(
        items=[
            types.InlineCompletionItem(
                insert_text=text,
                range=types.Range(start=position, end=position),
                command=types.Command(
                    title="Rotary: suggestion accepted",
                    command="rotary.suggestionAccepted",
                    arguments=[{"id": uuid.uuid4().hex[:12], "acceptedLength": len(text), "full": True}],
                ),
            )
        ]
    )


def completion_list(document: str, position: types.Position, text: str, encoding: str) -> types.CompletionList:
    """One item that replaces the word being typed (so clients' prefix filtering keeps it) with the word and `text`."""
    offset = offset_at(document, position.line, position.character, encoding)
    line_start = document.rfind("\n", 0, offset) + 1
    word = document[line_start + _word_start(document[line_start:offset], offset - line_start) : offset]
    word_start = types.Position(position.line, position_at(document, offset - len(word), encoding)[1])
    item = types.CompletionItem(
        label=(word + text).strip().split("\n")[0][:80] or text,
        kind=types.CompletionItemKind.Text,
        detail="Rotary",
        filter_text=word + text,
        text_edit=types.TextEdit(range=types.Range(start=word_start, end=position), new_text=word + text),
    )
    return types.CompletionList(is_incomplete=True, items=[item])


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}


def _word_start(line: str, column: int) -> int:
    start = column
    while start > 0 and (line[start - 1].isalnum() or line[start - 1] == "_"):
        start -= 1
    return start
