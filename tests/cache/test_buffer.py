"""KVBuffer bookkeeping, exactly, without a model: a fake forward writes K/V that encode (token, position, layer)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rotary.cache.buffer import KVBuffer, extend_batch
from rotary.cache.deferred import DeferredForward, can_ride, writes_of
from rotary.cache.plan import DocumentTokens, Segment, UpdatePlan, plan_update
from rotary.kernels.rope_shift import shift_keys_reference

LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))


def code(token, position, layer) -> float:
    """What the fake forward stores: keys +code, values -code."""
    return float(token) * 100 + position + layer / 10


class FakeForward:
    """Writes the Forward protocol's slots and records each call. `slice` gives the same fake running
    some layers only (sharing the record), from hidden inputs that carry the token in [..., 0]. It
    never grows a cache: the buffer must have reserved the slots (the forward only asserts it)."""

    def __init__(self, fail_after: int | None = None, layers: range | None = None, hidden=None, calls=None):
        self.calls = [] if calls is None else calls
        self.fail_after, self.layers, self.hidden = fail_after, layers, hidden

    def slice(self, layers: range, hidden: torch.Tensor | None = None) -> FakeForward:
        return FakeForward(self.fail_after, layers, hidden, self.calls)

    @torch.inference_mode()
    def __call__(self, *, caches, starts, lengths=None, ids=None, logits="last", logit_rows=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("model failed")
        self.calls.append(SimpleNamespace(
            ids=None if ids is None else ids.tolist(), starts=list(starts), lengths=lengths, layers=self.layers, logits=logits,
            logit_rows=None if logit_rows is None else list(logit_rows),
        ))
        tokens = ids if ids is not None else self.hidden[..., 0].long()  # [B, S]
        layers = range(caches[0].num_layers) if self.layers is None else self.layers
        for b, cache in enumerate(caches):
            assert cache.capacity >= starts[b] + tokens.shape[1], "the buffer reserves its slots before the forward"
            for s in range(tokens.shape[1] if lengths is None else lengths[b]):  # padding writes no K/V
                position = starts[b] + s
                for layer in layers:
                    value = code(tokens[b, s], position, layer)
                    cache.kv[layer, 0, :, position] = value
                    cache.kv[layer, 1, :, position] = -value
        return SimpleNamespace(logits=logits, hidden=self.hidden)


def buffer(capacity: int = 0, chunk: int = 4) -> KVBuffer:
    return KVBuffer(LAYERS, KV_HEADS, HEAD_DIM, capacity=capacity, chunk=chunk)


def assert_holds(buf: KVBuffer, ids: list[int]) -> None:
    """The buffer's ids are `ids` and every filled slot holds exactly their K/V."""
    assert buf.token_ids == tuple(ids)
    for layer in range(LAYERS):
        for position in range(buf.filled[layer]):
            value = code(ids[position], position, layer)
            assert torch.all(buf.kv[layer, 0, :, position] == value), (layer, position)
            assert torch.all(buf.kv[layer, 1, :, position] == -value), (layer, position)


def test_extend_appends_ids_and_kv_together():
    buf, forward = buffer(), FakeForward()
    assert buf.length == 0 and buf.capacity == 0 and buf.is_complete()
    buf.extend([7, 8, 9], forward)
    buf.extend([10], forward)
    assert buf.filled == [4] * LAYERS and buf.length == 4 and len(buf) == 4
    assert_holds(buf, [7, 8, 9, 10])
    assert [c.starts for c in forward.calls] == [[0], [3]]


def test_growth_is_amortised_in_whole_chunks_and_keeps_the_data():
    buf, forward = buffer(chunk=16), FakeForward()
    capacities = []
    for token in range(300):
        buf.extend([token % 50], forward)
        if not capacities or capacities[-1] != buf.capacity:
            capacities.append(buf.capacity)
    assert all(c % 16 == 0 for c in capacities)
    assert len(capacities) <= 9  # grows by half again each time: 16, 32, 48, 80, 128, 192, 288, 432
    assert all(b >= a + a // 2 for a, b in zip(capacities[1:], capacities[2:]))
    assert_holds(buf, [t % 50 for t in range(300)])


def test_chunked_extend_runs_one_forward_per_chunk_and_logits_on_the_last():
    buf, forward = buffer(), FakeForward()
    buf.extend(list(range(10)), forward, chunk=4)
    assert [c.starts for c in forward.calls] == [[0], [4], [8]]
    assert [c.logits for c in forward.calls] == [None, None, "last"]
    assert_holds(buf, list(range(10)))


def test_rollback_is_constant_time_and_reextending_equals_never_having_extended():
    buf, forward = buffer(), FakeForward()
    buf.extend([1, 2, 3, 4, 5, 6], forward)
    kv, capacity = buf.kv, buf.capacity
    buf.extend([40, 41, 42], forward)  # a draft, rejected
    kv = buf.kv
    buf.rollback(6)
    assert buf.kv is kv and buf.capacity >= capacity  # no tensor work
    assert buf.length == 6 and buf.filled == [6] * LAYERS
    buf.extend([7, 8], forward)
    fresh = buffer()
    fresh.extend([1, 2, 3, 4, 5, 6, 7, 8], FakeForward())
    assert_holds(buf, [1, 2, 3, 4, 5, 6, 7, 8])
    assert torch.equal(buf.kv[:, :, :, :8], fresh.kv[:, :, :, :8])
    buf.rollback(0)
    assert buf.length == 0 and buf.filled == [0] * LAYERS
    with pytest.raises(AssertionError):
        buf.rollback(1)


def test_rollback_keeps_staleness_before_the_cut():
    tokens = DocumentTokens(range(10), stale=[(2, 4), (6, 9)])
    tokens.truncate(7)
    assert tokens.token_ids == tuple(range(7)) and tokens.stale_intervals == ((2, 4), (6, 7))
    tokens.truncate(3)
    assert tokens.stale_intervals == ((2, 3),)


def test_per_layer_depth_after_an_early_exit():
    buf, forward = buffer(), FakeForward()
    buf.extend([1, 2, 3], forward)
    buf.extend([4], forward.slice(range(0, 2)), layers=range(0, 2))  # exits after layer 1
    assert buf.filled == [4, 4, 3, 3] and buf.length == 4 and not buf.is_complete()
    assert buf.unfilled(2) == (3, 4) and buf.unfilled(0) == (4, 4)
    with pytest.raises(AssertionError, match="fill"):
        buf.extend([5], forward)  # layers 2.. would attend to a hole
    buf.extend([5], forward.slice(range(0, 1)), layers=range(0, 1))  # exiting earlier still works
    assert buf.filled == [5, 4, 3, 3]
    hidden = torch.tensor([[[4.0], [5.0]]])  # the hidden states carry the tokens in this fake
    with pytest.raises(AssertionError):
        buf.fill(2, forward.slice(range(1, 4), hidden), range(1, 4))  # layer 1 holds 4 positions, layer 2 holds 3: not one start
    buf.fill(1, forward.slice(range(1, 2), hidden[:, 1:]), range(1, 2))
    buf.fill(2, forward.slice(range(2, 4), hidden), range(2, 4))
    assert buf.is_complete()
    assert_holds(buf, [1, 2, 3, 4, 5])
    with pytest.raises(AssertionError, match="past"):
        buf.fill(2, forward.slice(range(2, 4), hidden), range(2, 4))  # nothing left to fill
    buf.rollback(4)
    assert buf.filled == [4] * LAYERS


def test_rotate_turns_the_keys_of_every_layer_and_never_the_values():
    buf, forward = buffer(), FakeForward()
    buf.extend(list(range(12)), forward)
    with torch.inference_mode():
        buf.kv.normal_()  # distinct values per head and dim
    expected_keys = [buf.kv[layer, 0].clone().unsqueeze(0) for layer in range(LAYERS)]
    values = buf.kv[:, 1].clone()
    segments = [(2, 5, 3), (7, 12, -4)]
    shift_keys_reference(expected_keys, segments, INV_FREQ)
    buf.rotate(segments, INV_FREQ)  # one call over every layer
    for layer in range(LAYERS):
        assert torch.equal(buf.kv[layer, 0, :, :12], expected_keys[layer][0, :, :12])
    assert torch.equal(buf.kv[:, 1], values)  # values never rotate


def test_move_reads_every_source_before_writing():
    buf, forward = buffer(), FakeForward()
    buf.extend(list(range(10)), forward)
    before = buf.kv.clone()
    buf.move([(0, 5, 2)])  # overlapping: old [0, 5) to new [2, 7)
    assert torch.equal(buf.kv[:, :, :, 2:7], before[:, :, :, 0:5])
    buf.kv = before.clone()
    buf.move([(0, 3, 3), (3, 6, 0)])  # a swap
    assert torch.equal(buf.kv[:, :, :, 3:6], before[:, :, :, 0:3])
    assert torch.equal(buf.kv[:, :, :, 0:3], before[:, :, :, 3:6])
    with pytest.raises(AssertionError, match="reserve"):
        buf.move([(0, 5, buf.capacity - 2)])


def test_apply_plan_moves_rotates_and_encodes_in_order():
    old = list(range(100, 130))
    new = [7, 8] + old[:10] + [9] + old[14:]  # insert 2 at the top, replace 4 in the middle by 1
    buf, forward = buffer(), FakeForward()
    buf.extend(old, forward)
    old_kv = buf.kv.clone()
    plan = plan_update(old, new)
    forward.calls.clear()
    out = buf.apply(plan, new, forward, inv_freq=INV_FREQ)
    assert out is None  # the plan ends with a reused piece
    assert buf.token_ids == tuple(new) and buf.is_complete() and buf.filled == [len(new)] * LAYERS
    # encoded pieces ran left to right, at their new positions
    assert [c.starts for c in forward.calls] == [[s] for s, _ in plan.encode_ranges()]
    for s, e in plan.encode_ranges():
        for p in range(s, e):
            assert torch.all(buf.kv[1, 0, :, p] == code(new[p], p, 1))
    # reused pieces: values moved untouched, keys moved then rotated by their delta
    for seg in plan.segments:
        if not seg.is_reused:
            continue
        moved = old_kv[:, :, :, seg.old_start : seg.old_end].clone()
        assert torch.equal(buf.kv[:, 1, :, seg.new_start : seg.new_end], moved[:, 1])
        expected = [moved[layer, 0].unsqueeze(0) for layer in range(LAYERS)]
        shift_keys_reference(expected, [(0, seg.length, seg.delta)], INV_FREQ)
        for layer in range(LAYERS):
            assert torch.equal(buf.kv[layer, 0, :, seg.new_start : seg.new_end], expected[layer][0])
    assert buf.tokens.stale_intervals == tuple(plan.newly_stale_intervals())


def test_apply_returns_the_last_forward_when_the_plan_ends_by_encoding():
    old = list(range(20))
    new = old[:15] + [50, 51, 52]
    buf, forward = buffer(), FakeForward()
    buf.extend(old, forward)
    out = buf.apply(plan_update(old, new), new, forward, inv_freq=INV_FREQ)
    assert out.logits == "last"
    assert_holds(buf, new)


def test_a_failed_apply_leaves_an_empty_consistent_buffer():
    old = list(range(20))
    new = [99] + old[:5] + [98] * 5 + old[10:]
    buf = buffer()
    buf.extend(old, FakeForward())
    with pytest.raises(RuntimeError, match="model failed"):
        buf.apply(plan_update(old, new), new, FakeForward(fail_after=1), inv_freq=INV_FREQ)
    assert buf.length == 0 and buf.filled == [0] * LAYERS
    buf.extend(new, FakeForward())
    assert_holds(buf, new)


def test_apply_of_an_identity_or_empty_plan():
    buf, forward = buffer(), FakeForward()
    buf.extend([1, 2, 3], forward)
    buf.apply(UpdatePlan(3, 3, (Segment.keep(0, 3),)), [1, 2, 3], forward, inv_freq=None)
    assert_holds(buf, [1, 2, 3])
    buf.apply(UpdatePlan(3, 0, ()), [], forward, inv_freq=None)
    assert buf.length == 0 and buf.filled == [0] * LAYERS


def test_refresh_reencodes_in_place_and_clears_staleness():
    old = list(range(30))
    new = [77] + old
    buf, forward = buffer(), FakeForward()
    buf.extend(old, forward)
    plan = plan_update(old, new)
    buf.apply(plan, new, forward, inv_freq=INV_FREQ)
    assert buf.tokens.stale_intervals == ((1, 31),)
    assert buf.refresh(10, 20, forward, chunk=4) == 10
    assert [c.starts for c in forward.calls[-3:]] == [[10], [14], [18]]
    assert buf.tokens.stale_intervals == ((1, 10), (20, 31))
    for p in range(10, 20):
        assert torch.all(buf.kv[2, 0, :, p] == code(new[p], p, 2))
    assert not torch.all(buf.kv[2, 0, :, 25] == code(new[25], 25, 2))  # rotated, not re-encoded
    assert buf.refresh(5, None, forward) == 26
    assert buf.tokens.stale_count == 4 and buf.refresh(40, None, forward) == 0


def test_extend_batch_pads_rows_and_counts_only_real_tokens():
    buffers = [buffer(), buffer(), buffer()]
    forward = FakeForward()
    for b, prompt in zip(buffers, ([1, 2], [3, 4, 5, 6, 7], [8])):
        b.extend(prompt, forward)
    forward.calls.clear()
    extend_batch(buffers, [[10], [11, 12, 13], [14, 15]], forward, logits="all")
    call = forward.calls[0]
    assert call.ids == [[10, 10, 10], [11, 12, 13], [14, 15, 15]]
    assert call.starts == [2, 5, 1] and call.lengths == [1, 3, 2]
    assert_holds(buffers[0], [1, 2, 10])
    assert_holds(buffers[1], [3, 4, 5, 6, 7, 11, 12, 13])
    assert_holds(buffers[2], [8, 14, 15])
    assert [b.filled[0] for b in buffers] == [3, 8, 3]
    extend_batch(buffers, [[20], [21], [22]], forward)
    assert forward.calls[-1].lengths is None  # no padding needed
    assert_holds(buffers[0], [1, 2, 10, 20])
    with pytest.raises(AssertionError, match="twice"):
        extend_batch([buffers[0], buffers[0]], [[1], [2]], forward)


def test_deferred_calls_ride_in_extend_batch_as_rows_that_only_write_kv():
    a, b = buffer(), buffer()
    forward = FakeForward()
    a.extend([1, 2, 3, 4, 5, 6], forward)
    b.extend([7, 8, 9], forward)
    with torch.inference_mode():
        a.kv[:, :, :, 1:4] = 0  # what the deferred re-encoding must restore
    deferred = DeferredForward()
    assert a.refresh(1, 2, deferred) == 1 and a.refresh(2, 4, deferred) == 2  # two calls, going forward
    assert can_ride(deferred) and len(deferred.calls) == 2
    forward.calls.clear()
    extend_batch([a, b], [[10], [11, 12]], forward, logits="all", writes=writes_of([deferred]))
    assert len(forward.calls) == 1  # one forward for both new rows and both deferred calls
    call = forward.calls[0]
    assert call.ids == [[2, 2], [3, 4], [10, 10], [11, 12]] and call.starts == [1, 2, 6, 3] and call.lengths == [1, 2, 1, 2]
    assert call.logit_rows == [2, 3]  # logits for the new rows only
    assert_holds(a, [1, 2, 3, 4, 5, 6, 10])
    assert_holds(b, [7, 8, 9, 11, 12])
    assert deferred.calls == []


def test_deferred_calls_that_go_backwards_cannot_ride():
    a, forward = buffer(), FakeForward()
    a.extend([1, 2, 3, 4, 5, 6], forward)
    deferred = DeferredForward()
    a.refresh(3, 5, deferred)
    a.refresh(1, 4, deferred)  # overlaps the call before: in one forward it would see that call's K/V too early
    assert not can_ride(deferred)
    with pytest.raises(AssertionError, match="overlap"):
        writes_of([deferred])


def test_extend_batch_with_an_early_exit_then_fill():
    buffers = [buffer(), buffer()]
    forward = FakeForward()
    for b in buffers:
        b.extend([1, 2], forward)
    extend_batch(buffers, [[3], [4]], forward.slice(range(0, 2)), layers=range(0, 2))
    assert [b.filled for b in buffers] == [[3, 3, 2, 2]] * 2
    with pytest.raises(AssertionError, match="fill"):
        extend_batch(buffers, [[5], [6]], forward)


def test_nbytes_counts_the_whole_capacity():
    buf, forward = buffer(chunk=8), FakeForward()
    buf.extend(list(range(10)), forward)
    buf.rollback(3)
    assert buf.capacity == 16 and buf.nbytes() == LAYERS * 2 * KV_HEADS * 16 * HEAD_DIM * 4


def test_buffer_written_under_inference_mode_can_still_be_moved_outside_it():
    buf = buffer()
    with torch.inference_mode():
        buf.reserve(8)  # an inference tensor now
    buf.extend([1, 2, 3], FakeForward())
    buf.move([(0, 3, 4)])
    buf.rotate([(4, 7, 1)], INV_FREQ)


def test_from_kv_round_trip():
    buf, forward = buffer(), FakeForward()
    buf.extend(list(range(9)), forward)
    copy = KVBuffer.from_kv(buf.used().clone(), DocumentTokens(buf.token_ids, stale=[(3, 5)]))
    assert copy.token_ids == buf.token_ids and copy.is_complete() and copy.tokens.stale_intervals == ((3, 5),)
    assert_holds(copy, list(range(9)))
    copy.extend([4], forward)
    assert_holds(copy, list(range(9)) + [4])
    buf.extend([1], forward.slice(range(0, 1)), layers=range(0, 1))
    with pytest.raises(AssertionError, match="unfilled"):
        buf.used()
