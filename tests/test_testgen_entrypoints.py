"""`rotary tests`, GenerateTests over gRPC and the LSP code action, end to end on one real worker.

Bad input (a function that does not exist, a file that does not parse, a language without a
grammar) gets a clear error on each path and nothing is written.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest
from lsprotocol import types

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.launch import rotary_command

SOURCE = '''def clamp(value, low, high):
    """Limit value to the range [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value
'''


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        rotary_command("--log-level", "warning", "tests", *args),
        capture_output=True, text=True, timeout=timeout,
    )


# -- bad input on the command line: no model needed, nothing written ------------------------------


@pytest.mark.parametrize(
    "name, text, target, words",
    [
        ("clamp.py", SOURCE, "clamp.py::clip", ["no function or method 'clip'", "clamp"]),
        ("broken.py", "def clamp(:\n", "broken.py::clamp", ["does not parse as Python", "line 1"]),
        ("clamp.rb", "def clamp; end\n", "clamp.rb::clamp", ["no grammar", ".rb"]),
        ("clamp.py", SOURCE, "clamp.py", ["FILE::QUALNAME"]),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, name, text, target, words):
    (tmp_path / name).write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = run_cli(str(tmp_path / target), timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    for word in words:
        assert word in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- the real worker -----------------------------------------------------------------------------------


@pytest.fixture
def worker(shared_worker):
    """The session's worker (tests/conftest.py): default flags, caches under a temporary directory."""
    return shared_worker


@pytest.mark.model
def test_grpc_streams_each_test_with_progress(worker):
    replies = list(worker.generate_tests("clamp.py", SOURCE, "clamp", count=2, max_tokens=32, explain=True, request_id="g1"))
    first, tests, last = replies[0], [r for r in replies if r.HasField("test")], replies[-1]
    assert first.total_tests == 2 and first.done_tests == 0 and not first.HasField("test") and first.focal == "clamp"
    assert [r.done_tests for r in tests] == [1, 2] and all(r.request_id == "g1" for r in replies)
    assert [t.test.name for t in tests] == ["test_clamp_1", "test_clamp_2"]
    assert tests[0].test.code.startswith("def test_clamp_1():\n    # a typical input\n    assert clamp")
    assert all(t.test.stats.tokens_generated > 0 for t in tests)
    assert last.done and last.file_name == "test_clamp.py" and last.language == "python"
    assert "from clamp import clamp" in last.file_text and "def test_clamp_2():" in last.file_text
    # The second test was drafted from the first one's patterns (explain lists the drafts).
    assert any(d.source == "ast" and d.pattern for d in tests[1].test.drafts), tests[1].test.drafts
    # Greedy output does not depend on the drafter.
    plain = list(worker.generate_tests("clamp.py", SOURCE, "clamp", count=2, max_tokens=32, drafter="plain"))
    assert plain[-1].file_text == last.file_text


@pytest.mark.model
@pytest.mark.parametrize(
    "path, text, qualname, fields, code, words",
    [
        ("clamp.py", SOURCE, "clip", {}, grpc.StatusCode.NOT_FOUND, ["clip"]),
        ("broken.py", "def clamp(:\n", "clamp", {}, grpc.StatusCode.INVALID_ARGUMENT, ["does not parse"]),
        ("clamp.rb", "def clamp; end", "clamp", {}, grpc.StatusCode.INVALID_ARGUMENT, ["no grammar"]),
        ("clamp.py", SOURCE, "clamp", {"count": 50}, grpc.StatusCode.INVALID_ARGUMENT, ["count"]),
        ("clamp.py", SOURCE, "clamp", {"drafter": "magic"}, grpc.StatusCode.INVALID_ARGUMENT, ["drafter"]),
    ],
)
def test_grpc_bad_input(worker, path, text, qualname, fields, code, words):
    with pytest.raises(grpc.RpcError) as info:
        list(worker.generate_tests(path, text, qualname, **fields))
    assert info.value.code() == code
    for word in words:
        assert word in info.value.details()


@pytest.mark.model
def test_grpc_cancel_stops_the_generation(worker):
    call = worker.generate_tests("clamp.py", SOURCE, "clamp", count=5, max_tokens=128)
    seen = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in call:
            seen.append(reply)
            if reply.HasField("test"):
                call.cancel()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert sum(r.HasField("test") for r in seen) == 1
    assert worker.stub.Health(pb.HealthRequest()).ready  # the worker goes on serving


@pytest.mark.model
def test_cli_writes_explains_and_checks(worker, tmp_path):
    source = tmp_path / "clamp.py"
    source.write_text(SOURCE)
    out = run_cli(f"{source}::clamp", "-n", "2", "--max-tokens", "32", "--worker", worker.address, "--explain", "--check")
    assert out.returncode == 0, out.stderr
    written = tmp_path / "test_clamp.py"
    assert written.exists() and "def test_clamp_1():" in written.read_text()
    assert f"wrote {written}: 2 tests for clamp" in out.stdout
    assert "test_clamp_2:" in out.stdout and "drafted tokens kept" in out.stdout  # --explain, per test
    assert "--check:" in out.stdout and "subprocess in a temporary directory" in out.stdout
    assert " of 2 passed" in out.stdout
    again = run_cli(f"{source}::clamp", "--worker", worker.address)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten without --force


# -- the LSP code action -------------------------------------------------------------------------------


async def lsp_session(address: str, tmp_path: Path):
    from pytest_lsp import client_capabilities, make_test_lsp_client

    client = make_test_lsp_client()
    _structure_code_actions_by_shape(client)
    edits: list[types.ApplyWorkspaceEditParams] = []

    @client.feature(types.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: types.ApplyWorkspaceEditParams):
        edits.append(params)
        return types.ApplyWorkspaceEditResult(applied=True)

    await client.start_io(*rotary_command("lsp", "--worker", address))
    await client.initialize_session(types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), root_uri=tmp_path.as_uri(),
    ))
    return client, edits


def _structure_code_actions_by_shape(client) -> None:
    """lsprotocol (2025.0.0) reads every item of a code-action result that has a "command" key as a
    Command, so a CodeAction that carries its command (what the server sends, as the spec allows)
    arrives as a Command whose `command` is the text of a dict. Editors tell the two apart by the
    type of "command" (a string in a Command, an object in a CodeAction); so does this client."""
    from typing import Union

    converter = client.protocol._converter

    def structure(obj, _):
        is_command = isinstance(obj.get("command"), str)
        return converter.structure(obj, types.Command if is_command else types.CodeAction)

    converter.register_structure_hook(Union[types.Command, types.CodeAction], structure)


def open_source(client, uri: str, text: str) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
    ))


async def wait_ready(client) -> None:
    for _ in range(600):
        stats = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats"))
        if stats["worker"]["state"] == "ready":
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("worker not ready")


@pytest.mark.model
async def test_lsp_code_action_creates_a_test_file_with_progress(worker, tmp_path):
    client, edits = await lsp_session(worker.address, tmp_path)
    try:
        uri = (tmp_path / "clamp.py").as_uri()
        open_source(client, uri, SOURCE)
        await wait_ready(client)
        actions = await client.text_document_code_action_async(types.CodeActionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            range=types.Range(start=types.Position(3, 4), end=types.Position(3, 4)),
            context=types.CodeActionContext(diagnostics=[]),
        ))
        assert [a.title for a in actions] == ["Generate unit tests for clamp"]
        command = actions[0].command
        args = list(command.arguments)
        args[0]["count"] = 2
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(command=command.command, arguments=args))
        target = (tmp_path / "test_clamp.py").as_uri()
        assert result["uri"] == target and result["tests"] == 2, result
        create, insert = edits[0].edit.document_changes
        assert create.kind == "create" and create.uri == target
        assert insert.text_document.uri == target and "def test_clamp_2():" in insert.edits[0].new_text
        assert [d.uri for d in client.shown_documents] == [target]
        reports = [r for token, values in client.progress_reports.items() if token.startswith("rotary/tests/") for r in values]
        assert [r.kind for r in reports][:1] == ["begin"] and reports[-1].kind == "end"
        assert reports[0].cancellable and any(r.kind == "report" and r.percentage == 50 for r in reports)
        # Outside any function: no action.
        assert await client.text_document_code_action_async(types.CodeActionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            range=types.Range(start=types.Position(7, 0), end=types.Position(7, 0)),
            context=types.CodeActionContext(diagnostics=[]),
        )) is None
    finally:
        await client.shutdown_session()
        await client.stop()


@pytest.mark.model
async def test_lsp_cancel_and_bad_input(worker, tmp_path):
    client, edits = await lsp_session(worker.address, tmp_path)
    try:
        uri = (tmp_path / "clamp.py").as_uri()
        open_source(client, uri, SOURCE)
        await wait_ready(client)
        # A function that is not there: an error message, nothing created.
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="rotary.generateTests", arguments=[{"uri": uri, "qualname": "clip"}],
        ))
        assert "error" in result and "clip" in result["error"]
        assert any(m.type == types.MessageType.Error and "clip" in m.message for m in client.messages)
        # Cancelled from the progress (the editor's cancel button) after the first test: nothing created.
        task = asyncio.ensure_future(client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="rotary.generateTests", arguments=[{"uri": uri, "qualname": "clamp", "count": 5}],
        )))
        token = None
        for _ in range(3000):
            token = next((t for t, values in client.progress_reports.items()
                          if t.startswith("rotary/tests/") and any(r.kind == "report" and r.percentage for r in values)), None)
            if token or task.done():
                break
            await asyncio.sleep(0.1)
        assert token is not None, client.progress_reports
        client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
        result = await asyncio.wait_for(task, timeout=120)
        assert result == {"cancelled": True}
        assert edits == []
        assert client.progress_reports[token][-1].kind == "end"
    finally:
        await client.shutdown_session()
        await client.stop()
