"""End to end over stdio: the real daemon, the real worker it starts, the real model.

The suggestion must equal the greedy continuation computed directly with
transformers on the text the test itself built from the same edits, so the
whole path (incremental sync, position encoding, gRPC diffs, cache, decoding,
stop rules) is checked, not just "non-empty".

The first test needs a daemon whose model is still loading: it has one of its own. The others
share one daemon (a module-scoped client), each with a document (URI) of its own, and each puts
back any setting it changes.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from tests.conftest import first_line, greedy_continuation
from rotary.completion.rpc.launch import rotary_command

pytestmark = [pytest.mark.model]

URI = "file:///tmp/rotary-e2e/example.py"

ORIGINAL = '''import os


def read_config(path):
    """Read a config file and return its lines."""
    with open(path) as handle:
        return handle.read().splitlines()
'''


def change(start, end, text):
    return types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text
    )


def open_document(client: LanguageClient, text: str, uri: str = URI) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
        )
    )


def change_document(client: LanguageClient, version: int, start, end, new: str, uri: str = URI) -> None:
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[change(start, end, new)],
        )
    )


async def wait_ready(client: LanguageClient, timeout: float = 240.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats"))
        if stats["worker"]["state"] == "ready":
            return stats
        assert stats["worker"]["state"] != "error", stats["worker"]["message"]
        assert asyncio.get_running_loop().time() < deadline, f"worker not ready: {stats['worker']}"
        await asyncio.sleep(0.5)


async def inline(client: LanguageClient, line: int, character: int, invoked: bool = False, uri: str = URI):
    kind = types.InlineCompletionTriggerKind.Invoked if invoked else types.InlineCompletionTriggerKind.Automatic
    return await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(trigger_kind=kind),
        )
    )


async def start_session(lsp_client: LanguageClient) -> None:
    params = types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"),
        initialization_options={"completionMode": "singleLine", "debounceMs": 10, "maxTokens": 48},
    )
    lsp_client.init_result = await lsp_client.initialize_session(params)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=rotary_command("lsp")))
async def client(lsp_client: LanguageClient):
    """A daemon of the test's own (its worker starts loading when the test starts)."""
    await start_session(lsp_client)
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=rotary_command("lsp")), scope="module")
async def shared_client(lsp_client: LanguageClient):
    """One daemon (and its worker) for the module's tests that do not need a loading model."""
    await start_session(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def test_invoked_request_waits_for_the_loading_model_and_automatic_does_not(client: LanguageClient):
    text = "def add(a, b):\n    return a"
    open_document(client, text)
    stats = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats"))
    assert stats["worker"]["state"] in ("starting", "loading"), "the test must start while the model loads"
    # Typing while the model loads: nothing, at once.
    assert await inline(client, 1, 12) is None
    # The user pressed the trigger key: the request waits for the model and answers.
    result = await inline(client, 1, 12, invoked=True)
    expected = first_line(greedy_continuation(text))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    assert result is not None and result.items and result.items[0].insert_text == expected


@pytest.mark.asyncio(loop_scope="module")
async def test_inline_completion_after_incremental_edits_matches_transformers(shared_client: LanguageClient):
    client, uri = shared_client, "file:///tmp/rotary-e2e/edits.py"
    caps = client.init_result.capabilities
    assert caps.inline_completion_provider is not None
    assert "rotary.stats" in caps.execute_command_provider.commands
    await wait_ready(client)
    # The model load was reported as work-done progress: begin ... end.
    reports = [r for token, values in client.progress_reports.items() if token.startswith("rotary/") for r in values]
    assert reports and reports[0].kind == "begin" and reports[-1].kind == "end"

    text = ORIGINAL
    open_document(client, text, uri)
    # Several incremental edits, one of them with a character outside the BMP (2 UTF-16 units).
    edits = [
        ((0, 9), (0, 9), "\nimport sys"),  # insert a line after "import os"
        ((5, 4), (5, 51), '"""Read a config file (🔧 tools) and return its lines."""'),  # replace the docstring
        ((7, 0), (7, 36), "        lines = handle.read().splitlines()"),  # replace the return line
        ((8, 0), (8, 0), "    return [line for line in lines if line.strip() and not line"),
    ]
    version = 1
    for start, end, new in edits:
        version += 1
        text = apply_utf16(text, start, end, new)
        change_document(client, version, start, end, new, uri)
    cursor_line = text.split("\n")[8]
    result = await inline(client, 8, len(cursor_line), uri=uri)
    assert result is not None and result.items, "no suggestion"
    suggestion = result.items[0].insert_text
    expected = first_line(greedy_continuation(text[: text.index(cursor_line) + len(cursor_line)]))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    assert suggestion == expected
    assert result.items[0].range.start == types.Position(line=8, character=len(cursor_line))

    # The worker saw exactly one open and batched edits, and reports cache stats.
    stats = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats"))
    assert stats["daemon"]["suggestions"] >= 1
    assert stats["worker"]["completions"] >= 1


def apply_utf16(text: str, start, end, new: str) -> str:
    """Like apply(), with characters counted in UTF-16 code units as LSP does by default."""
    lines = text.split("\n")

    def off(pos):
        line = lines[pos[0]]
        units = 0
        col = 0
        while col < len(line) and units < pos[1]:
            units += 2 if ord(line[col]) > 0xFFFF else 1
            col += 1
        return sum(len(ln) + 1 for ln in lines[: pos[0]]) + col

    return text[: off(start)] + new + text[off(end) :]


@pytest.mark.asyncio(loop_scope="module")
async def test_position_after_astral_character_uses_utf16_units(shared_client: LanguageClient):
    client, uri = shared_client, "file:///tmp/rotary-e2e/astral.py"
    await wait_ready(client)
    text = 'label = "🔧 spanner"\nvalue = label.upper()\nprint(val'
    open_document(client, text, uri)
    # Insert after "🔧 ": column 12 in UTF-16 units (the emoji counts 2) is code point 11.
    change_document(client, 2, (0, 12), (0, 12), "big ", uri)
    text = apply_utf16(text, (0, 12), (0, 12), "big ")
    assert text.startswith('label = "🔧 big spanner"')
    result = await inline(client, 2, 9, uri=uri)
    expected = first_line(greedy_continuation(text))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    assert result is not None and result.items, "no suggestion"
    assert result.items[0].insert_text == expected


async def daemon_stats(client: LanguageClient) -> dict:
    return (await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats")))["daemon"]


@pytest.mark.asyncio(loop_scope="module")
async def test_newer_request_supersedes_older(shared_client: LanguageClient):
    client, uri = shared_client, "file:///tmp/rotary-e2e/supersede.py"
    await wait_ready(client)
    superseded = (await daemon_stats(client))["superseded"]  # the daemon is the module's: counted from here
    # A debounce long enough that the first request is surely still waiting when the second comes.
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {"debounceMs": 1500}}))
    try:
        text = "def add(a, b):\n    return a"
        open_document(client, text, uri)
        requests = (await daemon_stats(client))["requests"]
        first = asyncio.ensure_future(inline(client, 1, 12, uri=uri))
        deadline = asyncio.get_running_loop().time() + 10
        while (await daemon_stats(client))["requests"] == requests:  # the daemon holds the first request
            assert asyncio.get_running_loop().time() < deadline, "the first request never reached the daemon"
        assert not first.done()
        second = await inline(client, 1, 12, uri=uri)
        assert await first is None
        expected = first_line(greedy_continuation(text))
        assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
        assert second is not None and second.items[0].insert_text == expected
        assert (await daemon_stats(client))["superseded"] >= superseded + 1
    finally:  # the module's other tests debounce as the fixture set it
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {"debounceMs": 10}}))


# Worker restarts (killed, rotary.restartWorker, settings changes): tests/lsp/test_restart.py.
