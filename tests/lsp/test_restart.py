"""A worker restart, through each of its causes, against the real daemon, worker and model.

The causes (lsp/worker.py): the worker dies (killed here), `rotary.restartWorker`, and a
settings change of `model` or `workerAddress` (workspace/didChangeConfiguration, which the daemon
applies once the user allows it: the client here answers "Allow"). After
each, the worker is a new process, and the documents reach it through the restart hook
(lsp/sync.py `worker_restarted`: each document is sent whole with OpenDocument at its next
flush), not through the fallback for a worker that lost them (an EditDocument refused with
NOT_FOUND, then a resend). What tells the two apart:

- the daemon's `documents_resent` counts resends after a refused edit or a drifted
  acknowledgement; the hook does not add to it;
- the new worker's `edits` and `edits_rejected` stay 0: the documents were edited after the
  restart, yet the worker got whole texts, never an edit against a text it never had.

The suggestions after the restart equal the transformers oracle on the edited texts.

The causes run in sequence on one daemon (a module-scoped client: each cause costs one worker
load, not a new daemon's too). Each cause opens documents of its own (URIs under a folder named
after it), and closes them at its end, so what it asserts is about its own documents and the
worker that its restart started.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from rotary.completion.rpc.launch import rotary_command

from tests.conftest import first_line, greedy_continuation, spawn_worker

pytestmark = [pytest.mark.model]

# file name -> (text, an edit made after the restart as (line, start, end, new text))
DOCUMENTS = {
    "load.py": (
        "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.",
        (3, 9, 13, "path_to_file"),
    ),
    "area.py": (
        "def area(width, height):\n    return width",
        (0, 4, 8, "rectangle_area"),
    ),
}
CAUSES = ["worker killed", "rotary.restartWorker", "model setting", "workerAddress setting"]


def uri_of(cause: str, name: str) -> str:
    """The URI of a document of one cause's test (no cause sees another's documents)."""
    return f"file:///tmp/rotary-restart/{cause.replace(' ', '-').replace('.', '-')}/{name}"


def edited(text: str, edit) -> str:
    line, start, end, new = edit
    lines = text.split("\n")
    lines[line] = lines[line][:start] + new + lines[line][end:]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def expected_after_edit(name: str) -> str:
    text, edit = DOCUMENTS[name]
    expected = first_line(greedy_continuation(edited(text, edit), 16))
    assert expected.strip(), f"the oracle produced nothing for {name}; the test would be vacuous"
    return expected


@pytest_lsp.fixture(config=ClientServerConfig(server_command=rotary_command("lsp")), scope="module")
async def client(lsp_client: LanguageClient):
    @lsp_client.feature(types.WINDOW_SHOW_MESSAGE_REQUEST)
    def allow(params: types.ShowMessageRequestParams):
        # The user allows the model and workerAddress changes this test makes (the daemon asks first).
        return types.MessageActionItem(title="Allow")

    params = types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"),
        initialization_options={"completionMode": "singleLine", "debounceMs": 0, "maxTokens": 16},
    )
    await lsp_client.initialize_session(params)
    yield
    await lsp_client.shutdown_session()


async def stats(client: LanguageClient) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats"))


async def wait_for(client: LanguageClient, ok, what: str, timeout: float = 240.0) -> dict:
    """Poll rotary.stats until `ok(stats)`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not ok(current := await stats(client)):
        assert current["worker"]["state"] != "error" or "retrying" in current["worker"]["message"], current["worker"]
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {current['worker']}"
        await asyncio.sleep(0.5)
    return current


async def suggestion(client: LanguageClient, uri: str, text: str) -> str | None:
    lines = text.split("\n")
    result = await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=len(lines) - 1, character=len(lines[-1])),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        )
    )
    return result.items[0].insert_text if result and result.items else None


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("cause", CAUSES)  # in this order: the workerAddress cause leaves the daemon on a worker it stops
async def test_a_restart_resends_the_documents_through_the_restart_hook(client: LanguageClient, cause, model_dir, tmp_path):
    external = None
    if cause == "workerAddress setting":  # loads beside the daemon's own worker
        external, address = spawn_worker(tmp_path)
    documents = {uri_of(cause, name): (name, text, edit) for name, (text, edit) in DOCUMENTS.items()}
    try:
        ready = lambda s: s["worker"]["state"] == "ready"  # noqa: E731
        # The daemon is the module's: the previous cause closed its documents, the worker holds none.
        await wait_for(client, lambda s: ready(s) and s["worker"]["open_documents"] == 0, "no ready worker without documents")
        for uri, (_, text, _) in documents.items():
            client.text_document_did_open(
                types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text))
            )
            assert await suggestion(client, uri, text) is not None  # the worker has the document now
        before = await stats(client)
        old_pid = before["worker"]["pid"]
        assert before["worker"]["open_documents"] == len(DOCUMENTS)

        if cause == "worker killed":
            os.kill(old_pid, signal.SIGKILL)
        elif cause == "rotary.restartWorker":
            await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.restartWorker"))
        elif cause == "model setting":
            assert before["daemon"]["settings"]["model"] != str(model_dir)  # a change, so a restart
            client.workspace_did_change_configuration(
                types.DidChangeConfigurationParams(settings={"rotary": {"model": str(model_dir)}})
            )
        else:
            from rotary.completion.client import WorkerClient

            probe = WorkerClient(address)
            try:
                probe.wait_ready(timeout=300)
            finally:
                probe.close()
            client.workspace_did_change_configuration(
                types.DidChangeConfigurationParams(settings={"rotary": {"workerAddress": address}})
            )
        after = await wait_for(
            client, lambda s: ready(s) and s["worker"].get("pid") not in (None, old_pid), "no new worker became ready"
        )
        if external is not None:
            assert after["worker"]["pid"] == external.pid
        if cause == "model setting":
            assert after["daemon"]["settings"]["model"] == str(model_dir)

        # The user goes on editing; each document's next completion sends it to the new worker.
        for uri, (name, text, edit) in documents.items():
            line, start, end, new = edit
            client.text_document_did_change(
                types.DidChangeTextDocumentParams(
                    text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
                    content_changes=[
                        types.TextDocumentContentChangePartial(
                            range=types.Range(types.Position(line, start), types.Position(line, end)), text=new
                        )
                    ],
                )
            )
            assert await suggestion(client, uri, edited(text, edit)) == expected_after_edit(name)

        final = await stats(client)
        assert final["worker"]["restarts"] == before["worker"]["restarts"] + 1
        assert final["worker"]["pid"] == after["worker"]["pid"] != old_pid
        # Sent whole by the restart hook: no refused edit, no resend counted by the fallback.
        assert final["daemon"]["documents_resent"] == before["daemon"]["documents_resent"]
        assert final["worker"]["edits"] == 0 and final["worker"]["edits_rejected"] == 0
        assert final["worker"]["open_documents"] == len(DOCUMENTS)
    finally:
        for uri in documents:
            client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))
        if external is not None:
            external.terminate()
            external.wait(timeout=60)
