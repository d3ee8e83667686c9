"""Sessions sharing a worker never change each other's answers, guesses or room: real workers over
loopback gRPC with the real model, each under a temporary cache folder (snapshots included).

A session's answers are compared with what that session gets alone, on a fresh worker of its own.
Every test here failed on the code before per-session caches, n-gram sources, shares and stream
limits (noted per test)."""

from __future__ import annotations

import json
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rotary.completion.client import WorkerClient
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.access import SESSION_METADATA
from rotary.completion.rpc.launch import rotary_command
from tests.completion.test_grpc_interface import spawn_worker, stop

pytestmark = pytest.mark.model

A, B = "a" * 32, "b" * 32

# A module of about 470 tokens; session A's copy starts with a 7-line header, session B's does not.
# The two differ only far before the cursor (beyond the refresh window of 128 tokens).
BODY = '''import dataclasses
from typing import Any


@dataclasses.dataclass
class Field:
    name: str
    kind: str
    default: Any = None
    required: bool = False

    def describe(self) -> str:
        return f"{self.name}: {self.kind} = {self.default!r}"


class Schema:
    def __init__(self, name: str):
        self.name = name
        self.fields: list[Field] = []

    def add(self, name: str, kind: str, default: Any = None, required: bool = False) -> Field:
        field = Field(name, kind, default, required)
        self.fields.append(field)
        return field

    def required(self) -> list[Field]:
        return [f for f in self.fields if f.required]

    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def validate(self, record: dict) -> list[str]:
        errors = []
        for f in self.required():
            if f.name not in record:
                errors.append(f"missing {f.name}")
        for key in record:
            if key not in self.names():
                errors.append(f"unknown {key}")
        return errors


def build_schema() -> Schema:
    schema = Schema("user")
    schema.add("id", "int", required=True)
    schema.add("email", "str", required=True)
    schema.add("name", "str")
    schema.add("age", "int", default=0)
    schema.add("active", "bool", default=True)
    return schema


def main() -> None:
    schema = build_schema()
    print(schema.validate({"id": 1, "name": "x"}))
    print(schema.names())
    main_field = schema.add("field_main", "str")
    other = schema.add(\''''
HEADER = "".join(f"# header line {i}: imports and notes about module_{i}\n" for i in range(7))

# A line whose completion (on its own) repeats nothing of itself: alone, its n-gram drafter guesses nothing.
GREETING = 'def greet(name):\n    """Say hello."""\n    return "Hello, " + name + "! Welcome to'


@pytest.fixture
def fresh(tmp_path):
    """Start a worker of one's own (a fresh cache folder), ready; stopped at the end of the test."""
    started = []

    def start(*extra: str) -> tuple[WorkerClient, str]:
        folder = tmp_path / f"worker-{len(started)}"
        folder.mkdir()
        proc, address = spawn_worker(folder, *extra)
        client = WorkerClient(address)
        started.append((proc, client))
        client.wait_ready(timeout=300)
        return client, address

    yield start
    for proc, client in started:
        client.close()
        stop(proc)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One worker for the tests that need no fresh one (each uses sessions of its own)."""
    proc, address = spawn_worker(tmp_path_factory.mktemp("shared"))
    client = WorkerClient(address)
    try:
        client.wait_ready(timeout=300)
        yield client, address
    finally:
        client.close()
        stop(proc)


def as_session(session: str) -> list[tuple[str, str]]:
    return [(SESSION_METADATA, session)] if session else []


def open_doc(stub, session: str, uri: str, text: str, version: int = 1) -> pb.DocumentAck:
    return stub.OpenDocument(
        pb.OpenDocumentRequest(uri=uri, version=version, language_id="python", text=text), metadata=as_session(session)
    )


def complete(stub, session: str, uri: str, text: str, max_tokens: int = 24) -> tuple[str, pb.CompletionStats]:
    """Open (or reopen) `text` at `uri` in the session and complete at its end (single line, edit-aware cache)."""
    open_doc(stub, session, uri, text)
    request = pb.CompleteRequest(
        uri=uri, version=1, offset=len(text),
        options=pb.CompleteOptions(max_tokens=max_tokens, mode=pb.COMPLETION_MODE_SINGLE_LINE, abstain_threshold=0.0),
    )
    chunks = list(stub.Complete(request, metadata=as_session(session), timeout=300))
    assert chunks[-1].done
    return "".join(c.text for c in chunks), chunks[-1].stats


def complete_text(stub, session: str, text: str, cache_key: str) -> tuple[str, pb.CompletionStats]:
    request = pb.CompleteTextRequest(
        text=text, offset=len(text), language_id="python", cache_key=cache_key,
        options=pb.CompleteOptions(max_tokens=8, mode=pb.COMPLETION_MODE_SINGLE_LINE, abstain_threshold=0.0),
    )
    chunks = list(stub.CompleteText(request, metadata=as_session(session), timeout=300))
    return "".join(c.text for c in chunks), chunks[-1].stats


def stats(stub, session: str = "") -> dict:
    return json.loads(stub.Stats(pb.StatsRequest(), metadata=as_session(session)).json)


def test_one_uri_in_two_sessions_gives_each_its_own_answers(fresh):
    """B completes its text on a URI where A completed another: B's answer is the one B gets alone, and
    nothing of A's cache is reused. Before the fix the KV cache was per URI: B reused 435 of A's
    tokens, whose K/V carried A's header, and got `other_name = "other_name"` where B alone gets
    `field_other', "str", required=True)`."""
    uri = "file:///shared/schema.py"
    alone, _ = fresh()
    b_alone = complete(alone.stub, B, uri, BODY)
    together, _ = fresh()
    a_first = complete(together.stub, A, uri, HEADER + BODY)
    b_after_a = complete(together.stub, B, uri, BODY)
    assert b_after_a[0] == b_alone[0]
    assert b_after_a[1].tokens_reused == 0 == b_alone[1].tokens_reused
    # Within a session, reuse is as before: A's next completion on its text reuses its own cache.
    a_again = complete(together.stub, A, uri, HEADER + BODY)
    assert a_again[0] == a_first[0] and a_again[1].tokens_reused > 0
    # Closing the URI in B leaves A's cache alone.
    together.stub.CloseDocument(pb.CloseDocumentRequest(uri=uri), metadata=as_session(B))
    assert complete(together.stub, A, uri, HEADER + BODY)[1].tokens_reused > 0


def test_complete_text_cache_keys_are_per_session_and_reserved_uris_are_refused(shared):
    """Session B's CompleteText with A's cache key starts from nothing, and no document call can
    reach a cache key's cache. Before the fix keys were global: B reused A's tokens, and
    CloseDocument("cache-key:k") from anyone dropped A's cache."""
    stub = shared[0].stub
    text = BODY
    complete_text(stub, A, text, "k")
    assert complete_text(stub, A, text, "k")[1].tokens_reused > 0  # A's own key: reused
    assert complete_text(stub, B, text, "k")[1].tokens_reused == 0  # B's "k" is another cache
    for call in (
        lambda: open_doc(stub, B, "cache-key:k", "x = 1\n"),
        lambda: stub.CloseDocument(pb.CloseDocumentRequest(uri="cache-key:k"), metadata=as_session(B)),
        lambda: stub.CloseDocument(pb.CloseDocumentRequest(uri="cache-key:k"), metadata=as_session(A)),
        lambda: stub.EditDocument(pb.EditDocumentRequest(uri="cache-key:k", base_version=1, new_version=2), metadata=as_session(A)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache-key:" in err.value.details()
    assert complete_text(stub, A, text, "k")[1].tokens_reused > 0  # still there


def test_another_sessions_document_gives_no_guesses(fresh):
    """B completes a line whose continuation only A's document contains: B's drafter guesses from B's
    text alone, so B drafts what it drafts alone (nothing). Before the fix the worker's n-gram sources
    held every session's documents and recent completions: B drafted 4 tokens from A's document,
    which told B what A's file contains."""
    alone, _ = fresh()
    text, b_alone = complete(alone.stub, B, "file:///b.py", GREETING, max_tokens=32)
    assert text.strip() and b_alone.tokens_drafted == 0  # the line alone has nothing to guess from
    together, _ = fresh()
    complete(together.stub, A, "file:///a.py", "# notes\n\n" + GREETING + text + "\n", max_tokens=4)
    again, b_after_a = complete(together.stub, B, "file:///b.py", GREETING, max_tokens=32)
    assert again == text
    assert (b_after_a.tokens_drafted, b_after_a.drafts_accepted) == (0, 0)
    # What B's guesses were worth is B's own (A's judged guesses are not shown to B).
    assert stats(together.stub, B)["speculation"]["guesses_judged"] == {}


def test_one_session_cannot_fill_the_worker_for_the_others(shared):
    """A session that opens documents until it is refused is refused at its share, and another session
    still opens its own. Before the fix the bounds were the worker's alone: one session opened all
    10,000 documents the worker holds, and every other session was refused."""
    from rotary.completion.documents import MAX_DOCUMENTS

    stub = shared[0].stub
    greedy, other = "c" * 32, "d" * 32
    opened = 0
    with pytest.raises(grpc.RpcError) as err:
        for opened in range(MAX_DOCUMENTS + 1):
            open_doc(stub, greedy, f"file:///many/{opened}.py", "")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < opened < MAX_DOCUMENTS // 2 and "session's limit" in err.value.details()
    open_doc(stub, other, "file:///many/0.py", "y = 2\n")  # another session opens its own
    stub.CloseDocument(pb.CloseDocumentRequest(uri="file:///many/0.py"), metadata=as_session(other))


def test_rotary_complete_closes_what_it_opens(shared, tmp_path):
    """`rotary complete --worker ADDR` leaves no document open in the worker (its session "" would
    otherwise hold it until the lease). Before the fix it never closed its document."""
    client, address = shared
    path = tmp_path / "one.py"
    path.write_text("def one():\n    return 1\n")
    before = stats(client.stub)["open_documents"]
    done = subprocess.run(
        rotary_command("--log-level", "warning", "complete", str(path), "--line", "2", "--worker", address, "--max-tokens", "4"),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert stats(client.stub)["open_documents"] == before


FOCAL = '''def clamp(value, low, high):
    """Return value limited to the range [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value
'''


def test_streaming_calls_past_the_limit_are_refused_and_health_still_answers(fresh, monkeypatch):
    """With a limit of 2 streaming calls, two long GenerateTests streams in flight make a third
    streaming call RESOURCE_EXHAUSTED (counted), while Health and the standard health check answer;
    once they end, streaming calls are served again. Before the fix there was no limit: the third
    stream was served (and 128 such streams took every gRPC thread, Health's included)."""
    monkeypatch.setenv("ROTARY_MAX_STREAMS", "2")
    client, address = fresh()
    stub = client.stub
    streams = [
        stub.GenerateTests(
            pb.GenerateTestsRequest(path="clamp.py", text=FOCAL, qualname="clamp", count=20, max_tokens=256), timeout=600
        )
        for _ in range(2)
    ]
    for stream in streams:
        assert next(stream).total_tests == 20  # the first reply comes at once: the stream is in flight
    with pytest.raises(grpc.RpcError) as err:
        complete_text(stub, A, "x = ", "")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Health(pb.HealthRequest(), timeout=10).ready
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="rotary.v1.Worker"), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    counted = stats(stub)
    assert (counted["streams_open"], counted["streams_refused"], counted["max_streams"]) == (2, 1, 2)
    for stream in streams:
        stream.cancel()
    deadline = time.monotonic() + 120  # the worker frees a slot when a cancelled stream's handler returns
    while stats(stub)["streams_open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats(stub)["streams_open"] == 0
    complete_text(stub, A, "x = ", "")  # served again


def test_health_has_threads_of_its_own():
    """A worker whose every gRPC thread is held by a stream (here the standard health Watch, with a pool
    of one thread) still answers Health and the standard Check, on the health threads. Before the
    fix every call shared the one pool and Health waited behind the streams (DEADLINE_EXCEEDED)."""
    from rotary.completion.server import make_server
    from rotary.completion.service import WorkerService

    service = WorkerService(model_path="/nonexistent")  # never loaded: Health needs no model
    server, _ = make_server(service, rpc_threads=1)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            next(watch)  # the pool's one thread now streams this
            from rotary.completion.rpc import worker_pb2_grpc as pb_grpc

            assert not pb_grpc.WorkerStub(channel).Health(pb.HealthRequest(), timeout=10).ready
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        server.stop(grace=None)


def test_a_stream_limit_that_is_not_a_positive_number_is_refused_clearly(monkeypatch):
    from rotary.completion.streams import max_streams_setting

    for value in ("many", "0", "-3"):
        monkeypatch.setenv("ROTARY_MAX_STREAMS", value)
        with pytest.raises(SystemExit, match="ROTARY_MAX_STREAMS"):
            max_streams_setting()
    monkeypatch.setenv("ROTARY_MAX_STREAMS", "3")
    assert max_streams_setting() == 3
