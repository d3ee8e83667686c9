"""The KV manager on CPU without a model (a fake forward that writes K/V encoding token, position and
layer): the steps `bring_to` hands the scheduler, exactly; pinning; the flags it alone sets; the
background refresh and snapshot policy. These are the engine's prefill and background code as they
were before the manager existed (completion/engine.py `prepare`, `background_step`), moved; the
model-level tests (tests/cache/test_pie_model.py, tests/completion/test_scheduler.py) check the
same code on the real model. Checked by mutation (by hand, then put back): without `entry.dirty = True`
in `bring_to`, test_an_edit_is_deferred_then_run_before_the_last_token_is_fed fails.
"""

from __future__ import annotations

from rotary.cache.deferred import run_deferred
from rotary.cache.manager import DONE, REFRESH_CHUNK, RUN_DEFERRED, KVManager, PrefillStep, Reuse
from rotary.cache.plan import DocumentTokens
from rotary.cache.store import DocumentKV, KVStore
from rotary.completion.request import CompletionStats
from tests.cache.test_buffer import INV_FREQ, LAYERS, FakeForward, assert_holds, buffer, code


def manager(forward: FakeForward, **kwargs) -> KVManager:
    return KVManager(KVStore(), buffer, forward, inv_freq=INV_FREQ, edit_aware=True, prefill_chunk=4, **kwargs)


def assert_values(buf, ids: list[int], computed_at: list[int]) -> None:
    """The buffer holds `ids`, each slot's values those computed for its token at `computed_at[slot]`
    (moved K/V keep their values; their keys were re-rotated, not checked here)."""
    assert buf.token_ids == tuple(ids) and buf.is_complete()
    for layer in range(LAYERS):
        for position, (token, at) in enumerate(zip(ids, computed_at)):
            assert (buf.kv[layer, 1, :, position] == -code(token, at, layer)).all(), (layer, position)


def run(steps, forward) -> tuple[list[PrefillStep], object]:
    """Drive `bring_to` as the scheduler would, running each deferred forward when asked."""
    seen, kept = [], []
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            return seen, done.value
        seen.append(step)
        if step.deferred is not None:
            kept.append(step.deferred)
        if step.run_deferred:
            run_deferred(kept, forward)
            kept = []


def test_an_edit_is_deferred_then_run_before_the_last_token_is_fed():
    forward = FakeForward()
    kv = manager(forward)
    entry = kv.acquire("file:///a.py")
    old = list(range(100, 120))
    run(kv.bring_to(entry, old, CompletionStats(), Reuse.EDIT_AWARE, refresh_window=0), forward)
    new = old[:10] + [7, 8] + old[10:]  # two tokens typed in the middle
    entry.dirty, forward.calls[:] = False, []
    steps = kv.bring_to(entry, new, stats := CompletionStats(), Reuse.EDIT_AWARE, refresh_window=0)
    first = next(steps)
    assert first.deferred is not None and not first.run_deferred
    assert [(start, ids) for _, start, ids in first.deferred.calls] == [(10, [7, 8])]  # recorded, not run
    assert forward.calls == [] and entry.buffer.token_ids == tuple(new[:-1])  # the ids are ahead of the K/V
    assert entry.dirty and entry.refresh_position is None
    assert next(steps) == RUN_DEFERRED  # the last id's forward reads the cache
    run_deferred([first.deferred], forward)
    seen, logits = run(steps, forward)
    assert seen == [] and logits == "l"  # the last id fed with logits="last" (the fake returns the string)
    # kept 0..9, encoded 10 and 11, moved by two 12..20 (computed at 10..18), the last id fed at 21
    assert_values(entry.buffer, new, [*range(12), *range(10, 19), 21])
    assert (stats.tokens_reused, stats.tokens_encoded, stats.tokens_rerotated) == (19, 3, 9)


def test_prefix_reuse_encodes_the_rest_a_chunk_a_step_and_leaves_the_last_id_when_asked():
    forward = FakeForward()
    kv = manager(forward)
    entry = kv.acquire("file:///a.py")
    ids = list(range(50, 61))
    steps, logits = run(kv.bring_to(entry, ids, CompletionStats(), Reuse.PREFIX, refresh_window=0, feed_last=False), forward)
    assert steps == [DONE, DONE, DONE] and logits is None  # 10 context ids in chunks of 4
    assert_holds(entry.buffer, ids[:-1])


def test_pinned_while_acquired_unpinned_on_release_and_dropped_on_discard():
    kv = manager(FakeForward())
    entry = kv.acquire("file:///a.py")
    assert entry.pinned and kv.store.get("file:///a.py") is entry
    kv.release("file:///a.py", entry)
    assert not entry.pinned and kv.store.get("file:///a.py") is entry
    entry = kv.acquire("file:///a.py")
    kv.discard("file:///a.py", entry)  # a failed request: its cache may be half-updated
    assert not entry.pinned and kv.store.get("file:///a.py") is None
    fresh = kv.acquire(None)  # no key: a cache nobody keeps
    assert not fresh.pinned and len(kv.store) == 0


def test_background_refresh_runs_when_idle_or_over_budget_from_the_first_stale_token():
    forward = FakeForward()
    kv = manager(forward, stale_budget=100)
    ids = list(range(1, 81))
    stale = buffer()
    stale.extend(ids, forward)
    stale.tokens = DocumentTokens(ids, stale=[(5, 10), (30, 40)])
    entry = DocumentKV(buffer=stale, dirty=False)
    kv.store.put("file:///a.py", entry)
    assert kv.background_step(idle=False) is None  # 15 stale tokens, under the budget: waits for idle
    assert kv.background_step(idle=True) == f"refreshed file:///a.py [5, {5 + REFRESH_CHUNK})"
    assert entry.refresh_position == 5 + REFRESH_CHUNK and entry.dirty
    assert kv.background_step(idle=True) == f"refreshed file:///a.py [{5 + REFRESH_CHUNK}, 80)"
    assert entry.refresh_position is None and entry.tokens.stale_count == 0
    assert kv.background_refreshed == 80 - 5
    kv.stale_budget = 0
    entry.buffer.tokens = DocumentTokens(ids, stale=[(70, 71)])
    assert kv.background_step(idle=False) == "refreshed file:///a.py [70, 80)"  # over the budget: at once


def test_a_snapshot_copies_a_changed_unpinned_cache_and_clears_its_flag(tmp_path):
    forward = FakeForward()
    kv = KVManager(KVStore(spill_dir=tmp_path, identity="m", layout=(4, 2, 8)), buffer, forward)
    held = kv.acquire("file:///held.py")
    held.buffer.extend([1, 2, 3], forward)
    idle = kv.acquire("file:///idle.py")
    idle.buffer.extend([4, 5], forward)
    kv.release("file:///idle.py", idle)
    assert kv.snapshot_one() == "file:///idle.py" and not idle.dirty
    assert kv.snapshot_one() is None  # the other one is pinned: a request is changing it
    kv.release("file:///held.py", held)
    kv.snapshot_all()
    kv.store.flush()
    assert not held.dirty and kv.store.snapshot_path("file:///held.py").exists()
