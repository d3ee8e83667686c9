"""One thread owns the model: every forward pass of every request runs here, stepped together.

A request is a small state machine (queued -> prefill, one chunk per step -> decode, one
verify step per round -> done). Each round of the loop:
1. admits new requests in arrival order (first come, first served); a request whose
   document is busy with an earlier one waits for it (one document, one cache);
2. ends cancelled requests (checked every round: during prefill between chunks, during
   decoding between steps);
3. runs prefill steps (one chunk each) of the requests that are prefilling, oldest first,
   until PREFILL_ROUND_S is spent, so that a long prefill delays the others by at most that
   plus one chunk; small steps (a keystroke's edited tokens) come back as deferred forwards,
   not run;
4. runs one batched forward for every request that is decoding: each feeds its pending
   token plus its drafter's guesses, and keeps what greedy decoding keeps (decode.py); the
   deferred forwards ride in it as rows that only write K/V (or run alone with no decoding).
With nothing to do it runs background work, the lowest priority (the KV manager's): one chunk
of a stale document's refresh at a time, and copies of changed caches handed to a writer
thread (disk I/O never happens on this thread).

The scheduler decides; what it runs is handed to it as typed objects: `Steps` (completion/steps.py
runs each step on the model) and `BackgroundWork` (cache/manager.py). It never calls back into
the front (engine.py) that submits to it.

Callers (gRPC threads, benchmarks, tests) submit a Job and read its chunks from a queue:
they never touch the model, its caches or a lock around them, so Health and Stats never
wait for a busy model.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, TypeVar

from rotary.cache.deferred import DeferredForward
from rotary.cache.manager import PrefillStep, PrefillSteps
from rotary.cache.store import DocumentKV

from .decode import Generation
from .drafters import TokenSources
from .prompt import Prompt
from .request import Chunk, CompletionOptions, CompletionStats

log = logging.getLogger(__name__)

QUEUED, PREFILL, DECODE, DONE = "queued", "prefill", "decode", "done"
IDLE_SECONDS = 1.0  # background work waits this long after the last request
T = TypeVar("T")
# Prefill work per round before the decoding requests get their step. Requests that arrive
# together (many editors pausing at once) then start decoding together, in one wide batch, rather
# than trickling in a few a round; a decoding request waits at most this long for its next token,
# which an inline completion (shown whole) does not see. Measured with 20 documents completing at
# once: 0.15 s gave batches of ~4 rows, 1.0 s fewer rounds and a shorter wall time (noisy, 2 cores).
PREFILL_ROUND_S = 0.5

# Model threads still running at interpreter exit would be torn down inside a forward (the
# process then aborts): every scheduler is stopped, its current step finished, before that.
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for scheduler in list(_RUNNING):
        scheduler.stop()


@dataclass(eq=False)  # found in lists by identity
class Job:
    """One request on its way through the model thread."""

    key: str | None  # the KV store key of its document (None: no cache kept)
    prompt: Prompt
    options: CompletionOptions
    generation: Generation
    stats: CompletionStats  # the request's counters, filled in as it goes
    is_cancelled: Callable[[], bool] = lambda: False
    # The n-gram sources (its session's) that remember its completion; None: none do (test
    # generation's jobs, rotary.testgen, draft from their own state).
    sources: TokenSources | None = None
    state: str = QUEUED
    entry: DocumentKV | None = None  # the document's cache while the job holds it
    steps: PrefillSteps | None = None  # its prefill, one PrefillStep per step (Steps.prefill)
    out: queue.Queue[Chunk | BaseException | None] = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    decode_started: float | None = None
    deferred: DeferredForward | None = None  # its prefill's deferred forward not run yet, or None

    def chunks(self) -> Iterator[Chunk]:
        """What the model thread sends: text chunks, then the last one; an error is raised here."""
        while (item := self.out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


class Steps(Protocol):
    """What the scheduler runs on the model thread (completion/steps.py)."""

    def prefill(self, job: Job) -> PrefillSteps: ...

    def run_deferred(self, deferred: list[DeferredForward]) -> None: ...

    def decode_round(self, jobs: list[Job], deferred: list[DeferredForward]) -> None: ...

    def finish(self, job: Job) -> Chunk: ...

    def discard(self, job: Job) -> None: ...


class BackgroundWork(Protocol):
    """Idle work (cache/manager.py's KVManager): one bounded piece per call; what it did, or None."""

    def background_step(self, idle: bool) -> str | None: ...


class Scheduler:
    """The model thread: runs `steps` for the jobs submitted to it, `background` when none waits."""

    def __init__(self, steps: Steps, background: BackgroundWork, name: str = "rotary-model"):
        self.steps = steps
        self.background = background
        self._incoming: deque[Job] = deque()
        self._jobs: list[Job] = []  # admitted, in arrival order
        self._calls: deque[tuple[Callable[[], Any], queue.Queue]] = deque()  # run_exclusive's
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.name = name
        self.last_submit = time.monotonic()
        self.step_started: float | None = None  # set while a forward-bearing step runs (hang detection)
        self.rounds = 0
        self.batched_rows = 0  # decode rows run, summed over rounds (rows / decode rounds = mean batch)
        self.decode_rounds = 0
        self.prefill_steps = 0
        self.deferred_batches = 0  # batched forwards of deferred forwards alone (and the jobs in them, summed)
        self.deferred_jobs = 0
        self.deferred_in_decode = 0  # deferred forwards that ran as extra rows of a decoding round
        self.prefill_seconds = 0.0  # time in prefill steps, summed (where a loaded worker's time goes)
        self.decode_seconds = 0.0  # time in batched decode rounds, summed
        self.prefill_round_s = PREFILL_ROUND_S

    # -- callers' side (any thread) ---------------------------------------

    def submit(self, job: Job) -> Job:
        with self._wake:
            self._incoming.append(job)
            self.last_submit = time.monotonic()
            self._wake.notify()
        self._ensure_thread()
        return job

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running (read without locks: an estimate is enough for Health)."""
        return len(self._incoming) + len(self._jobs)

    def busy_for(self) -> float:
        """Seconds the current step has been running (0 when idle): a hung forward shows here."""
        started = self.step_started
        return 0.0 if started is None else time.monotonic() - started

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread between rounds and return its result (for shutdown work, tests)."""
        done: queue.Queue = queue.Queue()
        with self._wake:
            self._calls.append((fn, done))
            self._wake.notify()
        self._ensure_thread()
        result = done.get()
        if isinstance(result, BaseException):
            raise result
        return result

    # -- the model thread ------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._wake:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                    self._thread.start()
                    _RUNNING.add(self)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._incoming and not self._jobs and not self._calls and not self._stop:
                    if not self._wake.wait(timeout=0.2):
                        break  # idle tick: background work may run
                if self._stop:
                    self._fail_all(RuntimeError("the worker is shutting down"))
                    return
                while self._incoming:
                    self._jobs.append(self._incoming.popleft())
                calls = list(self._calls)
                self._calls.clear()
            for fn, done in calls:
                try:
                    done.put(fn())
                except BaseException as exc:
                    done.put(exc)
            if not self._jobs:
                if not calls:
                    self._background()
                continue
            try:
                self._round()
            except BaseException as exc:  # a bug in a step must not kill the model thread
                log.exception("scheduler round failed")
                self._fail_all(exc)

    def _round(self) -> None:
        self.rounds += 1
        for job in list(self._jobs):
            if job.state in (PREFILL, DECODE, QUEUED) and job.is_cancelled():
                job.generation.cancel()
                self._end(job)
        busy = {job.key for job in self._jobs if job.state in (PREFILL, DECODE) and job.key is not None}
        for job in self._jobs:
            if job.state == QUEUED and (job.key is None or job.key not in busy):
                job.state = PREFILL
                job.steps = self.steps.prefill(job)
                if job.key is not None:
                    busy.add(job.key)
        self._prefill_steps()
        # Every deferred forward runs in this round (before any cancel or the next step reads its cache).
        deferring = [job for job in self._jobs if job.deferred is not None]
        decoding = [job for job in self._jobs if job.state == DECODE]
        if decoding:
            self._decode_step(decoding, deferring)
        elif deferring:
            self._run_deferred(deferring)

    def _prefill_steps(self) -> None:
        """Prefill steps in arrival order, one per job and pass, until PREFILL_ROUND_S is spent.

        A request's prefill after a keystroke is a few small steps (the edited tokens, the refresh
        near the cursor); one step per round would make the twentieth of twenty editors wait for
        sixty rounds, each carrying a batched decode forward. A small step comes back as a deferred
        forward (cache/deferred.py), kept on the job: the round's decoding forward runs all of them
        as extra rows, so twenty requests' edited tokens cost a few rows of a forward that runs
        anyway. A job that needs its deferred forward run before its next step says so
        (RUN_DEFERRED) and it runs after the pass. The budget still bounds how long decoding
        requests wait: at most prefill_round_s plus one pass (0: one pass a round).
        """
        deadline = time.monotonic() + self.prefill_round_s
        while True:
            prefilling = [job for job in self._jobs if job.state == PREFILL]
            if not prefilling:
                return
            run_now: list[Job] = []
            for job in prefilling:
                step = self._prefill_step(job)
                if step is not None and step.run_deferred:
                    run_now.append(job)
                elif step is not None and step.deferred is not None:
                    if job.deferred is None:
                        job.deferred = step.deferred
                    else:
                        job.deferred.merge(step.deferred)
                if time.monotonic() >= deadline:
                    break
            run_now = [job for job in run_now if job.deferred is not None]
            if run_now:
                self._run_deferred(run_now)
            if time.monotonic() >= deadline:
                return

    def _prefill_step(self, job: Job) -> PrefillStep | None:
        """One step of the job's prefill: what it handed over, or None (its prefill ended, or failed)."""
        self.step_started = time.monotonic()
        self.prefill_steps += 1
        try:
            return next(job.steps)
        except StopIteration as done:
            if done.value is not None:  # the logits after the context (else the first round feeds its last token)
                job.generation.start(done.value)
            job.state = DECODE
            self._emit(job)
        except Exception as exc:
            self._fail(job, exc)
        finally:
            self.prefill_seconds += time.monotonic() - self.step_started
            self.step_started = None
        return None

    def _run_deferred(self, jobs: list[Job]) -> None:
        """Run these jobs' deferred forwards, batched, in forwards of their own."""
        self.step_started = time.monotonic()
        self.deferred_batches += 1
        self.deferred_jobs += len(jobs)
        try:
            self.steps.run_deferred([job.deferred for job in jobs])
        except Exception as exc:
            for job in jobs:
                self._fail(job, exc)
        finally:
            for job in jobs:
                job.deferred = None
            self.prefill_seconds += time.monotonic() - self.step_started
            self.step_started = None

    def _decode_step(self, jobs: list[Job], deferring: list[Job]) -> None:
        """One decoding round for `jobs`, with the deferred forwards of `deferring` in its forward."""
        self.step_started = time.monotonic()
        try:
            self.steps.decode_round(jobs, [job.deferred for job in deferring])
        except Exception as exc:
            for job in {id(job): job for job in jobs + deferring}.values():
                self._fail(job, exc)
            return
        finally:
            for job in deferring:
                job.deferred = None
            self.decode_seconds += time.monotonic() - self.step_started
            self.step_started = None
        self.decode_rounds += 1
        self.batched_rows += len(jobs)
        self.deferred_in_decode += len(deferring)
        for job in jobs:
            self._emit(job)

    def _emit(self, job: Job) -> None:
        text = job.generation.take_chunk()
        if text:
            job.out.put(Chunk(text=text))
        if job.generation.finished:
            self._end(job)

    def _end(self, job: Job) -> None:
        """Send what is left and the last chunk; give the document's cache back."""
        if job.steps is not None and job.state == PREFILL:
            job.steps.close()  # an abandoned prefill leaves the cache consistent (cache/manager.py)
        if job.deferred is not None:  # the cache goes back holding what its ids say
            self._run_deferred([job])
            if job.state == DONE:
                return  # that failed: the job ended there
        job.state = DONE
        if job in self._jobs:
            self._jobs.remove(job)
        try:
            job.out.put(self.steps.finish(job))
        except Exception as exc:
            job.out.put(exc)
        job.out.put(None)

    def _fail(self, job: Job, exc: BaseException) -> None:
        log.error("request failed: %s", exc, exc_info=exc)
        if job.steps is not None and job.state == PREFILL:
            job.steps.close()
        job.state = DONE
        job.deferred = None  # its cache is dropped: nothing to write into it
        if job in self._jobs:
            self._jobs.remove(job)
        self.steps.discard(job)
        job.out.put(exc)
        job.out.put(None)

    def _fail_all(self, exc: BaseException) -> None:
        for job in list(self._jobs) + list(self._incoming):
            job.out.put(exc)
            job.out.put(None)
        self._jobs.clear()
        self._incoming.clear()

    def _background(self) -> None:
        """Lowest priority: only when no request is waiting; one bounded piece at a time."""
        try:
            self.step_started = time.monotonic()
            idle = time.monotonic() - self.last_submit >= IDLE_SECONDS
            if not self._incoming:
                self.background.background_step(idle)
        except Exception:
            log.exception("background cache work failed")
            time.sleep(1.0)
        finally:
            self.step_started = None
