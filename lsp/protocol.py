"""The daemon's JSON-RPC and LSP protocol layer (pygls 2): bad input gets an answer, never silence.

A body that is not JSON gets a parse error (-32700), a request whose params do not fit its method
gets invalid params (-32602) with its id, a request before `initialize` gets ServerNotInitialized
(-32002), an unknown method MethodNotFound, and an unknown command an error that lists Rotary's
commands. It prefers UTF-8 positions when the client offers them, keeps the ids of the requests not
answered yet (LSP over TCP: a session is idle only when it waits for nothing), and hands the
document notifications to Rotary's features without pygls's workspace, so that the daemon's own
copy (lsp/sync.py) is the only one and nothing is ever read from disk.

It knows nothing of completions, settings or the worker: lsp/server.py registers those features.
"""

from __future__ import annotations

import logging

from lsprotocol import types
from pygls.exceptions import (
    FeatureRequestError,
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

log = logging.getLogger(__name__)


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


def report_protocol_error(protocol: RotaryProtocol, error: Exception, source) -> None:
    """pygls's error handler: a body that is not JSON (or not UTF-8) gets a parse error; a feature's
    error was already answered; anything else is logged, never shown (a keystroke raises no dialog)."""
    if source is JsonRpcException and isinstance(error, ValueError):  # from the reader: not JSON, or not UTF-8
        protocol.send_error(None, JsonRpcParseError(f"Parse error: {str(error)[:200]}"))
        return
    if source is FeatureRequestError:
        return
    log.error("%s", error)


def client_window(protocol: LanguageServerProtocol) -> types.WindowClientCapabilities | None:
    """The client's window capabilities (messages, $/progress, showDocument); None before initialize."""
    capabilities = getattr(protocol, "client_capabilities", None)
    return capabilities.window if capabilities else None
