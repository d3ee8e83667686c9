"""What the editor is told about the daemon: `rotary/status` notifications (a status bar) and the
worker start's $/progress (starting, loading the model, ready).

It owns the open progress token of a worker start and the last completion's latency shown in the
status. It sends only; it never starts, stops or asks anything.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from .protocol import client_window
from .worker import LOADING, READY, STARTING, STOPPED

log = logging.getLogger(__name__)


class Status:
    def __init__(self, lsp: LanguageServer, enabled: Callable[[], bool]):
        """`lsp`: the server whose client is told; `enabled`: whether completions are on (the settings)."""
        self.lsp = lsp
        self.enabled = enabled
        self.progress_token: str | None = None  # the open $/progress of a worker start; one token per start
        self.last_latency_ms: float | None = None  # of the last completion answered (set by lsp/completion.py)

    def send(self, state: str, message: str, last_result: str | None = None) -> None:
        self.lsp.protocol.notify(
            "rotary/status",
            {"state": state, "message": message, "latencyMs": self.last_latency_ms, "lastResult": last_result},
        )

    def worker_changed(self, state: str, message: str) -> None:
        """The worker connection's state changed (WorkerConnection.on_state): status and $/progress."""
        log.info("worker %s: %s", state, message)
        if state == STOPPED:  # only on shutdown or restart; the next state says what follows
            return
        status = "disabled" if not self.enabled() else {READY: "ready", LOADING: "loading", STARTING: "loading"}.get(state, "error")
        self.send(status, message)
        asyncio.ensure_future(self._progress(state, message))

    async def _progress(self, state: str, message: str) -> None:
        window = client_window(self.lsp.protocol)
        if not (window and window.work_done_progress):
            return
        progress = self.lsp.work_done_progress
        try:
            if state in (STARTING, LOADING) and self.progress_token is None:
                token = self.progress_token = f"rotary/worker/{uuid.uuid4().hex[:8]}"
                await progress.create_async(token)
                progress.begin(token, types.WorkDoneProgressBegin(title="Rotary", message=message, cancellable=False))
            elif state in (STARTING, LOADING):
                progress.report(self.progress_token, types.WorkDoneProgressReport(message=message))
            elif self.progress_token is not None:
                token, self.progress_token = self.progress_token, None
                progress.end(token, types.WorkDoneProgressEnd(message=message))
        except Exception as exc:  # a client that refuses progress still gets completions
            log.debug("progress not shown: %s", exc)
