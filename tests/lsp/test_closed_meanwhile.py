"""A document closed while its completion is pending ends that request quietly: no suggestion, no error.

The real daemon over stdio (`rotary lsp --worker ADDR`), the real worker service over gRPC in this
process with the engine of tests/fakes.py, which holds each call until the test lets it go. The
editor closes the document while the worker still decodes; once the worker answers, the request
gets an empty answer (never the closed document's suggestion, never an error), and the daemon goes
on serving the next document. Each step waits for a counter or a reply, never for time.
"""

from __future__ import annotations

import pytest

from rotary.completion.service import WorkerService
from tests.fakes import FAKE_COMPLETION, start_worker
from tests.lsp.test_isolation import initialize, wait_until
from tests.lsp.test_lsp_protocol import inline, open_doc, start_daemon, stats, stop_daemon
from tests.lsp.test_supersede import daemon_on_a_fake_worker, replies

URI = "file:///closed_meanwhile.py"


@pytest.mark.parametrize("method", ["textDocument/inlineCompletion", "textDocument/completion"])
def test_a_document_closed_while_its_completion_is_pending_gets_no_suggestion(method):
    """Fails on the code before the fix (commit 98d0698: lsp/server.py's `complete` returned the
    worker's text without checking that the document was still open), checked by running it there:
    the inline request of the closed document got the suggestion FAKE_COMPLETION, and the completion
    request (whose handler did drop it) still counted a suggestion."""
    with daemon_on_a_fake_worker(URI) as (service, client):
        engine = service.engine
        before = stats(client)["daemon"]
        engine.hang = True  # the call stays in the worker's engine until the test lets it go
        params = {"textDocument": {"uri": URI}, "position": {"line": 1, "character": 4}}
        if method == "textDocument/inlineCompletion":
            params["context"] = {"triggerKind": 2}
        pending = client.start_request(method, params)
        wait_until(lambda: engine.requests == 1, "the completion's call never reached the worker")
        client.notify("textDocument/didClose", {"textDocument": {"uri": URI}})
        wait_until(lambda: stats(client)["daemon"]["open_documents"] == 0, "the daemon never saw the close")
        engine.hang = False  # the worker answers, for a document that is no longer open
        reply = replies(client, {pending})[pending]

        assert "error" not in reply, reply
        result = reply["result"]
        items = result["items"] if isinstance(result, dict) else (result or [])
        assert items == [], f"a suggestion for a closed document: {result}"
        after = stats(client)["daemon"]
        assert after["suggestions"] == before["suggestions"] and after["errors"] == before["errors"]

        # The daemon goes on: the document opened again gets its suggestion.
        open_doc(client, URI, "def f():\n    ", version=2)
        again = inline(client, URI, 1, 4)
        assert again["result"]["items"][0]["insertText"] == FAKE_COMPLETION


class CountingWorker(WorkerService):
    """The real worker service, counting the GenerateTests calls that reach it."""

    generate_calls = 0

    def GenerateTests(self, request, context):
        type(self).generate_calls += 1
        return super().GenerateTests(request, context)


def test_a_document_closed_while_its_tests_wait_for_the_model_ends_the_command_quietly():
    """rotary.generateTests waits for a loading model; the editor closes the document meanwhile. The
    command ends quietly ({"cancelled": true}, no error message), and the closed document's text never
    goes to the worker. Fails on the code before the fix (commit 98d0698, checked by running it there):
    the daemon sent the closed document's text to the worker (GenerateTests reached it)."""
    CountingWorker.generate_calls = 0
    server, service, address = start_worker(service_cls=CountingWorker)
    service.ready.clear()  # the model "loads" until the test says it is ready
    proc, client = start_daemon("--worker", address)
    try:
        initialize(client, options={"debounceMs": 0})
        wait_until(lambda: stats(client)["worker"]["state"] == "loading", "the daemon never saw the loading worker")
        uri = "file:///closed_tests.py"
        open_doc(client, uri, "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n")
        pending = client.start_request("workspace/executeCommand", {
            "command": "rotary.generateTests", "arguments": [{"uri": uri, "qualname": "clamp"}],
        })
        client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        wait_until(lambda: stats(client)["daemon"]["open_documents"] == 0, "the daemon never saw the close")
        service.ready.set()
        shown = []
        while True:  # the command's reply, and any message shown meanwhile
            message = client.read()
            if message.get("method") == "window/showMessage":
                shown.append(message["params"]["message"])
            elif "method" in message and "id" in message:
                client.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
            elif message.get("id") == pending:
                break
        assert message.get("result") == {"cancelled": True}, message
        assert not shown, shown
        assert CountingWorker.generate_calls == 0, "the closed document's text went to the worker"
    finally:
        stop_daemon(proc, client)
        server.stop(0)
