"""PIE on the real model: after an edit, layer-0 keys equal a full recompute; after a refresh, every layer does."""

from __future__ import annotations

import functools

import pytest
import torch

pytestmark = pytest.mark.model

SOURCE = '''"""Inventory helpers."""
import os
import re

NAME_PATTERN = re.compile(r"[a-z_]+")


def load(path):
    with open(path) as handle:
        return [line.strip() for line in handle]


def save(path, lines):
    with open(path, "w") as handle:
        handle.write("\\n".join(lines))


def count_names(lines):
    return sum(1 for line in lines if NAME_PATTERN.fullmatch(line))
'''

EDITS = {
    "insertion": lambda t: t.replace("import re\n", "import re\nimport sys\nimport json\n", 1),
    "deletion": lambda t: t.replace("import os\n", "", 1),
    "multi_place": lambda t: t.replace("import os\n", "import os.path as osp\n", 1).replace("def save(", "def save_lines_to(", 1),
    "at_start": lambda t: "# header\n" + t,
}


@functools.lru_cache(maxsize=1)
def engine():
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner

    return CompletionEngine(ModelRunner(load_model(None)), KVStore())


def encoded_from_scratch(ids):
    eng = engine()
    cache = eng.runner.new_cache()
    eng.runner.forward(ids, cache, 0)
    return cache


def cached_after_edit(edit, refresh_window=0):
    from rotary.cache.store import DocumentKV
    from rotary.completion.engine import CompletionOptions

    eng = engine()
    entry = DocumentKV(cache=eng.runner.new_cache())
    options = CompletionOptions(refresh_window=refresh_window)
    eng.prepare_cache(entry, eng.runner.encode_text(SOURCE), options)
    new_ids = eng.runner.encode_text(EDITS[edit](SOURCE))
    counts = eng.prepare_cache(entry, new_ids, options)
    return entry, new_ids, counts


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_layer0_keys_after_pie_equal_full_recompute(edit):
    entry, new_ids, counts = cached_after_edit(edit)
    full = encoded_from_scratch(new_ids)
    assert list(entry.tokens.token_ids) == new_ids
    assert counts.encoded < len(new_ids) // 4, counts  # only the edit was encoded
    assert counts.rerotated > 0
    keys, ref = entry.cache.layers[0].keys, full.layers[0].keys
    assert keys.shape == ref.shape
    scale = ref.abs().max().item()
    assert max_error(keys, ref) <= 1e-5 * scale + 1e-4
    assert max_error(entry.cache.layers[0].values, full.layers[0].values) <= 1e-4
    # Deeper layers are stale (they attended to the old text) but positions are right: close, not equal.
    cos = torch.nn.functional.cosine_similarity(entry.cache.layers[-1].keys.flatten(), full.layers[-1].keys.flatten(), dim=0)
    assert cos > 0.99
    assert entry.tokens.stale_count > 0


def test_without_rerotation_layer0_keys_are_wrong():
    """The check above can fail: the conflict baseline (no re-rotation) breaks it."""
    from rotary.cache.store import DocumentKV
    from rotary.completion.engine import CompletionOptions

    eng = engine()
    entry = DocumentKV(cache=eng.runner.new_cache())
    eng.prepare_cache(entry, eng.runner.encode_text(SOURCE), CompletionOptions(cache_mode="conflict", refresh_window=0))
    new_ids = eng.runner.encode_text(EDITS["insertion"](SOURCE))
    eng.prepare_cache(entry, new_ids, CompletionOptions(cache_mode="conflict", refresh_window=0))
    full = encoded_from_scratch(new_ids)
    assert max_error(entry.cache.layers[0].keys, full.layers[0].keys) > 1e-2


@pytest.mark.parametrize("edit", ["insertion", "multi_place"])
def test_refresh_makes_every_layer_equal_full_recompute(edit):
    from rotary.cache.executor import refresh_from

    entry, new_ids, _ = cached_after_edit(edit)
    first_stale = entry.tokens.stale_intervals[0][0]
    refreshed = refresh_from(entry.cache, entry.tokens, first_stale, engine().runner.forward)
    assert refreshed == len(new_ids) - first_stale and entry.tokens.stale_count == 0
    full = encoded_from_scratch(new_ids)
    for mine, ref in zip(entry.cache.layers, full.layers):
        assert max_error(mine.keys, ref.keys) <= 1e-3
        assert max_error(mine.values, ref.values) <= 1e-3


def test_refresh_window_before_the_cursor_clears_nearby_staleness():
    entry, new_ids, counts = cached_after_edit("insertion", refresh_window=64)
    assert counts.refreshed > 0
    assert entry.tokens.stale_count_in(len(new_ids) - 64, len(new_ids)) == 0


def test_long_document_window_slides_by_rerotation():
    """Past the context budget the window before the cursor moves in hops: its cached keys shift, not re-encode."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import WINDOW_HOP, CompletionEngine, CompletionOptions

    base = engine()
    small = CompletionEngine(base.runner, KVStore(), max_context_tokens=WINDOW_HOP + 100)
    options = CompletionOptions(max_tokens=2, refresh_window=0)
    text = SOURCE * 4
    list(small.complete("long", text, len(text), options))
    first = small.kv_store.get("long").tokens.token_ids
    grown = text + SOURCE  # pushes the window start forward by at least one hop
    stats = list(small.complete("long", grown, len(grown), options))[-1].stats
    assert stats.context_tokens <= WINDOW_HOP + 100
    assert stats.tokens_rerotated > 0
    assert stats.tokens_encoded < stats.context_tokens
    assert small.kv_store.get("long").tokens.token_ids != first
