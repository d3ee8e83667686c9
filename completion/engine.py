"""One completion request, from document text to streamed answer.

text before/after the cursor -> prompt (prompt.py: context window, FIM form, token
healing) -> the document's KV cache (cache/: reuse what is still valid, re-rotate what
moved, encode the rest) -> speculative greedy decoding (decode.py: the pending token
plus a drafter's guesses, verified in one forward) -> stop rules -> chunks.

This is the request front: it builds contexts and generations, hands a Job to the
scheduler and streams its chunks; it never runs the model itself. The model is run only by
the scheduler's thread (scheduler.py), which runs the steps of steps.py (prefill through the
KV manager, cache/manager.py; batched decoding rounds) and the manager's background work.
Prefill is cut into chunks, so a request's cancel is seen between chunks, and during
decoding between steps.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Iterator

import torch

from rotary.cache.buffer import KVBuffer
from rotary.cache.manager import KVManager
from rotary.cache.store import DocumentKV, KVStore
from rotary.models.runner import ModelRunner

from .decode import DEFAULT_DRAFT_TOKENS, Generation
from .documents import key_session
from .drafters import Drafter, NgramDrafter, NoDrafter, SpeculationPolicy, TokenSources
from .prompt import WINDOW_HOP, Prompt, Vocabulary, forbidden_after, heal_length
from .request import DEFAULT_MAX_TOKENS, Chunk, CompletionOptions, CompletionStats
from .rpc.wire import NO_CACHE
from .sampling import Sampler
from .scheduler import Job, Scheduler
from .steps import ModelSteps, reuse_of
from .stops import StopRules
from .verdict import Gate

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 512
PREFILL_CHUNK = 256  # tokens per prefill step: the longest another request waits for the model thread
# A completion's n-gram drafter guesses only after a match of at least this many tokens. On this CPU a
# forward of 2-9 tokens costs 2-3 of one token (1 thread, 1k context: 1 token 49 ms, 2-3 94 ms, 4-5
# 118-126 ms, 7-9 150-156 ms), so a guess must be right often to pay. Measured on 60 completion points
# of stdlib files (in process, multi-line, 48 tokens): after a 2-token match 49% of first guesses were
# right and 1.7 of 7.5 kept, a loss; after 3 tokens 74% and 2.7 of 7.4; after 4, 82% and 3.2 of 5.6.
COMPLETION_NGRAM_MIN = 3
DRAFTERS = ("ngram", "none")

__all__ = ["WINDOW_HOP", "CompletionEngine", "CompletionOptions", "CompletionStats", "Chunk"]


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
        inv_freq = runner.rope_inv_freq()
        # Models whose RoPE rotations do not compose cannot re-rotate cached keys exactly.
        self.edit_aware_supported = runner.info.rope.composable and inv_freq is not None
        self.kv_manager = KVManager(
            kv_store, self.new_buffer,
            lambda **batch: self.runner.forward(**batch),  # looked up at each call: tests wrap runner.forward
            inv_freq=inv_freq, convention=runner.info.rope.convention, edit_aware=self.edit_aware_supported,
            prefill_chunk=prefill_chunk, stale_budget=stale_budget,
        )
        self.steps = ModelSteps(runner, self.kv_manager)
        # Per session (one daemon; "" for callers that name none, the engine's own included): how
        # many n-gram guesses its completions verify (what its guesses were worth: see
        # drafters.SpeculationPolicy), and where its drafters look besides a request's own text (its
        # recent completions and its other cached documents, read on the model thread only). Never
        # shared: another session's text must not decide a session's guesses, nor its speed.
        self._drafting: dict[str, tuple[TokenSources, SpeculationPolicy]] = {}
        self.sources, self.speculation = self._new_drafting("")
        self._healing_masks: dict[tuple[str, str], torch.Tensor] = {}
        self.vocabulary  # indexed once here rather than on the first keystroke
        self.gate = Gate.from_dict(runner.exits.meta["gate"]) if runner.exits is not None and "gate" in runner.exits.meta else None
        override = os.environ.get("ROTARY_ABSTAIN_THRESHOLD", "").strip()
        self.abstain_default = max(0.0, float(override)) if override else None
        self.scheduler = Scheduler(self.steps, self.kv_manager)

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
            prompt=prompt,
            options=options,
            generation=generation,
            stats=CompletionStats(context_tokens=len(prompt.ids)),
            is_cancelled=is_cancelled,
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

        return TokenSources(documents), SpeculationPolicy(self.steps.step_costs)

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

    # -- the caches, for benchmarks, tests and calibration ------------------------------

    def new_buffer(self) -> KVBuffer:
        info = self.runner.info
        return KVBuffer(
            info.num_layers, info.num_kv_heads, info.head_dim, dtype=self.runner.dtype, device=self.runner.device
        )

    def prepare_now(self, entry: DocumentKV, ids: list[int], options: CompletionOptions) -> tuple[torch.Tensor, CompletionStats]:
        """Bring a cache to `ids` as a request would, on the model thread, each deferred forward run at
        once (benchmarks and tests that set up a cache by hand); the logits after the last id."""
        stats = CompletionStats(context_tokens=len(ids))
        logits = self.scheduler.run_exclusive(
            lambda: self.kv_manager.bring_to_now(entry, ids, stats, reuse_of(options.cache_mode), options.refresh_window)
        )
        return logits, stats

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
        self.scheduler.run_exclusive(self.kv_manager.snapshot_all)
        self.kv_store.flush()

    def warm_up(self) -> None:
        """One short completion, so the first keystroke does not pay one-off setup."""
        for _ in self.complete(None, "def main():\n    return 0\n", 22, CompletionOptions(max_tokens=2, cache_mode=NO_CACHE)):
            pass
