"""Rotary's language server: the editor's side of the service (pygls 2, no torch).

It tracks every edit (incremental sync), answers textDocument/inlineCompletion
(ghost text) and textDocument/completion, debounces per document and cancels
the previous request of a document down to the worker, reports the worker's
model loading as $/progress, and sends `rotary/status` notifications that
editors show in a status bar.

This module puts the daemon together and owns its settings; each job lives in its own module:
  protocol.py        JSON-RPC and LSP errors, position encoding, the requests not answered yet
  sync.py            the one copy of each open document and the diffs the worker still needs
  completion.py      a completion request's lifecycle: debounce, supersede, flush, stream, error mapping
  status.py          `rotary/status` and the worker start's $/progress
  tests_command.py   the "Generate unit tests" code action and command
  worker.py          the connection to the model worker (start, watch, restart)
They do not import this module, nor each other upward: server -> completion -> status -> protocol.

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
import logging
from dataclasses import asdict, replace
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

import rotary
from rotary.completion.rpc.wire import SINGLE_LINE, text_crc32

from .completion import Completions, completion_list, inline_completion_list
from .positions import UTF8, UTF16
from .protocol import RotaryProtocol, client_window, report_protocol_error
from .settings import Settings, parse_settings
from .status import Status
from .sync import DocumentSync, wire_text
from .tests_command import GENERATE_TESTS, TestsCommand
from .worker import READY, STOPPED, WorkerConnection, worker_stats

log = logging.getLogger(__name__)

# Settings that send the documents' text somewhere or load code: from the command line, or from a
# trusted client once the user allowed them (window/showMessageRequest); always logged.
REDIRECTING_SETTINGS = ("workerAddress", "model")
ALLOW, DENY = "Allow", "Deny"
CLI_FLAGS = {"workerAddress": "rotary lsp --worker ADDR", "model": "rotary lsp --model PATH"}


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
        self.status = Status(self, enabled=lambda: self.settings.enabled)
        self.completions = Completions(self.sync, worker, self.status, settings=lambda: self.settings, encoding=lambda: self.encoding)
        self.tests = TestsCommand(self, self.sync, worker)
        worker.on_state = self.status.worker_changed
        worker.on_restart = self.sync.worker_restarted

    @property
    def encoding(self) -> str:
        """The position encoding negotiated at initialize (pygls's workspace keeps it; it holds no document)."""
        enc = self.workspace.position_encoding if self.protocol._workspace else None
        return UTF8 if enc == types.PositionEncodingKind.Utf8 else "utf-32" if enc == types.PositionEncodingKind.Utf32 else UTF16

    @property
    def counters(self) -> dict[str, int]:
        return self.completions.counters

    async def complete(self, uri: str, position: types.Position, mode: str, invoked: bool = False) -> tuple[str, dict] | None:
        """A completion at `position` (lsp/completion.py): the suggestion and its stats, or None."""
        return await self.completions.complete(uri, position, mode, invoked)

    def report_server_error(self, error: Exception, source) -> None:
        report_protocol_error(self.protocol, error, source)

    # -- settings ---------------------------------------------------------------

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
            window = client_window(self.protocol)
            if not (window and window.show_message):
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
            self.status.send("loading", "waiting for your answer about Rotary's settings")
            return
        self.worker.start()
        if self.worker.state != STOPPED:  # a shared worker already on its way: tell this editor where it stands
            self.status.worker_changed(self.worker.state, self.worker.message)

    # -- stats ----------------------------------------------------------------

    async def stats(self) -> dict:
        lat = sorted(self.completions.latencies_ms)
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
                "last_completion": self.completions.last_completion,
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
        if ls.sync.opened_copy(uri, "didChange") is None:
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
        return None if result is None else inline_completion_list(result[0], params.position)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", " "]))
    async def completion(ls: RotaryServer, params: types.CompletionParams):
        # No waiting for a loading model here: clients send "Invoked" for ordinary typing too (LSP's
        # CompletionTriggerKind.Invoked covers 24x7 completion), and time the request out.
        result = await ls.complete(params.text_document.uri, params.position, SINGLE_LINE)
        copy = ls.sync.docs.get(params.text_document.uri)
        if result is None or copy is None:
            return types.CompletionList(is_incomplete=True, items=[])
        return completion_list(copy.text, params.position, result[0], ls.encoding)

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.Refactor], resolve_provider=False),
    )
    def code_action(ls: RotaryServer, params: types.CodeActionParams):
        only = params.context.only if params.context else None
        if only and not any(k in ("", types.CodeActionKind.Refactor) for k in only):
            return None
        action = ls.tests.action(params.text_document.uri, params.range.start.line)
        return [action] if action is not None else None

    @server.command(GENERATE_TESTS)
    async def generate_tests_command(ls: RotaryServer, *args):
        info = _first_dict(args)
        uri, qualname = info.get("uri"), info.get("qualname")
        if not isinstance(uri, str) or not isinstance(qualname, str) or not qualname:
            return ls.tests.failed("Rotary: rotary.generateTests needs {uri, qualname}")
        count = info.get("count", 0)
        return await ls.tests.generate(uri, qualname, int(count) if isinstance(count, int) else 0)

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
        ls.status.send("ready" if ls.settings.enabled and ls.worker.state == READY else "disabled", "toggled")
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
