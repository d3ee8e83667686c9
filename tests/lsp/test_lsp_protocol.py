"""The daemon speaking raw LSP (JSON-RPC framing by hand), without a model: negotiation, bad input, TCP.

The worker address points where nothing can listen (tests/listening.py), so every completion must come back
empty (no error), while everything else keeps working.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from rotary.completion.rpc.launch import rotary_command
from tests.listening import UNREACHABLE, wait_listening



class RawClient:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.next_id = 0
        self.notifications: list[dict] = []
        self.server_requests: list[dict] = []  # every request the server sent (answered with null by `request`)

    def send(self, payload: dict | bytes) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.writer.flush()

    def notify(self, method: str, params: dict) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def start_request(self, method: str, params: dict | None) -> int:
        """Send a request without waiting for its reply: its id."""
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        return self.next_id

    def request(self, method: str, params: dict | None, timeout: float = 20) -> dict:
        self.start_request(method, params)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.read()
            if message.get("id") == self.next_id and "method" not in message:
                return message
            if "method" in message and "id" in message:  # a request from the server: answer it
                self.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
            elif "method" in message:
                self.notifications.append(message)
        raise TimeoutError(method)

    def read(self) -> dict:
        length = None
        while True:
            line = self.reader.readline()
            if not line:
                raise EOFError("server closed the stream")
            if line in (b"\r\n", b"\n"):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        message = json.loads(self.reader.read(length))
        if "method" in message and "id" in message:
            self.server_requests.append(message)
        return message


def start_daemon(*args: str) -> tuple[subprocess.Popen, RawClient]:
    """`rotary lsp ARGS` over stdio, and a raw client on it."""
    proc = subprocess.Popen(
        rotary_command("lsp", *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    return proc, RawClient(proc.stdout, proc.stdin)


def stop_daemon(proc: subprocess.Popen, client: RawClient) -> None:
    try:
        client.request("shutdown", None, timeout=10)
        client.notify("exit", {})
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def daemon():
    proc, client = start_daemon("--worker", UNREACHABLE)
    yield client
    stop_daemon(proc, client)


def initialize(client: RawClient, encodings=None, options=None) -> dict:
    caps = {"general": {"positionEncodings": encodings}} if encodings else {}
    result = client.request("initialize", {"processId": None, "rootUri": None, "capabilities": caps, "initializationOptions": options})
    client.notify("initialized", {})
    return result["result"]


def open_doc(client: RawClient, uri: str, text: str, version: int = 1) -> None:
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": version, "text": text}})


def inline(client: RawClient, uri: str, line: int, character: int) -> dict:
    return client.request(
        "textDocument/inlineCompletion",
        {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}, "context": {"triggerKind": 2}},
    )


def stats(client: RawClient) -> dict:
    return client.request("workspace/executeCommand", {"command": "rotary.stats", "arguments": []})["result"]


def test_capabilities_and_utf16_by_default(daemon):
    caps = initialize(daemon)["capabilities"]
    assert caps["inlineCompletionProvider"] is not None
    assert caps["completionProvider"] is not None
    assert caps["textDocumentSync"]["change"] == 2  # incremental
    assert caps.get("positionEncoding", "utf-16") == "utf-16"
    assert {"rotary.stats", "rotary.toggle", "rotary.suggestionAccepted"} <= set(caps["executeCommandProvider"]["commands"])


def test_utf8_is_chosen_when_the_client_offers_it(daemon):
    caps = initialize(daemon, encodings=["utf-16", "utf-8"])["capabilities"]
    assert caps["positionEncoding"] == "utf-8"
    assert stats(daemon)["daemon"]["position_encoding"] == "utf-8"


def test_unreachable_worker_gives_empty_answers_not_errors(daemon):
    initialize(daemon, options={"debounceMs": 0})
    open_doc(daemon, "file:///a.py", "def f(x):\n    return x")
    reply = inline(daemon, "file:///a.py", 1, 12)
    assert "error" not in reply and reply["result"] is None
    reply = daemon.request("textDocument/completion", {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 1, "character": 12}})
    assert "error" not in reply and reply["result"]["items"] == []
    assert stats(daemon)["daemon"]["worker_unavailable"] >= 1


def test_malformed_and_out_of_order_messages_lose_nothing(daemon):
    initialize(daemon, options={"debounceMs": 0})
    daemon.send(b"{this is not json")
    daemon.notify("textDocument/didChange", {  # a change for a document never opened
        "textDocument": {"uri": "file:///never.py", "version": 3},
        "contentChanges": [{"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "x"}],
    })
    open_doc(daemon, "file:///b.py", "abc\n")
    daemon.notify("textDocument/didChange", {  # a position far out of range clamps to the end
        "textDocument": {"uri": "file:///b.py", "version": 2},
        "contentChanges": [{"range": {"start": {"line": 40, "character": 9}, "end": {"line": 40, "character": 9}}, "text": "def"}],
    })
    reply = inline(daemon, "file:///b.py", 99, 99)
    assert "error" not in reply
    daemon.send({"jsonrpc": "2.0", "id": 999, "method": "no/such/method", "params": {}})
    report = stats(daemon)  # the server still answers and kept the opened document
    assert report["daemon"]["open_documents"] == 1


def test_invalid_settings_warn_and_fall_back(daemon):
    initialize(daemon, options={"maxTokens": "many", "completionMode": "sometimes"})
    report = stats(daemon)
    assert report["daemon"]["settings"]["maxTokens"] == 64
    assert report["daemon"]["settings"]["completionMode"] == "auto"
    warnings = [n for n in daemon.notifications if n["method"] == "window/showMessage"]
    assert any("maxTokens" in n["params"]["message"] for n in warnings)
    daemon.notify("workspace/didChangeConfiguration", {"settings": {"rotary": {"maxTokens": 12}}})
    assert stats(daemon)["daemon"]["settings"]["maxTokens"] == 12


def test_binary_and_huge_files_are_not_completed(daemon):
    initialize(daemon, options={"debounceMs": 0})
    open_doc(daemon, "file:///blob.bin", "PK\x03\x04\x00\x00binary")
    open_doc(daemon, "file:///huge.py", "x = 1\n" * 400_000)
    assert inline(daemon, "file:///blob.bin", 0, 3)["result"] is None
    skipped = stats(daemon)["daemon"]["skipped_documents"]
    assert "binary" in skipped["file:///blob.bin"] and "too large" in skipped["file:///huge.py"]


def test_lsp_over_tcp():
    proc = subprocess.Popen(
        rotary_command("lsp", "--tcp", "127.0.0.1:0", "--worker", UNREACHABLE),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, port, _ = wait_listening(proc)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            stream = conn.makefile("rwb")
            client = RawClient(stream, stream)
            assert initialize(client)["capabilities"]["inlineCompletionProvider"] is not None
    finally:
        proc.kill()
        proc.wait(timeout=10)
