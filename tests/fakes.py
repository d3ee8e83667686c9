"""A real worker service without a model, served in the test process: for tests of security, faults and bad input.

`start_worker()` serves the real WorkerService (documents, acks, errors) on the real server
(server.make_server: its interceptors for the token, request parsing and call limits, its options), but with a stand-in
engine that completes every request with FAKE_COMPLETION at once. The service says it is ready,
so a daemon connects to it as to a loaded worker. No torch is loaded for any of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from types import SimpleNamespace


from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.access import server_credentials
from rotary.completion.server import make_server
from rotary.completion.service import WorkerService

FAKE_COMPLETION = "return 42"
FakeStats = dataclasses.make_dataclass("FakeStats", [(f.name, float, 0) for f in pb.CompletionStats.DESCRIPTOR.fields])


@dataclass
class FakeChunk:
    text: str
    done: bool = True
    stop_reason: str = "eos"
    stats: object = None


class FakeStore:
    budget_bytes = 0
    counters: dict = {}

    def drop(self, uri: str) -> None:
        pass

    def forget(self, uri: str) -> None:
        pass

    def items(self) -> list:
        return []

    def total_bytes(self) -> int:
        return 0

    def stale_tokens(self) -> int:
        return 0

    def __len__(self) -> int:
        return 0


class _Zero(int):
    def __call__(self, *args, **kwargs) -> int:
        return 0


class _Counters:
    """Whatever the service reads from the engine's scheduler (depths, counts, times): zero."""

    def __getattr__(self, name: str) -> _Zero:
        return _Zero(0)


class FakeEngine:
    """Completes every request with FAKE_COMPLETION; `hang` makes it wait until cancelled instead."""

    edit_aware_supported = True
    scheduler = _Counters()
    kv_manager = _Counters()
    steps = _Counters()

    def __init__(self):
        self.hang = False
        self.requests = 0  # calls that reached the engine
        self.cancelled = 0  # of those, the ones that ended cancelled (by their caller)
        self.kv_store = FakeStore()
        self.runner = SimpleNamespace(device="cpu", path="fake")

    def forget_session(self, session: str) -> None:
        pass

    def complete(self, uri, text, offset, options, is_cancelled=lambda: False, session=""):
        self.requests += 1
        while self.hang and not is_cancelled():
            import time

            time.sleep(0.01)
        stats = FakeStats(**{f.name: 0 for f in dataclasses.fields(FakeStats)})
        self.cancelled += bool(is_cancelled())
        yield FakeChunk(text="" if is_cancelled() else FAKE_COMPLETION, stop_reason="cancelled" if is_cancelled() else "eos", stats=stats)


def start_worker(
    listen: str = "127.0.0.1:0", token: str | None = None, tls: tuple[bytes, bytes] | None = None, service_cls=WorkerService
):
    """Serve a ready, model-less worker; returns (server, service, address).
    `listen`: where, by default a loopback port the OS picks (the address returned names it), or
    `unix:PATH`. `service_cls`: WorkerService or a subclass (a worker that misbehaves on purpose)."""
    service = service_cls()
    service.engine = FakeEngine()
    service.load_message = "ready: fake"
    service.ready.set()
    server, _ = make_server(service, token, reflection=False, rpc_threads=16)
    bound = server.add_secure_port(listen, server_credentials(*tls)) if tls else server.add_insecure_port(listen)
    server.start()
    return server, service, listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{bound}"


async def until(predicate, timeout: float = 30.0) -> bool:
    """Wait (asyncio) until `predicate()` holds; False if it still does not after `timeout` s (a guard against
    a hang, never a timing check: callers assert the result)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
