"""The tensor side of per-document KV caches: which K/V tensors belong to which document.

cache/ owns every KV byte. A DocumentKV pairs the token ids whose K/V are cached
(positions 0..len-1) with the Hugging Face cache object holding them; the store
maps documents to them and evicts the least recently used over a memory budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .plan import DocumentTokens


@dataclass
class DocumentKV:
    tokens: DocumentTokens = field(default_factory=DocumentTokens)  # ids whose K/V are cached, and which are stale
    cache: Any = None  # transformers DynamicCache with len(tokens) positions

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers if layer.is_initialized)


class KVStore:
    """Per-document caches with least-recently-used eviction over a byte budget."""

    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget_bytes = budget_bytes
        self._docs: OrderedDict[str, DocumentKV] = OrderedDict()
        self.evictions = 0

    def get(self, uri: str) -> DocumentKV | None:
        entry = self._docs.get(uri)
        if entry is not None:
            self._docs.move_to_end(uri)
        return entry

    def put(self, uri: str, entry: DocumentKV) -> None:
        self._docs[uri] = entry
        self._docs.move_to_end(uri)
        self._evict_over_budget(keep=uri)

    def drop(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def total_bytes(self) -> int:
        return sum(e.nbytes() for e in self._docs.values())

    def __len__(self) -> int:
        return len(self._docs)

    def _evict_over_budget(self, keep: str) -> None:
        while self.total_bytes() > self.budget_bytes and len(self._docs) > 1:
            oldest = next(iter(self._docs))
            if oldest == keep:
                break
            del self._docs[oldest]
            self.evictions += 1
