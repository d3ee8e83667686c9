"""A small synchronous client of the worker, for the CLI and benchmarks (the daemon has its own async one)."""

from __future__ import annotations

import os
import time

import grpc

from .rpc import worker_pb2 as pb
from .rpc import worker_pb2_grpc as pb_grpc
from .rpc.access import WORKER_CA_ENV, WORKER_TOKEN_ENV, sync_worker_channel
from .rpc.wire import AUTO, CACHE_MODE_BY_NAME, COMPLETION_MODE_BY_NAME, EDIT_AWARE


class WorkerClient:
    def __init__(self, address: str, token: str | None = None, ca_file: str | None = None):
        """`token` and `ca_file` (default: $ROTARY_WORKER_TOKEN, $ROTARY_WORKER_CA) reach a worker that needs them;
        one on another machine always does (TLS and a token, see rpc/access.py)."""
        self.address = address
        token = token or os.environ.get(WORKER_TOKEN_ENV) or None
        self.channel = sync_worker_channel(address, token, ca_file or os.environ.get(WORKER_CA_ENV) or None)
        self.stub = pb_grpc.WorkerStub(self.channel)

    def wait_ready(self, timeout: float = 300.0, on_message=None) -> pb.HealthReply:
        """Poll Health until the model is loaded; raise with the worker's message on failure or timeout."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                health = self.stub.Health(pb.HealthRequest(), timeout=5)
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            if health.ready:
                return health
            if health.message != last and on_message:
                on_message(health.message)
            last = health.message
            if health.message.startswith("model failed"):
                raise RuntimeError(health.message)
            time.sleep(0.2)
        raise TimeoutError(f"worker at {self.address} not ready after {timeout:.0f} s (last: {last})")

    def open(self, uri: str, text: str, version: int = 1, language_id: str = "python") -> pb.DocumentAck:
        return self.stub.OpenDocument(pb.OpenDocumentRequest(uri=uri, version=version, language_id=language_id, text=text))

    def edit(self, uri: str, base_version: int, new_version: int, changes: list[tuple[int, int, str]]) -> pb.DocumentAck:
        return self.stub.EditDocument(
            pb.EditDocumentRequest(
                uri=uri,
                base_version=base_version,
                new_version=new_version,
                changes=[pb.TextChange(start=s, end=e, text=t) for s, e, t in changes],
            )
        )

    def close_document(self, uri: str) -> pb.DocumentAck:
        return self.stub.CloseDocument(pb.CloseDocumentRequest(uri=uri))

    def complete(self, uri: str, version: int, offset: int, max_tokens: int = 0, mode: str = AUTO, cache: str = EDIT_AWARE):
        """Return (text, last chunk); `mode` and `cache` are the engine's names (rpc/wire.py)."""
        request = pb.CompleteRequest(
            uri=uri,
            version=version,
            offset=offset,
            options=pb.CompleteOptions(
                max_tokens=max_tokens, mode=COMPLETION_MODE_BY_NAME[mode].wire, cache=CACHE_MODE_BY_NAME[cache].wire
            ),
        )
        parts, last = [], None
        for chunk in self.stub.Complete(request):
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last

    def generate_tests(self, path: str, text: str, qualname: str, **fields):
        """Stream GenerateTestsReply messages (fields: count, max_tokens, drafter, temperature, top_p,
        seed, explain, language_id, request_id; see worker.proto); returns the call's iterator."""
        return self.stub.GenerateTests(pb.GenerateTestsRequest(path=path, text=text, qualname=qualname, **fields))

    def close(self) -> None:
        self.channel.close()
