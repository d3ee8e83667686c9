"""A real worker service without a model, served in the test process: for tests of security, faults and bad input.

`start_worker()` serves the real WorkerService (documents, acks, errors) behind the real
WorkerInterceptor (token, request parsing) with the real server options, but with a stand-in
engine that completes every request with FAKE_COMPLETION at once. The service says it is ready,
so a daemon connects to it as to a loaded worker. No torch is loaded for any of it.
"""

from __future__ import annotations

import dataclasses
import socket
from concurrent import futures
from dataclasses import dataclass
from types import SimpleNamespace

import grpc

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc import worker_pb2_grpc as pb_grpc
from rotary.completion.rpc.access import WorkerInterceptor, server_credentials
from rotary.completion.service import WorkerService
from rotary.completion.standard_services import add_standard_services

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
    background_refreshed = 0
    scheduler = _Counters()

    def __init__(self):
        self.hang = False
        self.requests = 0
        self.kv_store = FakeStore()
        self.runner = SimpleNamespace(device="cpu", path="fake")

    def complete(self, uri, text, offset, options, is_cancelled=lambda: False):
        self.requests += 1
        while self.hang and not is_cancelled():
            import time

            time.sleep(0.01)
        stats = FakeStats(**{f.name: 0 for f in dataclasses.fields(FakeStats)})
        yield FakeChunk(text="" if is_cancelled() else FAKE_COMPLETION, stop_reason="cancelled" if is_cancelled() else "eos", stats=stats)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(
    port: int | None = None, token: str | None = None, tls: tuple[bytes, bytes] | None = None, service_cls=WorkerService
):
    """Serve a ready, model-less worker on 127.0.0.1; returns (server, service, address).
    `service_cls`: WorkerService or a subclass (a worker that misbehaves on purpose)."""
    service = service_cls()
    service.engine = FakeEngine()
    service.load_message = "ready: fake"
    service.ready.set()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        interceptors=[WorkerInterceptor(token)],
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    add_standard_services(server, False)
    address = f"127.0.0.1:{port or 0}"
    bound = server.add_secure_port(address, server_credentials(*tls)) if tls else server.add_insecure_port(address)
    server.start()
    return server, service, f"127.0.0.1:{bound}"
