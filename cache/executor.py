"""Carry out a cache plan on the tensors: keep, re-rotate (PIE), encode; and refresh stale tokens.

The bookkeeping (cache/plan.py) decides; this module moves K/V accordingly in a
Hugging Face DynamicCache (per layer `keys`/`values`, [batch, kv_heads, seq, head_dim]).
The model is reached only through `encode(ids, cache, start)`, which runs the
tokens at positions start.. attending to the cache's first `start` positions and
appends their K/V (models/ owns that call; cache/ never imports it).

Executing a plan walks its segments left to right, so every ENCODE segment
attends to exactly the new text before it: reused pieces are appended (a view
for a leading KEEP, copies otherwise), shifted pieces have their keys re-rotated
by their delta (values untouched), and encoded pieces run through the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rotary.kernels import shift_keys

from .plan import DocumentTokens, UpdatePlan

Encode = Callable[[list[int], Any, int], torch.Tensor]


@dataclass
class UpdateCounts:
    reused: int = 0
    encoded: int = 0
    rerotated: int = 0
    refreshed: int = 0


def cache_length(cache: Any) -> int:
    for layer in cache.layers:
        if layer.is_initialized:
            return int(layer.keys.shape[-2])
    return 0


def truncate(cache: Any, length: int) -> None:
    """Keep the first `length` positions of every layer (transformers' own crop() changed meaning across versions)."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def execute_plan(
    cache: Any,
    plan: UpdatePlan,
    new_ids: Sequence[int],
    encode: Encode,
    inv_freq: torch.Tensor,
    convention: str,
    rerotate: bool = True,
) -> None:
    """Rebuild `cache` (holding the old ids' K/V) so it holds K/V for `new_ids`, as `plan` says.

    rerotate=False leaves moved keys at their old rotation: the "conflict" baseline of the
    PIE paper, kept for benchmarks only.
    """
    assert cache_length(cache) == plan.old_length, (cache_length(cache), plan.old_length)
    assert len(new_ids) == plan.new_length
    layers = [layer for layer in cache.layers if layer.is_initialized]
    old = [(layer.keys, layer.values) for layer in layers]  # [B, H, S_old, D] each
    built = 0  # positions of the new sequence already in the cache
    pending: list[tuple[int, int]] = []  # old ranges waiting to be appended
    shifts: list[tuple[int, int, int]] = []  # (new_start, new_end, delta) among them

    def flush_pending() -> None:
        nonlocal built
        if not pending:
            return
        for layer, (old_k, old_v) in zip(layers, old):
            if built == 0 and len(pending) == 1:
                s, e = pending[0]
                layer.keys, layer.values = old_k[..., s:e, :], old_v[..., s:e, :]  # a view: nothing copied
            else:
                head = [layer.keys[..., :built, :]] if built else []
                layer.keys = torch.cat(head + [old_k[..., s:e, :] for s, e in pending], dim=-2)
                layer.values = torch.cat(
                    ([layer.values[..., :built, :]] if built else []) + [old_v[..., s:e, :] for s, e in pending], dim=-2
                )
        if shifts and rerotate:
            # In place, also when layer.keys is a view of the old tensor: a plan never reuses an old
            # position twice, so nothing reads the rotated old positions again.
            shift_keys([layer.keys for layer in layers], shifts, inv_freq, convention)
        built += sum(e - s for s, e in pending)
        pending.clear()
        shifts.clear()

    if plan.old_length and not layers:
        raise AssertionError("a cache with positions must have initialized layers")
    if not plan.segments:
        truncate(cache, 0)
        return
    for seg in plan.segments:
        if seg.is_reused:
            pending.append((seg.old_start, seg.old_end))
            if seg.delta:
                shifts.append((seg.new_start, seg.new_end, seg.delta))
            continue
        flush_pending()
        truncate(cache, built)  # before the first flush the layers still hold the old positions
        encode(list(new_ids[seg.new_start : seg.new_end]), cache, seg.new_start)
        built = seg.new_end
        layers = [layer for layer in cache.layers if layer.is_initialized]
        assert not old or len(old) == len(layers), "the model changed the number of cached layers"
    flush_pending()
    truncate(cache, plan.new_length)
    assert cache_length(cache) == plan.new_length, (cache_length(cache), plan.new_length)


def refresh_from(cache: Any, tokens: DocumentTokens, start: int, encode: Encode, end: int | None = None) -> int:
    """Re-encode positions [start, end) (default: to the end) against the current prefix; return how many.

    Re-encoding to the end leaves [start, len) exactly as a full recompute would make
    it, provided [0, start) already is. Positions after `end` keep their K/V (spliced back).
    """
    length = len(tokens)
    end = length if end is None else min(end, length)
    if start >= end:
        return 0
    layers = [layer for layer in cache.layers if layer.is_initialized]
    tail = [(layer.keys[..., end:, :], layer.values[..., end:, :]) for layer in layers] if end < length else None
    truncate(cache, start)
    encode(list(tokens.token_ids[start:end]), cache, start)
    if tail is not None:
        for layer, (k, v) in zip(layers, tail):
            layer.keys = torch.cat([layer.keys, k], dim=-2)
            layer.values = torch.cat([layer.values, v], dim=-2)
    tokens.mark_refreshed(start, end)
    return end - start
