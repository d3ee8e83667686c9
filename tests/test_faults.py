"""Faults between the daemon and its worker, without a model: unreachable, failing in a loop, hung, replaced.

Each test drives the daemon's real code (RotaryServer, WorkerConnection, DocumentSync) in this
process against the real worker service without a model (tests/fakes.py).
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import grpc
import pytest
from lsprotocol import types

import rotary.lsp.completion as completion_module
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc import worker_pb2_grpc as pb_grpc
from rotary.completion.rpc.launch import python_command
from rotary.lsp.server import RotaryServer
from rotary.lsp.worker import ERROR, MAX_START_FAILURES, READY, WorkerConnection
from tests.fakes import FAKE_COMPLETION, start_worker, until
from tests.listening import UNREACHABLE, unix_address

ROOT = Path(__file__).resolve().parent.parent
URI = "file:///fault.py"


class NullWriter:
    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def new_server(address: str) -> RotaryServer:
    server = RotaryServer(address)
    server.protocol.set_writer(NullWriter())
    server.settings = server.settings.__class__(workerAddress=address, debounceMs=0)
    return server


def test_the_error_state_retries_with_backoff_and_recovers_by_itself():
    """The worker's address is a unix socket in a folder of the test's own: nothing listens there
    until the test serves the worker on it (no port freed and hoped unused meanwhile)."""

    async def run(address: str):
        conn = WorkerConnection(address)
        conn.backoff_base_s, conn.connect_timeout_s = 0.05, 0.3
        states = []
        conn.on_state = lambda state, message: states.append((state, message))
        conn.start()
        assert await until(lambda: conn.failures >= 2)
        errors = [m for s, m in states if s == ERROR]
        assert errors and all("retrying in" in m for m in errors) and conn.ready_stub() is None
        server, _, _ = start_worker(address)  # the worker comes back: the daemon finds it without help
        try:
            assert await until(lambda: conn.state == READY)
        finally:
            await conn.stop()
            server.stop(0)

    with unix_address() as address:
        asyncio.run(run(address))


def test_starts_that_fail_in_a_loop_back_off_then_stop_with_a_clear_status():
    """lsp/worker.py's stated rule: failed starts back off 1, 2, 4, ... s, and after MAX_START_FAILURES
    in a row the daemon stops with a clear status. The delays are read as the supervisor asks for them
    (not measured on the wall clock, which a loaded machine stretches) and not waited."""
    attempts, delays = [], []

    class CrashingWorker(WorkerConnection):
        async def _launch(self) -> str:  # a worker process that dies while loading, every time
            attempts.append(len(delays))
            self.process = await asyncio.create_subprocess_exec(*python_command("-c", "import sys; sys.exit(3)"))
            return f"unix:/nonexistent-{id(self)}/worker.sock"

        async def _back_off(self, delay: float) -> None:
            delays.append(delay)

    async def run():
        conn = CrashingWorker()
        conn.start()
        assert await until(lambda: conn._supervisor.done(), timeout=60)
        state, message = conn.state, conn.message
        await conn.stop()
        return state, message

    state, message = asyncio.run(run())
    assert attempts == list(range(MAX_START_FAILURES))  # one start after each back-off, none without
    assert state == ERROR and f"failed {MAX_START_FAILURES} times in a row" in message and "rotary.restartWorker" in message
    assert "exited with code 3" in message
    assert delays == [1.0, 2.0, 4.0, 8.0][: MAX_START_FAILURES - 1]


def test_every_grpc_call_of_the_daemon_has_a_deadline():
    rpcs = set(pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name)
    missing = []
    for path in (ROOT / "lsp").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in rpcs:
                if not any(kw.arg == "timeout" for kw in node.keywords):
                    missing.append(f"{path.name}:{node.lineno} {node.func.attr}")
    assert not missing, missing


def test_a_hung_worker_gives_no_suggestion_within_the_deadline_then_serves_again(monkeypatch):
    import rotary.completion.engine  # noqa: F401  the worker imports it on its first Complete: not within the deadline

    monkeypatch.setattr(completion_module, "COMPLETION_TIMEOUT_S", 0.5)
    worker_server, service, address = start_worker()

    async def run():
        server = new_server(address)
        server.worker.start()
        assert await until(lambda: server.worker.state == READY)
        server.sync.opened(URI, 1, "python", "def f():\n    ")
        service.engine.hang = True  # until the call is cancelled: only the daemon's deadline ends it
        # The 60 s: a guard against a hang (no deadline at all), not a measure of the 0.5 s one.
        hung = await asyncio.wait_for(server.complete(URI, types.Position(1, 4), "auto"), timeout=60)
        assert await until(lambda: service.engine.cancelled == 1)  # the worker saw its call end cancelled
        service.engine.hang = False
        again = await server.complete(URI, types.Position(1, 4), "auto")
        counters = dict(server.counters)
        await server.worker.stop()
        return hung, again, counters

    try:
        hung, again, counters = asyncio.run(run())
    finally:
        worker_server.stop(0)
    assert hung is None and counters["worker_unavailable"] == 1
    assert again is not None and again[0] == FAKE_COMPLETION


def test_a_stale_stub_after_a_restart_is_no_error_for_the_editor():
    worker_server, _service, address = start_worker()

    async def run():
        server = new_server(address)
        server.worker.start()
        assert await until(lambda: server.worker.state == READY)
        server.sync.opened(URI, 1, "python", "x = ")
        closed = grpc.aio.insecure_channel(address)
        await closed.close()
        server.worker.stub = pb_grpc.WorkerStub(closed)  # what a request holding the old stub sees
        result = await server.complete(URI, types.Position(0, 4), "auto")
        report = await server.stats()
        await server.worker.stop()
        return result, dict(server.counters), report

    try:
        result, counters, report = asyncio.run(run())
    finally:
        worker_server.stop(0)
    assert result is None and counters["worker_unavailable"] == 1 and counters["errors"] == 0
    assert "Channel is closed" in report["worker"]["stats_error"]


def test_an_edit_that_times_out_but_landed_is_resent_not_applied_twice():
    """A lost acknowledgement: the worker applied the edit, the daemon saw DEADLINE_EXCEEDED."""
    from rotary.bench.soak import run_sequence

    ops = [("flush",), ("lost_ack",), ("edit", [((0, 1, 0), (0, 1, 0), "b", False)], 1), ("flush",),
           ("edit", [((0, 2, 0), (0, 2, 0), "c", False)], 1)]  # (line, column, past the end) picks
    reference, daemon, worker = asyncio.run(run_sequence("a", "utf-16", ops))
    assert reference == daemon == worker == "abc"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_an_unreachable_worker_during_a_completion_wakes_the_watcher(code):
    conn = WorkerConnection(UNREACHABLE)
    conn.report_failure(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"))
    assert conn._wake.is_set()


def test_a_worker_whose_model_thread_is_stuck_in_one_step_is_treated_as_hung():
    """A busy worker keeps finishing steps; a forward that never ends shows in Health's busy_seconds."""
    from types import SimpleNamespace

    worker_server, service, address = start_worker()

    async def run():
        server = new_server(address)
        server.worker.hung_after_s = 3.0
        server.worker.start()
        assert await until(lambda: server.worker.state == READY)
        service.engine.scheduler = SimpleNamespace(queue_depth=1, busy_for=lambda: 3600.0)
        found = await until(lambda: "hung" in (server.worker.last_failure or ""), timeout=15)
        service.engine.scheduler = SimpleNamespace(queue_depth=0, busy_for=lambda: 0.0)
        back = await until(lambda: server.worker.state == READY, timeout=30)
        await server.worker.stop()
        return found, back

    try:
        found, back = asyncio.run(run())
    finally:
        worker_server.stop(0)
    assert found and back
