"""Isolation of the daemon (lsp/) and of `rotary tests`: what an editor, a repository's settings or a
worker can make them read, write or send. No model: the worker is the real WorkerService without one
(tests/fakes.py), here a subclass that misbehaves on purpose where a test needs a hostile worker.

Each test failed on the code before the fix (checked with the fix stashed); its docstring says how.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from lsprotocol import types

from rotary.completion.rpc import access
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.wire import text_crc32
from rotary.completion.service import WorkerService
from rotary.lsp import sync as sync_mod
from rotary.lsp.sync import DocumentSync, ack_matches
from tests.fakes import FAKE_COMPLETION, start_worker
from tests.listening import UNREACHABLE, wait_listening
from tests.lsp.test_lsp_protocol import RawClient, inline, open_doc, start_daemon, stats, stop_daemon
from tests.test_testgen_entrypoints import SOURCE, lsp_session, open_source
from rotary.completion.rpc.launch import rotary_command

SECRET = "AWS_SECRET_ACCESS_KEY_rotary_isolation = 'hunter2'\ndef leak_me_please():\n    return AWS"
TEST_FILE_TEXT = "from clamp import clamp\n\n\ndef test_clamp_1():\n    assert clamp(5, 0, 3) == 3\n"


class HostileWorker(WorkerService):
    """The real service, with switches for what a hostile or broken worker does."""

    file_name = "test_clamp.py"  # what GenerateTests proposes as the test file's name
    drop_crc = False  # acknowledge documents without their CRC-32
    plant: tuple[Path, Path] | None = None  # (link, target): made during GenerateTests, as a racing attacker would

    def OpenDocument(self, request, context):
        ack = super().OpenDocument(request, context)
        if self.drop_crc:
            ack.ClearField("crc32")
        return ack

    def EditDocument(self, request, context):
        ack = super().EditDocument(request, context)
        if self.drop_crc:
            ack.ClearField("crc32")
        return ack

    def GenerateTests(self, request, context):
        if self.plant is not None:
            self.plant[0].symlink_to(self.plant[1])
        yield pb.GenerateTestsReply(
            request_id=request.request_id, done=True, done_tests=1, total_tests=1, message="1 test",
            file_name=self.file_name, file_text=TEST_FILE_TEXT, language="python", focal=request.qualname,
        )


@pytest.fixture
def worker():
    server, service, address = start_worker(service_cls=HostileWorker)
    yield service, address
    server.stop(0)


def initialize(client: RawClient, capabilities: dict | None = None, options: dict | None = None, initialized: bool = True) -> dict:
    reply = client.request("initialize", {
        "processId": None, "rootUri": None, "capabilities": capabilities or {}, "initializationOptions": options,
    })
    if initialized:
        client.notify("initialized", {})
    return reply["result"]


@pytest.fixture
def daemon(worker):
    """A daemon on the hostile worker, ready."""
    proc, client = start_daemon("--worker", worker[1])
    initialize(client, options={"debounceMs": 0})
    wait_until(lambda: stats(client)["worker"]["state"] == "ready", "the daemon never reached its worker")
    yield client
    stop_daemon(proc, client)


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def did_change(client: RawClient, uri: str, changes: list, version: int = 2) -> None:
    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": changes})


def worker_documents(service: WorkerService, client: RawClient) -> int:
    """How many documents the worker holds for this daemon."""
    return service.documents.sessions().get(stats(client)["worker"]["session"], 0)


# -- 1. the daemon reads only what the editor sent ---------------------------------------------------


def test_a_uri_never_opened_is_refused_and_never_read_from_disk(daemon, worker, tmp_path):
    """Before: a didChange with no changes for a URI never opened made pygls read the file, the daemon
    adopted it, completed in it (the worker got the secret), and rotary.stats gave its length and CRC."""
    service = worker[0]
    secret = tmp_path / "secret.py"
    secret.write_text(SECRET)
    uri = secret.as_uri()
    did_change(daemon, uri, [])
    lines = SECRET.split("\n")
    end = {"line": len(lines) - 1, "character": len(lines[-1])}
    assert inline(daemon, uri, end["line"], end["character"])["result"] is None
    listed = daemon.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": end})["result"]
    assert listed["items"] == []
    actions = daemon.request("textDocument/codeAction", {
        "textDocument": {"uri": uri}, "range": {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 4}},
        "context": {"diagnostics": []},
    })
    assert "error" not in actions and actions["result"] is None
    tests = daemon.request("workspace/executeCommand", {"command": "rotary.generateTests", "arguments": [{"uri": uri, "qualname": "leak_me_please"}]})
    assert "not open" in tests["result"]["error"]
    report = stats(daemon)["daemon"]
    assert uri not in report["documents"] and report["open_documents"] == 0
    assert len(SECRET) not in [d["length"] for d in report["documents"].values()]
    assert text_crc32(SECRET) not in [d["crc32"] for d in report["documents"].values()]
    assert worker_documents(service, daemon) == 0  # nothing of it reached the worker
    # The daemon goes on serving a document the editor did open.
    open_doc(daemon, "file:///opened.py", "def f():\n    ")
    assert inline(daemon, "file:///opened.py", 1, 4)["result"]["items"][0]["insertText"] == FAKE_COMPLETION


def test_a_fifo_named_by_a_uri_never_opened_does_not_block_the_daemon(daemon, tmp_path):
    """Before: pygls opened the FIFO to read it, and the daemon's event loop hung in open() until a
    writer came; the stats request below went unanswered."""
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    did_change(daemon, fifo.as_uri(), [])
    answers: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: answers.put(stats(daemon)), daemon=True).start()
    try:
        report = answers.get(timeout=30)  # a liveness bound, not a measured duration
    except queue.Empty:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the daemon waits in open(): release it
        os.close(fd)
        pytest.fail("the daemon blocked reading a FIFO it was never sent")
    assert fifo.as_uri() not in report["daemon"]["documents"]
    with pytest.raises(OSError) as info:  # nobody holds the FIFO open for reading
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO


# -- 2. generated test files stay beside their source -------------------------------------------------


@pytest.mark.parametrize("proposed", ["../../.config/autostart/x.desktop", "/etc/cron.d/x.desktop", "..\\..\\x.desktop"])
async def test_the_lsp_test_file_takes_only_a_base_name_from_the_worker(worker, tmp_path, proposed):
    """Before: the worker's file_name was joined unchecked, so "../../.config/autostart/x.desktop" or
    an absolute path became a CreateFile outside the source's folder."""
    service, address = worker
    service.file_name = proposed
    src = tmp_path / "project" / "src"
    src.mkdir(parents=True)
    client, edits = await lsp_session(address, tmp_path / "project")
    try:
        uri = (src / "clamp.py").as_uri()
        open_source(client, uri, SOURCE)
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="rotary.generateTests", arguments=[{"uri": uri, "qualname": "clamp"}],
        ))
        target = (src / "x.desktop").as_uri()
        assert result["uri"] == target, result
        create, insert = edits[0].edit.document_changes
        assert create.uri == target and insert.text_document.uri == target
    finally:
        await client.shutdown_session()
        await client.stop()


async def test_the_lsp_test_file_needs_a_usable_name(worker, tmp_path):
    """Before: a file name of "../" became "../_2", a CreateFile in the source's parent folder."""
    service, address = worker
    service.file_name = "../"
    client, edits = await lsp_session(address, tmp_path)
    try:
        uri = (tmp_path / "clamp.py").as_uri()
        open_source(client, uri, SOURCE)
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="rotary.generateTests", arguments=[{"uri": uri, "qualname": "clamp"}],
        ))
        assert "no usable file name" in result["error"] and edits == []
    finally:
        await client.shutdown_session()
        await client.stop()


def run_tests_cli(worker_address: str, target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        rotary_command("--log-level", "warning", "tests", target, "-n", "1", "--worker", worker_address, *args),
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("force", [False, True])
def test_rotary_tests_never_writes_through_a_symbolic_link(worker, tmp_path, force):
    """Before: a dangling link at the output (out.exists() is False for it) was written through, with or
    without --force, and --force wrote through a link to an existing file."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    (src / "clamp.py").write_text(SOURCE)
    planted = outside / ("existing.py" if force else "planted.py")
    if force:
        planted.write_text("keep me\n")
    (src / "test_clamp.py").symlink_to(planted)
    out = run_tests_cli(worker[1], f"{src / 'clamp.py'}::clamp", *(["--force"] if force else []))
    assert out.returncode == 2 and "symbolic link" in out.stderr, out.stdout + out.stderr
    assert planted.read_text() == "keep me\n" if force else not planted.exists()


@pytest.mark.parametrize("force", [False, True])
def test_rotary_tests_never_writes_through_a_link_made_during_the_generation(worker, tmp_path, force):
    """The check before the generation is not what protects: the file is opened with O_NOFOLLOW (and
    O_EXCL without --force), so a link made while the worker generates is not followed either.
    Before: the link was written through."""
    (tmp_path / "clamp.py").write_text(SOURCE)
    planted = tmp_path / "outside.py"
    if force:
        planted.write_text("keep me\n")
    worker[0].plant = (tmp_path / "test_clamp.py", planted)
    out = run_tests_cli(worker[1], f"{tmp_path / 'clamp.py'}::clamp", *(["--force"] if force else []))
    assert out.returncode == 2 and ("symbolic link" if force else "appeared meanwhile") in out.stderr, out.stdout + out.stderr
    assert planted.read_text() == "keep me\n" if force else not planted.exists()


def test_rotary_tests_writes_a_new_file_and_overwrites_only_with_force(worker, tmp_path):
    """The ordinary paths still work: a new file is written; an existing one only with --force."""
    (tmp_path / "clamp.py").write_text(SOURCE)
    target = f"{tmp_path / 'clamp.py'}::clamp"
    assert run_tests_cli(worker[1], target).returncode == 0
    written = tmp_path / "test_clamp.py"
    assert written.read_text() == TEST_FILE_TEXT
    written.write_text("mine\n")
    again = run_tests_cli(worker[1], target)
    assert again.returncode == 2 and "exists" in again.stderr and written.read_text() == "mine\n"
    assert run_tests_cli(worker[1], target, "--force").returncode == 0 and written.read_text() == TEST_FILE_TEXT


# -- 3. smaller gaps ------------------------------------------------------------------------------------


def test_abstract_unix_sockets_are_refused_to_serve_and_to_connect():
    """Before: `unix-abstract:` counted as local (served without a token, connected to in plain text),
    though any local user can connect to an abstract socket: it has no file and so no permissions."""
    assert not access.is_local_address("unix-abstract:rotary")
    with pytest.raises(access.AccessError, match="abstract unix socket"):
        access.check_listen("unix-abstract:rotary", "t" * 32, True, "the worker")
    with pytest.raises(access.AccessError, match="abstract unix socket"):
        access.worker_channel("unix-abstract:rotary", token="t" * 32)
    with pytest.raises(access.AccessError, match="abstract unix socket"):
        access.sync_worker_channel("unix-abstract:rotary")


def test_an_acknowledgement_without_crc_is_a_drift(daemon, worker):
    """Before: an acknowledgement without crc32 was accepted on its length alone, so a worker holding
    another text of the same length served completions on it."""
    service = worker[0]
    assert not ack_matches(pb.DocumentAck(length=3), "abc")
    assert ack_matches(pb.DocumentAck(length=3, crc32=text_crc32("abc")), "abc")
    service.drop_crc = True
    open_doc(daemon, "file:///nocrc.py", "def f():\n    ")
    assert inline(daemon, "file:///nocrc.py", 1, 4)["result"] is None  # never completed on an unproven text
    assert stats(daemon)["daemon"]["drift_detected"] >= 1
    service.drop_crc = False
    assert inline(daemon, "file:///nocrc.py", 1, 4)["result"]["items"][0]["insertText"] == FAKE_COMPLETION


def insert_at_start(count: int) -> list[types.TextDocumentContentChangePartial]:
    return [types.TextDocumentContentChangePartial(range=types.Range(types.Position(0, 0), types.Position(0, 0)), text="x")] * count


def test_one_did_change_is_measured_before_any_of_it_is_applied(monkeypatch):
    """Before: every change of one didChange was applied (a line index and a copy of the whole text
    each) before any bound was checked: here 5,000 changes on 100,000 characters, 5,000 line indexes."""
    indexed = []
    monkeypatch.setattr(sync_mod, "line_starts", lambda text: indexed.append(1) or [0])
    docs = DocumentSync()
    docs.opened("file:///big.py", 1, "python", "y" * 100_000)
    docs.changed("file:///big.py", 2, insert_at_start(5_000), "utf-16")
    copy = docs.docs["file:///big.py"]
    assert indexed == []  # refused before a single change was applied
    assert "5000 changes" in copy.skipped_reason and copy.text == ""
    docs.changed("file:///big.py", 3, insert_at_start(1), "utf-16")  # out of sync until reopened
    assert copy.text == "" and indexed == []
    docs.opened("file:///big.py", 4, "python", "abc")
    docs.changed("file:///big.py", 5, insert_at_start(3), "utf-16")
    assert docs.docs["file:///big.py"].text == "xxxabc" and not docs.docs["file:///big.py"].skipped_reason


def test_a_too_large_did_change_is_reported_and_the_daemon_goes_on(daemon):
    """Over LSP: the document that got one is skipped with the reason, and a reopen brings it back."""
    open_doc(daemon, "file:///many.py", "z" * 100_000)
    did_change(daemon, "file:///many.py", [
        {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "x"}
    ] * 20_000)
    report = stats(daemon)["daemon"]
    assert "20000 changes" in report["skipped_documents"]["file:///many.py"]
    assert inline(daemon, "file:///many.py", 0, 3)["result"] is None
    open_doc(daemon, "file:///many.py", "def f():\n    ", version=3)
    assert inline(daemon, "file:///many.py", 1, 4)["result"]["items"][0]["insertText"] == FAKE_COMPLETION


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_an_idle_tcp_session_is_closed_and_frees_the_slot():
    """Before: the first client on loopback (no token) kept the one `lsp --tcp` slot for as long as it
    stayed connected; there was no --idle-timeout. Here the daemon closes the silent session (the
    test waits for its end of stream) and the next editor gets the slot."""
    proc = subprocess.Popen(
        rotary_command("lsp", "--tcp", "127.0.0.1:0", "--worker", UNREACHABLE, "--idle-timeout", "0.5"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, port, _ = wait_listening(proc)
        with connect(port) as first:
            stream = first.makefile("rwb")
            assert initialize(RawClient(stream, stream))["capabilities"]["inlineCompletionProvider"] is not None
            silent = RawClient(stream, stream)
            with pytest.raises(EOFError):  # the daemon ends the silent session (after its status messages)
                while True:
                    silent.read()
        with connect(port) as second:
            stream = second.makefile("rwb")
            client = RawClient(stream, stream)
            assert initialize(client)["capabilities"]["inlineCompletionProvider"] is not None
            assert stats(client)["daemon"]["open_documents"] == 0
    finally:
        proc.kill()
        proc.wait(timeout=10)


# -- 4. settings that send text elsewhere or load code need the user's yes ---------------------------


async def confirming_session(tmp_path: Path, answers: list[str], options: dict):
    """A real daemon with no --worker or --model, whose client answers window/showMessageRequest from `answers`."""
    from pytest_lsp import client_capabilities, make_test_lsp_client

    client = make_test_lsp_client()
    asked: list[str] = []

    @client.feature(types.WINDOW_SHOW_MESSAGE_REQUEST)
    def answer(params: types.ShowMessageRequestParams):
        asked.append(params.message)
        return types.MessageActionItem(title=answers.pop(0))

    await client.start_io(*rotary_command("lsp"))
    await client.initialize_session(types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), root_uri=tmp_path.as_uri(), initialization_options=options,
    ))
    return client, asked


async def daemon_stats(client) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats"))


async def wait_for(client, ok, what: str) -> dict:
    import asyncio

    for _ in range(600):
        report = await daemon_stats(client)
        if ok(report):
            return report
        await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_a_worker_address_from_the_editor_applies_only_when_the_user_allows_it(tmp_path):
    """Before: any client over stdio set workerAddress (and model) without a question, so a repository's
    .dir-locals.el could send every open document, and the worker token, to its own address."""
    first_server, first, first_address = start_worker()
    second_server, second, second_address = start_worker()
    answers = ["Allow", "Deny", "Deny", "Allow"]
    client, asked = await confirming_session(tmp_path, answers, {"workerAddress": first_address, "debounceMs": 0})
    try:
        # Asked before anything starts; allowed: the daemon's worker is the first one (no local worker started).
        report = await wait_for(client, lambda s: s["worker"]["state"] == "ready", "never reached the allowed worker")
        assert report["daemon"]["settings"]["workerAddress"] == first_address
        assert report["worker"]["restarts"] == 0 and "pid" not in report["worker"]  # no local worker first
        assert first_address in asked[0] and "Allow rotary.workerAddress?" in asked[0]
        session = report["worker"]["session"]

        # A change to the second address, denied: the first worker stays.
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {"workerAddress": second_address}}))
        await wait_for(client, lambda s: len(asked) == 2, "the change was not asked about")
        # A model, denied: not loaded.
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {"model": str(tmp_path / "evil")}}))
        await wait_for(client, lambda s: len(asked) == 3, "the model was not asked about")
        report = await daemon_stats(client)
        assert report["daemon"]["settings"]["workerAddress"] == first_address and report["daemon"]["settings"]["model"] == ""
        assert second_address in asked[1] and "evil" in asked[2]
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri="file:///kept.py", language_id="python", version=1, text="def f():\n    ")
        ))
        result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri="file:///kept.py"), position=types.Position(1, 4),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        ))
        assert result.items[0].insert_text == FAKE_COMPLETION
        assert first.documents.sessions().get(session) == 1 and second.documents.sessions() == {}

        # The same denied value again: not asked again, not applied.
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {"workerAddress": second_address}}))
        assert (await daemon_stats(client))["daemon"]["settings"]["workerAddress"] == first_address and len(asked) == 3

        # Another value, allowed: applied, the daemon moves to it and resends its document there.
        third_server, third, third_address = start_worker()
        try:
            client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {"workerAddress": third_address}}))
            await wait_for(
                client, lambda s: s["daemon"]["settings"]["workerAddress"] == third_address and s["worker"]["state"] == "ready",
                "the allowed change was not applied",
            )
            result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri="file:///kept.py"), position=types.Position(1, 4),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
            ))
            assert result.items[0].insert_text == FAKE_COMPLETION and third.documents.sessions().get(session) == 1
            assert len(asked) == 4 and answers == []
        finally:
            await client.shutdown_session()
            third_server.stop(0)
    finally:
        await client.stop()
        first_server.stop(0)
        second_server.stop(0)


def test_a_client_that_cannot_ask_cannot_set_them():
    """Before: applied without a question. A client without window.showMessage is warned instead,
    and told to pass the value on the command line. (`initialized` is never sent: no worker starts.)"""
    proc, client = start_daemon()
    try:
        initialize(client, options={"workerAddress": UNREACHABLE, "model": "/tmp/evil", "maxTokens": 9}, initialized=False)
        warned = lambda: [n["params"]["message"] for n in client.notifications  # noqa: E731
                          if n["method"] == "window/showMessage" and "cannot ask you" in n["params"]["message"]]
        wait_until(lambda: stats(client) and len(warned()) == 2, "no warning for each setting", timeout=20)
        settings = stats(client)["daemon"]["settings"]
        assert (settings["workerAddress"], settings["model"], settings["maxTokens"]) == ("", "", 9)
        assert any("--worker ADDR" in m for m in warned()) and any("--model PATH" in m for m in warned())
    finally:
        stop_daemon(proc, client)


def test_command_line_flags_win_without_a_question():
    """--worker is the user's own choice: the client's workerAddress neither asks nor applies."""
    proc = subprocess.Popen(
        rotary_command("lsp", "--worker", UNREACHABLE),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    client = RawClient(proc.stdout, proc.stdin)
    try:
        initialize(client, capabilities={"window": {"showMessage": {}}}, options={"workerAddress": "127.0.0.1:1"})
        assert stats(client)["daemon"]["settings"]["workerAddress"] == UNREACHABLE
        client.notify("workspace/didChangeConfiguration", {"settings": {"rotary": {"workerAddress": "127.0.0.1:2"}}})
        assert stats(client)["daemon"]["settings"]["workerAddress"] == UNREACHABLE
        assert [r for r in client.server_requests if r["method"] == "window/showMessageRequest"] == []
    finally:
        stop_daemon(proc, client)
