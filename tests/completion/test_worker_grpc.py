"""The worker over real gRPC on loopback, with the real embedded model."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from rotary.completion.client import WorkerClient
from rotary.completion.rpc import worker_pb2 as pb
from tests.conftest import first_line, greedy_continuation, spawn_worker


@pytest.fixture
def worker(shared_worker):
    """The session's worker (tests/conftest.py): default flags, caches under a temporary directory."""
    return shared_worker


def stats(client: WorkerClient) -> dict:
    return json.loads(client.stub.Stats(pb.StatsRequest()).json)


@pytest.mark.model
def test_open_edit_complete_matches_transformers(worker):
    text = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x"
    worker.open("file:///a.py", text)
    # Rename x to value in the second function with two changes in one edit.
    param = text.index("cube(x)") + len("cube(")
    ack = worker.edit("file:///a.py", 1, 2, [(len(text) - 1, len(text), "value"), (param, param + 1, "value")])
    text = text[:-1] + "value"
    text = text[:param] + "value" + text[param + 1 :]
    assert ack.version == 2 and ack.length == len(text)
    assert "def cube(value):\n    return value" in text
    suggestion, last = worker.complete("file:///a.py", 2, len(text), mode="single_line", max_tokens=32)
    assert last.done and last.stop_reason
    expected = first_line(greedy_continuation(text))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    assert suggestion == expected
    assert last.stats.context_tokens > 0 and last.stats.tokens_generated > 0
    # Completing again at the same place reuses the cached prefix: only the last token is encoded.
    again, last = worker.complete("file:///a.py", 2, len(text), mode="single_line", max_tokens=32)
    assert again == suggestion
    assert last.stats.tokens_encoded == 1 and last.stats.tokens_reused == last.stats.context_tokens - 1


@pytest.mark.model
def test_document_errors_map_to_status_codes(worker):
    worker.open("file:///b.py", "abc", version=5)
    with pytest.raises(grpc.RpcError) as err:
        worker.edit("file:///b.py", 4, 6, [(0, 0, "x")])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        worker.edit("file:///never-opened.py", 1, 2, [(0, 0, "x")])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        worker.edit("file:///b.py", 5, 6, [(2, 99, "")])
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.RpcError) as err:
        worker.complete("file:///b.py", 5, 42)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.RpcError) as err:
        worker.complete("file:///b.py", 9, 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Nothing was lost by the refused calls.
    assert worker.edit("file:///b.py", 5, 6, [(3, 3, "d")]).length == 4


@pytest.mark.model
def test_cancel_stops_decoding(worker):
    # The model counts on past 400 tokens here; the cancel comes once the first line has streamed.
    text = "NUMBERS = [\n    100,\n    101,\n    102,\n    103,\n"
    worker.open("file:///c.py", text)
    before = stats(worker)
    request = pb.CompleteRequest(
        uri="file:///c.py",
        version=1,
        offset=len(text),
        options=pb.CompleteOptions(max_tokens=400, mode=pb.COMPLETION_MODE_MULTI_LINE),
    )
    call = worker.stub.Complete(request)
    first = next(call)
    assert not first.done and first.text.strip(), "decoding had not started streaming lines"
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 30
    while (after := stats(worker))["completions_cancelled"] == before["completions_cancelled"]:
        assert time.monotonic() < deadline, "the worker never saw the cancel"
        time.sleep(0.1)
    # Decoding stopped far short of the 400-token budget (exact counts: tests/completion/test_scheduler.py).
    assert after["tokens_generated"] - before["tokens_generated"] < 200
    # The worker is free for the next request: nothing of the cancelled one is left on the model thread,
    # and every token generated from here on is the next request's (none the cancelled one's).
    assert stats(worker)["model_thread"]["queue_depth"] == 0
    _, last = worker.complete("file:///c.py", 1, len(text), max_tokens=4)
    assert last.done and last.stop_reason != "cancelled"
    assert stats(worker)["tokens_generated"] - after["tokens_generated"] == last.stats.tokens_generated


@pytest.mark.model
def test_streaming_sends_lines_as_they_become_final(worker):
    """A multi-line completion streams in several chunks; each one but the last ends where a line
    became final (take_chunk sends whole lines), and together they are the whole suggestion."""
    text = "def fizzbuzz(n):\n    "
    worker.open("file:///d.py", text)
    request = pb.CompleteRequest(
        uri="file:///d.py", version=1, offset=len(text),
        options=pb.CompleteOptions(max_tokens=64, mode=pb.COMPLETION_MODE_MULTI_LINE),
    )
    chunks = list(worker.stub.Complete(request))
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    whole = "".join(c.text for c in chunks)
    assert len(chunks) >= 3, [c.text for c in chunks]  # at least two lines streamed before the end
    sent = ""
    for chunk in chunks[:-1]:
        assert chunk.text, "an empty chunk before the last"
        sent += chunk.text
        rest = whole[len(sent) :]
        # Final lines only: what follows is a line break (after any trailing blanks held back), or nothing.
        assert rest == "" or rest.lstrip(" \t").startswith("\n"), (sent, rest)
    assert whole.count("\n") >= 2


def test_worker_reports_a_model_that_cannot_load(tmp_path):
    proc, address = spawn_worker(tmp_path, "--model", str(tmp_path / "missing-model"))
    client = WorkerClient(address)
    try:
        with pytest.raises(RuntimeError, match="missing-model"):
            client.wait_ready(timeout=60)
        client.open("file:///e.py", "x = 1")  # documents are still accepted
        with pytest.raises(grpc.RpcError) as err:
            client.complete("file:///e.py", 1, 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "missing-model" in err.value.details()
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


PIE_DOC = '''import os


def list_python_files(folder):
    """Return the Python files directly inside folder."""
    names = sorted(os.listdir(folder))
    return [name for name in names if name.endswith(".py")]


def count_lines(path):
    with open(path) as handle:
        return sum(1 for _ in handle)


def main():
    for name in list_python_files("."):
        print(name, count_lines(name))
'''


@pytest.mark.model
def test_completions_after_edits_with_pie_refresh_and_full_recompute(worker):
    uri = "file:///pie.py"
    cursor_text = '        print(name, '
    text = PIE_DOC[: PIE_DOC.index(cursor_text) + len(cursor_text)]
    before = stats(worker)  # the worker is the session's: its counters are compared with these
    worker.open(uri, text)
    worker.complete(uri, 1, len(text), mode="single_line", max_tokens=16)  # fills the cache
    # Insert a line near the top: every cached token after it moves by the same delta.
    insert_at = text.index("def list_python_files")
    addition = "import sys\n\n\n"
    worker.edit(uri, 1, 2, [(insert_at - 2, insert_at - 2, addition)])
    text = text[: insert_at - 2] + addition + text[insert_at - 2 :]
    expected = first_line(greedy_continuation(text))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"

    pie, last = worker.complete(uri, 2, len(text), mode="single_line", max_tokens=16)
    assert last.stats.tokens_rerotated > 0
    assert last.stats.tokens_encoded < last.stats.context_tokens // 3
    # Every stale token sits within the refresh window before the cursor, so the result is exact.
    assert last.stats.stale_refreshed > 0
    assert pie == expected

    full, last_full = worker.complete(uri, 2, len(text), mode="single_line", max_tokens=16, cache="none")
    assert full == expected and last_full.stats.tokens_encoded == last_full.stats.context_tokens
    prefix, last_prefix = worker.complete(uri, 2, len(text), mode="single_line", max_tokens=16, cache="prefix")
    assert prefix == expected

    report = stats(worker)
    assert report["tokens_rerotated"] > before["tokens_rerotated"] and report["cache"]["edit_aware"] is True
    # The worker timed its decoding forwards (what a guessed row costs here decides how many it verifies).
    timed = report["speculation"]["forward_ms_by_tokens"]  # {threads: {tokens fed: ms}}
    assert timed and all(ms > 0 for by_tokens in timed.values() for ms in by_tokens.values()), report["speculation"]


@pytest.mark.model
def test_restarted_worker_reopens_documents_from_snapshots(tmp_path):
    """Both workers keep their snapshots in tmp_path/kv ($ROTARY_KV_DIR, tests/conftest.py::spawn_worker),
    none under their XDG_CACHE_HOME (tmp_path/cache). The last assert fails without the variable (before
    it, the snapshots went to $XDG_CACHE_HOME/rotary/kv, where another run's workers could restore them)."""
    import signal

    text = PIE_DOC
    for attempt in range(2):
        proc, address = spawn_worker(tmp_path)
        client = WorkerClient(address)
        try:
            client.wait_ready(timeout=300)
            client.open("file:///snap.py", text)
            _, last = client.complete("file:///snap.py", 1, len(text), max_tokens=4)
            if attempt == 0:
                assert last.stats.tokens_reused == 0
            else:  # the new worker found the snapshot the first one wrote when it stopped
                assert last.stats.tokens_reused >= last.stats.context_tokens - 2
                assert stats(client)["cache"]["restored"] == 1
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    assert list((tmp_path / "kv").rglob("*.msgpack"))
    assert not list((tmp_path / "cache").rglob("*.msgpack"))


@pytest.mark.model
def test_idle_worker_refreshes_stale_tokens_in_the_background(worker):
    uri = "file:///background.py"
    text = PIE_DOC * 3  # long enough that stale tokens remain outside the 128-token refresh window
    refreshed = stats(worker)["cache"]["background_refreshed"]  # the session's worker: counted from here
    worker.open(uri, text)
    worker.complete(uri, 1, len(text), max_tokens=2)
    worker.edit(uri, 1, 2, [(0, 0, "import sys\n")])
    _, last = worker.complete(uri, 2, len(text) + 11, max_tokens=2)
    assert last.stats.tokens_rerotated > 0
    deadline = time.monotonic() + 120
    while (cache := stats(worker)["cache"])["stale_tokens"]:
        assert time.monotonic() < deadline, cache
        time.sleep(0.5)
    assert cache["background_refreshed"] > refreshed


@pytest.mark.model
def test_health_is_answered_while_every_completion_waits_for_the_model(worker):
    """The daemon restarts a worker whose Health misses its 2 s deadline: a busy one must never miss it.
    Shown by order, not by the clock: Health answers with a queue depth of all 24 requests, so it was
    answered while every one of them held its stream and waited for (or ran on) the model thread. With
    fewer gRPC threads than streams (before), Health waited for a completion to end, and the depth it
    reported never counted them all."""
    import threading

    text = "def f(x):\n    return x\n" * 10 + "def g(y):\n    "
    uris = [f"file:///load-{i}.py" for i in range(24)]  # more calls than gRPC had threads before
    for uri in uris:
        worker.open(uri, text)
    errors = []

    def ask(uri):
        try:
            worker.complete(uri, 1, len(text), max_tokens=8, mode="multi_line")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(uri,)) for uri in uris]
    for t in threads:
        t.start()
    depths = []
    while any(t.is_alive() for t in threads):
        health = worker.stub.Health(pb.HealthRequest(), timeout=60)  # a guard against a hang only
        depths.append(health.queue_depth)
        time.sleep(0.05)  # a pace, not a measure: back to back, the probes took the model thread's cores
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert max(depths) == len(uris), depths
