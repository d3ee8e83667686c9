"""One completion request, from document text to streamed answer.

text before/after the cursor -> token ids -> the document's KV cache (reuse what
is still valid, encode the rest) -> greedy decoding -> stop rules -> chunks.

Plain greedy decoding: each step feeds the last token and takes the argmax.
The loop checks the caller's cancel flag before every forward pass, so a
cancelled request stops within one token.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from rotary.cache.executor import UpdateCounts, execute_plan, refresh_from, truncate
from rotary.cache.plan import DocumentTokens, common_prefix_length
from rotary.cache.store import DocumentKV, KVStore
from rotary.models.runner import ModelRunner

from .prompt import WINDOW_HOP, HealingConstraint, Prompt, Vocabulary, forbidden_after, heal_length
from .stops import AUTO, StopRules

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 512

EDIT_AWARE, PREFIX, NO_CACHE, CONFLICT = "edit_aware", "prefix", "none", "conflict"


@dataclass
class CompletionOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    mode: str = AUTO
    # edit_aware (PIE), prefix (reuse the unchanged prefix only), none (from scratch),
    # conflict (PIE without re-rotation: a benchmark baseline only).
    cache_mode: str = EDIT_AWARE
    # Re-encode stale tokens among the last N before the cursor before completing (0: never).
    refresh_window: int = 128


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


@dataclass
class Chunk:
    text: str
    done: bool = False
    stop_reason: str = ""
    stats: CompletionStats | None = None


class CompletionEngine:
    def __init__(self, runner: ModelRunner, kv_store: KVStore, max_context_tokens: int = 2048, stale_budget: int = 1024):
        self.runner = runner
        self.kv_store = kv_store
        self.max_context_tokens = min(max_context_tokens, runner.info.max_positions)
        self.eos_ids = set(runner.info.eos_token_ids)
        self.inv_freq = runner.rope_inv_freq()
        # Models whose RoPE rotations do not compose cannot re-rotate cached keys exactly.
        self.edit_aware_supported = runner.info.rope.composable and self.inv_freq is not None
        self.waiting = 0  # completions waiting for the model; background work yields to them
        self._waiting_lock = threading.Lock()  # gRPC threads count concurrently
        self.background_refreshed = 0
        # More stale tokens than this in one document: refresh it in the background without waiting for idle.
        self.stale_budget = stale_budget
        self._healing_masks: dict[tuple[str, str], torch.Tensor] = {}
        self.vocabulary  # indexed once here rather than on the first keystroke

    def over_stale_budget(self) -> bool:
        return any(entry.tokens.stale_count > self.stale_budget for _, entry in self.kv_store.items())

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
        uri: str,
        text: str,
        offset: int,
        options: CompletionOptions,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Chunk]:
        started = time.perf_counter()
        max_tokens = max(1, min(options.max_tokens or DEFAULT_MAX_TOKENS, MAX_TOKENS_LIMIT))
        context = self.build_context(text, offset, max_tokens)
        stops = StopRules(context.text_before, context.text_after, options.mode)
        stats = CompletionStats(context_tokens=len(context.ids))

        with self._waiting_lock:
            self.waiting += 1
        with self.runner.lock:
            with self._waiting_lock:
                self.waiting -= 1
            entry = self.kv_store.get(uri) if options.cache_mode != NO_CACHE else None
            if entry is None or entry.cache is None:
                entry = DocumentKV(cache=self.runner.new_cache())
            if is_cancelled():
                yield self._final("", "cancelled", stats, started)
                return
            # Bring the cache to every context token but the last, which is fed to get the next-token logits.
            counts = self.prepare_cache(entry, context.ids[:-1], options)
            entry.dirty = True
            entry.refresh_position = None  # the text moved: a background refresh starts over
            logits = self.runner.forward(context.ids[-1:], entry.cache, len(context.ids) - 1)
            entry.tokens.append(context.ids[-1:])
            stats.tokens_reused = counts.reused
            stats.tokens_encoded = counts.encoded + 1
            stats.tokens_rerotated = counts.rerotated
            stats.stale_refreshed = counts.refreshed
            stats.prefill_ms = (time.perf_counter() - started) * 1000
            if options.cache_mode != NO_CACHE:
                self.kv_store.put(uri, entry)

            sent = ""
            reason = ""
            final_text = None
            text_so_far = ""
            decode_started = time.perf_counter()
            for text_so_far, reason, stats.tokens_generated in self.decode(
                entry, logits, context, max_tokens, is_cancelled
            ):
                if reason or text_so_far.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    continue
                decision = stops.check(text_so_far)
                if decision.committed.startswith(sent) and len(decision.committed) > len(sent):
                    yield Chunk(text=decision.committed[len(sent) :])
                    sent = decision.committed
                if decision.stop_reason:
                    reason, final_text = decision.stop_reason, decision.final
                    break
            stats.decode_ms = (time.perf_counter() - decode_started) * 1000

        if final_text is None:
            final_text = "" if reason == "cancelled" else stops.finish(text_so_far, reason).final or ""
        if not final_text.startswith(sent):
            # Cannot happen by the stop rules' contract (committed is a prefix of final); log loudly if it does.
            log.error("stop rules broke their prefix contract: sent %r, final %r", sent, final_text)
            final_text = sent
        yield self._final(final_text[len(sent) :], reason, stats, started)

    def decode(
        self,
        entry: DocumentKV,
        logits: torch.Tensor,
        context: Prompt,
        max_tokens: int,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[str, str, int]]:
        """Greedy decoding from `logits`, extending entry's cache; yields (visible text, end reason or "", tokens).

        The first tokens are constrained by token healing (prompt.py); the visible text is what
        comes after the healed text. The caller may stop early; the cache then holds every
        generated token but the last (which was never fed).
        """
        constraint = HealingConstraint(context.heal, context.forbidden_after_heal)
        generated: list[int] = []
        text = ""
        while True:
            remaining = constraint.remaining(text)
            if remaining is not None:
                logits = logits.masked_fill(~self.healing_mask(remaining, constraint.forbidden_next), float("-inf"))
            token = int(torch.argmax(logits))
            if token in self.eos_ids:
                yield constraint.visible(text), "eos", len(generated)
                return
            generated.append(token)
            text = self.runner.decode_ids(generated)
            visible = constraint.visible(text)
            if len(generated) >= max_tokens:
                yield visible, "max_tokens", len(generated)
                return
            yield visible, "", len(generated)
            if is_cancelled():
                yield visible, "cancelled", len(generated)
                return
            logits = self.runner.forward([token], entry.cache, len(entry.tokens))
            entry.tokens.append([token])

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

    def prepare_cache(self, entry: DocumentKV, ids: list[int], options: CompletionOptions) -> UpdateCounts:
        """Make entry.cache hold K/V for `ids` (positions 0..len-1), reusing what the chosen mode allows."""
        counts = UpdateCounts()
        mode = options.cache_mode
        if mode in (EDIT_AWARE, CONFLICT) and not self.edit_aware_supported:
            mode = PREFIX
        if mode in (EDIT_AWARE, CONFLICT):
            plan = entry.tokens.plan(ids)
            execute_plan(
                entry.cache, plan, ids, self.runner.forward, self.inv_freq, self.runner.info.rope.convention,
                rerotate=mode == EDIT_AWARE,
            )
            entry.tokens.apply(plan, ids)
            counts.reused, counts.encoded, counts.rerotated = plan.tokens_reused, plan.tokens_encoded, plan.tokens_rerotated
            if options.refresh_window and mode == EDIT_AWARE:
                stale = entry.tokens.stale_range_before(len(ids), options.refresh_window)
                if stale is not None:
                    counts.refreshed = refresh_from(entry.cache, entry.tokens, stale[0], self.runner.forward)
            return counts
        keep = common_prefix_length(entry.tokens.token_ids, ids) if mode == PREFIX else 0
        truncate(entry.cache, keep)
        if keep < len(ids):
            self.runner.forward(ids[keep:], entry.cache, keep)
        # Staleness of the kept prefix (from earlier edit-aware updates) stays recorded.
        stale = [(s, min(e, keep)) for s, e in entry.tokens.stale_intervals if s < keep]
        entry.tokens = DocumentTokens(ids, stale=stale)
        counts.reused, counts.encoded = keep, len(ids) - keep
        return counts

    def maintenance_step(self, chunk_tokens: int = 64) -> str | None:
        """One bounded piece of background work while no completion waits; what was done, or None.

        Stale documents are refreshed chunk by chunk from their first stale token to the end
        (which leaves them exactly as a full recompute would), most recently used first; then
        changed caches are written as snapshots, so a restarted worker finds them.
        """
        if self.waiting or not self.runner.lock.acquire(blocking=False):
            return None
        try:
            for uri, entry in reversed(self.kv_store.items()):
                if entry.refresh_position is None and entry.tokens.stale_count:
                    entry.refresh_position = entry.tokens.stale_intervals[0][0]
                if entry.refresh_position is not None:
                    start = entry.refresh_position
                    end = min(start + chunk_tokens, len(entry.tokens))
                    refresh_from(entry.cache, entry.tokens, start, self.runner.forward, end)
                    entry.refresh_position = end if end < len(entry.tokens) else None
                    entry.dirty = True
                    self.background_refreshed += end - start
                    return f"refreshed {uri} [{start}, {end})"
            written = self.kv_store.write_dirty_snapshot()
            return f"snapshot of {written}" if written else None
        finally:
            self.runner.lock.release()

    @staticmethod
    def _final(rest: str, reason: str, stats: CompletionStats, started: float) -> Chunk:
        stats.total_ms = (time.perf_counter() - started) * 1000
        return Chunk(text=rest, done=True, stop_reason=reason, stats=stats)
