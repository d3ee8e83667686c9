"""The bad-input catalogue: one test per row. Each asserts the answer (a clear error or a clean refusal)
and then that both processes still serve the next request (`both_serve`).

The daemon is a real `rotary lsp` process spoken to in raw JSON-RPC; its worker is the real worker
service without a model, in this process (tests/fakes.py), which completes every request with
FAKE_COMPLETION. gRPC rows call that worker directly, as any client could.

| row | answer |
| --- | --- |
| body that is not JSON, or not UTF-8 | parse error -32700, id null |
| JSON that is no JSON-RPC message | invalid request -32600 |
| params that do not fit the method | invalid params -32602, with the request's id |
| unknown request / notification | method not found -32601 / ignored |
| requests before initialize | ServerNotInitialized -32002; notifications dropped |
| positions out of range / negative | clamped (LSP) / invalid params |
| a 50 MB file | not sent to the worker, no completions for it, listed as skipped |
| NUL bytes / invalid UTF-8 from a gRPC client | NUL is text like any other / INVALID_ARGUMENT |
| completion for an unopened document | gRPC NOT_FOUND; LSP: no suggestion |
| oversized gRPC message | RESOURCE_EXHAUSTED |
| an edit with a million changes | RESOURCE_EXHAUSTED at once, the document unchanged |
| an unknown setting | a warning, the other settings kept |
| an unknown command | invalid params naming Rotary's commands |
| a crafted snapshot (bad shapes, a missing key, a huge length) | refused, deleted, the cache rebuilt |

The crafted-snapshot row runs the worker's real KV store (cache/store.py) on crafted files; every
kind of crafted file is in tests/cache/test_snapshot.py.
"""

from __future__ import annotations

import itertools
import time

import grpc
import pytest

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc import worker_pb2_grpc as pb_grpc
from rotary.completion.rpc.wire import text_crc32
from tests.fakes import FAKE_COMPLETION, start_worker
from tests.lsp.test_lsp_protocol import RawClient, initialize, inline, open_doc, start_daemon, stats, stop_daemon

_probes = itertools.count()


@pytest.fixture(scope="module")
def worker():
    import rotary.completion.engine  # noqa: F401  the worker's first Complete imports it; do it up front

    server, service, address = start_worker()
    channel = grpc.insecure_channel(address)
    yield pb_grpc.WorkerStub(channel), service, address
    channel.close()
    server.stop(0)


@pytest.fixture(scope="module")
def daemon(worker):
    proc, client = start_daemon("--worker", worker[2])
    initialize(client, options={"debounceMs": 0})
    deadline = time.monotonic() + 30
    while stats(client)["worker"]["state"] != "ready":
        assert time.monotonic() < deadline, "the daemon never reached its worker"
        time.sleep(0.1)
    yield client
    stop_daemon(proc, client)


def daemon_session(daemon: RawClient) -> str:
    """The daemon's session in the worker, under which its documents are kept."""
    return stats(daemon)["worker"]["session"]


def both_serve(daemon: RawClient, worker) -> None:
    """The daemon completes a fresh document through the worker, and the worker answers a client directly."""
    stub = worker[0]
    uri = f"file:///probe{next(_probes)}.py"
    open_doc(daemon, uri, "def f():\n    ")
    reply = inline(daemon, uri, 1, 4)
    assert "error" not in reply and reply["result"]["items"][0]["insertText"] == FAKE_COMPLETION
    daemon.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert stub.Health(pb.HealthRequest(), timeout=10).ready
    ack = stub.OpenDocument(pb.OpenDocumentRequest(uri=uri + "#grpc", version=1, text="ok"), timeout=10)
    ack = stub.EditDocument(pb.EditDocumentRequest(uri=uri + "#grpc", base_version=1, new_version=2,
                                                   changes=[pb.TextChange(start=2, end=2, text="!")]), timeout=10)
    assert (ack.length, ack.crc32) == (3, text_crc32("ok!"))
    stub.CloseDocument(pb.CloseDocumentRequest(uri=uri + "#grpc"), timeout=10)


def read_until(client: RawClient, predicate, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = client.read()
        if predicate(message):
            return message
        if "method" in message and "id" not in message:
            client.notifications.append(message)
    raise TimeoutError


def send_raw(client: RawClient, body: bytes) -> None:
    client.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    client.writer.flush()


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, pb.DocumentAck):
            list(result)
    return refused.value


# -- JSON-RPC -------------------------------------------------------------------------------------------


def test_a_body_that_is_not_json_or_not_utf8_gets_a_parse_error(daemon, worker):
    for body in (b"{this is not json", b'{"jsonrpc": "2.0", "id": 1, "method": "\xff\xfe"}'):
        send_raw(daemon, body)
        reply = read_until(daemon, lambda m: "error" in m)
        assert reply["id"] is None and reply["error"]["code"] == -32700
    both_serve(daemon, worker)


def test_json_that_is_no_json_rpc_message_gets_invalid_request(daemon, worker):
    send_raw(daemon, b"[1, 2, 3]")
    assert read_until(daemon, lambda m: "error" in m)["error"]["code"] == -32600
    send_raw(daemon, b'{"id": 77, "method": "textDocument/inlineCompletion"}')  # no "jsonrpc"
    reply = read_until(daemon, lambda m: "error" in m)
    assert reply["id"] == 77 and reply["error"]["code"] == -32600
    both_serve(daemon, worker)


def test_params_that_do_not_fit_the_method_get_invalid_params_with_the_id(daemon, worker):
    reply = daemon.request("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///x.py"}, "position": "here"})
    assert reply["error"]["code"] == -32602 and "textDocument/inlineCompletion" in reply["error"]["message"]
    daemon.notify("textDocument/didOpen", {"textDocument": {"uri": 5}})  # a malformed notification: dropped
    both_serve(daemon, worker)


def test_unknown_methods(daemon, worker):
    reply = daemon.request("rotary/noSuchMethod", {})
    assert reply["error"]["code"] == -32601
    daemon.notify("rotary/noSuchNotification", {"x": 1})
    both_serve(daemon, worker)


def test_requests_before_initialize_get_server_not_initialized(worker):
    proc, client = start_daemon("--worker", worker[2])
    try:
        reply = client.request("workspace/executeCommand", {"command": "rotary.stats", "arguments": []})
        assert reply["error"]["code"] == -32002 and "initialize" in reply["error"]["message"]
        reply = client.request("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///a.py"},
                                                                 "position": {"line": 0, "character": 0},
                                                                 "context": {"triggerKind": 1}})
        assert reply["error"]["code"] == -32002
        open_doc(client, "file:///early.py", "x")  # a notification before initialize: dropped
        initialize(client, options={"debounceMs": 0})
        assert stats(client)["daemon"]["open_documents"] == 0
        deadline = time.monotonic() + 30
        while stats(client)["worker"]["state"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        both_serve(client, worker)
    finally:
        stop_daemon(proc, client)


# -- positions and documents ------------------------------------------------------------------------------


def test_positions_out_of_range_clamp_and_negative_ones_are_invalid(daemon, worker):
    open_doc(daemon, "file:///range.py", "a = 1\n")
    daemon.notify("textDocument/didChange", {
        "textDocument": {"uri": "file:///range.py", "version": 2},
        "contentChanges": [{"range": {"start": {"line": 10**6, "character": 10**9},
                                      "end": {"line": 10**6, "character": 10**9}}, "text": "b = "}],
    })
    reply = inline(daemon, "file:///range.py", 10**6, 10**9)
    assert reply["result"]["items"][0]["insertText"] == FAKE_COMPLETION
    assert worker[1].documents.get("file:///range.py", session=daemon_session(daemon)).text == "a = 1\nb = "
    reply = daemon.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": "file:///range.py"}, "position": {"line": -1, "character": 0}, "context": {"triggerKind": 1}})
    assert reply["error"]["code"] == -32602
    daemon.notify("textDocument/didClose", {"textDocument": {"uri": "file:///range.py"}})
    both_serve(daemon, worker)


def test_a_50_mb_file_is_not_sent_and_gets_no_completions(daemon, worker):
    text = ("x = 'abcdefghijklmnopqrstuvwxyz0123456789'\n" * (50 * 1024 * 1024 // 42))[: 50 * 1024 * 1024]
    open_doc(daemon, "file:///huge.py", text)
    reply = inline(daemon, "file:///huge.py", 3, 0)
    assert "error" not in reply and reply["result"] is None
    assert "too large" in stats(daemon)["daemon"]["skipped_documents"]["file:///huge.py"]
    assert "file:///huge.py" not in [uri for uri in worker[1].documents._docs]
    daemon.notify("textDocument/didClose", {"textDocument": {"uri": "file:///huge.py"}})
    both_serve(daemon, worker)


def test_a_completion_for_an_unopened_document(daemon, worker):
    stub = worker[0]
    error = grpc_error(stub.Complete, pb.CompleteRequest(uri="file:///never.py", version=1, offset=0), timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "not open" in error.details()
    reply = inline(daemon, "file:///never-opened.py", 0, 0)
    assert "error" not in reply and reply["result"] is None
    both_serve(daemon, worker)


# -- from a gRPC client -------------------------------------------------------------------------------------


def test_nul_bytes_are_text_and_invalid_utf8_is_refused(daemon, worker):
    stub, _, address = worker
    ack = stub.OpenDocument(pb.OpenDocumentRequest(uri="file:///nul.py", version=1, text="a\x00b"), timeout=10)
    assert (ack.length, ack.crc32) == (3, text_crc32("a\x00b"))
    chunks = list(stub.Complete(pb.CompleteRequest(uri="file:///nul.py", version=1, offset=3), timeout=10))
    assert chunks[-1].done
    stub.CloseDocument(pb.CloseDocumentRequest(uri="file:///nul.py"), timeout=10)
    # OpenDocumentRequest with field 1 (uri) holding bytes that are not UTF-8.
    raw = b"\x0a\x04\xff\xfe\xfd\xfc\x10\x01"
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/rotary.v1.Worker/OpenDocument", request_serializer=None, response_deserializer=None)
        error = grpc_error(call, raw, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in error.details()
    both_serve(daemon, worker)


def test_an_oversized_grpc_message_is_refused(daemon, worker):
    request = pb.OpenDocumentRequest(uri="file:///big.py", version=1, text="x" * (65 << 20))
    error = grpc_error(worker[0].OpenDocument, request, timeout=60)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    both_serve(daemon, worker)


def test_an_edit_with_a_million_changes_is_refused_at_once(daemon, worker):
    stub = worker[0]
    stub.OpenDocument(pb.OpenDocumentRequest(uri="file:///million.py", version=1, text="abc"), timeout=10)
    change = pb.TextChange(start=0, end=0, text="x")
    request = pb.EditDocumentRequest(uri="file:///million.py", base_version=1, new_version=2)
    request.changes.extend([change] * 1_000_000)
    error = grpc_error(stub.EditDocument, request, timeout=60)  # the timeout: a guard against a hang only
    # Refused by the limit on the count of changes, before any of them was applied (the text below is unchanged).
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1000000 changes in one edit is over the limit" in error.details()
    assert worker[1].documents.get("file:///million.py").text == "abc"
    stub.CloseDocument(pb.CloseDocumentRequest(uri="file:///million.py"), timeout=10)
    both_serve(daemon, worker)


# -- settings and commands ----------------------------------------------------------------------------------


def test_an_unknown_setting_warns_and_keeps_the_others(daemon, worker):
    daemon.notify("workspace/didChangeConfiguration", {"settings": {"rotary": {"noSuchSetting": 1, "maxTokens": 33}}})
    report = stats(daemon)["daemon"]
    assert report["settings"]["maxTokens"] == 33 and "noSuchSetting" not in report["settings"]
    assert any("noSuchSetting" in n["params"]["message"] for n in daemon.notifications if n["method"] == "window/showMessage")
    daemon.notify("workspace/didChangeConfiguration", {"settings": {"rotary": {"maxTokens": 64}}})
    both_serve(daemon, worker)


def test_an_unknown_command_is_refused_naming_rotarys(daemon, worker):
    reply = daemon.request("workspace/executeCommand", {"command": "editor.action.run", "arguments": ["rm -rf /"]})
    assert reply["error"]["code"] == -32602
    assert "unknown command 'editor.action.run'" in reply["error"]["message"] and "rotary.stats" in reply["error"]["message"]
    both_serve(daemon, worker)


# -- files the worker reads ------------------------------------------------------------------------------


def test_a_crafted_snapshot_is_refused_deleted_and_rebuilt(daemon, worker, tmp_path):
    from rotary.cache.store import KVStore
    from tests.cache.test_snapshot import DIM, HEADS, LAYERS, LAYOUT, crafted

    store = KVStore(spill_dir=tmp_path, identity="m", layout=LAYOUT)
    rows = {
        "file:///shapes.py": ({"shape": [LAYERS, 2, HEADS + 1, 5, DIM]}, None),  # shapes this model does not have
        "file:///missing.py": ({}, "token_ids"),  # a missing key
        "file:///huge.py": ({"shape": [LAYERS, 2, HEADS, 10**12, DIM], "token_ids": list(range(5))}, None),  # a huge length
    }
    for uri, (changes, drop) in rows.items():
        crafted(store.snapshot_path(uri), changes, drop=drop)
        assert store.get(uri) is None  # refused: the document's cache is rebuilt by encoding
        assert not store.snapshot_path(uri).exists()
    assert store.counters["refused"] == len(rows)
    both_serve(daemon, worker)
