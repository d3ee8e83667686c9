"""`rotary lsp --tcp HOST:PORT`: LSP over TCP, one editor at a time, each connection a session of its own.

pygls's own TCP server shares one protocol object across connections: a second
connection takes over the first one's writer, and any disconnect shuts the daemon
down. Here every connection is read by the daemon until its `initialize` (at most
HANDSHAKE_S seconds and HANDSHAKE_MESSAGES messages; a request before it gets
ServerNotInitialized, as over stdio). Then:

- another editor is connected: the request is answered with an error that says so,
  with the same text as a window/showMessage, and the connection is closed. The
  connected editor notices nothing.
- the daemon has an access token and `initializationOptions.accessToken` does not
  match it (compared in constant time): an error, and the connection is closed.
- otherwise the connection becomes the session: a fresh RotaryServer (its own
  protocol, documents and settings) on the daemon's one worker connection, which
  stays warm between sessions. `exit`, a disconnect, or IDLE_S seconds (`--idle-timeout`)
  in which the editor sends nothing while none of its requests is being answered, ends
  the session and closes its documents in the worker; the daemon then waits for the next
  editor. So a client that connects first (any local user, on loopback without a token)
  cannot keep the one slot by saying nothing.

One editor at a time, rather than one session per connection side by side, because
the worker keys documents by URI: two editors with the same file open would
overwrite each other's copy. An editor expects its own server, so a second one is
told plainly to start a daemon on another port (or to use stdio, what editors
normally do). A port scan, or a client that never sends `initialize`, costs a
short-lived task and never touches the session.

A client is trusted with the settings that redirect text or load code
(`workerAddress`, `model`) only when the daemon has a token and the client sent it;
even then a new value applies only once the user allows it (lsp/server.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from typing import Callable

from lsprotocol import types
from pygls.io_ import run_async

from rotary.completion.rpc.access import token_matches

from .server import RotaryServer, create_server
from .worker import WorkerConnection

log = logging.getLogger(__name__)

HANDSHAKE_S = 10.0  # a connection must send initialize within this long
IDLE_S = 300.0  # after initialize, a session that sends nothing this long (and waits for no answer) ends
HANDSHAKE_MESSAGES = 16
MAX_HANDSHAKE_BODY = 1 << 20  # an initialize request is a few KB
TOKEN_OPTION = "accessToken"  # initializationOptions.accessToken
REQUEST_FAILED = -32803  # LSP's RequestFailed
SERVER_NOT_INITIALIZED = -32002


class HandshakeEnded(Exception):
    """The connection closed, timed out or sent something unreadable before initialize."""


class TcpDaemon:
    def __init__(
        self,
        worker_address: str = "",
        model: str = "",
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        worker_token: str | None = None,
        worker_ca: str | None = None,
        idle_s: float = IDLE_S,
    ):
        self.idle_s = idle_s
        self.worker_args = dict(address=worker_address, model=model, token=worker_token, ca_file=worker_ca)
        self.cli = dict(worker_address=worker_address, model=model)
        self.token = token
        self.ssl_context = ssl_context
        self.worker: WorkerConnection | None = None
        self.active: RotaryServer | None = None
        self.sessions = 0
        self.refused = 0

    def run(self, host: str, port: int, on_bound: Callable[[str], None] | None = None) -> None:
        try:
            asyncio.run(self.serve(host, port, on_bound))
        except KeyboardInterrupt:
            pass

    async def serve(self, host: str, port: int, on_bound: Callable[[str], None] | None = None) -> None:
        self.worker = WorkerConnection(**self.worker_args)
        server = await asyncio.start_server(
            self._connection, host, port, ssl=self.ssl_context, ssl_handshake_timeout=HANDSHAKE_S if self.ssl_context else None
        )
        bound = ", ".join(str(sock.getsockname()[:2]) for sock in server.sockets)
        log.info("LSP over TCP%s on %s: one editor at a time", " (TLS)" if self.ssl_context else "", bound)
        if on_bound:
            on_bound(bound)
        try:
            async with server:
                await server.serve_forever()
        finally:
            await self.worker.stop()

    # -- one connection -----------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            request = await asyncio.wait_for(self._until_initialize(reader, writer), HANDSHAKE_S)
        except (HandshakeEnded, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError) as exc:
            log.info("connection from %s closed before initialize (%s)", peer, exc.__class__.__name__)
            await _close(writer)
            return
        if self.active is not None:
            self.refused += 1
            log.warning("refused a second editor from %s: one is connected", peer)
            await self._refuse(writer, request, (
                "Rotary: this daemon (rotary lsp --tcp) already serves an editor, and serves one at a time. "
                "Start another daemon on another port for this editor, or let the editor start `rotary lsp` over stdio."
            ))
            return
        options = request.get("params", {}).get("initializationOptions") if isinstance(request.get("params"), dict) else None
        presented = options.pop(TOKEN_OPTION, None) if isinstance(options, dict) else None
        if self.token and not token_matches(self.token, presented if isinstance(presented, str) else None):
            self.refused += 1
            log.warning("refused an editor from %s: missing or wrong access token", peer)
            await self._refuse(writer, request, (
                "Rotary: missing or wrong access token. Send the daemon's token as initializationOptions.accessToken."
            ))
            return
        await self._session(request, reader, writer, trusted=self.token is not None, peer=peer)

    async def _until_initialize(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
        for _ in range(HANDSHAKE_MESSAGES):
            message = await _read_message(reader)
            method = message.get("method")
            if method == types.INITIALIZE and "id" in message:
                return message
            if method == types.EXIT:
                raise HandshakeEnded("exit")
            if "id" in message and method is not None:
                _write(writer, {"jsonrpc": "2.0", "id": message["id"], "error": {
                    "code": SERVER_NOT_INITIALIZED, "message": f"{method}: the server is not initialized yet (send initialize first)"}})
                await writer.drain()
        raise HandshakeEnded("too many messages before initialize")

    async def _refuse(self, writer: asyncio.StreamWriter, request: dict, message: str) -> None:
        _write(writer, {"jsonrpc": "2.0", "method": types.WINDOW_SHOW_MESSAGE,
                        "params": {"type": types.MessageType.Error.value, "message": message}})
        _write(writer, {"jsonrpc": "2.0", "id": request["id"], "error": {"code": REQUEST_FAILED, "message": message}})
        await _close(writer)

    async def _session(self, request: dict, reader, writer, trusted: bool, peer) -> None:
        self.sessions += 1
        server = create_server(self.cli["worker_address"], self.cli["model"], worker=self.worker, trusted=trusted)
        self.active = server
        log.info("session %d: editor at %s%s", self.sessions, peer, " (token: trusted with settings)" if trusted else "")
        protocol = server.protocol
        protocol.set_writer(writer)
        stop = threading.Event()

        def end_session() -> None:
            stop.set()
            writer.close()

        protocol.end_session = end_session
        activity = asyncio.Event()
        watch = asyncio.ensure_future(self._end_when_idle(protocol, activity, end_session))
        try:
            protocol.handle_message(json.loads(json.dumps(request), object_hook=protocol.structure_message))
            await run_async(
                stop_event=stop, reader=_ActivityReader(reader, activity), protocol=protocol, logger=log,
                error_handler=server.report_server_error,
            )
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("session %d: connection lost (%s)", self.sessions, exc.__class__.__name__)
        finally:
            watch.cancel()
            await self._end(server)
            await _close(writer)
            log.info("session %d ended; waiting for the next editor", self.sessions)

    async def _end_when_idle(self, protocol, activity: asyncio.Event, end_session: Callable[[], None]) -> None:
        """End the session after idle_s seconds in which the editor sent nothing and none of its
        requests was being answered (a long test generation is not idleness)."""
        while True:
            try:
                await asyncio.wait_for(activity.wait(), self.idle_s)
                activity.clear()
            except asyncio.TimeoutError:
                if protocol.answering:
                    continue
                log.warning("session %d: the editor sent nothing for %g s; closing it to free the slot", self.sessions, self.idle_s)
                end_session()
                return

    async def _end(self, server: RotaryServer) -> None:
        """The editor is gone: stop its requests and its questions, close its documents in the worker, free the slot."""
        for call in list(server.completions.calls.values()):
            call.cancel()
        server.start_when_confirmed = False  # a question left unanswered changes nothing, starts nothing
        for question in list(server.confirming.values()):
            question.cancel()
        stub = self.worker.ready_stub()
        for uri in list(server.sync.docs):
            copy = server.sync.closed(uri)
            if stub is not None and copy is not None and copy.acked_version is not None:
                await server.sync.close_in_worker(copy, stub)
        self.worker.on_state = lambda state, message: None
        self.worker.on_restart = lambda: None
        if self.active is server:
            self.active = None


async def _read_message(reader: asyncio.StreamReader) -> dict:
    length = None
    while True:
        line = await reader.readline()
        if not line:
            raise HandshakeEnded("closed")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None or not 0 < length <= MAX_HANDSHAKE_BODY:
        raise HandshakeEnded(f"bad Content-Length {length}")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise HandshakeEnded("not a JSON-RPC message")
    return message


class _ActivityReader:
    """The connection's reader, telling `activity` whenever the editor sent something."""

    def __init__(self, reader: asyncio.StreamReader, activity: asyncio.Event):
        self.reader, self.activity = reader, activity

    async def readline(self) -> bytes:
        line = await self.reader.readline()
        self.activity.set()
        return line

    async def readexactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.activity.set()
        return data


def _write(writer: asyncio.StreamWriter, payload: dict) -> None:
    body = json.dumps(payload).encode()
    writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)
    except (ConnectionError, asyncio.TimeoutError, ssl.SSLError, RuntimeError):
        pass
