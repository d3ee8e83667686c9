"""The steps the scheduler runs on the model thread, each for the requests it names.

- `prefill`: a request's cache brought to its prompt by the KV manager (cache/manager.py), one
  PrefillStep at a time; the context's last token is left to the first decoding round.
- `run_deferred`: several requests' deferred forwards (cache/deferred.py) in batched forwards.
- `decode_round`: one batched forward for every decoding request, each row its pending token
  plus its drafter's guesses, with the deferred forwards of waiting requests as extra rows; the
  guesses greedy decoding agrees with are kept (decode.py), the buffer rolled back past the rest.
- `finish` / `discard`: the last chunk and the cache given back, or the cache dropped.

The scheduler decides which requests take which step (completion/scheduler.py); these methods
run them and never call back into it or into the front (engine.py).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from rotary.cache.buffer import extend_batch
from rotary.cache.deferred import DeferredForward, can_ride, run_deferred, writes_of
from rotary.cache.manager import KVManager, PrefillSteps, Reuse
from rotary.models.runner import ModelRunner

from .drafters import StepCosts
from .request import Chunk
from .rpc.wire import EDIT_AWARE, NO_CACHE, PREFIX
from .scheduler import Job

# Guessed tokens per batched decode round, shared by its rows. One guess is cheap next to a step's
# fixed cost while the batch is small; in a wide batch each guessed position costs a full-vocabulary
# LM head and a row of every matrix product, so guesses (mostly rejected on unseen code) would slow
# every request in the round. The text is the same whatever the guesses (decode.py). Measured with 20
# editors (`rotary bench load --quick --sizes 20`, rows packed, not padded): 0 guesses p95 8.9 s,
# 8: 6.8-7.7 s, 16: 5.3-6.2 s (decoding time 36 s against 40-41 s), 32: 7.1 s.
DRAFT_ROUND_BUDGET = 16

CONFLICT = "conflict"  # besides the contract's cache modes (rpc/wire.py): PIE without re-rotation, a benchmark baseline
# What the KV manager may reuse for each cache mode.
REUSE = {EDIT_AWARE: Reuse.EDIT_AWARE, CONFLICT: Reuse.NO_ROTATION, PREFIX: Reuse.PREFIX, NO_CACHE: Reuse.NOTHING}


def reuse_of(cache_mode: str) -> Reuse:
    assert cache_mode in REUSE, f"cache mode {cache_mode!r} is not one of {sorted(REUSE)}"
    return REUSE[cache_mode]


class ModelSteps:
    """The scheduler's steps (scheduler.Steps) on one runner and one KV manager."""

    def __init__(self, runner: ModelRunner, kv_manager: KVManager):
        self.runner = runner
        self.kv_manager = kv_manager
        self.decode_tokens_fed = 0  # tokens fed by batched decoding rounds (pending tokens and guesses)
        # What a forward costs by the tokens it feeds: measured on this worker's forwards, whoever's
        # they are (a property of the machine, not of any text).
        self.step_costs = StepCosts()

    def prefill(self, job: Job) -> PrefillSteps:
        """The job's prefill steps on its document's cache (pinned until the job ends); returns the logits."""
        job.entry = self.kv_manager.acquire(job.key)
        # The context's last token is fed by the first decoding round, batched with the other requests'
        # steps (a forward of its own per request was ~1/6 of a loaded worker's time); an early-exit
        # request feeds it here, through every layer, as its K/V must not come from an exit.
        fold = not job.generation.early_exit
        options = job.options
        logits = yield from self.kv_manager.bring_to(
            job.entry, job.prompt.ids, job.stats, reuse_of(options.cache_mode), options.refresh_window, feed_last=not fold
        )
        if fold:
            job.generation.start_unfed(job.prompt.ids[-1])
        job.stats.prefill_ms = (time.perf_counter() - job.submitted) * 1000
        job.decode_started = time.perf_counter()
        return logits

    def run_deferred(self, deferred: list[DeferredForward]) -> None:
        """Run several requests' deferred forwards together, in forwards of their own."""
        run_deferred(deferred, self.runner.forward)

    def decode_round(self, jobs: list[Job], deferred: list[DeferredForward]) -> None:
        """One batched forward for every decoding job: each feeds its pending token and its guesses.

        `deferred`: the deferred forwards of waiting requests, to run first: they ride in that forward
        as rows that only write K/V (those that cannot, see can_ride, run before it). Jobs in lossy
        early-exit mode run one at a time (each token decides its own depth).
        """
        layers = self.runner.info.num_layers
        batched = [job for job in jobs if not job.generation.early_exit]
        riding, alone = [], []
        for d in deferred:
            if d.calls:
                (riding if batched and can_ride(d) else alone).append(d)
        if alone:
            run_deferred(alone, self.runner.forward)
        for job in jobs:
            if job.generation.early_exit:
                self._early_exit_step(job)
        if not batched:
            return
        share = DRAFT_ROUND_BUDGET // len(batched)
        writes = writes_of(riding)
        # What the guesses are added to: every row's pending token and the deferred tokens, in a
        # forward of that many rows, whose thread count (the runner's rule) decides what a token costs.
        write_lengths = [len(row) for _, _, row in writes]
        base = len(batched) + sum(write_lengths)
        forward_rows = len(batched) + len(write_lengths)
        cpu = self.runner.device.type == "cpu"  # elsewhere the forward returns before it is done: not timed
        padded = forward_rows * max(write_lengths, default=1)  # the runner counts padded rows
        setting = self.runner.threads_for(padded, forward_rows) if cpu else None
        rows = [job.generation.to_feed(job.entry.buffer.token_ids, share, base, setting) for job in batched]
        buffers = [job.entry.buffer for job in batched]
        starts = [buffer.length for buffer in buffers]
        fed = base + sum(len(row) - 1 for row in rows)
        started = time.perf_counter()
        out = extend_batch(buffers, rows, self.runner.forward, logits="all", writes=writes)
        if cpu:
            self.step_costs.record(fed, time.perf_counter() - started, torch.get_num_threads())  # as the runner set them
        self.decode_tokens_fed += sum(len(row) for row in rows)
        for b, job in enumerate(batched):
            generation = job.generation
            # The first token comes from the context's last token, the prefill's forward run late: as
            # when the prefill ran it, its layers are not counted as decoding ones.
            first = generation.feeds_context
            before = len(generation.generated)
            verdict = generation.verify(rows[b], out.logits[b, : len(rows[b])])
            buffers[b].rollback(starts[b] + verdict.keep)
            if not first:
                generation.layers_run += layers * (len(generation.generated) - before)

    def _early_exit_step(self, job: Job) -> None:
        generation, buffer = job.generation, job.entry.buffer
        exits = self.runner.exits
        threshold = job.options.exit_threshold if job.options.exit_threshold is not None else exits.threshold
        if threshold != exits.threshold:
            exits = dataclasses.replace(exits, threshold=threshold)
        fed = generation.to_feed(buffer.token_ids)
        out = buffer.extend(fed, self.runner.exit_forward(exits), logits="all")  # the exit: models/exits.py
        generation.verify(fed, out.logits[0])
        generation.layers_run += (out.exited + 1) if out.exited is not None else self.runner.info.num_layers

    def finish(self, job: Job) -> Chunk:
        """The last chunk: what is left of the final text, the stop reason, the stats; the cache goes back."""
        generation, stats = job.generation, job.stats
        rest = generation.take_chunk()
        if generation.stop_reason != "cancelled" and job.sources is not None:  # what the model said here, it will likely say again
            job.sources.add_completion(generation.prompt.ids, generation.generated)
        if job.entry is not None:
            self.kv_manager.release(job.key, job.entry)
        stats.tokens_generated = len(generation.generated)
        stats.forwards = generation.forwards
        stats.tokens_drafted, stats.drafts_accepted = generation.drafted, generation.drafts_kept
        stats.layers_run = generation.layers_run
        stats.confidence = generation.confidence if generation.confidence is not None else -1.0
        if job.decode_started is not None:
            stats.decode_ms = (time.perf_counter() - job.decode_started) * 1000
        stats.total_ms = (time.perf_counter() - job.submitted) * 1000
        return Chunk(text=rest, done=True, stop_reason=generation.stop_reason, stats=stats, features=generation.features)

    def discard(self, job: Job) -> None:
        """A job failed: its document's cache may be half-updated, so it is dropped (the next request rebuilds)."""
        self.kv_manager.discard(job.key, job.entry)
