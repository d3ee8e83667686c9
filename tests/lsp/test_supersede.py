"""A newer completion request supersedes an older one whose gRPC call is already in flight: the daemon
cancels that call, down to the worker's decoding loop, and the older request gets no suggestion.

tests/lsp/test_lsp_e2e.py::test_newer_request_supersedes_older covers the other case, an older
request still in its debounce (no call exists yet). Here: the real daemon over stdio
(`rotary lsp --worker ADDR`), the real worker service over gRPC in this process with the engine
of tests/fakes.py, which holds a call until it is cancelled; each step waits for a counter or a
reply, never for time.
"""

from __future__ import annotations

import contextlib

from tests.fakes import FAKE_COMPLETION, start_worker
from tests.lsp.test_isolation import initialize, wait_until
from tests.lsp.test_lsp_protocol import RawClient, open_doc, start_daemon, stats, stop_daemon

URI = "file:///supersede.py"


def send_inline(client: RawClient, line: int, character: int) -> int:
    """An inline completion request, sent without waiting: its id."""
    return client.start_request("textDocument/inlineCompletion", {
        "textDocument": {"uri": URI}, "position": {"line": line, "character": character}, "context": {"triggerKind": 2},
    })


@contextlib.contextmanager
def daemon_on_a_fake_worker(uri: str):
    """The real daemon over stdio on the real worker service (in this process) with tests/fakes.py's
    engine, ready, with `uri` open ("def f():\n    "): (service, client); stopped afterwards."""
    server, service, address = start_worker()
    proc, client = start_daemon("--worker", address)
    try:
        initialize(client, options={"debounceMs": 0})
        wait_until(lambda: stats(client)["worker"]["state"] == "ready", "the daemon never reached its worker")
        open_doc(client, uri, "def f():\n    ")
        yield service, client
    finally:
        service.engine.hang = False
        stop_daemon(proc, client)
        server.stop(0)


def replies(client: RawClient, ids: set[int]) -> dict[int, dict]:
    """Read until every request in `ids` has its reply (answering the server's own requests)."""
    got: dict[int, dict] = {}
    while not ids <= got.keys():
        message = client.read()
        if "method" in message and "id" in message:
            client.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
        elif "method" not in message:
            got[message["id"]] = message
    return got


def test_a_superseded_request_s_call_in_flight_is_cancelled_in_the_worker():
    """Fails if the daemon does not cancel the older call (lsp/server.py's `previous.cancel()` removed):
    the older call is never cancelled in the worker (its engine is never told), so the wait for
    `cancelled == 1` fails."""
    with daemon_on_a_fake_worker(URI) as (service, client):
        engine = service.engine
        before, (counted, _) = stats(client)["daemon"], service.counters.snapshot()
        engine.hang = True  # each call stays in the worker's engine until it is cancelled

        older = send_inline(client, 1, 4)
        wait_until(lambda: engine.requests == 1, "the older request's call never reached the worker")
        newer = send_inline(client, 1, 4)
        # The newer request's call reaches the worker, and the older one ended there cancelled.
        wait_until(lambda: engine.requests == 2 and engine.cancelled == 1, "the older call was not cancelled in the worker")
        engine.hang = False  # the newer call is answered
        got = replies(client, {older, newer})

        assert got[older]["result"] is None
        assert got[newer]["result"]["items"][0]["insertText"] == FAKE_COMPLETION
        assert stats(client)["daemon"]["superseded"] == before["superseded"] + 1
        # The worker's own counters (its Stats, read here in its process): one call cancelled, one answered.
        assert service.counters["completions_cancelled"] == counted["completions_cancelled"] + 1
        assert service.counters["completions"] == counted["completions"] + 1
