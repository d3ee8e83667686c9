"""The daemon's side of "Generate unit tests": the code action on a Python function, and the
rotary.generateTests command that asks the worker for its tests (GenerateTests, streamed, with a
cancellable $/progress) and opens them as a new test file beside the source (a workspace edit).

Which function a position is in is found here, in pure Python (`ast`); the generation itself
happens in the worker. The text sent is the daemon's copy of the open document (lsp/sync.py).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import grpc
from lsprotocol import types
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path

from rotary.completion.rpc import worker_pb2 as pb

from .protocol import client_window
from .sync import DocumentSync
from .worker import INVOKED_WAIT_S, WorkerConnection, own_task_cancelled

log = logging.getLogger(__name__)

GENERATE_TESTS = "rotary.generateTests"
# Generating a batch of tests takes minutes on a CPU; the call ends by itself after this long.
TESTS_TIMEOUT_S = 1800


class TestsCommand:
    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, lsp: LanguageServer, sync: DocumentSync, worker: WorkerConnection):
        """`lsp`: the server whose client shows the progress, the messages and the new file."""
        self.lsp, self.sync, self.worker = lsp, sync, worker

    def action(self, uri: str, line: int) -> types.CodeAction | None:
        """"Generate unit tests for <name>" on the Python function holding `line`, if there is one."""
        copy = self.sync.opened_copy(uri, "codeAction")
        if copy is None or copy.skipped_reason:
            return None
        if (copy.language_id or "") != "python" and not uri.endswith((".py", ".pyi")):
            return None
        found = function_at(copy.text, line)
        if found is None:
            return None
        return types.CodeAction(
            title=f"Generate unit tests for {found.name}",
            kind=types.CodeActionKind.Refactor,
            command=types.Command(
                title=f"Generate unit tests for {found.name}", command=GENERATE_TESTS,
                arguments=[{"uri": uri, "qualname": found.qualname}],
            ),
        )

    async def generate(self, uri: str, qualname: str, count: int = 0) -> dict:
        """Ask the worker for tests of `qualname` in the document `uri`, with $/progress (cancellable);
        open the result as a new test file beside it (workspace edit: CreateFile + insert). A document
        closed while the model loads ends the command quietly ({"cancelled": True})."""
        copy = self.sync.opened_copy(uri, GENERATE_TESTS)
        if copy is None:
            return self.failed(f"Rotary: {uri} is not open")
        stub = self.worker.ready_stub() or await self.worker.wait_ready(INVOKED_WAIT_S)
        copy = self.sync.docs.get(uri)  # the text now (edited, or reopened, while the model loaded)
        if copy is None:  # closed meanwhile: the editor no longer has it
            log.info("%s: %s was closed while waiting for the worker; no tests", GENERATE_TESTS, uri)
            return {"cancelled": True}
        if stub is None:
            return self.failed(f"Rotary: the model worker is not ready ({self.worker.message})")
        path = to_fs_path(uri) or uri.rsplit("/", 1)[-1]
        token = f"rotary/tests/{uuid.uuid4().hex[:8]}"
        request = pb.GenerateTestsRequest(
            path=path, text=copy.text, qualname=qualname, count=count, language_id="python", request_id=token,
        )  # the text as the wait for the worker ended, not after the next await
        progress = await self._begin_progress(token, f"Rotary: tests for {qualname}")
        call = stub.GenerateTests(request, timeout=TESTS_TIMEOUT_S)
        if progress is not None:  # the user pressed cancel on the progress: cancel the call, down to the worker
            progress.add_done_callback(lambda f: call.cancel() if f.cancelled() else None)
        last = None
        try:
            async for reply in call:
                last = reply
                if progress is not None and reply.total_tests:
                    self.lsp.work_done_progress.report(token, types.WorkDoneProgressReport(
                        message=reply.message, percentage=int(100 * reply.done_tests / reply.total_tests),
                    ))
        except asyncio.CancelledError:
            # Two causes reach here: grpc.aio raises CancelledError out of a call cancelled on this
            # side (the user pressed cancel on the progress: `call.cancel()` above), and the request's
            # own task is cancelled ($/cancelRequest, shutdown). The first is an answer, the second
            # must propagate so that pygls drops the request.
            call.cancel()
            self._end_progress(token, progress, "cancelled")
            if own_task_cancelled():
                raise
            return {"cancelled": True}
        except grpc.aio.AioRpcError as exc:
            self._end_progress(token, progress, "cancelled" if exc.code() == grpc.StatusCode.CANCELLED else "failed")
            if exc.code() == grpc.StatusCode.CANCELLED:
                return {"cancelled": True}
            return self.failed(f"Rotary: no tests for {qualname}: {exc.details()}")
        except grpc.aio.UsageError as exc:
            self._end_progress(token, progress, "failed")
            return self.failed(f"Rotary: the worker connection was replaced ({exc})")
        if last is None or not last.done or (progress is not None and progress.cancelled()):
            self._end_progress(token, progress, "cancelled")
            return {"cancelled": True}
        try:
            target = new_test_file_uri(uri, last.file_name)  # beside the source, whatever the worker proposed
        except ValueError as exc:
            self._end_progress(token, progress, "failed")
            return self.failed(f"Rotary: no test file for {qualname}: {exc}")
        edit = types.WorkspaceEdit(document_changes=[
            types.CreateFile(uri=target, options=types.CreateFileOptions(overwrite=False, ignore_if_exists=False)),
            types.TextDocumentEdit(
                text_document=types.OptionalVersionedTextDocumentIdentifier(uri=target, version=None),
                edits=[types.TextEdit(range=types.Range(start=types.Position(0, 0), end=types.Position(0, 0)), new_text=last.file_text)],
            ),
        ])
        applied = await self.lsp.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit=edit, label=f"Unit tests for {qualname}"))
        self._end_progress(token, progress, last.message)
        if not applied.applied:
            return self.failed(f"Rotary: the editor did not create {target}: {applied.failure_reason or 'refused'}")
        window = client_window(self.lsp.protocol)
        if window and window.show_document and window.show_document.support:
            try:
                await self.lsp.window_show_document_async(types.ShowDocumentParams(uri=target, take_focus=True))
            except Exception as exc:  # the file exists either way
                log.info("showDocument failed: %s", exc)
        return {"uri": target, "tests": last.done_tests, "fileName": last.file_name}

    def failed(self, message: str) -> dict:
        log.warning("%s", message)
        self.lsp.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=message))
        return {"error": message}

    async def _begin_progress(self, token: str, title: str):
        """A cancellable $/progress, when the client supports it; returns its cancel future (or None)."""
        window = client_window(self.lsp.protocol)
        if not (window and window.work_done_progress):
            return None
        try:
            await self.lsp.work_done_progress.create_async(token)
            self.lsp.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, cancellable=True, percentage=0))
        except Exception as exc:
            log.debug("progress not shown: %s", exc)
            return None
        return self.lsp.work_done_progress.tokens.get(token)

    def _end_progress(self, token: str, progress, message: str) -> None:
        if progress is None:
            return
        try:
            self.lsp.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        finally:
            self.lsp.work_done_progress.tokens.pop(token, None)


@dataclass(frozen=True)
class FunctionAt:
    qualname: str  # "name" or "Class.method" (nested classes and functions joined with dots)
    name: str
    line: int  # 0-based line of its `def`


def function_at(text: str, line: int) -> FunctionAt | None:
    """The innermost function or method whose lines hold `line` (0-based); None when the text does
    not parse or the line is in no function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    best: FunctionAt | None = None

    def visit(body, prefix: str) -> None:
        nonlocal best
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                last = (node.end_lineno or node.lineno) - 1
                if not first <= line <= last:
                    continue
                qualname = prefix + node.name
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qualname + ".")
                else:
                    best = FunctionAt(qualname, node.name, node.lineno - 1)
                    visit(node.body, qualname + ".")

    visit(tree.body, "")
    return best


def new_test_file_uri(source_uri: str, file_name: str, exists=os.path.lexists) -> str:
    """Where the new test file goes: beside the source, under a name no file (nor link) has yet.

    Only the base name of the worker's `file_name` is used: a worker's "../x" or "/etc/x" must not
    put a file outside the source's folder. Raises ValueError when it has no usable base name."""
    name = os.path.basename(file_name.replace("\\", "/"))
    if name in ("", ".", "..") or "\x00" in name:
        raise ValueError(f"the worker proposed no usable file name ({file_name!r})")
    path = to_fs_path(source_uri) if source_uri.startswith("file:") else None
    if not path:
        return source_uri.rsplit("/", 1)[0] + "/" + quote(name)
    folder = os.path.dirname(path)
    stem, ext = os.path.splitext(name)
    candidate, k = os.path.join(folder, name), 2
    while exists(candidate):
        candidate, k = os.path.join(folder, f"{stem}_{k}{ext}"), k + 1
    return from_fs_path(candidate)
