"""What one forward pass does, as one typed value: `Batch` in, `ForwardOutput` out.

A forward runs rows of new tokens, row b for caches[b], at positions [starts[b], starts[b] +
lengths[b]). The rows are right-padded to the longest (`width`); the padding writes no K/V.
Which rows get logits, and at which positions, is part of the description too (`logits`,
`logit_rows`). Every valid combination is a valid Batch and the constructor rejects the rest,
once, with a ValueError that names the field: the forwards (transformer.py's own, hf.py's
fallback) then only assert invariants.

cache/ may not import models/ (tests/test_project.py), so the KV buffer calls a forward with
the Batch's fields as keywords (cache/buffer.py's `Forward`); `Transformer.__call__`,
`HFForward.__call__` and `ModelRunner.forward` build the Batch from them.

The caches are not resized here: their owner (cache/buffer.py's KVBuffer.reserve) makes room
before the call, and the forward asserts it (`Batch.check_capacity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch

Logits = Literal["last", "all"] | None
LOGITS = ("last", "all", None)


class KVCache(Protocol):
    """What a forward needs from a cache (cache/buffer.py's KVBuffer has it).

    kv: [layers, 2, kv_heads, capacity, head_dim]; kv[l, 0] keys, kv[l, 1] values. Slot p holds position p.
    The forward writes slots only; the cache's owner sizes `kv` (reserve) and moves its fill pointers.
    """

    kv: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """Rows of new tokens for one forward (see the module docstring)."""

    caches: tuple[Any, ...]  # row b writes and attends to caches[b] (a cache may take several rows: riders)
    starts: tuple[int, ...]  # row b's first new token is at position starts[b]
    lengths: tuple[int, ...] | None = None  # real tokens per row (None: every row is `width` long)
    ids: torch.Tensor | None = None  # [B, width] token ids (None: the caller brings hidden states, run_layers)
    logits: Logits = "last"  # "last": each row's last real token, [B, vocab]; "all": [B, width, vocab]; None
    logit_rows: tuple[int, ...] | None = None  # with "all": only these rows, [R, their longest, vocab]

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (normalising a frozen value)
        set_("caches", tuple(self.caches))
        set_("starts", tuple(int(s) for s in self.starts))
        rows = len(self.caches)
        if rows == 0:
            raise ValueError("a batch needs at least one row")
        if len(self.starts) != rows or min(self.starts) < 0:
            raise ValueError(f"starts {list(self.starts)}: one non-negative position per row ({rows} rows)")
        ids = self.ids
        if ids is not None:
            ids = ids.view(1, -1) if ids.dim() == 1 else ids
            set_("ids", ids)
            if ids.dim() != 2 or ids.shape[0] != rows or ids.shape[1] == 0:
                raise ValueError(f"ids of shape {list(ids.shape)} for {rows} rows: [rows, width] with width >= 1")
        if self.lengths is None:
            if ids is None:
                raise ValueError("a batch without ids needs its rows' lengths")
            set_("lengths", (ids.shape[1],) * rows)
        else:
            set_("lengths", tuple(int(n) for n in self.lengths))
        if len(self.lengths) != rows or min(self.lengths) < 1:
            raise ValueError(f"lengths {list(self.lengths)}: one length >= 1 per row ({rows} rows)")
        if ids is not None and max(self.lengths) != ids.shape[1]:
            raise ValueError(f"lengths {list(self.lengths)} for ids {ids.shape[1]} wide: the longest row is the width")
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be 'last', 'all' or None, not {self.logits!r}")
        if self.logit_rows is not None:
            set_("logit_rows", tuple(int(r) for r in self.logit_rows))
            if self.logits != "all" or not self.logit_rows:
                raise ValueError("logit_rows picks rows of logits='all' (and at least one)")
            if not all(0 <= r < rows for r in self.logit_rows):
                raise ValueError(f"logit_rows {list(self.logit_rows)} outside the {rows} rows")

    @property
    def rows(self) -> int:
        return len(self.caches)

    @property
    def width(self) -> int:
        """The padded number of positions per row (S of [B, S, ...])."""
        return max(self.lengths)

    @property
    def ragged(self) -> bool:
        return min(self.lengths) < self.width

    def check_capacity(self) -> None:
        """The invariant a forward relies on: the caches' owner reserved every row's slots (the padded width)."""
        for cache, start in zip(self.caches, self.starts):
            assert cache.kv.shape[3] >= start + self.width, (
                f"cache of capacity {cache.kv.shape[3]} for positions up to {start + self.width}: reserve() before the forward"
            )


class ForwardOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, vocab] ("last"), [B, S, vocab] or [R, S', vocab] ("all"), None
    hidden: torch.Tensor | None = None  # [B, S, dim] after the layers run (layer slices only: Transformer.slice)
    exited: int | None = None  # the layer after which an early exit stopped (models/exits.py; None: every layer ran)


class Forward(Protocol):
    """The small interface both forwards implement (transformer.py's own, hf.py's fallback)."""

    def forward(self, batch: Batch) -> ForwardOutput: ...
