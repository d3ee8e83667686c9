"""The KV cache Rotary owns: one document's token ids and their K/V, changed only together.

A KVBuffer holds one preallocated tensor, kv [layers, 2, kv_heads, capacity, head_dim]
(kv[l, 0] keys, kv[l, 1] values of layer l; slot p holds position p), the token ids
whose K/V it holds (a DocumentTokens, with their staleness), and per layer a fill depth:
`filled[l]` leading positions hold valid K/V in layer l. A token that exited early at
layer k is recorded (its id is held) with layers k.. left unfilled until `fill` runs them.

The invariant "these ids and these tensors describe the same text" is kept here: every
change goes through a method that moves both (`extend`, `fill`, `rollback`, `apply`,
`refresh`, and `extend_batch` for several documents at once). One exception is made on
purpose and kept visible: `apply` and `refresh` given a DeferredForward (cache/deferred.py)
move the ids at once and leave the K/V to be written when the deferred forward runs; the
KV manager (cache/manager.py) keeps it with the request until the scheduler runs it, before
anything reads the buffer. The model is reached only through a `Forward` callable
(models/batch.py's Batch, as keywords), so cache/ never imports models/. The buffer owns its
capacity: it reserves room before every forward, which only writes slots. Which document a
buffer belongs to, whether it is pinned, stale or changed since its snapshot is not kept here
(cache/store.py holds the buffers, cache/manager.py their flags).

Costs. Appending writes the new slots only (no copy of the cache per token). Capacity grows
by half again, in whole chunks, so growth is amortised O(1) per token. `rollback` is O(1) on
the tensors: slots past the new length are simply no longer counted (the next extend
overwrites them). Moving reused K/V for an edit (PIE) is one gather and one scatter over
every layer at once, and re-rotating moved keys is one `shift_keys` call on the stacked keys.

Every write happens under torch.inference_mode() (here and in the forward), so the buffer's
tensors may be inference tensors; read them freely, write them only through this class.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from rotary.kernels import shift_keys

from .plan import DocumentTokens, UpdatePlan

DEFAULT_CHUNK = 256  # capacity grows in whole chunks of this many positions


class Forward(Protocol):
    """The model's forward as the buffer calls it: models/batch.py's Batch, its fields as keywords
    (Transformer, HFForward and ModelRunner.forward build the Batch; cache/ may not import models/).

    Writes the K/V of row b's new tokens into caches[b].kv at slots [starts[b], starts[b] + lengths[b])
    for the layers it runs, attending to slots [0, position]; never resizes a cache, never moves `filled`.
    """

    def __call__(
        self,
        *,
        caches: Sequence[KVBuffer],
        starts: Sequence[int],
        lengths: Sequence[int] | None = None,
        ids: torch.Tensor | None = None,
        logits: str | None = "last",
        logit_rows: Sequence[int] | None = None,
    ) -> Any: ...


class KVBuffer:
    """One document's K/V in one stacked tensor, with the token ids it describes."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 0,
        chunk: int = DEFAULT_CHUNK,
    ):
        assert num_layers > 0 and kv_heads > 0 and head_dim > 0 and chunk > 0
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.chunk = dtype, torch.device(device), chunk
        self.kv = self._allocate(_round_up(capacity, chunk))  # [layers, 2, kv_heads, capacity, head_dim]
        self.filled = [0] * num_layers  # per layer: positions [0, filled[l]) hold valid K/V
        self.tokens = DocumentTokens()  # the ids of positions [0, length), and which are stale

    @classmethod
    @torch.inference_mode()
    def from_kv(cls, kv: torch.Tensor, tokens: DocumentTokens, *, chunk: int = DEFAULT_CHUNK) -> KVBuffer:
        """A buffer holding `tokens` with K/V kv [layers, 2, kv_heads, len(tokens), head_dim] (a snapshot read back)."""
        layers, two, kv_heads, length, head_dim = kv.shape
        assert two == 2 and length == len(tokens), f"K/V for {length} positions, {len(tokens)} tokens"
        buffer = cls(layers, kv_heads, head_dim, dtype=kv.dtype, device=kv.device, capacity=length, chunk=chunk)
        buffer.kv[:, :, :, :length].copy_(kv)
        buffer.tokens = tokens
        buffer.filled = [length] * layers
        return buffer

    def used(self) -> torch.Tensor:
        """K/V of the tokens held, [layers, 2, kv_heads, length, head_dim] (a view; every layer filled)."""
        assert self.is_complete(), "an early exit left layers unfilled"
        return self.kv[:, :, :, : self.length]

    def __repr__(self) -> str:
        depth = "" if self.is_complete() else f", filled={self.filled}"
        return f"KVBuffer({self.length} tokens, capacity {self.capacity}{depth})"

    # -- state ------------------------------------------------------------

    @property
    def length(self) -> int:
        """How many tokens the buffer holds (their ids; every layer up to here unless an early exit left gaps)."""
        return len(self.tokens)

    def __len__(self) -> int:
        return self.length

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.tokens.token_ids

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def is_complete(self) -> bool:
        """Every layer holds K/V for every token (no early exit waiting to be filled)."""
        return all(depth == self.length for depth in self.filled)

    def unfilled(self, layer: int) -> tuple[int, int]:
        """The positions [start, end) whose K/V layer `layer` still lacks."""
        return self.filled[layer], self.length

    def nbytes(self) -> int:
        """Bytes held (the whole capacity)."""
        return self.kv.nbytes

    # -- capacity ---------------------------------------------------------

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Make room for `length` positions: grow by at least half the capacity, in whole chunks."""
        if length <= self.capacity:
            return
        grown = self._allocate(_round_up(max(length, self.capacity + self.capacity // 2), self.chunk))
        used = max(self.filled)
        grown[:, :, :, :used].copy_(self.kv[:, :, :, :used])
        self.kv = grown

    def _allocate(self, capacity: int) -> torch.Tensor:
        shape = (self.num_layers, 2, self.kv_heads, capacity, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    # -- the model: ids and tensors change together ------------------------

    def extend(
        self,
        ids: Sequence[int],
        forward: Forward,
        *,
        layers: range | None = None,
        logits: str | None = "last",
        chunk: int | None = None,
    ) -> Any:
        """Run `ids` after the tokens held, append their K/V and their ids; return the forward's output.

        layers: the layers `forward` runs (default: all, which an early-exit forward fills too, the
        layers it skips by state copying). range(0, k) is a forward that stops after layer k - 1 (a
        layer slice, Transformer.slice): layers k.. stay unfilled for these tokens until `fill` runs
        them, and no later token can run those layers before that.
        chunk: at most this many tokens per forward (prefill in pieces); the output is the last piece's.
        """
        ids = [int(i) for i in ids]
        assert ids, "extend needs at least one token"
        layers = self.layer_range(layers)
        assert layers.start == 0, "extend starts at layer 0; use fill() to complete later layers"
        step = chunk or len(ids)
        out = None
        for first in range(0, len(ids), step):
            piece = ids[first : first + step]
            start = self.length
            self.check_depth(layers, start)
            self.reserve(start + len(piece))
            out = forward(
                ids=torch.tensor([piece], device=self.device), caches=[self], starts=[start],
                logits=logits if first + step >= len(ids) else None,
            )
            self.tokens.append(piece)
            self._mark_filled(layers, start + len(piece))
        return out

    def fill(self, count: int, forward: Forward, layers: range, *, logits: str | None = None) -> Any:
        """Complete `layers` for the `count` held tokens from filled[layers.start] that a layer slice
        left unfilled there. `forward` runs those layers from their hidden state (what the slice
        returned: Transformer.slice(layers, hidden)); it gets no ids.
        """
        layers = self.layer_range(layers)
        start = self.filled[layers.start]
        assert start + count <= self.length, f"fill of {count} positions from {start} runs past {self.length} tokens"
        self.check_depth(layers, start)
        out = forward(caches=[self], starts=[start], lengths=[count], logits=logits)
        self._mark_filled(layers, start + count)
        return out

    def rollback(self, length: int) -> None:
        """Forget every token from `length` on (rejected draft tokens): O(1) on the tensors."""
        assert 0 <= length <= self.length, f"cannot roll {self.length} tokens back to {length}"
        self.tokens.truncate(length)
        self.filled = [min(depth, length) for depth in self.filled]

    def refresh(self, start: int, end: int | None, forward: Forward, *, chunk: int | None = None) -> int:
        """Re-encode positions [start, end) in place against the current prefix; return how many.

        Exactly what a full recompute gives for [start, end) when [0, start) already is; positions
        after `end` keep their K/V. Clears their staleness.
        """
        assert self.is_complete(), "refresh needs every layer filled"
        end = self.length if end is None else min(end, self.length)
        if start >= end:
            return 0
        ids = self.tokens.token_ids
        step = chunk or end - start
        for first in range(start, end, step):
            last = min(first + step, end)
            forward(ids=torch.tensor([ids[first:last]], device=self.device), caches=[self], starts=[first], logits=None)
        self.tokens.mark_refreshed(start, end)
        return end - start

    def apply(
        self,
        plan: UpdatePlan,
        new_ids: Sequence[int],
        forward: Forward,
        *,
        inv_freq: torch.Tensor | None,
        convention: str = "half",
        rerotate: bool = True,
        chunk: int | None = None,
    ) -> Any:
        """Turn the buffer (holding the old ids) into one holding `new_ids`, as `plan` says (PIE).

        Reused pieces that moved are gathered and scattered in one step for every layer, their keys
        re-rotated by their delta in one shift_keys call (values untouched); then every ENCODE piece
        runs through the model left to right, attending to the new text before it. Returns the output
        of the last forward when the plan ends with an ENCODE piece (its logits="last"), else None.
        rerotate=False leaves moved keys at their old rotation (the PIE paper's "conflict" baseline).
        On an error the buffer is emptied (consistent, to be rebuilt by encoding).
        """
        new_ids = [int(i) for i in new_ids]
        assert self.is_complete(), "apply needs every layer filled"
        assert plan.old_length == self.length and plan.new_length == len(new_ids), (plan, self.length, len(new_ids))
        try:
            self.reserve(plan.new_length)
            moves = [(s.old_start, s.old_end, s.new_start) for s in plan.segments if s.is_reused and s.delta]
            self.move(moves)
            shifts = plan.shifts_at_new_positions()
            if shifts and rerotate:
                assert inv_freq is not None, "moved keys need the model's inv_freq to be re-rotated"
                self.rotate(shifts, inv_freq, convention)
            out = None
            encodes = plan.encode_ranges()
            for start, end in encodes:
                step = chunk or end - start
                for first in range(start, end, step):
                    last = min(first + step, end)
                    wants_logits = last == plan.new_length
                    out = forward(
                        ids=torch.tensor([new_ids[first:last]], device=self.device), caches=[self], starts=[first],
                        logits="last" if wants_logits else None,
                    )
            if not encodes or encodes[-1][1] != plan.new_length:
                out = None
        except BaseException:
            self.rollback(0)
            raise
        self.tokens.apply(plan, new_ids)
        self.filled = [plan.new_length] * self.num_layers
        return out

    # -- tensor helpers for a PIE executor ----------------------------------

    @torch.inference_mode()
    def move(self, moves: Sequence[tuple[int, int, int]]) -> None:
        """Copy slots [old_start, old_end) to [new_start, ...) for each move, all layers, keys and values.

        All sources are read before any destination is written, so moves may overlap each other's
        old and new ranges (a plan never reuses one old slot twice). The capacity must already fit.
        """
        moves = [(s, e, n) for s, e, n in moves if e > s and n != s]
        if not moves:
            return
        assert max(n + e - s for s, e, n in moves) <= self.capacity, "reserve() before moving past the capacity"
        old = torch.cat([torch.arange(s, e) for s, e, _ in moves]).to(self.device)
        new = torch.cat([torch.arange(n, n + e - s) for s, e, n in moves]).to(self.device)
        self.kv.index_copy_(3, new, self.kv.index_select(3, old))

    def rotate(self, segments: Sequence[tuple[int, int, int]], inv_freq: torch.Tensor, convention: str = "half") -> None:
        """Re-rotate the keys of slots [start, end) by delta positions, every layer in one shift_keys call."""
        end = max((e for _, e, _ in segments), default=0)
        shift_keys(self.kv[:, 0:1, :, : max(end, self.length)], segments, inv_freq, convention)

    # -- checks, and the record of a batched write -------------------------------

    def layer_range(self, layers: range | None) -> range:
        """`layers` checked against the model's (None: all of them)."""
        layers = range(self.num_layers) if layers is None else layers
        assert layers.step == 1 and 0 <= layers.start < layers.stop <= self.num_layers, f"bad layer range {layers}"
        return layers

    def check_depth(self, layers: range, start: int) -> None:
        """Every layer in `layers` holds exactly `start` positions: a forward writing from `start` may run them."""
        for layer in layers:
            assert self.filled[layer] == start, (
                f"layer {layer} holds {self.filled[layer]} positions, not {start}: "
                "fill() the positions an early exit skipped before running it again"
            )

    def _mark_filled(self, layers: range, end: int) -> None:
        for layer in layers:
            self.filled[layer] = end

    def written(self, ids: Sequence[int], layers: range) -> None:
        """A batched forward (extend_batch) wrote the K/V of `ids` after the tokens held, in `layers`: hold them."""
        start = self.length
        self.tokens.append(ids)
        self._mark_filled(layers, start + len(ids))


def extend_batch(
    buffers: Sequence[KVBuffer],
    ids: Sequence[Sequence[int]],
    forward: Forward,
    *,
    layers: range | None = None,
    logits: str | None = "last",
    writes: Sequence[tuple[KVBuffer, int, list[int]]] = (),
) -> Any:
    """`extend` for several documents in one batched forward: row b appends ids[b] to buffers[b].

    Rows may have different numbers of tokens: shorter ones are right-padded here, and the forward
    runs only the real tokens (the padding writes no K/V). logits="last" gives each row's last real
    token, [B, vocab]; "all" gives [B, S, vocab] with padded positions zero.

    writes: (buffer, first slot, ids) rows that only write K/V at slots the buffer's ids already
    cover (a deferred forward's calls, cache/deferred.py), run in the same forward before the new
    rows; the new rows see their K/V exactly as if they had run first (every layer writes all rows'
    K/V before any row attends). Their logits are not computed.
    """
    assert len(buffers) == len(ids) and buffers, "one list of ids per buffer"
    assert len({id(b) for b in buffers}) == len(buffers), "a buffer appears twice in one batch"
    rows = [[int(i) for i in row] for row in ids]
    assert all(rows), "every row needs at least one token"
    layers = buffers[0].layer_range(layers)
    assert layers.start == 0
    starts = [b.length for b in buffers]
    for buffer, start in zip(buffers, starts):
        buffer.check_depth(layers, start)
    assert not writes or (layers == range(buffers[0].num_layers) and logits == "all")
    for buffer, start, row in writes:
        assert start + len(row) <= buffer.length, "a K/V-only row writes inside the buffer's ids"
    padded, lengths = padded_rows([row for _, _, row in writes] + rows, buffers[0].device)
    caches = [buffer for buffer, _, _ in writes] + list(buffers)
    all_starts = [start for _, start, _ in writes] + starts
    for cache, start in zip(caches, all_starts):
        cache.reserve(start + padded.shape[1])
    out = forward(
        ids=padded, caches=caches, starts=all_starts, lengths=lengths, logits=logits,
        **({"logit_rows": range(len(writes), len(writes) + len(rows))} if writes else {}),
    )
    for buffer, row in zip(buffers, rows):
        buffer.written(row, layers)
    return out


def padded_rows(rows: Sequence[list[int]], device) -> tuple[torch.Tensor, list[int] | None]:
    """Rows of ids right-padded to the longest, [B, S], and each row's real length (None: all full)."""
    counts = [len(row) for row in rows]
    width = max(counts)
    padded = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], device=device)
    return padded, None if min(counts) == width else counts


def _round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk
