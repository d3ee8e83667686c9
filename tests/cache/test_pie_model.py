"""PIE on the real model, on Rotary's own KV buffer: after an edit, layer-0 keys equal a full recompute;
after a refresh (on a request, or chunk by chunk in the background), every layer does.

The reference is plain transformers run on the edited text from scratch (tests/conftest.py's
reference_model), not Rotary's forward.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import reference_model, rotary_engine

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


engine = rotary_engine  # the session's one engine (tests/conftest.py)


def transformers_kv(ids):
    """Every layer's K and V, [layers][2] of [kv_heads, T, head_dim], from transformers on `ids` from scratch."""
    model, _ = reference_model()
    with torch.inference_mode():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def cached_after_edit(edit, refresh_window=0, cache_mode="edit_aware"):
    from rotary.cache.store import DocumentKV
    from rotary.completion.engine import CompletionOptions

    eng = engine()
    entry = DocumentKV(buffer=eng.new_buffer())
    options = CompletionOptions(refresh_window=refresh_window, cache_mode=cache_mode)
    eng.prepare_now(entry, eng.runner.encode_text(SOURCE), options)
    new_ids = eng.runner.encode_text(EDITS[edit](SOURCE))
    _, stats = eng.prepare_now(entry, new_ids, options)
    return entry, new_ids, stats


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_layer0_keys_after_pie_equal_full_recompute(edit):
    entry, new_ids, stats = cached_after_edit(edit)
    full = transformers_kv(new_ids)
    kv = entry.buffer.used()  # [layers, 2, kv_heads, T, head_dim]
    assert list(entry.tokens.token_ids) == new_ids
    assert stats.tokens_encoded < len(new_ids) // 4, stats  # only the edit was encoded
    assert stats.tokens_rerotated > 0
    keys, ref = kv[0, 0], full[0][0]
    assert keys.shape == ref.shape
    assert max_error(keys, ref) <= 1e-5 * ref.abs().max().item() + 1e-4
    assert max_error(kv[0, 1], full[0][1]) <= 1e-4
    # Deeper layers are stale (they attended to the old text) but positions are right: close, not equal.
    cos = torch.nn.functional.cosine_similarity(kv[-1, 0].flatten(), full[-1][0].flatten(), dim=0)
    assert cos > 0.99
    assert entry.tokens.stale_count > 0


def test_without_rerotation_layer0_keys_are_wrong():
    """The check above can fail: the conflict baseline (no re-rotation) breaks it."""
    entry, new_ids, _ = cached_after_edit("insertion", cache_mode="conflict")
    assert max_error(entry.buffer.used()[0, 0], transformers_kv(new_ids)[0][0]) > 1e-2


@pytest.mark.parametrize("edit", ["insertion", "multi_place"])
def test_refresh_makes_every_layer_equal_full_recompute(edit):
    entry, new_ids, _ = cached_after_edit(edit)
    first_stale = entry.tokens.stale_intervals[0][0]
    eng = engine()
    refreshed = eng.scheduler.run_exclusive(lambda: entry.buffer.refresh(first_stale, None, eng.runner.forward))
    assert refreshed == len(new_ids) - first_stale and entry.tokens.stale_count == 0
    kv = entry.buffer.used()
    for layer, (keys, values) in enumerate(transformers_kv(new_ids)):
        assert max_error(kv[layer, 0], keys) <= 1e-3, layer
        assert max_error(kv[layer, 1], values) <= 1e-3, layer


def test_background_refresh_chunk_by_chunk_equals_full_recompute_layer_by_layer():
    """The idle worker refreshes a stale document 64 tokens at a time; the result is exact, every layer."""
    eng = engine()
    entry, new_ids, _ = cached_after_edit("multi_place")
    eng.kv_store.put("file:///stale.py", entry)
    try:
        steps = 0
        while entry.tokens.stale_count:
            done = eng.scheduler.run_exclusive(lambda: eng.kv_manager.background_step(idle=True))
            assert done and done.startswith("refreshed"), done
            steps += 1
        assert steps >= 2, "the refresh must have taken several chunks"
        kv = entry.buffer.used()
        for layer, (keys, values) in enumerate(transformers_kv(new_ids)):
            assert max_error(kv[layer, 0], keys) <= 1e-3, layer
            assert max_error(kv[layer, 1], values) <= 1e-3, layer
    finally:
        eng.kv_store.forget("file:///stale.py")


def test_refresh_window_before_the_cursor_clears_nearby_staleness():
    entry, new_ids, stats = cached_after_edit("insertion", refresh_window=64)
    assert stats.stale_refreshed > 0
    assert all(end <= len(new_ids) - 64 for _, end in entry.tokens.stale_intervals)


def test_long_document_window_slides_by_rerotation():
    """Past the context budget the window before the cursor moves in hops: its cached keys shift, not re-encode."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import WINDOW_HOP, CompletionEngine, CompletionOptions

    small = CompletionEngine(engine().runner, KVStore(), max_context_tokens=WINDOW_HOP + 100)
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
