"""One completion request, from document text to streamed answer.

text before/after the cursor -> prompt (prompt.py: context window, FIM form, token
healing) -> the document's KV cache (cache/: reuse what is still valid, re-rotate what
moved, encode the rest) -> speculative greedy decoding (decode.py: the pending token
plus a drafter's guesses, verified in one forward) -> stop rules -> chunks.

The model is run only by the scheduler's thread (scheduler.py): `complete` builds a
Job and reads its chunks; the steps the scheduler runs (prefill chunks, batched decode
rounds, background refresh) are the methods below. Prefill is cut into chunks, so a
request's cancel is seen between chunks, and during decoding between steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from rotary.cache.buffer import DeferredForward, KVBuffer, can_ride, extend_batch, run_deferred
from rotary.cache.plan import common_prefix_length
from rotary.cache.store import DocumentKV, KVStore
from rotary.models.runner import ModelRunner

from .decode import DEFAULT_DRAFT_TOKENS, Generation
from .documents import key_session
from .drafters import Drafter, NgramDrafter, NoDrafter, SpeculationPolicy, StepCosts, TokenSources
from .prompt import WINDOW_HOP, Prompt, Vocabulary, forbidden_after, heal_length
from .rpc.wire import AUTO, EDIT_AWARE, NO_CACHE, PREFIX
from .sampling import Sampler
from .scheduler import RUN_RECORDED, Job, Scheduler
from .stops import StopRules
from .verdict import Gate

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 512
PREFILL_CHUNK = 256  # tokens per prefill step: the longest another request waits for the model thread
REFRESH_CHUNK = 64  # tokens per background refresh step
# A prefill step encoding at most this many tokens (the edited tokens after a keystroke, the refresh of
# stale ones near the cursor) runs as extra rows of the round's decoding forward (scheduler.py); a
# bigger one (a paste, a first open) runs before the request's next step, as a forward of that size
# is already efficient.
BATCHED_STEP_TOKENS = 64
# Guessed tokens per batched decode round, shared by its rows. One guess is cheap next to a step's
# fixed cost while the batch is small; in a wide batch each guessed position costs a full-vocabulary
# LM head and a row of every matrix product, so guesses (mostly rejected on unseen code) would slow
# every request in the round. The text is the same whatever the guesses (decode.py). Measured with 20
# editors (`rotary bench load --quick --sizes 20`, rows packed, not padded): 0 guesses p95 8.9 s,
# 8: 6.8-7.7 s, 16: 5.3-6.2 s (decoding time 36 s against 40-41 s), 32: 7.1 s.
DRAFT_ROUND_BUDGET = 16
# A completion's n-gram drafter guesses only after a match of at least this many tokens. On this CPU a
# forward of 2-9 tokens costs 2-3 of one token (1 thread, 1k context: 1 token 49 ms, 2-3 94 ms, 4-5
# 118-126 ms, 7-9 150-156 ms), so a guess must be right often to pay. Measured on 60 completion points
# of stdlib files (in process, multi-line, 48 tokens): after a 2-token match 49% of first guesses were
# right and 1.7 of 7.5 kept, a loss; after 3 tokens 74% and 2.7 of 7.4; after 4, 82% and 3.2 of 5.6.
COMPLETION_NGRAM_MIN = 3
IDLE_SECONDS = 1.0  # background work waits this long after the last request

CONFLICT = "conflict"  # besides the contract's cache modes (rpc/wire.py): PIE without re-rotation, a benchmark baseline
DRAFTERS = ("ngram", "none")

__all__ = ["WINDOW_HOP", "CompletionEngine", "CompletionOptions", "CompletionStats", "Chunk"]


@dataclass
class CompletionOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    mode: str = AUTO
    # edit_aware (PIE), prefix (reuse the unchanged prefix only), none (from scratch),
    # conflict (PIE without re-rotation: a benchmark baseline only).
    cache_mode: str = EDIT_AWARE
    # Re-encode stale tokens among the last N before the cursor before completing (0: never).
    refresh_window: int = 128
    # Who guesses tokens ahead for one-forward verification: "ngram" (prompt lookup) or "none"
    # (one token per forward). The text is the same either way.
    drafter: str = "ngram"
    # Abstention: show nothing when the calibrated gate's P(first line right) is below this.
    # None: the threshold calibrated for the model; 0: never abstain.
    abstain_threshold: float | None = None
    # Lossy early exit per token (needs calibrated exit heads); its threshold (None: calibrated).
    early_exit: bool = False
    exit_threshold: float | None = None


@dataclass
class CompletionStats:
    context_tokens: int = 0
    tokens_reused: int = 0
    tokens_encoded: int = 0
    tokens_rerotated: int = 0
    stale_refreshed: int = 0
    tokens_generated: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    forwards: int = 0  # decoding forward passes (verify steps)
    tokens_drafted: int = 0
    drafts_accepted: int = 0
    layers_run: int = 0  # layers evaluated for the generated tokens (fewer than layers x tokens with early exit)
    confidence: float = -1.0  # the abstention gate's P(first line right); -1 without a gate


@dataclass
class Chunk:
    text: str
    done: bool = False
    stop_reason: str = ""
    stats: CompletionStats | None = None
    features: list[float] | None = None  # the first line's features for the abstention gate (last chunk)


class CompletionEngine:
    def __init__(
        self,
        runner: ModelRunner,
        kv_store: KVStore,
        max_context_tokens: int = 2048,
        stale_budget: int = 1024,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        self.runner = runner
        self.kv_store = kv_store
        self.max_context_tokens = min(max_context_tokens, runner.info.max_positions)
        self.eos_ids = frozenset(runner.info.eos_token_ids)
        self.inv_freq = runner.rope_inv_freq()
        # Models whose RoPE rotations do not compose cannot re-rotate cached keys exactly.
        self.edit_aware_supported = runner.info.rope.composable and self.inv_freq is not None
        self.prefill_chunk = prefill_chunk
        self.background_refreshed = 0
        self.decode_tokens_fed = 0  # tokens fed by batched decoding rounds (pending tokens and guesses)
        # What a forward costs by the tokens it feeds: measured on this worker's forwards, whoever's
        # they are (a property of the machine, not of any text).
        self.step_costs = StepCosts()
        # Per session (one daemon; "" for callers that name none, the engine's own included): how
        # many n-gram guesses its completions verify (what its guesses were worth: see
        # drafters.SpeculationPolicy), and where its drafters look besides a request's own text (its
        # recent completions and its other cached documents, read on the model thread only). Never
        # shared: another session's text must not decide a session's guesses, nor its speed.
        self._drafting: dict[str, tuple[TokenSources, SpeculationPolicy]] = {}
        self.sources, self.speculation = self._new_drafting("")
        # More stale tokens than this in one document: refresh it in the background without waiting for idle.
        self.stale_budget = stale_budget
        self._healing_masks: dict[tuple[str, str], torch.Tensor] = {}
        self.vocabulary  # indexed once here rather than on the first keystroke
        self.gate = Gate.from_dict(runner.exits.meta["gate"]) if runner.exits is not None and "gate" in runner.exits.meta else None
        override = os.environ.get("ROTARY_ABSTAIN_THRESHOLD", "").strip()
        self.abstain_default = max(0.0, float(override)) if override else None
        self.scheduler = Scheduler(self)

    # -- building a request ----------------------------------------------------

    def build_context(self, text: str, offset: int, max_tokens: int) -> Prompt:
        """Token ids the model sees (the text before the cursor, or FIM form when the model has FIM
        tokens and there is code after the cursor), with the end of the text before the cursor
        taken off for token healing (see prompt.py)."""
        before, after = text[:offset], text[offset:]
        budget = max(16, self.max_context_tokens - max_tokens)
        ids = self.runner.encode_text(before)
        cut = heal_length(ids, before, self.runner.token_text, self.runner.special_ids)
        heal = self.runner.decode_ids(ids[len(ids) - cut :]) if cut else ""
        ids = ids[: len(ids) - cut]
        fim = self.runner.info.fim_tokens
        use_fim = bool(fim and after.strip())
        if use_fim:
            suffix_ids = self.runner.encode_text(after)[: budget // 4]
            keep = budget - len(suffix_ids) - 3
            truncated = len(ids) > keep
            ids = [fim["prefix"], *ids[max(0, len(ids) - keep) :], fim["suffix"], *suffix_ids, fim["middle"]]
        else:
            truncated = len(ids) > budget
            if truncated:  # start the window on a hop boundary so it moves rarely
                start = -(-(len(ids) - budget) // WINDOW_HOP) * WINDOW_HOP
                if len(ids) - start < budget // 2:  # a budget under one hop: the rounding would leave too little
                    start = len(ids) - budget
                ids = ids[start:]
        if not ids:
            # An empty document: start from the document separator so the model has a position 0.
            ids = [min(self.eos_ids)]
        return Prompt(
            ids=ids,
            text_before=before,
            text_after=after,
            truncated=truncated,
            heal=heal,
            forbidden_after_heal=forbidden_after(before, after),
            fim=use_fim,
        )

    def complete(
        self,
        uri: str | None,
        text: str,
        offset: int,
        options: CompletionOptions,
        is_cancelled: Callable[[], bool] = lambda: False,
        session: str = "",
    ) -> Iterator[Chunk]:
        """Stream the completion at `offset`; `uri` names the document whose cache to use (None: keep none)."""
        max_tokens = max(1, min(options.max_tokens or DEFAULT_MAX_TOKENS, MAX_TOKENS_LIMIT))
        yield from self.complete_prompt(uri, self.build_context(text, offset, max_tokens), options, is_cancelled, session=session)

    def complete_prompt(
        self,
        uri: str | None,
        prompt: Prompt,
        options: CompletionOptions,
        is_cancelled: Callable[[], bool] = lambda: False,
        drafter: Drafter | None = None,
        session: str = "",
        *,
        sampler: Sampler | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        remember: bool = True,
    ) -> Iterator[Chunk]:
        """Stream the completion of a prompt already built (benchmarks and test generation build their own).

        `uri`: the KV store key of the request's cache; the service's are per session
        (documents.store_key). `drafter`: who guesses tokens ahead for this request (default:
        options.drafter's kind); a caller that generates several related texts may keep one drafter
        across them. `session`: whose n-gram sources and speculation statistics the request uses.
        `sampler`: draw tokens instead of greedy decoding (None: greedy). `draft_tokens`: at most
        this many guessed tokens per verify. `remember`: the session's n-gram sources learn the
        completion (test generation's drafters keep their own state, so its tests are not added).
        """
        max_tokens = max(1, min(options.max_tokens or DEFAULT_MAX_TOKENS, MAX_TOKENS_LIMIT))
        key = uri if options.cache_mode != NO_CACHE else None
        if key is not None:
            self.kv_store.get(key)  # a spilled cache comes back from disk here, not on the model thread
        generation = self.new_generation(
            prompt, options, max_tokens, drafter, uri=key, session=session, sampler=sampler, draft_tokens=draft_tokens
        )
        job = Job(
            key=key,
            prefill=functools.partial(self._prefill, prompt=prompt, options=options),
            generation=generation,
            finish=self._finish,
            is_cancelled=is_cancelled,
            stats=CompletionStats(context_tokens=len(prompt.ids)),
            options=options,
            sources=self.drafting(session)[0] if remember else None,
        )
        yield from self.scheduler.submit(job).chunks()

    def new_generation(
        self, prompt: Prompt, options: CompletionOptions, max_tokens: int, drafter: Drafter | None = None,
        uri: str | None = None, session: str = "", sampler: Sampler | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> Generation:
        """`uri`: the request's document (its n-gram drafter looks in the session's other documents,
        not again in it). `sampler`, `draft_tokens`: see complete_prompt."""
        assert drafter is not None or options.drafter in DRAFTERS, f"drafter must be one of {DRAFTERS}"
        ngram = drafter is None and options.drafter == "ngram"
        sources, speculation = self.drafting(session)
        return Generation(
            prompt=prompt,
            stops=StopRules(prompt.text_before, prompt.text_after, options.mode),
            max_tokens=max_tokens,
            eos_ids=self.eos_ids,
            decode_ids=self.runner.decode_ids,
            healing_mask=self.healing_mask,
            drafter=drafter or (NgramDrafter(min_n=COMPLETION_NGRAM_MIN, sources=sources, exclude=uri) if ngram else NoDrafter()),
            draft_tokens=draft_tokens,
            sampler=sampler,
            # A caller's own drafter (test generation) keeps its own draft length.
            speculation=speculation if ngram else None,
            gate=self.gate.score if self.gate is not None else None,
            gate_bound=self.gate.best_score if self.gate is not None else None,
            abstain_below=self.abstain_below(options),
            early_exit=options.early_exit and self.runner.exits is not None,
        )

    def drafting(self, session: str) -> tuple[TokenSources, SpeculationPolicy]:
        """The session's n-gram sources and speculation policy (made on its first request)."""
        if not session:  # the engine's own attributes (benchmarks and tests read or replace them)
            return self.sources, self.speculation
        mine = self._drafting.get(session)
        return mine if mine is not None else self._drafting.setdefault(session, self._new_drafting(session))

    def _new_drafting(self, session: str) -> tuple[TokenSources, SpeculationPolicy]:
        def documents() -> list[tuple[str, list[int]]]:
            return [(key, entry.buffer.token_ids) for key, entry in self.kv_store.items() if key_session(key) == session]

        return TokenSources(documents), SpeculationPolicy(self.step_costs)

    def forget_session(self, session: str) -> None:
        """A session went away: what its drafters learnt goes with it."""
        if session:
            self._drafting.pop(session, None)
        else:
            self.sources, self.speculation = self._new_drafting("")

    def abstain_below(self, options: CompletionOptions) -> float:
        """The gate's threshold for this request: the request's own, else the worker's default
        ($ROTARY_ABSTAIN_THRESHOLD, for an operator or a test suite that compares raw greedy text),
        else the one calibrated for the model."""
        if self.gate is None:
            return 0.0
        if options.abstain_threshold is not None:
            return max(0.0, options.abstain_threshold)
        return self.gate.threshold if self.abstain_default is None else self.abstain_default

    def text_chunk(self, text: str) -> Chunk:
        return Chunk(text=text)

    # -- steps the scheduler runs on the model thread ---------------------------------

    def new_buffer(self) -> KVBuffer:
        info = self.runner.info
        return KVBuffer(
            info.num_layers, info.num_kv_heads, info.head_dim, dtype=self.runner.dtype, device=self.runner.device
        )

    def _prefill(self, job: Job, prompt: Prompt, options: CompletionOptions) -> Iterator[DeferredForward | None]:
        """The job's prefill steps on its document's cache (pinned until the job ends); returns the logits."""
        if job.key is not None:
            job.entry = self.kv_store.acquire(job.key, self.new_buffer)
        else:
            job.entry = DocumentKV(buffer=self.new_buffer())
        # The context's last token is fed by the first decoding round, batched with the other requests'
        # steps (a forward of its own per request was ~1/6 of a loaded worker's time); an early-exit
        # request feeds it here, through every layer, as its K/V must not come from an exit.
        fold = not job.generation.early_exit
        logits = yield from self.prepare(job.entry, prompt.ids, options, job.stats, feed_last=not fold)
        if fold:
            job.generation.start_unfed(prompt.ids[-1])
        job.stats.prefill_ms = (time.perf_counter() - job.submitted) * 1000
        job.decode_started = time.perf_counter()
        return logits

    def prepare(
        self, entry: DocumentKV, ids: list[int], options: CompletionOptions, stats: CompletionStats, feed_last: bool = True
    ) -> Iterator[DeferredForward | None]:
        """Bring a cache to `ids`, one chunk of work per step; return the logits after the last id.

        A step yields None (its work is done), recorded encoding (a DeferredForward) the caller must
        run before anything reads this cache, batched with other requests' (run_encodes, or rows of a
        decoding round: decode_round), or RUN_RECORDED: run what was recorded before the next step.

        Every id but the last is put in the cache as the cache mode allows; the last is fed on
        its own to get the logits the first generated token comes from (feed_last=False: it is left
        to the caller, the cache then holding ids[:-1], and None is returned). Abandoned between steps
        (cancelled), the cache holds a consistent prefix of the work, which the next request reuses.
        """
        buffer = entry.buffer
        context, last = ids[:-1], ids[-1:]
        entry.dirty = True
        entry.refresh_position = None  # the text moved: a background refresh starts over
        mode = options.cache_mode
        if mode in (EDIT_AWARE, CONFLICT) and not self.edit_aware_supported:
            mode = PREFIX
        plan = buffer.tokens.plan(context) if mode in (EDIT_AWARE, CONFLICT) else None
        if plan is not None and plan.tokens_reused:
            # Reuse what the plan keeps (moved keys re-rotated: PIE), encode the edited pieces. The
            # encoding is recorded, then run by the scheduler with other requests' (or at once if big).
            deferred = DeferredForward()
            buffer.apply(
                plan, context, deferred, inv_freq=self.inv_freq,
                convention=self.runner.info.rope.convention, rerotate=mode == EDIT_AWARE, chunk=self.prefill_chunk,
            )
            stats.tokens_reused, stats.tokens_encoded = plan.tokens_reused, plan.tokens_encoded
            stats.tokens_rerotated = plan.tokens_rerotated
            yield from self._recorded(deferred)
            stale = buffer.tokens.stale_range_before(len(context), options.refresh_window) if options.refresh_window else None
            if stale is not None and mode == EDIT_AWARE:
                deferred = DeferredForward()
                stats.stale_refreshed = buffer.refresh(stale[0], None, deferred, chunk=self.prefill_chunk)
                yield from self._recorded(deferred)
            if feed_last:
                yield RUN_RECORDED  # the last id's forward below reads the cache
        else:
            keep = common_prefix_length(buffer.token_ids, context) if mode != NO_CACHE and plan is None else 0
            buffer.rollback(keep)
            stats.tokens_reused, stats.tokens_encoded = keep, len(context) - keep
            for first in range(keep, len(context), self.prefill_chunk):
                buffer.extend(context[first : first + self.prefill_chunk], self.runner.forward, logits=None)
                yield
        stats.tokens_encoded += 1
        if not feed_last:
            return None
        out = buffer.extend(last, self.runner.forward, logits="last")
        return out.logits[0]  # [vocab]

    def _recorded(self, deferred: DeferredForward) -> Iterator[DeferredForward | str]:
        """Hand recorded encoding to the scheduler; a big one (more than BATCHED_STEP_TOKENS) is to run
        before the next step rather than wait for the decoding round."""
        if deferred.calls:
            yield deferred
            if deferred.tokens > BATCHED_STEP_TOKENS:
                yield RUN_RECORDED

    def run_encodes(self, recorded: list[DeferredForward]) -> None:
        """Run several requests' recorded prefill steps together (the scheduler calls this)."""
        run_deferred(recorded, self.runner.forward)

    def prepare_now(self, entry: DocumentKV, ids: list[int], options: CompletionOptions) -> tuple[torch.Tensor, CompletionStats]:
        """`prepare` to the end, on the model thread (benchmarks and tests that set up a cache by hand)."""

        def run() -> tuple[torch.Tensor, CompletionStats]:
            stats = CompletionStats(context_tokens=len(ids))
            steps = self.prepare(entry, ids, options, stats)
            while True:
                try:
                    step = next(steps)
                except StopIteration as done:
                    return done.value, stats
                if isinstance(step, DeferredForward):
                    self.run_encodes([step])

        return self.scheduler.run_exclusive(run)

    def decode_round(self, jobs: list[Job], recorded: list[DeferredForward] = ()) -> None:
        """One batched forward for every decoding job: each feeds its pending token and its guesses.

        `recorded`: prefill steps of waiting requests (DeferredForward) to run first: they ride in that
        forward as rows that only write K/V (those that cannot, see can_ride, run before it).
        Jobs in lossy early-exit mode run one at a time (each token decides its own depth).
        """
        layers = self.runner.info.num_layers
        batched = [job for job in jobs if not job.generation.early_exit]
        riders, alone = [], []
        for r in recorded:
            if r.calls:
                (riders if batched and can_ride(r) else alone).append(r)
        if alone:
            run_deferred(alone, self.runner.forward)
        for job in jobs:
            if job.generation.early_exit:
                self._early_exit_step(job)
        if not batched:
            return
        share = DRAFT_ROUND_BUDGET // len(batched)
        # What the guesses are added to: every row's pending token and the riders' tokens, in a forward
        # of that many rows, whose thread count (the runner's rule) decides what a token costs.
        rider_lengths = [len(row) for r in riders for _, _, row in r.calls]
        base = len(batched) + sum(rider_lengths)
        forward_rows = len(batched) + len(rider_lengths)
        cpu = self.runner.device.type == "cpu"  # elsewhere the forward returns before it is done: not timed
        padded = forward_rows * max(rider_lengths, default=1)  # the runner counts padded rows
        setting = self.runner.threads_for(padded, forward_rows) if cpu else None
        rows = [job.generation.to_feed(job.entry.buffer.token_ids, share, base, setting) for job in batched]
        buffers = [job.entry.buffer for job in batched]
        starts = [buffer.length for buffer in buffers]
        fed = base + sum(len(row) - 1 for row in rows)
        started = time.perf_counter()
        out = extend_batch(buffers, rows, self.runner.forward, logits="all", riders=riders)
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

    def _finish(self, job: Job) -> Chunk:
        """The last chunk: what is left of the final text, the stop reason, the stats; the cache goes back."""
        generation, stats = job.generation, job.stats
        rest = generation.take_chunk()
        if generation.stop_reason != "cancelled" and job.sources is not None:  # what the model said here, it will likely say again
            job.sources.add_completion(generation.prompt.ids, generation.generated)
        if job.key is not None and job.entry is not None:
            self.kv_store.release(job.key, job.entry)
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
        if job.key is not None:
            self.kv_store.forget(job.key)
            if job.entry is not None:
                job.entry.pinned = False

    # -- background work (the model thread, when no request waits) ------------------------

    def over_stale_budget(self) -> bool:
        return any(entry.tokens.stale_count > self.stale_budget for _, entry in self.kv_store.items())

    def background_step(self, request_waiting: Callable[[], bool]) -> str | None:
        """One bounded piece of background work, if the worker is idle (or a document is over its stale budget).

        Stale documents are refreshed chunk by chunk from their first stale token to the end
        (which leaves them exactly as a full recompute would), most recently used first; then a
        changed cache is copied and handed to the store's writer thread as a snapshot.
        """
        idle = time.monotonic() - self.scheduler.last_submit >= IDLE_SECONDS
        if request_waiting() or not (idle or self.over_stale_budget()):
            return None
        for uri, entry in reversed(self.kv_store.items()):
            if entry.refresh_position is None and entry.tokens.stale_count:
                entry.refresh_position = entry.tokens.stale_intervals[0][0]
            if entry.refresh_position is not None:
                start = entry.refresh_position
                end = min(start + REFRESH_CHUNK, len(entry.tokens))
                entry.buffer.refresh(start, end, self.runner.forward)
                entry.refresh_position = end if end < len(entry.tokens) else None
                entry.dirty = True
                self.background_refreshed += end - start
                return f"refreshed {uri} [{start}, {end})"
        if idle:
            written = self.kv_store.snapshot_one_dirty()
            return f"snapshot of {written}" if written else None
        return None

    # -- model-thread helpers -------------------------------------------------------

    def healing_mask(self, remaining: str, forbidden_next: str) -> torch.Tensor:
        """[vocab] bool: the tokens token healing allows next (end of sequence always allowed)."""
        key = (remaining, forbidden_next)
        mask = self._healing_masks.get(key)
        if mask is None:
            mask = torch.zeros(self.runner.info.vocab_size, dtype=torch.bool, device=self.runner.device)
            allowed = [i for i in self.vocabulary.allowed(remaining, forbidden_next) if i < len(mask)]
            mask[allowed + [i for i in self.eos_ids if i < len(mask)]] = True
            if len(self._healing_masks) >= 1024:
                self._healing_masks.clear()
            self._healing_masks[key] = mask
        return mask

    @functools.cached_property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.runner.token_texts, self.runner.special_ids)

    def flush_snapshots(self) -> None:
        """Write every changed cache (shutdown): copied on the model thread, written by the store's writer."""

        def copy_all() -> None:
            while self.kv_store.snapshot_one_dirty():
                pass

        self.scheduler.run_exclusive(copy_all)
        self.kv_store.flush()

    def warm_up(self) -> None:
        """One short completion, so the first keystroke does not pay one-off setup."""
        for _ in self.complete(None, "def main():\n    return 0\n", 22, CompletionOptions(max_tokens=2, cache_mode=NO_CACHE)):
            pass
