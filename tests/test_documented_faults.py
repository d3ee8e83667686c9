"""docs/RELIABILITY.md "Faults", number by number: the backoff cap, every deadline's value, and what an
exception in a completion gets. No model: the daemon's real code (RotaryServer, WorkerConnection,
DocumentSync) in this process against the real worker service on a fake engine (tests/fakes.py).

The oracle is the documented table, written out here (DOCUMENTED_DEADLINES_S, DOCUMENTED_BACKOFF_S),
not the constants of lsp/: a change of a value in the code fails these tests until the document says
the same. Checked by mutation (by hand, then put back): with `MAX_BACKOFF_S = 60` in lsp/worker.py,
Health's `timeout=5`, or the completion's `except Exception` narrowed in lsp/completion.py, they fail.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from lsprotocol import types
from rotary.lsp.server import RotaryServer
from rotary.lsp.worker import ERROR, READY, WorkerConnection

from tests.fakes import FakeEngine, start_worker, until

URI = "file:///documented_fault.py"

# docs/RELIABILITY.md, Faults, "a hung worker": every gRPC call of the daemon has a deadline (seconds).
DOCUMENTED_DEADLINES_S = {"Complete": 60, "OpenDocument": 30, "EditDocument": 10, "CloseDocument": 5, "Stats": 5, "Health": 2}
# docs/RELIABILITY.md, Faults, "worker unreachable or erroring": starts back off 1, 2, 4 ... 30 s.
DOCUMENTED_BACKOFF_S = [1, 2, 4, 8, 16, 30, 30, 30]


class NullWriter:
    """The editor's side of the daemon's output: everything it would have shown is kept here."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class RecordingStub:
    """The daemon's real stub, with each call's `timeout` written down by method name."""

    def __init__(self, stub, timeouts: dict[str, set]):
        self._stub, self._timeouts = stub, timeouts

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            self._timeouts.setdefault(name, set()).add(kwargs.get("timeout"))
            return method(*args, **kwargs)

        return call


class RecordingConnection(WorkerConnection):
    """The real WorkerConnection; the stub it opens records the deadlines of every call through it."""

    def __init__(self, address: str, timeouts: dict[str, set]):
        super().__init__(address)
        self.timeouts = timeouts

    async def _open_channel(self, address: str) -> None:
        await super()._open_channel(address)
        self.stub = RecordingStub(self.stub, self.timeouts)


def new_server(worker: WorkerConnection) -> tuple[RotaryServer, NullWriter]:
    server = RotaryServer(worker.external_address, worker=worker)
    writer = NullWriter()
    server.protocol.set_writer(writer)
    server.settings = server.settings.__class__(workerAddress=worker.external_address, debounceMs=0)
    return server, writer


def test_every_grpc_call_of_the_daemon_has_its_documented_deadline():
    """Open, edit, complete, read the stats, close and watch the worker's health through the daemon's
    own code; each call's deadline is the documented one (the client's `timeout`, not a measured time)."""
    worker_server, _service, address = start_worker()
    timeouts: dict[str, set] = {}

    async def run():
        server, _ = new_server(RecordingConnection(address, timeouts))
        server.worker.start()
        assert await until(lambda: server.worker.state == READY)
        server.sync.opened(URI, 1, "python", "def f():\n    ")
        assert await server.complete(URI, types.Position(1, 4), "auto") is not None  # OpenDocument, Complete
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(1, 4), end=types.Position(1, 4)), text="x = 1\n    "
        )
        server.sync.changed(URI, 2, [change], "utf-16")
        assert await server.complete(URI, types.Position(2, 4), "auto") is not None  # EditDocument, Complete
        await server.stats()  # Stats
        copy = server.sync.closed(URI)
        await server.sync.close_in_worker(copy, server.worker.stub)  # CloseDocument
        assert await until(lambda: len(timeouts.get("Health", ())) >= 1)  # the watcher's Health
        await server.worker.stop()

    try:
        asyncio.run(run())
    finally:
        worker_server.stop(0)
    assert {name: timeouts.get(name) for name in DOCUMENTED_DEADLINES_S} == {
        name: {seconds} for name, seconds in DOCUMENTED_DEADLINES_S.items()
    }


def test_an_unreachable_worker_is_retried_with_a_backoff_capped_at_30_s():
    """An external worker that is never there: the daemon retries for ever (it recovers by itself when the
    worker comes back, tests/test_faults.py), each wait doubling from 1 s up to the documented cap. The
    waits are read as the supervisor asks for them, not waited, and the status says each one."""
    delays, messages = [], []

    class Unreachable(WorkerConnection):
        async def _back_off(self, delay: float) -> None:
            delays.append(delay)
            messages.append((self.state, self.message))

    async def run():
        conn = Unreachable("unix:/nonexistent-rotary-test/worker.sock")
        conn.connect_timeout_s = 0  # the first refused Health call makes the start fail
        conn.start()
        assert await until(lambda: len(delays) >= len(DOCUMENTED_BACKOFF_S))
        await conn.stop()

    asyncio.run(run())
    assert delays[: len(DOCUMENTED_BACKOFF_S)] == DOCUMENTED_BACKOFF_S
    assert all(s == ERROR and f"retrying in {d:.0f} s" in m for d, (s, m) in zip(delays, messages))


class FailingEngine(FakeEngine):
    """An engine that raises in the middle of a completion (a bug in the worker)."""

    def complete(self, *args, **kwargs):
        raise RuntimeError("a bug in the engine")
        yield  # a generator, as the engine's complete is


@pytest.mark.parametrize("where", ["worker", "daemon"])
def test_an_exception_in_a_completion_is_logged_and_gives_no_suggestion_and_no_dialog(where, caplog):
    """docs/RELIABILITY.md: an exception in a completion (in the worker, or in the daemon while it sends the
    document and reads the answer) is logged, the editor gets no suggestion and no dialog, and the next
    completion works."""
    worker_server, service, address = start_worker()
    if where == "worker":
        service.engine = FailingEngine()

    async def run():
        server, writer = new_server(WorkerConnection(address))
        server.worker.start()
        assert await until(lambda: server.worker.state == READY)
        server.sync.opened(URI, 1, "python", "def f():\n    ")
        flush = server.sync.flush
        if where == "daemon":
            async def broken_flush(uri, stub):
                raise ValueError("a bug in the daemon")

            server.sync.flush = broken_flush
        with caplog.at_level(logging.ERROR, logger="rotary.lsp.server"):
            result = await server.complete(URI, types.Position(1, 4), "auto")
        service.engine, server.sync.flush = FakeEngine(), flush
        again = await server.complete(URI, types.Position(1, 4), "auto")
        counters = dict(server.counters)
        await server.worker.stop()
        return result, again, counters, writer.data

    try:
        result, again, counters, shown = asyncio.run(run())
    finally:
        worker_server.stop(0)
    assert result is None and counters["errors"] == 1
    assert again is not None  # the daemon goes on
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged and ("bug in the daemon" in caplog.text if where == "daemon" else "completion failed" in caplog.text)
    assert b"window/showMessage" not in shown and b"window/showMessageRequest" not in shown  # no dialog
