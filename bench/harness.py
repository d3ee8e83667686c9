"""What the LSP benchmarks and soaks share: editors driving real `rotary lsp` daemons over stdio
(pygls's LanguageClient), the reference-text check against the daemon's and the worker's copies,
and a worker started on a private unix socket.

Used by `rotary bench load` (bench/load.py), `rotary bench latency` and `rotary soak kills` (bench/kills.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Iterator

from rotary.completion.rpc.launch import private_socket, rotary_command, worker_command
from rotary.completion.rpc.wire import text_crc32 as crc32

STDERR_LINES_KEPT = 200  # of each daemon's log (errors only), for a report on a failure


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


@contextlib.contextmanager
def running_worker(model: str | None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A ready `rotary worker` (the embedded model, or `model`) on a unix socket in a folder of its own
    (0700; no port to race for), as (process, address); stopped and its folder removed afterwards."""
    from rotary.completion.client import WorkerClient

    folder, address = private_socket()
    worker = subprocess.Popen(worker_command(address, model, "warning"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = WorkerClient(address)
        try:
            probe.wait_ready(timeout=600)
        finally:
            probe.close()
        yield worker, address
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        shutil.rmtree(folder, ignore_errors=True)


class Editor:
    """A pygls LanguageClient driving one `rotary lsp` daemon over stdio, and the reference text it built."""

    def __init__(self, name: str, daemon_args: list[str], settings: dict | None = None, niceness: int = 0):
        self.name = name
        self.niceness = niceness  # the daemon's scheduling priority (nice -n), 0: as this process
        self.daemon_args = daemon_args
        self.settings = settings or {}
        self.client = None
        self.version = 0

    async def start(self) -> None:
        from lsprotocol import types
        from pygls.lsp.client import LanguageClient

        self.client = LanguageClient(f"rotary-{self.name}", "1")

        @self.client.feature("rotary/status")
        def status(params):  # noqa: ARG001  shown in an editor's status bar; nothing to do here
            return None

        command = rotary_command("--log-level", "error", "lsp", *self.daemon_args)
        if self.niceness:  # through nice(1): a preexec hook would fork a process that has gRPC threads
            command = ["nice", "-n", str(self.niceness), *command]
        await self.client.start_io(*command)
        # pygls pipes the daemon's stderr and never reads it. An editor does (its output panel, its log):
        # a pipe nobody reads fills after ~64 KB, and the daemon's next log line then blocks its event
        # loop for good (a kill soak's error lines filled it after ~80 kills). Read it; keep the tail.
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._stderr_reader = asyncio.ensure_future(self._read_stderr())
        await self.client.initialize_async(
            types.InitializeParams(capabilities=types.ClientCapabilities(), initialization_options=self.settings)
        )
        self.client.initialized(types.InitializedParams())

    @property
    def pid(self) -> int | None:
        server = getattr(self.client, "_server", None)
        return getattr(server, "pid", None)

    async def stats(self) -> dict:
        from lsprotocol import types

        return await asyncio.wait_for(
            self.client.workspace_execute_command_async(types.ExecuteCommandParams(command="rotary.stats")), timeout=120
        )

    async def wait_ready(self, timeout: float = 600.0, ok=None) -> dict:
        ok = ok or (lambda s: s["worker"]["state"] == "ready")
        deadline = time.monotonic() + timeout
        while not ok(current := await self.stats()):
            worker = current["worker"]
            if worker["state"] == "error" and "retrying" not in worker["message"]:
                raise RuntimeError(f"{self.name}: the daemon stopped its worker: {worker['message']}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the worker did not become ready: {current['worker']}")
            await asyncio.sleep(0.2)
        return current

    def open(self, uri: str, text: str) -> None:
        from lsprotocol import types

        self.version = 1
        self.client.text_document_did_open(
            types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text))
        )

    def change(self, uri: str, text: str, start: int, end: int, new: str) -> str:
        """Replace text[start:end] by `new` (code-point offsets) with an incremental didChange; return the
        new text. Positions are UTF-16 (the default encoding when the client names none)."""
        from lsprotocol import types

        def position(offset: int) -> types.Position:  # the texts have no CR (make_session skips such files)
            line_start = text.rfind("\n", 0, offset) + 1
            return types.Position(text.count("\n", 0, line_start), utf16_len(text[line_start:offset]))

        self.version += 1
        self.client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.version),
                content_changes=[types.TextDocumentContentChangePartial(range=types.Range(position(start), position(end)), text=new)],
            )
        )
        return text[:start] + new + text[end:]

    async def complete(self, uri: str, text: str, offset: int) -> tuple[float, str | None]:
        """inlineCompletion at `offset`; (milliseconds to the answer, the suggestion or None)."""
        from lsprotocol import types

        line_start = text.rfind("\n", 0, offset) + 1
        position = types.Position(text.count("\n", 0, line_start), utf16_len(text[line_start:offset]))
        started = time.perf_counter()
        result = await self.client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=position,
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
            )
        )
        elapsed = (time.perf_counter() - started) * 1000
        return elapsed, (result.items[0].insert_text if result and result.items else None)

    def close(self, uri: str) -> None:
        from lsprotocol import types

        self.client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))

    async def _read_stderr(self) -> None:
        stream = getattr(getattr(self.client, "_server", None), "stderr", None)
        if stream is None:
            return
        while line := await stream.readline():
            self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    async def stop(self) -> None:
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.shutdown_async(None), timeout=30)
            self.client.exit(None)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.client.stop(), timeout=30)
        except Exception:
            server = getattr(self.client, "_server", None)
            if server is not None and server.returncode is None:
                server.kill()


async def check_texts(editor: Editor, uri: str, reference: str, worker_stub) -> dict:
    """The daemon's and the worker's copies of `uri` against the reference (length and CRC-32).

    The worker is asked with an EditDocument of no changes at the version the daemon says it has
    (base = new = that version), in the daemon's session: it changes nothing and its acknowledgement
    carries the worker's length and CRC-32. Call it only while the daemon flushes nothing for `uri` (the editor idle)."""
    from rotary.completion.rpc import worker_pb2 as pb
    from rotary.completion.rpc.access import SESSION_METADATA
    from rotary.lsp.sync import wire_text

    stats = await editor.stats()
    doc = stats["daemon"].get("documents", {}).get(uri)
    wire = wire_text(reference)
    out = {"daemon_ok": False, "worker_ok": False, "why": ""}
    if doc is None:
        out["why"] = "the daemon has no such document"
        return out
    out["daemon_ok"] = doc["length"] == len(reference) and doc["crc32"] == crc32(wire)
    if not out["daemon_ok"]:
        out["why"] = f"daemon length {doc['length']} vs {len(reference)}"
    if doc["pending"] or doc["resend"] or doc["worker_version"] is None:
        out["why"] += f" daemon has {doc['pending']} pending changes (resend {doc['resend']})"
        return out
    try:
        ack = await worker_stub.EditDocument(
            pb.EditDocumentRequest(uri=uri, base_version=doc["worker_version"], new_version=doc["worker_version"]), timeout=10,
            metadata=[(SESSION_METADATA, stats["worker"].get("session", ""))],  # the daemon's copy, not another's
        )
    except Exception as exc:  # noqa: BLE001  any refusal is a failed check
        out["why"] += f" worker refused the check: {exc}"
        return out
    out["worker_ok"] = ack.length == len(wire) and ack.crc32 == crc32(wire)
    if not out["worker_ok"]:
        out["why"] += f" worker length {ack.length} vs {len(wire)}"
    return out
