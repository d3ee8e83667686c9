"""The daemon's connection to its model worker: start it (or connect to one), watch it, restart it.

By default the daemon starts a local worker process on a private unix socket
(in a 0700 folder of its own) and reports its model loading as progress. With a
worker address it connects to a running worker instead: over TLS with an access
token unless the address is on this machine (rotary.completion.rpc.access).
Whatever happens to the worker, completion requests get either a ready stub or
None (the editor then shows nothing, never an error dialog per keystroke); a
dead worker is restarted and the documents are sent again (the `on_restart`
callback).

Failed starts back off (1, 2, 4, ... s, at most MAX_BACKOFF_S) in the error
state, whose message says when the next try comes. A worker of our own that
fails to start or load MAX_START_FAILURES times in a row (a model that cannot
load, a crash while loading) stops there with a clear status until the settings
change or `rotary.restartWorker`; an external worker is retried for as long as
it is unreachable, so the daemon recovers by itself when it comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import grpc

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc import worker_pb2_grpc as pb_grpc
from rotary.completion.rpc.access import AccessError, worker_channel
from rotary.completion.rpc.launch import private_socket, worker_command

log = logging.getLogger(__name__)

STARTING, LOADING, READY, ERROR, STOPPED = "starting", "loading", "ready", "error", "stopped"
KEEP_WORKER_LOGS = 20
MAX_BACKOFF_S = 30.0
MAX_START_FAILURES = 5  # of our own worker, in a row; then stop with a clear status
STABLE_S = 60.0  # a worker ready this long has really started: its failures count from zero again
# So has one that answered a completion (mark_served): a worker killed after serving is no crash loop,
# and kills in a row (an OOM killer, a user's kill) must not stop the daemon after MAX_START_FAILURES.
# One step of the worker's model thread (a prefill chunk, a decode round) takes well under a second;
# one that has run this long is hung, and the worker is restarted. A busy worker is never: its Health
# is answered off the model thread and its steps keep finishing.
HUNG_STEP_S = 120.0
# An explicitly invoked request (a key press, a command) made while the model loads waits this long for it.
INVOKED_WAIT_S = 30


def worker_log_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "rotary" / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("worker-*.log"), key=lambda p: p.stat().st_mtime)[:-KEEP_WORKER_LOGS]:
        old.unlink(missing_ok=True)  # one log per daemon session; keep the recent ones
    return folder / f"worker-{os.getpid()}.log"


class WorkerConnection:
    def __init__(
        self,
        address: str = "",
        model: str = "",
        on_state: Callable[[str, str], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        token: str | None = None,
        ca_file: str | None = None,
    ):
        self.external_address = address
        self.model = model
        self.token = token  # sent to an external worker (ROTARY_WORKER_TOKEN)
        # This daemon's session in the worker: its documents are kept apart from other daemons' and
        # dropped when it stops calling (completion/documents.py, service.py).
        self.session = uuid.uuid4().hex
        self.ca_file = ca_file  # PEM that an external worker's TLS certificate must chain to
        self.on_state = on_state or (lambda state, message: None)
        self.on_restart = on_restart or (lambda: None)
        self.state = STOPPED
        self.message = ""
        self.process: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.WorkerStub | None = None
        self.restarts = 0
        self.log_path: Path | None = None
        self._supervisor: asyncio.Task | None = None
        self._socket_dir: str | None = None
        self._wake = asyncio.Event()
        self.last_failure: str | None = None  # why the last start failed; cleared once ready
        self.failures = 0  # failed starts in a row
        self.served = False  # the current worker answered a completion (it really started)
        self._wanted = False
        self.backoff_base_s = 1.0
        self.hung_after_s = HUNG_STEP_S
        self.connect_timeout_s = 10.0  # an external worker that answers nothing for this long is unreachable

    # -- public ------------------------------------------------------------

    @property
    def wanted(self) -> bool:
        """start() was called and stop() was not (also while stopped after repeated failures)."""
        return self._wanted

    def start(self) -> None:
        self._wanted = True
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.ensure_future(self._supervise())

    def ready_stub(self) -> pb_grpc.WorkerStub | None:
        return self.stub if self.state == READY else None

    async def wait_ready(self, timeout: float) -> pb_grpc.WorkerStub | None:
        """The ready stub once the worker is ready, waiting at most `timeout` s while it starts or loads.

        Returns None at once when the worker is not on its way (stopped, in its error state, or
        retrying after a failed start: an unreachable worker must not hold the request), and None
        after the timeout. Cancelling the caller's task cancels the wait.
        """
        deadline = time.monotonic() + timeout
        while self.state == LOADING or (self.state == STARTING and not self.last_failure):
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.1)
        return self.ready_stub()

    def mark_served(self) -> None:
        """The current worker answered a completion: it has really started (its failures start over)."""
        self.served = True

    def report_failure(self, exc: BaseException) -> None:
        """A call failed as if the worker were gone: check it now rather than at the next poll."""
        log.warning("worker call failed: %s", exc)
        self._wake.set()

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        self.on_restart()  # a new worker knows no documents: resend them whole
        self.start()

    async def stop(self) -> None:
        self._wanted = False
        if self._supervisor:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
            self._supervisor = None
        await self._close_channel()
        await self._kill_process()
        self._set_state(STOPPED, "stopped")

    def reconfigure(self, address: str, model: str) -> bool:
        """Take new settings; return True when the worker must be restarted for them."""
        changed = (address, model) != (self.external_address, self.model)
        self.external_address, self.model = address, model
        return changed

    # -- supervision -------------------------------------------------------

    async def _supervise(self) -> None:
        self.failures = 0
        first = True
        while True:
            ready_at = None
            try:
                if not first:
                    self.restarts += 1
                    self.on_restart()
                first = False
                self.served = False
                address = await self._launch()
                await self._open_channel(address)
                await self._wait_ready()
                ready_at = time.monotonic()
                await self._watch()
            except asyncio.CancelledError:
                raise
            except AccessError as exc:  # a setting, not a fault: trying again cannot help
                await self._stop_after(str(exc))
                return
            except Exception as exc:
                log.warning("worker problem: %s", exc)
                self.last_failure = str(exc)
            await self._close_channel()
            await self._kill_process()
            if ready_at is not None and (self.served or time.monotonic() - ready_at >= STABLE_S):
                self.failures = 0
            self.failures += 1
            if not self.external_address and self.failures >= MAX_START_FAILURES:
                await self._stop_after(
                    f"the worker failed {self.failures} times in a row, last: {self.last_failure}. "
                    "Stopped; fix the cause (see the worker log), then run rotary.restartWorker or change the settings"
                )
                return
            delay = min(self.backoff_base_s * 2 ** (self.failures - 1), MAX_BACKOFF_S)
            self._set_state(ERROR, f"{self.last_failure}; retrying in {delay:.0f} s")
            await self._back_off(delay)

    async def _back_off(self, delay: float) -> None:
        """The wait before the next start (its own method so a test can see the delays without waiting them)."""
        await asyncio.sleep(delay)

    async def _stop_after(self, message: str) -> None:
        log.error("%s", message)
        self.last_failure = message
        await self._close_channel()
        await self._kill_process()
        self._set_state(ERROR, message)

    async def _launch(self) -> str:
        if self.external_address:
            self._set_state(STARTING, f"connecting to worker at {self.external_address}")
            return self.external_address
        self._set_state(STARTING, "starting the model worker")
        self._socket_dir, address = private_socket()  # only this user reaches the socket
        cmd = worker_command(address, self.model or None)
        self.log_path = worker_log_path()
        log_file = open(self.log_path, "ab")
        try:
            # stdout is the LSP channel of the daemon: the worker must never write there.
            self.process = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        finally:
            log_file.close()
        log.info("started worker pid %s on %s (log %s)", self.process.pid, address, self.log_path)
        return address

    async def _open_channel(self, address: str) -> None:
        await self._close_channel()
        token = self.token if self.external_address else None  # our own worker is on a private socket
        self.channel = worker_channel(address, token, self.ca_file, session=self.session)
        self.stub = pb_grpc.WorkerStub(self.channel)

    async def _wait_ready(self) -> None:
        started = time.monotonic()
        last = None
        while True:
            self._check_process()
            try:
                health = await self.stub.Health(pb.HealthRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise AccessError(f"worker at {self.external_address} refused the access token: {exc.details()}") from exc
                if self.external_address and time.monotonic() - started > self.connect_timeout_s:
                    raise RuntimeError(f"worker at {self.external_address} is unreachable ({exc.code().name})")
                await asyncio.sleep(0.2)
                continue
            if health.ready:
                self._set_state(READY, f"ready: {health.model} on {health.device}")
                return
            if health.message.startswith("model failed"):
                raise RuntimeError(health.message)
            if health.message != last:
                self._set_state(LOADING, health.message)
                last = health.message
            await asyncio.sleep(0.3)

    async def _watch(self) -> None:
        """Return when the worker is gone."""
        while True:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass
            self._check_process()
            try:
                health = await self.stub.Health(pb.HealthRequest(), timeout=2)
                if not health.ready:
                    raise RuntimeError(f"worker is no longer ready: {health.message}")
                if health.busy_seconds > self.hung_after_s:
                    raise RuntimeError(f"worker hung: one step of its model thread has run {health.busy_seconds:.0f} s")
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(f"worker unreachable: {exc.code().name}") from exc

    def _check_process(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"worker exited with code {self.process.returncode} (log: {self.log_path})")

    async def _close_channel(self) -> None:
        self.stub = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def _kill_process(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._socket_dir:
            for leftover in Path(self._socket_dir).glob("*"):
                leftover.unlink(missing_ok=True)
            os.rmdir(self._socket_dir)
            self._socket_dir = None

    def _set_state(self, state: str, message: str) -> None:
        changed = (state, message) != (self.state, self.message)
        self.state, self.message = state, message
        if state == READY:
            self.last_failure = None
        if changed:
            self.on_state(state, message)


def own_task_cancelled() -> bool:
    """Whether the running request's own task is being cancelled ($/cancelRequest, shutdown).

    grpc.aio also raises asyncio.CancelledError out of a call that was cancelled under it, as when
    a worker restart closes the channel mid-call; that one must be answered, not propagated (pygls
    would leave the request unanswered, and the editor waiting)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def worker_stats(stub) -> dict:
    """The worker's own stats, or {"stats_error": why} (unreachable, restarted mid-call)."""
    try:
        reply = await stub.Stats(pb.StatsRequest(), timeout=5)
        return json.loads(reply.json)
    except grpc.aio.AioRpcError as exc:
        return {"stats_error": exc.details()}
    except grpc.aio.UsageError as exc:
        return {"stats_error": str(exc)}
    except asyncio.CancelledError:
        if own_task_cancelled():
            raise
        return {"stats_error": "the worker's connection closed during the call (a restart)"}
