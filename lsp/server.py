"""Rotary's language server: the editor's side of the service (pygls 2, no torch).

It tracks every edit (incremental sync), answers textDocument/inlineCompletion
(ghost text) and textDocument/completion, debounces per document and cancels
the previous request of a document down to the worker, reports the worker's
model loading as $/progress, and sends `rotary/status` notifications that
editors show in a status bar.

Bad input gets an answer, never silence or a crash: a body that is not JSON gets
a parse error (-32700), a request whose params do not fit its method gets
invalid params (-32602) with its id, a request before `initialize` gets
ServerNotInitialized (-32002), an unknown method MethodNotFound, and an
unknown command an error that lists Rotary's commands. Nothing that goes wrong
between the daemon and the worker reaches the editor as an error: a completion
then comes back empty.

The daemon reads only what the editor sent: a document exists for it from its
`didOpen` to its `didClose`, and anything naming another URI (a `didChange`,
a completion, a code action, a command) is refused and logged. Nothing is ever
read from disk in place of an editor's text (pygls's workspace would: it opens
the URI's path, a FIFO blocks it). The daemon keeps one copy of each document,
its own (lsp/sync.py); pygls's workspace holds none.

Settings that redirect the documents' text or load code (`workerAddress`,
`model`) come from the command line (`--worker`, `--model`; they win) or, from a
client, only once the user allowed the new value in a `window/showMessageRequest`
("Allow"/"Deny"): a repository's editor settings (eglot's .dir-locals.el) must
not send every open document and the worker token to an address of its choosing.
A client that cannot ask (no window.showMessage capability) cannot change them;
neither can one that is not trusted with them (LSP over TCP without an access
token). Every change is logged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from dataclasses import asdict, replace
from typing import Any

import grpc
from lsprotocol import types
from pygls.exceptions import (
    FeatureRequestError,
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcServerNotInitialized,
)
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method
from pygls.uris import to_fs_path

import rotary
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.wire import COMPLETION_MODE_BY_NAME, DECODING_MODE_BY_SETTING, SINGLE_LINE, text_crc32

from .positions import UTF8, UTF16, offset_at, position_at
from .settings import Settings, parse_settings
from .sync import DocumentSync, wire_text
from .testgen import function_at, new_test_file_uri
from .worker import LOADING, READY, STARTING, STOPPED, WorkerConnection

log = logging.getLogger(__name__)

COMPLETION_TIMEOUT_S = 60
# An explicitly invoked request made while the model loads waits this long for it (automatic ones do not wait).
INVOKED_WAIT_S = 30


# Generating a batch of tests takes minutes on a CPU; the call ends by itself after this long.
TESTS_TIMEOUT_S = 1800
GENERATE_TESTS = "rotary.generateTests"

# Settings that send the documents' text somewhere or load code: from the command line, or from a
# trusted client once the user allowed them (window/showMessageRequest); always logged.
REDIRECTING_SETTINGS = ("workerAddress", "model")
ALLOW, DENY = "Allow", "Deny"
CLI_FLAGS = {"workerAddress": "rotary lsp --worker ADDR", "model": "rotary lsp --model PATH"}


class _Dropped:
    """A message that was already answered (or is not worth one); pygls ignores it (no jsonrpc version)."""

    jsonrpc = None


class RotaryProtocol(LanguageServerProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initialize_received = False
        self.end_session = None  # LSP over TCP: `exit` ends this connection's session, not the daemon
        self.answering: set = set()  # ids of the client's requests not answered yet

    def handle_message(self, message):
        if isinstance(message, _Dropped):
            return
        if not hasattr(message, "jsonrpc"):  # JSON, but no JSON-RPC message (an array, a number, no "jsonrpc")
            msg_id = message.get("id") if isinstance(message, dict) else None
            self.send_error(msg_id, JsonRpcInvalidRequest("Invalid request: not a JSON-RPC 2.0 message object"))
            return
        method = getattr(message, "method", None)
        if not self.initialize_received and method not in (None, types.INITIALIZE, types.EXIT):
            # LSP: before initialize, a request gets ServerNotInitialized and a notification is dropped.
            if getattr(message, "id", None) is not None:
                error = JsonRpcServerNotInitialized(f"{method}: the server is not initialized yet (send initialize first)")
                self._send_response(message.id, None, error.to_response_error())
            else:
                log.warning("%s before initialize dropped", method)
            return
        if method == types.INITIALIZE:
            self.initialize_received = True
        super().handle_message(message)

    def send_error(self, msg_id, error: JsonRpcException) -> None:
        """An error response; `"id": null` when the request's id is unknown, as JSON-RPC asks."""
        self._send_data({
            "jsonrpc": "2.0",
            "id": msg_id if isinstance(msg_id, (int, str)) else None,
            "error": {"code": error.code, "message": error.message},
        })

    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            # pygls would only log this; a request gets its answer (an id it can match), a notification is dropped.
            method = data.get("method")
            if "id" in data and isinstance(method, str):
                cause = exc.__cause__ or exc
                error = JsonRpcInvalidParams(f"{method}: invalid params ({str(cause).splitlines()[0][:300]})")
                self._send_response(data["id"], None, error.to_response_error())
            else:
                log.warning("dropped a malformed message: %s", str(exc.__cause__ or exc).splitlines()[0][:300])
            return _Dropped()

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        # Prefer UTF-8 when the client offers it (no transcoding on either side); else LSP's UTF-16 default.
        general = params.capabilities.general
        if general is not None and general.position_encodings and types.PositionEncodingKind.Utf8 in general.position_encodings:
            general.position_encodings = [types.PositionEncodingKind.Utf8]
        return (yield from super().lsp_initialize(params))

    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    def lsp_workspace__execute_command(self, params: types.ExecuteCommandParams):
        if params.command not in self.fm.commands:
            raise JsonRpcInvalidParams(
                f"unknown command {params.command!r}: Rotary runs only its own commands ({', '.join(sorted(self.fm.commands))})"
            )
        return (yield from super().lsp_workspace__execute_command(params))

    # The daemon's own copy of each document is the only one (lsp/sync.py). pygls's workspace would keep
    # a second (applying every change twice) and, asked for a URI it does not have, read the URI's path
    # from disk: these three hand the notifications to Rotary's features without touching it.

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None

    # The client's requests the server is still answering (LSP over TCP: a session is idle only
    # when it sends nothing and waits for nothing).

    def _handle_request(self, msg_id, method_name, params):
        self.answering.add(msg_id)
        return super()._handle_request(msg_id, method_name, params)

    def _send_response(self, msg_id, result=None, error=None):
        self.answering.discard(msg_id)
        return super()._send_response(msg_id, result, error)

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args):
        if self.end_session is None:
            return (yield from super().lsp_exit(*args))
        self.end_session()


class RotaryServer(LanguageServer):
    def __init__(
        self,
        worker_address: str = "",
        model: str = "",
        worker: WorkerConnection | None = None,
        trusted: bool = True,
        worker_token: str | None = None,
        worker_ca: str | None = None,
    ):
        """`worker`: a connection shared with other sessions (LSP over TCP), else the server makes its own.
        `trusted`: the client may change the settings that redirect text or load code (REDIRECTING_SETTINGS)."""
        super().__init__("rotary", rotary.__version__, protocol_cls=RotaryProtocol)
        self.settings = Settings(workerAddress=worker_address, model=model)
        self.cli_overrides = {k: v for k, v in {"workerAddress": worker_address, "model": model}.items() if v}
        self.trusted = trusted
        self.confirming: dict[tuple[str, str], asyncio.Future] = {}  # (key, value) -> its question to the user
        self.denied: set[tuple[str, str]] = set()  # values the user denied: not asked again this session
        self.start_when_confirmed = False
        self.sync = DocumentSync()
        self.owns_worker = worker is None
        if worker is None:
            worker = WorkerConnection(worker_address, model, token=worker_token, ca_file=worker_ca)
        else:
            self.settings = replace(self.settings, workerAddress=worker.external_address, model=worker.model)
        self.worker = worker
        worker.on_state = self._on_worker_state
        worker.on_restart = self.sync.worker_restarted
        self.requests = itertools.count(1)
        self.latest_request: dict[str, int] = {}  # uri -> newest request number (older ones give up)
        self.calls: dict[str, Any] = {}  # uri -> the gRPC call in flight
        self.progress_token: str | None = None  # the open $/progress of a worker start; one token per start
        self.last_latency_ms: float | None = None
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

    # -- state and status ---------------------------------------------------

    @property
    def encoding(self) -> str:
        enc = self.workspace.position_encoding if self.protocol._workspace else None
        return UTF8 if enc == types.PositionEncodingKind.Utf8 else "utf-32" if enc == types.PositionEncodingKind.Utf32 else UTF16

    def apply_settings(self, raw: Any) -> None:
        """A client's settings (initializationOptions, didChangeConfiguration). A new value of a
        REDIRECTING_SETTINGS key waits for the user's answer (`confirm`); the others apply at once."""
        new, warnings = parse_settings(raw, self.settings)
        to_confirm = {}
        for key in REDIRECTING_SETTINGS:
            before, after = getattr(self.settings, key), getattr(new, key)
            if before == after or key in self.cli_overrides:
                continue
            new = replace(new, **{key: before})  # applied only once the user allows it
            if not self.trusted:
                warnings.append(
                    f"rotary.{key} ignored: a client over TCP without the access token cannot change where the "
                    "documents go or which model loads (start the daemon with --token-file to allow it)"
                )
            elif (key, after) in self.denied:
                log.warning("rotary.%s = %r ignored: the user denied it in this session", key, after)
            elif (key, after) not in self.confirming:
                to_confirm[key] = after
        new = replace(new, **self.cli_overrides)  # command-line flags win over editor settings
        for warning in warnings:
            self.warn(warning)
        self._use(new)
        for key, value in to_confirm.items():
            self.confirming[(key, value)] = asyncio.ensure_future(self.confirm(key, value))

    def _use(self, new: Settings) -> None:
        self.settings = new
        # Before `initialized` the worker is not started yet and simply starts with these settings.
        if self.worker.reconfigure(new.workerAddress, new.model) and self.worker.wanted:
            asyncio.ensure_future(self.worker.restart())

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=message))

    async def confirm(self, key: str, value: str) -> bool:
        """Ask the user (window/showMessageRequest) before rotary.<key> becomes `value`; apply it if allowed."""
        try:
            caps = getattr(self.protocol, "client_capabilities", None)
            if not (caps and caps.window and caps.window.show_message):
                self.warn(
                    f"rotary.{key} = {value!r} ignored: this editor cannot ask you to confirm it "
                    f"(no window/showMessageRequest); pass it on the command line ({CLI_FLAGS[key]}) instead"
                )
                return False
            what = (
                f"send your open documents{' and the worker access token' if self.worker.token else ''} to the worker at {value!r}"
                if key == "workerAddress" else f"load the model {value!r} (a model's files can run code)"
            ) if value else f"go back to the default for rotary.{key} (now {getattr(self.settings, key)!r})"
            message = f"Rotary: the editor's settings (perhaps a project's) ask to {what}. Allow rotary.{key}?"
            try:
                answer = await self.window_show_message_request_async(types.ShowMessageRequestParams(
                    type=types.MessageType.Warning, message=message,
                    actions=[types.MessageActionItem(title=ALLOW), types.MessageActionItem(title=DENY)],
                ))
            except Exception as exc:  # an error answer, or the session ended: no
                log.warning("rotary.%s = %r not confirmed (%s); ignored", key, value, exc)
                return False
            if answer is None or answer.title != ALLOW:
                self.denied.add((key, value))
                log.warning("rotary.%s = %r denied by the user; keeping %r", key, value, getattr(self.settings, key))
                return False
            log.warning("rotary.%s changed by the client, allowed by the user: %r -> %r", key, getattr(self.settings, key), value)
            self._use(replace(self.settings, **{key: value}))
            return True
        finally:
            self.confirming.pop((key, value), None)
            if not self.confirming and self.start_when_confirmed:
                self.start_when_confirmed = False
                self.start_worker()

    def start_worker(self) -> None:
        """Start (or join) the worker, unless a redirecting setting still waits for the user's answer:
        then it starts with the answer, never first with settings about to change."""
        if self.confirming:
            self.start_when_confirmed = True
            self.send_status("loading", "waiting for your answer about Rotary's settings")
            return
        self.worker.start()
        if self.worker.state != STOPPED:  # a shared worker already on its way: tell this editor where it stands
            self._on_worker_state(self.worker.state, self.worker.message)

    def opened_copy(self, uri: str, what: str):
        """The daemon's copy of a document the editor opened, or None (refused and logged): the daemon
        knows only the text the editor sent, and never reads a URI itself."""
        copy = self.sync.docs.get(uri)
        if copy is None:
            log.warning("%s for %s refused: the editor never opened it (nothing is read from disk)", what, uri)
        return copy

    def report_server_error(self, error: Exception, source) -> None:
        if source is JsonRpcException and isinstance(error, ValueError):  # from the reader: not JSON, or not UTF-8
            self.protocol.send_error(None, JsonRpcParseError(f"Parse error: {str(error)[:200]}"))
            return
        if source is FeatureRequestError:
            return
        log.error("%s", error)  # no dialog: a keystroke never raises one

    def send_status(self, state: str, message: str, last_result: str | None = None) -> None:
        self.protocol.notify(
            "rotary/status",
            {"state": state, "message": message, "latencyMs": self.last_latency_ms, "lastResult": last_result},
        )

    def _on_worker_state(self, state: str, message: str) -> None:
        log.info("worker %s: %s", state, message)
        if state == STOPPED:  # only on shutdown or restart; the next state says what follows
            return
        status = "disabled" if not self.settings.enabled else {READY: "ready", LOADING: "loading", STARTING: "loading"}.get(state, "error")
        self.send_status(status, message)
        asyncio.ensure_future(self._progress(state, message))

    async def _progress(self, state: str, message: str) -> None:
        capabilities = getattr(self.protocol, "client_capabilities", None)  # none before initialize
        caps = capabilities.window if capabilities else None
        if not (caps and caps.work_done_progress):
            return
        try:
            if state in (STARTING, LOADING) and self.progress_token is None:
                token = self.progress_token = f"rotary/worker/{uuid.uuid4().hex[:8]}"
                await self.work_done_progress.create_async(token)
                self.work_done_progress.begin(
                    token, types.WorkDoneProgressBegin(title="Rotary", message=message, cancellable=False)
                )
            elif state in (STARTING, LOADING):
                self.work_done_progress.report(self.progress_token, types.WorkDoneProgressReport(message=message))
            elif self.progress_token is not None:
                token, self.progress_token = self.progress_token, None
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        except Exception as exc:  # a client that refuses progress still gets completions
            log.debug("progress not shown: %s", exc)

    # -- completion ---------------------------------------------------------

    async def complete(self, uri: str, position: types.Position, mode: str, invoked: bool = False) -> tuple[str, dict] | None:
        """The shared path of both completion requests: debounce, cancel older, flush edits, stream from the worker.

        `invoked`: the user asked explicitly (a key press, not typing). Such a request made while
        the worker starts or loads its model waits for it (bounded, cancellable; the client sees
        the load as $/progress) instead of returning nothing at once.
        """
        self.counters["requests"] += 1
        started = time.perf_counter()
        copy = self.opened_copy(uri, "completion")
        if not self.settings.enabled or copy is None or copy.skipped_reason:
            return None
        number = next(self.requests)
        self.latest_request[uri] = number
        previous = self.calls.pop(uri, None)
        if previous is not None:
            previous.cancel()  # cancel-previous, down to the worker's decoding loop
        if self.settings.debounceMs:
            await asyncio.sleep(self.settings.debounceMs / 1000)
        if self.latest_request.get(uri) != number:
            self.counters["superseded"] += 1
            return None
        stub = self.worker.ready_stub()
        if stub is None and invoked:
            self.send_status("loading", f"waiting for the model: {self.worker.message}")
            stub = await self.worker.wait_ready(INVOKED_WAIT_S)
            if self.latest_request.get(uri) != number:
                self.counters["superseded"] += 1
                return None
        if stub is None:
            self.counters["worker_unavailable"] += 1
            self.send_status("loading" if self.worker.state in (STARTING, LOADING) else "error", self.worker.message)
            return None
        copy = self.sync.docs.get(uri)
        if copy is None:
            return None
        offset = offset_at(copy.text, position.line, position.character, self.encoding)
        for attempt in range(2):
            try:
                copy = await self.sync.flush(uri, stub)
                if copy is None:
                    return None  # closed meanwhile
                if copy.pending or self.latest_request.get(uri) != number:
                    self.counters["superseded"] += 1
                    return None  # the text moved on while we flushed; a newer request will come
                decoding = DECODING_MODE_BY_SETTING[self.settings.decodingMode]
                call = stub.Complete(
                    pb.CompleteRequest(
                        uri=uri,
                        version=copy.acked_version,
                        offset=offset,
                        request_id=str(number),
                        options=pb.CompleteOptions(
                            max_tokens=self.settings.maxTokens,
                            mode=COMPLETION_MODE_BY_NAME[mode].wire,
                            cache=pb.CACHE_MODE_EDIT_AWARE if self.settings.editAwareCache else pb.CACHE_MODE_PREFIX,
                            early_exit=decoding.early_exit,
                            plain_decoding=decoding.plain_decoding,
                            # Negative: the threshold calibrated for the model (the field left unset).
                            **({"abstain_threshold": self.settings.abstainThreshold} if self.settings.abstainThreshold >= 0 else {}),
                            **({"exit_threshold": self.settings.exitThreshold} if self.settings.exitThreshold >= 0 else {}),
                        ),
                    ),
                    timeout=COMPLETION_TIMEOUT_S,  # a hung worker must not hang the editor's request
                )
                self.calls[uri] = call
                parts, last = [], None
                async for chunk in call:
                    parts.append(chunk.text)
                    last = chunk
                break
            except asyncio.CancelledError:
                if self.latest_request.get(uri) != number:
                    self.counters["superseded"] += 1
                    return None
                if own_task_cancelled():
                    raise
                # grpc.aio raised it out of a call whose channel a worker restart closed: no answer
                # this time, and the request is answered (an unanswered one hangs its editor's wait).
                self.counters["worker_unavailable"] += 1
                return None
            except grpc.aio.UsageError as exc:  # a stub of a channel closed by a restart
                self.counters["worker_unavailable"] += 1
                log.info("completion %s: the worker connection was replaced (%s)", number, exc)
                return None
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self.latest_request.get(uri) != number:
                    self.counters["superseded"] += 1
                    return None
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND) and attempt == 0:
                    self.sync.resend(uri)  # the worker lost or diverged from the document: resend it
                    continue
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    self.counters["worker_unavailable"] += 1
                    self.worker.report_failure(exc)
                else:
                    self.counters["errors"] += 1
                    log.error("completion failed: %s %s", exc.code().name, exc.details())
                return None
            except Exception:  # whatever it is, the editor gets no suggestion rather than an error
                self.counters["errors"] += 1
                log.exception("completion %s failed", number)
                return None
            finally:
                if self.calls.get(uri) is not None and self.latest_request.get(uri) == number:
                    self.calls.pop(uri, None)
        else:
            return None
        self.worker.mark_served()
        text = "".join(parts)
        latency = (time.perf_counter() - started) * 1000
        self.last_latency_ms = round(latency, 1)
        self.latencies_ms = (self.latencies_ms + [latency])[-1000:]
        stats = {"stop_reason": last.stop_reason if last else "", **_stats_dict(last.stats if last else None)}
        self.last_completion = {"uri": uri, "latency_ms": round(latency, 1), "chars": len(text), "text": text, **stats}
        log.info("completion %s: %d chars in %.0f ms (%s) %s", number, len(text), latency, stats["stop_reason"], stats)
        if stats["stop_reason"] == "abstained":
            # Said, never silent: the status shows it, stats count it, the abstainThreshold setting turns it off.
            self.counters["abstained"] += 1
            confidence = stats.get("confidence", -1)
            self.send_status("ready", f"no suggestion: likely wrong (confidence {confidence:.2f})", "abstained")
            return None
        self.counters["suggestions" if text else "empty"] += 1
        self.send_status("ready", self.worker.message, "suggestion" if text else "empty")
        return (text, stats) if text else None

    # -- unit-test generation ---------------------------------------------------

    def tests_action(self, uri: str, line: int) -> types.CodeAction | None:
        """"Generate unit tests for <name>" on the Python function holding `line`, if there is one."""
        copy = self.opened_copy(uri, "codeAction")
        if copy is None or copy.skipped_reason:
            return None
        if (copy.language_id or "") != "python" and not uri.endswith((".py", ".pyi")):
            return None
        found = function_at(copy.text, line)
        if found is None:
            return None
        return types.CodeAction(
            title=f"Generate unit tests for {found.name}",
            kind=types.CodeActionKind.Refactor,
            command=types.Command(
                title=f"Generate unit tests for {found.name}", command=GENERATE_TESTS,
                arguments=[{"uri": uri, "qualname": found.qualname}],
            ),
        )

    async def generate_tests(self, uri: str, qualname: str, count: int = 0) -> dict:
        """Ask the worker for tests of `qualname` in the document `uri`, with $/progress (cancellable);
        open the result as a new test file beside it (workspace edit: CreateFile + insert)."""
        copy = self.opened_copy(uri, GENERATE_TESTS)
        if copy is None:
            return self._tests_error(f"Rotary: {uri} is not open")
        stub = self.worker.ready_stub() or await self.worker.wait_ready(INVOKED_WAIT_S)
        if stub is None:
            return self._tests_error(f"Rotary: the model worker is not ready ({self.worker.message})")
        path = to_fs_path(uri) or uri.rsplit("/", 1)[-1]
        token = f"rotary/tests/{uuid.uuid4().hex[:8]}"
        progress = await self._begin_tests_progress(token, f"Rotary: tests for {qualname}")
        call = stub.GenerateTests(
            pb.GenerateTestsRequest(
                path=path, text=copy.text, qualname=qualname, count=count, language_id="python",
                request_id=token,
            ),
            timeout=TESTS_TIMEOUT_S,
        )
        if progress is not None:  # the user pressed cancel on the progress: cancel the call, down to the worker
            progress.add_done_callback(lambda f: call.cancel() if f.cancelled() else None)
        last = None
        try:
            async for reply in call:
                last = reply
                if progress is not None and reply.total_tests:
                    self.work_done_progress.report(token, types.WorkDoneProgressReport(
                        message=reply.message, percentage=int(100 * reply.done_tests / reply.total_tests),
                    ))
        except asyncio.CancelledError:
            # Two causes reach here: grpc.aio raises CancelledError out of a call cancelled on this
            # side (the user pressed cancel on the progress: `call.cancel()` above), and the request's
            # own task is cancelled ($/cancelRequest, shutdown). The first is an answer, the second
            # must propagate so that pygls drops the request.
            call.cancel()
            self._end_tests_progress(token, progress, "cancelled")
            if own_task_cancelled():
                raise
            return {"cancelled": True}
        except grpc.aio.AioRpcError as exc:
            self._end_tests_progress(token, progress, "cancelled" if exc.code() == grpc.StatusCode.CANCELLED else "failed")
            if exc.code() == grpc.StatusCode.CANCELLED:
                return {"cancelled": True}
            return self._tests_error(f"Rotary: no tests for {qualname}: {exc.details()}")
        except grpc.aio.UsageError as exc:
            self._end_tests_progress(token, progress, "failed")
            return self._tests_error(f"Rotary: the worker connection was replaced ({exc})")
        if last is None or not last.done or (progress is not None and progress.cancelled()):
            self._end_tests_progress(token, progress, "cancelled")
            return {"cancelled": True}
        try:
            target = new_test_file_uri(uri, last.file_name)  # beside the source, whatever the worker proposed
        except ValueError as exc:
            self._end_tests_progress(token, progress, "failed")
            return self._tests_error(f"Rotary: no test file for {qualname}: {exc}")
        edit = types.WorkspaceEdit(document_changes=[
            types.CreateFile(uri=target, options=types.CreateFileOptions(overwrite=False, ignore_if_exists=False)),
            types.TextDocumentEdit(
                text_document=types.OptionalVersionedTextDocumentIdentifier(uri=target, version=None),
                edits=[types.TextEdit(range=types.Range(start=types.Position(0, 0), end=types.Position(0, 0)), new_text=last.file_text)],
            ),
        ])
        applied = await self.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit=edit, label=f"Unit tests for {qualname}"))
        self._end_tests_progress(token, progress, last.message)
        if not applied.applied:
            return self._tests_error(f"Rotary: the editor did not create {target}: {applied.failure_reason or 'refused'}")
        caps = getattr(self.protocol, "client_capabilities", None)
        if caps and caps.window and caps.window.show_document and caps.window.show_document.support:
            try:
                await self.window_show_document_async(types.ShowDocumentParams(uri=target, take_focus=True))
            except Exception as exc:  # the file exists either way
                log.info("showDocument failed: %s", exc)
        return {"uri": target, "tests": last.done_tests, "fileName": last.file_name}

    def _tests_error(self, message: str) -> dict:
        log.warning("%s", message)
        self.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=message))
        return {"error": message}

    async def _begin_tests_progress(self, token: str, title: str):
        """A cancellable $/progress, when the client supports it; returns its cancel future (or None)."""
        caps = getattr(self.protocol, "client_capabilities", None)
        if not (caps and caps.window and caps.window.work_done_progress):
            return None
        try:
            await self.work_done_progress.create_async(token)
            self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, cancellable=True, percentage=0))
        except Exception as exc:
            log.debug("progress not shown: %s", exc)
            return None
        return self.work_done_progress.tokens.get(token)

    def _end_tests_progress(self, token: str, progress, message: str) -> None:
        if progress is None:
            return
        try:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        finally:
            self.work_done_progress.tokens.pop(token, None)

    # -- stats ----------------------------------------------------------------

    async def stats(self) -> dict:
        lat = sorted(self.latencies_ms)
        shown = self.counters["shown"]
        out: dict[str, Any] = {
            "daemon": {
                **self.counters,
                "acceptance_rate": round(self.counters["accepted"] / shown, 3) if shown else None,
                "latency_ms_p50": round(lat[len(lat) // 2], 1) if lat else None,
                "open_documents": len(self.sync.docs),
                "skipped_documents": {u: c.skipped_reason for u, c in self.sync.docs.items() if c.skipped_reason},
                # What the daemon holds per document, to check against a reference (rotary bench load, soak kills):
                # its text's length and CRC-32 (of the text as the worker gets it), the worker's version of it
                # and the changes still to send.
                "documents": {
                    u: {
                        "length": len(c.text),
                        "crc32": text_crc32(wire_text(c.text)),
                        "worker_version": c.acked_version,
                        "pending": len(c.pending),
                        "resend": c.resend,
                    }
                    for u, c in self.sync.docs.items()
                },
                "trusted_client": self.trusted,
                "documents_resent": self.sync.reopens,
                "drift_detected": self.sync.drifts,
                "pending_collapsed": self.sync.collapses,
                "settings": asdict(self.settings),
                "position_encoding": self.encoding,
                "last_completion": self.last_completion,
            },
            "worker": {
                **({"pid": self.worker.process.pid} if self.worker.process else {}),
                "state": self.worker.state,
                "message": self.worker.message,
                "restarts": self.worker.restarts,
                "log": str(self.worker.log_path or ""),
                "session": self.worker.session,  # this daemon's documents in the worker are under it
            },
        }
        stub = self.worker.ready_stub()
        if stub is not None:
            out["worker"].update(await worker_stats(stub))
        return out


def own_task_cancelled() -> bool:
    """Whether the running request's own task is being cancelled ($/cancelRequest, shutdown).

    grpc.aio also raises asyncio.CancelledError out of a call that was cancelled under it, as when
    a worker restart closes the channel mid-call; that one must be answered, not propagated (pygls
    would leave the request unanswered, and the editor waiting)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def worker_stats(stub) -> dict:
    """The worker's own stats, or {"stats_error": why} (unreachable, restarted mid-call)."""
    try:
        reply = await stub.Stats(pb.StatsRequest(), timeout=5)
        return json.loads(reply.json)
    except grpc.aio.AioRpcError as exc:
        return {"stats_error": exc.details()}
    except grpc.aio.UsageError as exc:
        return {"stats_error": str(exc)}
    except asyncio.CancelledError:
        if own_task_cancelled():
            raise
        return {"stats_error": "the worker's connection closed during the call (a restart)"}


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}


def _word_start(line: str, column: int) -> int:
    start = column
    while start > 0 and (line[start - 1].isalnum() or line[start - 1] == "_"):
        start -= 1
    return start


def create_server(worker_address: str = "", model: str = "", **options) -> RotaryServer:
    """The language server with its features; `options` go to RotaryServer (shared worker, trust, worker token)."""
    server = RotaryServer(worker_address, model, **options)

    @server.feature(types.INITIALIZE)
    def initialize(ls: RotaryServer, params: types.InitializeParams):
        ls.apply_settings(params.initialization_options)

    @server.feature(types.INITIALIZED)
    def initialized(ls: RotaryServer, params):
        ls.start_worker()

    @server.feature(types.SHUTDOWN)
    async def shutdown(ls: RotaryServer, params):
        if ls.owns_worker:  # a shared worker (LSP over TCP) serves the next session
            await ls.worker.stop()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: RotaryServer, params: types.DidChangeConfigurationParams):
        settings = params.settings
        if isinstance(settings, dict) and "rotary" in settings:
            settings = settings["rotary"]
        ls.apply_settings(settings)

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: RotaryServer, params: types.DidOpenTextDocumentParams):
        doc = params.text_document
        ls.sync.opened(doc.uri, doc.version, doc.language_id, doc.text)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: RotaryServer, params: types.DidChangeTextDocumentParams):
        uri = params.text_document.uri
        if ls.opened_copy(uri, "didChange") is None:
            return
        ls.sync.changed(uri, params.text_document.version, params.content_changes, ls.encoding)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    async def did_close(ls: RotaryServer, params: types.DidCloseTextDocumentParams):
        copy = ls.sync.closed(params.text_document.uri)
        if copy is not None and ls.worker.ready_stub() is not None:
            await ls.sync.close_in_worker(copy, ls.worker.ready_stub())

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: RotaryServer, params: types.InlineCompletionParams):
        invoked = params.context is not None and params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        result = await ls.complete(params.text_document.uri, params.position, ls.settings.worker_mode(), invoked)
        if result is None:
            return None
        text, _stats = result
        suggestion_id = uuid.uuid4().hex[:12]
        pos = params.position
        return types.InlineCompletionList(
            items=[
                types.InlineCompletionItem(
                    insert_text=text,
                    range=types.Range(start=pos, end=pos),
                    command=types.Command(
                        title="Rotary: suggestion accepted",
                        command="rotary.suggestionAccepted",
                        arguments=[{"id": suggestion_id, "acceptedLength": len(text), "full": True}],
                    ),
                )
            ]
        )

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", " "]))
    async def completion(ls: RotaryServer, params: types.CompletionParams):
        # No waiting for a loading model here: clients send "Invoked" for ordinary typing too (LSP's
        # CompletionTriggerKind.Invoked covers 24x7 completion), and time the request out.
        result = await ls.complete(params.text_document.uri, params.position, SINGLE_LINE)
        if result is None:
            return types.CompletionList(is_incomplete=True, items=[])
        text, _stats = result
        # Replace the word being typed so clients' prefix filtering keeps the item.
        copy = ls.sync.docs.get(params.text_document.uri)
        if copy is None:  # closed while the worker answered
            return types.CompletionList(is_incomplete=True, items=[])
        offset = offset_at(copy.text, params.position.line, params.position.character, ls.encoding)
        line_start = copy.text.rfind("\n", 0, offset) + 1
        word = copy.text[line_start + _word_start(copy.text[line_start:offset], offset - line_start) : offset]
        word_start = types.Position(params.position.line, position_at(copy.text, offset - len(word), ls.encoding)[1])
        item = types.CompletionItem(
            label=(word + text).strip().split("\n")[0][:80] or text,
            kind=types.CompletionItemKind.Text,
            detail="Rotary",
            filter_text=word + text,
            text_edit=types.TextEdit(range=types.Range(start=word_start, end=params.position), new_text=word + text),
        )
        return types.CompletionList(is_incomplete=True, items=[item])

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.Refactor], resolve_provider=False),
    )
    def code_action(ls: RotaryServer, params: types.CodeActionParams):
        only = params.context.only if params.context else None
        if only and not any(k in ("", types.CodeActionKind.Refactor) for k in only):
            return None
        action = ls.tests_action(params.text_document.uri, params.range.start.line)
        return [action] if action is not None else None

    @server.command(GENERATE_TESTS)
    async def generate_tests_command(ls: RotaryServer, *args):
        info = _first_dict(args)
        uri, qualname = info.get("uri"), info.get("qualname")
        if not isinstance(uri, str) or not isinstance(qualname, str) or not qualname:
            return ls._tests_error("Rotary: rotary.generateTests needs {uri, qualname}")
        count = info.get("count", 0)
        return await ls.generate_tests(uri, qualname, int(count) if isinstance(count, int) else 0)

    @server.command("rotary.stats")
    async def stats_command(ls: RotaryServer, *args):
        return await ls.stats()

    @server.command("rotary.restartWorker")
    async def restart_worker(ls: RotaryServer, *args):
        await ls.worker.restart()
        return {"restarting": True}

    @server.command("rotary.toggle")
    def toggle(ls: RotaryServer, *args):
        ls.settings = replace(ls.settings, enabled=not ls.settings.enabled)
        ls.send_status("ready" if ls.settings.enabled and ls.worker.state == READY else "disabled", "toggled")
        return {"enabled": ls.settings.enabled}

    @server.command("rotary.suggestionShown")
    def suggestion_shown(ls: RotaryServer, *args):
        info = _first_dict(args)
        ls.counters["shown"] += 1
        ls.counters["shown_chars"] += int(info.get("length", 0) or 0)
        return None

    @server.command("rotary.suggestionAccepted")
    def suggestion_accepted(ls: RotaryServer, *args):
        info = _first_dict(args)
        ls.counters["accepted" if info.get("full", True) else "accepted_partial"] += 1
        ls.counters["accepted_chars"] += int(info.get("acceptedLength", 0) or 0)
        return None

    return server


def _first_dict(args) -> dict:
    """Command arguments arrive as a list (sometimes nested once more by pygls); find the object."""
    for arg in args:
        if isinstance(arg, dict):
            return arg
        if isinstance(arg, (list, tuple)):
            found = _first_dict(arg)
            if found:
                return found
        if hasattr(arg, "__dict__") and not isinstance(arg, type):
            return dict(vars(arg))
    return {}
