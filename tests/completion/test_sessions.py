"""Daemons sharing one worker: each session (one daemon) keeps its own copy of a URI, and the
documents of a session that stops calling are dropped after the lease. A real worker over loopback
gRPC; the last test drives two real daemons over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import grpc
import pytest

from rotary.completion.client import WorkerClient
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.access import SESSION_METADATA
from tests.conftest import spawn_worker

pytestmark = pytest.mark.model

LEASE_S = 3


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc, address = spawn_worker(tmp_path_factory.mktemp("sessions-worker"), "--session-lease", str(LEASE_S))
    client = WorkerClient(address)
    try:
        client.wait_ready(timeout=300)
        yield client, address
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)


def as_session(session: str) -> list[tuple[str, str]]:
    return [(SESSION_METADATA, session)] if session else []


def open_doc(stub, session: str, uri: str, text: str) -> pb.DocumentAck:
    return stub.OpenDocument(pb.OpenDocumentRequest(uri=uri, version=1, language_id="python", text=text), metadata=as_session(session))


def held(stub, session: str, uri: str, version: int) -> pb.DocumentAck:
    """The session's copy, as length and CRC-32 (an edit with no changes changes nothing)."""
    return stub.EditDocument(pb.EditDocumentRequest(uri=uri, base_version=version, new_version=version), metadata=as_session(session))


def complete(stub, session: str, uri: str, version: int, offset: int) -> str:
    request = pb.CompleteRequest(
        uri=uri, version=version, offset=offset,
        options=pb.CompleteOptions(max_tokens=16, mode=pb.COMPLETION_MODE_SINGLE_LINE, abstain_threshold=0.0),
    )
    return "".join(chunk.text for chunk in stub.Complete(request, metadata=as_session(session), timeout=120))


def complete_text(stub, text: str) -> str:
    """The same completion from the text alone (no document, no cache): what the session's copy should give."""
    request = pb.CompleteTextRequest(
        text=text, offset=len(text), language_id="python",
        options=pb.CompleteOptions(max_tokens=16, mode=pb.COMPLETION_MODE_SINGLE_LINE, abstain_threshold=0.0),
    )
    return "".join(chunk.text for chunk in stub.CompleteText(request, timeout=120))


def worker_stats(stub, session: str = "") -> dict:
    return json.loads(stub.Stats(pb.StatsRequest(), metadata=as_session(session)).json)


@contextlib.contextmanager
def polling(stub, *sessions: str):
    """Call Health for the sessions every 0.5 s, as their daemons would: a slow completion on a busy
    machine must not outlast the short lease of this module's worker."""
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            for session in sessions:
                stub.Health(pb.HealthRequest(), metadata=as_session(session), timeout=10)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_two_sessions_open_one_uri_with_different_texts(worker):
    client, _ = worker
    with polling(client.stub, "a" * 32, "b" * 32):
        check_two_sessions_open_one_uri_with_different_texts(client.stub)


def check_two_sessions_open_one_uri_with_different_texts(stub):
    uri = "file:///shared/name.py"
    text_a = "def add(a, b):\n    return a +"
    text_b = "import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        return"
    open_doc(stub, "a" * 32, uri, text_a)
    open_doc(stub, "b" * 32, uri, text_b)
    # Each session completes on its own text, as a request carrying that text would.
    assert complete(stub, "a" * 32, uri, 1, len(text_a)) == complete_text(stub, text_a)
    assert complete(stub, "b" * 32, uri, 1, len(text_b)) == complete_text(stub, text_b)
    # An edit in one session leaves the other's copy alone.
    stub.EditDocument(
        pb.EditDocumentRequest(uri=uri, base_version=1, new_version=2, changes=[pb.TextChange(start=4, end=7, text="plus")]),
        metadata=as_session("a" * 32),
    )
    assert held(stub, "b" * 32, uri, 1).length == len(text_b)
    assert held(stub, "a" * 32, uri, 2).length == len(text_a) + 1
    # Closing it in one session keeps it open in the other.
    stub.CloseDocument(pb.CloseDocumentRequest(uri=uri), metadata=as_session("b" * 32))
    with pytest.raises(grpc.RpcError) as err:
        held(stub, "b" * 32, uri, 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    text_a2 = "def plus(a, b):\n    return a +"
    assert complete(stub, "a" * 32, uri, 2, len(text_a2)) == complete_text(stub, text_a2)
    stub.CloseDocument(pb.CloseDocumentRequest(uri=uri), metadata=as_session("a" * 32))


def test_a_silent_session_loses_its_documents_after_the_lease(worker):
    client, _ = worker
    stub = client.stub
    silent, alive = "c" * 32, "d" * 32
    open_doc(stub, silent, "file:///silent.py", "x = 1\n")
    open_doc(stub, alive, "file:///alive.py", "y = 2\n")
    open_doc(stub, "", "file:///no-session.py", "z = 3\n")  # a client naming no session: the same lease
    before = worker_stats(stub, alive)
    # The alive session calls as a daemon does (Health every 2 s; here more often) until the worker has
    # expired the two silent ones' documents: the counter, not the clock, says when the lease ran out.
    # The 120 s: a guard against a worker that never expires them.
    deadline = time.monotonic() + 120
    while (after := worker_stats(stub, alive))["documents_expired"] < before["documents_expired"] + 2:
        assert time.monotonic() < deadline, after
        stub.Health(pb.HealthRequest(), metadata=as_session(alive))
        time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as err:
        held(stub, silent, "file:///silent.py", 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert held(stub, alive, "file:///alive.py", 1).length == 6
    after = worker_stats(stub, alive)
    # The sessionless client (a `rotary complete` or a script that never closed its file) went silent
    # too: its document is gone, as the silent daemon's. (Asked with a session: a sessionless call
    # would start the session "" again.)
    assert after["sessions_expired"] > before["sessions_expired"]  # the earlier test's silent sessions count too
    assert after["documents_expired"] == before["documents_expired"] + 2
    with pytest.raises(grpc.RpcError) as err:
        held(stub, "", "file:///no-session.py", 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_two_daemons_sharing_a_worker_keep_their_own_text(worker):
    """Two real daemons (`rotary lsp --worker ADDR`) open one URI with different texts and type into it."""
    from rotary.bench.harness import Editor, check_texts

    _, address = worker

    async def run() -> list[dict]:
        channel = grpc.aio.insecure_channel(address)
        from rotary.completion.rpc import worker_pb2_grpc as pb_grpc

        stub = pb_grpc.WorkerStub(channel)
        editors = [Editor(f"s{i}", ["--worker", address], {"debounceMs": 0}) for i in range(2)]
        uri = "file:///shared/two-daemons.py"
        texts = ["def first():\n    return 1\n", "class Second:\n    pass\n"]
        try:
            await asyncio.gather(*(e.start() for e in editors))
            await asyncio.gather(*(e.wait_ready() for e in editors))
            for editor, text in zip(editors, texts):
                editor.open(uri, text)
            for step in range(3):
                for i, editor in enumerate(editors):
                    texts[i] = editor.change(uri, texts[i], len(texts[i]), len(texts[i]), f"# {editor.name} {step}\n")
                    await editor.complete(uri, texts[i], len(texts[i]))  # flushes the edits to the worker
            sessions = {(await e.stats())["worker"]["session"] for e in editors}
            assert len(sessions) == 2
            return [await check_texts(e, uri, t, stub) for e, t in zip(editors, texts)]
        finally:
            await asyncio.gather(*(e.stop() for e in editors))
            await channel.close()

    for check in asyncio.run(run()):
        assert check["daemon_ok"] and check["worker_ok"], check
