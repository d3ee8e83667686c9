"""`rotary demo` (what `make run` runs): the whole service on the embedded model, end to end.

It starts a model worker on loopback, starts the LSP daemon exactly as an
editor would (`rotary lsp` over stdio), opens a sample file, types into it
with incremental edits, asks for ghost text (textDocument/inlineCompletion)
and prints the suggestion. Then it keeps the worker serving and tells how to
connect an editor.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from rotary.completion.rpc.launch import DEFAULT_LISTEN, rotary_command, spawn_worker

# Ends mid-statement on purpose (the demo types the rest), so it is not a .py file of the package.
SAMPLE = Path(__file__).parent / "samples" / "inventory.py.in"


def _say(msg: str) -> None:
    print(msg, flush=True)


async def _drive_lsp(worker_address: str) -> str:
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("rotary-demo", "1")
    ready = asyncio.Event()

    @client.feature("rotary/status")
    def status(params):
        state = params.state if hasattr(params, "state") else params["state"]
        message = params.message if hasattr(params, "message") else params["message"]
        _say(f"  [daemon] {state}: {message}")
        if state == "ready":
            ready.set()

    await client.start_io(*rotary_command("--log-level", "warning", "lsp", "--worker", worker_address))
    started = time.perf_counter()
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            initialization_options={"completionMode": "multiLine", "maxTokens": 48},
        )
    )
    client.initialized(types.InitializedParams())
    await asyncio.wait_for(ready.wait(), timeout=600)
    _say(f"  daemon connected to the worker in {time.perf_counter() - started:.1f} s")

    text = SAMPLE.read_text()
    uri = SAMPLE.resolve().as_uri().removesuffix(".in")
    # Open the file without its last characters, then type them as an editor would (incremental edits).
    typed = "item."
    head = text.rstrip("\n")[: -len(typed)]
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=head))
    )
    line = head.count("\n")
    column = len(head.split("\n")[-1])
    for i, ch in enumerate(typed):
        client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2 + i),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(types.Position(line, column + i), types.Position(line, column + i)), text=ch
                    )
                ],
            )
        )
    column += len(typed)
    cursor_line = head.split("\n")[-1] + typed
    _say(f"\n  typed into {SAMPLE.stem}; cursor at the end of:\n      {cursor_line}")
    started = time.perf_counter()
    result = await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line, column),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        )
    )
    elapsed = (time.perf_counter() - started) * 1000
    suggestion = result.items[0].insert_text if result and result.items else ""
    _say(f"\n  suggestion ({elapsed:.0f} ms through LSP + gRPC):\n      {cursor_line}\x1b[2m{suggestion}\x1b[0m\n")
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return suggestion


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_demo(serve_after: bool = True, model: str | None = None, listen: str = DEFAULT_LISTEN) -> int:
    """Ctrl-C, SIGTERM and SIGHUP all end the demo through its `finally`, which stops the worker;
    the worker also watches this process (--parent-pid), so even a SIGKILL leaves no worker behind."""
    from rotary.completion.client import WorkerClient

    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)
    _say(f"Rotary demo: starting the model worker on {listen} (embedded model unless --model)")
    worker = spawn_worker(listen, model, log_level="warning")
    try:
        client = WorkerClient(listen)
        try:
            health = client.wait_ready(timeout=600, on_message=lambda m: _say(f"  [worker] {m}"))
        except (RuntimeError, TimeoutError) as exc:
            _say(f"worker failed: {exc}")
            return 1
        _say(f"  worker ready: {health.model} on {health.device}")
        _say("Starting the LSP daemon (rotary lsp, stdio) and completing through it:")
        suggestion = asyncio.run(_drive_lsp(listen))
        if not suggestion:
            _say("  (the model offered no suggestion here)")
        if not serve_after:
            return 0 if suggestion else 1
        exe = Path(sys.executable).parent / "rotary"
        _say(
            "The worker keeps serving. Connect an editor (see README):\n"
            f"  - any LSP client: run `{exe} lsp --worker {listen}` (or plain `{exe} lsp`, which starts its own worker)\n"
            "  - VS Code: editors/vscode (rotary.serverPath), Neovim: editors/nvim, Emacs: eglot\n"
            f"  - one-shot: `{exe} complete FILE --line L --worker {listen}`\n"
            "Press Ctrl-C to stop."
        )
        worker.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(stop, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
