"""Exact tests of the PIE bookkeeping: which cached K/V to keep, shift or encode, and what goes stale.

Token ids are plain ints; OLD is a ten-token document 100..109 so that an expected
plan can be read off by eye. One test uses the embedded model's real tokenizer to
show that BPE boundaries move next to an edit.
"""

from __future__ import annotations

import random

import pytest

from rotary.completion.rpc.launch import python_command

from rotary.cache.plan import (
    DocumentTokens,
    Segment,
    SegmentKind,
    UpdatePlan,
    plan_update,
)

OLD = list(range(100, 110))  # cached ids at positions 0..9

keep, shift, encode = Segment.keep, Segment.shift, Segment.encode


def update(document: DocumentTokens, new, **kwargs) -> UpdatePlan:
    """Plan the update and apply it (what an executor does once it carried the plan out)."""
    plan = document.plan(new, **kwargs)
    document.apply(plan, new)
    return plan


def updated(old, new, **kwargs):
    """Plan the update and return (plan, document after applying it), starting from a fresh cache."""
    document = DocumentTokens(old)
    plan = update(document, new, **kwargs)
    assert document.token_ids == tuple(new)
    return plan, document


def dropped(plan: UpdatePlan) -> int:
    """Old positions whose K/V the plan discards."""
    return plan.old_length - plan.tokens_reused


def is_identity(plan: UpdatePlan) -> bool:
    """The cache is already right: nothing to encode, move or drop."""
    return plan.old_length == plan.new_length == plan.tokens_kept


def shifts_at_old_positions(plan: UpdatePlan) -> list[tuple[int, int, int]]:
    return [(s.old_start, s.old_end, s.delta) for s in plan.segments if s.kind is SegmentKind.SHIFT]


def stale_in(document: DocumentTokens, start: int, end: int) -> int:
    return sum(max(0, min(e, end) - max(s, start)) for s, e in document.stale_intervals)


def assert_plan_rebuilds(old, new, plan: UpdatePlan):
    """Every new position is produced exactly once, and reused K/V belong to equal ids."""
    rebuilt = [None] * len(new)
    for segment in plan.segments:
        for offset in range(segment.length):
            if segment.is_reused:
                rebuilt[segment.new_start + offset] = old[segment.old_start + offset]
            else:
                rebuilt[segment.new_start + offset] = new[segment.new_start + offset]
    assert rebuilt == list(new)
    assert plan.tokens_encoded + plan.tokens_reused == len(new)


# ---------------------------------------------------------------------------
# Single edits


def test_insertion_keeps_prefix_encodes_new_tokens_and_shifts_suffix():
    new = OLD[:4] + [1, 2] + OLD[4:]
    plan, document = updated(OLD, new)
    assert plan.segments == (keep(0, 4), encode(4, 6), shift(4, 10, delta=+2))
    assert (plan.tokens_encoded, plan.tokens_kept, plan.tokens_rerotated, dropped(plan)) == (2, 4, 6, 0)
    assert shifts_at_old_positions(plan) == [(4, 10, 2)]
    assert plan.shifts_at_new_positions() == [(6, 12, 2)]
    assert plan.encode_ranges() == [(4, 6)]
    # The shifted suffix attended to the old text: stale; the prefix and the new tokens are not.
    assert document.stale_intervals == ((6, 12),)
    assert document.stale_count == 6


def test_deletion_shifts_suffix_left_and_encodes_nothing():
    new = OLD[:3] + OLD[5:]
    plan, document = updated(OLD, new)
    assert plan.segments == (keep(0, 3), shift(5, 10, delta=-2))
    assert (plan.tokens_encoded, plan.tokens_kept, plan.tokens_rerotated, dropped(plan)) == (0, 3, 5, 2)
    assert document.stale_intervals == ((3, 8),)


def test_same_length_replacement_keeps_suffix_in_place_but_stale():
    new = OLD[:3] + [1, 2] + OLD[5:]
    plan, document = updated(OLD, new)
    # delta 0: no rotation needed, yet the suffix attended to the replaced tokens.
    assert plan.segments == (keep(0, 3), encode(3, 5), keep(5, 10))
    assert plan.tokens_rerotated == 0
    assert document.stale_intervals == ((5, 10),)


def test_longer_replacement_shifts_by_length_difference():
    new = OLD[:3] + [1, 2, 3] + OLD[5:]
    plan, document = updated(OLD, new)
    assert plan.segments == (keep(0, 3), encode(3, 6), shift(5, 10, delta=+1))
    assert document.stale_count == 5


def test_edit_at_the_very_start_makes_every_reused_token_stale():
    new = [1] + OLD
    plan, document = updated(OLD, new)
    assert plan.segments == (encode(0, 1), shift(0, 10, delta=+1))
    assert plan.stale_from == 0
    assert document.stale_intervals == ((1, 11),)

    plan, document = updated(OLD, [1] + OLD[1:])
    assert plan.segments == (encode(0, 1), keep(1, 10))
    assert document.stale_intervals == ((1, 10),)


def test_edits_at_the_very_end_leave_nothing_stale():
    plan, document = updated(OLD, OLD + [1, 2])
    assert plan.segments == (keep(0, 10), encode(10, 12))
    assert document.stale_count == 0

    plan, document = updated(OLD, OLD[:8])
    assert plan.segments == (keep(0, 8),)
    assert dropped(plan) == 2
    assert document.stale_count == 0

    plan, document = updated(OLD, OLD[:9] + [1])
    assert plan.segments == (keep(0, 9), encode(9, 10))
    assert document.stale_count == 0


def test_bpe_boundary_change_replaces_the_tokens_around_the_edit():
    # Typing inside " foo" (id 103) re-segments " foo bar" so that the neighbour
    # " bar" (104) changes too: ids 103, 104 become 60, 61, 62. A character diff
    # would call 104 unchanged; only the id diff knows its K/V cannot be reused.
    new = OLD[:3] + [60, 61, 62] + OLD[5:]
    plan, document = updated(OLD, new)
    assert plan.segments == (keep(0, 3), encode(3, 6), shift(5, 10, delta=+1))
    assert document.stale_intervals == ((6, 11),)


def test_prefix_and_suffix_never_claim_the_same_token():
    # Repeated ids: old "7 7", new "7 7 7". The prefix takes both old tokens, so
    # the suffix must not reuse one of them a second time.
    plan, _ = updated([7, 7], [7, 7, 7])
    assert plan.segments == (keep(0, 2), encode(2, 3))
    plan, _ = updated([7, 7, 7], [7, 7])
    assert plan.segments == (keep(0, 2),)


def test_emptying_the_document_drops_everything():
    plan, document = updated(OLD, [])
    assert plan.segments == ()
    assert dropped(plan) == 10
    assert plan.tokens_encoded == 0
    assert len(document) == 0 and document.stale_count == 0


def test_filling_an_empty_document_encodes_everything():
    plan, document = updated([], OLD)
    assert plan.segments == (encode(0, 10),)
    assert plan.tokens_encoded == 10
    assert document.stale_count == 0


def test_identical_text_keeps_everything_and_encodes_nothing():
    plan, document = updated(OLD, list(OLD))
    assert plan.segments == (keep(0, 10),)
    assert is_identity(plan)
    assert plan.tokens_encoded == 0 and plan.tokens_rerotated == 0
    assert plan.stale_from is None
    assert document.stale_count == 0
    assert is_identity(plan_update([], []))


# ---------------------------------------------------------------------------
# Several edits between two requests


def test_several_edits_coalesce_into_one_plan_with_cumulative_deltas():
    old = list(range(100, 130))
    # Insert 2 tokens at 5 (+2), delete old[12:15] (-3), replace old[22:24] by one token (-1).
    new = old[0:5] + [1, 2] + old[5:12] + old[15:22] + [7] + old[24:30]
    plan, document = updated(old, new)
    assert plan.segments == (
        keep(0, 5),
        encode(5, 7),
        shift(5, 12, delta=+2),
        shift(15, 22, delta=+2 - 3),
        encode(21, 22),
        shift(24, 30, delta=+2 - 3 - 1),
    )
    assert (plan.tokens_encoded, plan.tokens_kept, plan.tokens_rerotated, dropped(plan)) == (3, 5, 20, 5)
    assert document.stale_intervals == ((7, 21), (22, 28))
    assert document.stale_count == 20


def test_middle_runs_shorter_than_min_match_are_encoded():
    old = list(range(100, 120))
    # Two edits with only three unchanged tokens (105, 106, 107) between them.
    new = old[:4] + [1] + old[5:8] + [2] + old[9:]
    plan, _ = updated(old, new)
    assert plan.segments == (keep(0, 4), encode(4, 9), keep(9, 20))
    plan, _ = updated(old, new, min_match=3)
    assert plan.segments == (keep(0, 4), encode(4, 5), keep(5, 8), encode(8, 9), keep(9, 20))


def test_plans_rebuild_the_new_ids_for_random_edits():
    rng = random.Random(1234)
    for _ in range(300):
        # A small alphabet makes repeats and coincidental matches common.
        old = [rng.randrange(8) for _ in range(rng.randrange(0, 40))]
        new = list(old)
        for _ in range(rng.randrange(0, 4)):
            at = rng.randrange(len(new) + 1)
            removed = rng.randrange(0, 4)
            new[at : at + removed] = [rng.randrange(8) for _ in range(rng.randrange(0, 4))]
        for min_match in (1, 4):
            plan, document = updated(old, new, min_match=min_match)
            assert_plan_rebuilds(old, new, plan)
            # What goes stale is exactly the reused tokens after the common prefix.
            prefix = plan.stale_from if plan.stale_from is not None else len(new)
            reused_after = sum(
                max(0, s.new_end - max(s.new_start, prefix)) for s in plan.segments if s.is_reused
            )
            assert document.stale_count == reused_after


def test_plan_invariants_reject_inconsistent_segments():
    with pytest.raises(AssertionError):
        UpdatePlan(old_length=10, new_length=10, segments=(keep(0, 5),))  # does not cover the new text
    with pytest.raises(AssertionError):
        UpdatePlan(old_length=10, new_length=12, segments=(keep(0, 6), shift(4, 10, +2)))  # reuses old 4, 5 twice
    with pytest.raises(AssertionError):
        UpdatePlan(old_length=5, new_length=6, segments=(shift(0, 6, 0),))  # delta 0 is a KEEP
    with pytest.raises(AssertionError):
        Segment(SegmentKind.SHIFT, 0, 3, 0)  # kind disagrees with delta


def test_apply_refuses_a_plan_for_another_cache():
    document = DocumentTokens(OLD)
    plan = plan_update(OLD[:5], OLD[:5] + [1])
    with pytest.raises(AssertionError):
        document.apply(plan, OLD[:5] + [1])


# ---------------------------------------------------------------------------
# Staleness across several requests, and refresh


def test_staleness_accumulates_moves_with_tokens_and_clears_on_refresh():
    document = DocumentTokens(OLD)
    first = OLD[:4] + [1, 2] + OLD[4:]  # 12 tokens, stale [6, 12)
    update(document, first)
    assert document.stale_intervals == ((6, 12),)

    # An edit inside the stale region: the prefix keeps its stale part, the
    # shifted suffix is stale anyway.
    second = first[:8] + [3] + first[8:]  # 13 tokens
    plan = update(document, second)
    assert plan.segments == (keep(0, 8), encode(8, 9), shift(8, 12, delta=+1))
    assert document.stale_intervals == ((6, 8), (9, 13))
    assert document.stale_count == 6
    assert [stale_in(document, p, p + 1) == 1 for p in (5, 6, 8, 9, 12)] == [False, True, False, True, True]

    # An edit before all stale tokens moves them along.
    third = second[:2] + [4, 5, 6] + second[2:]  # 16 tokens
    update(document, third)
    assert document.stale_intervals == ((5, 16),)

    # Deleting stale tokens removes their staleness with them.
    fourth = third[:10] + third[14:]  # 12 tokens
    plan = update(document, fourth)
    assert plan.segments == (keep(0, 10), shift(14, 16, delta=-4))
    assert document.stale_intervals == ((5, 12),)

    document.mark_refreshed(7, 10)
    assert document.stale_intervals == ((5, 7), (10, 12))
    assert document.stale_count == 4
    document.mark_refreshed(0, 12)
    assert document.stale_count == 0


def test_identical_text_keeps_existing_staleness():
    document = DocumentTokens(OLD, stale=[(3, 5)])
    update(document, list(OLD))
    assert document.stale_intervals == ((3, 5),)


def test_stale_range_before_cursor():
    document = DocumentTokens(list(range(40)), stale=[(2, 5), (12, 15), (20, 22), (30, 33)])
    assert stale_in(document, 0, 40) == 11
    # Window [10, 25) before cursor 25 holds two stale runs: one range covers both.
    assert document.stale_range_before(cursor=25, window=15) == (12, 22)
    # The window clips a stale run that straddles its start.
    assert document.stale_range_before(cursor=32, window=1) == (31, 32)
    assert document.stale_range_before(cursor=20, window=5) is None
    assert document.stale_range_before(cursor=3, window=100) == (2, 3)
    # After refreshing the range the window is clean.
    document.mark_refreshed(12, 22)
    assert document.stale_range_before(cursor=25, window=15) is None
    assert document.stale_intervals == ((2, 5), (30, 33))


# ---------------------------------------------------------------------------
# A sliding context window


def test_id_diff_finds_a_slide_too():
    # A window recomputed from the document (dropped 3, appended 2) diffs to the same plan.
    plan = plan_update(OLD, OLD[3:] + [1, 2])
    assert plan.segments == (shift(3, 10, delta=-3), encode(7, 9))


# ---------------------------------------------------------------------------
# Real tokenizer


def test_bookkeeping_does_not_import_torch():
    import subprocess

    code = "import sys, rotary.cache.plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run(python_command("-c", code)).returncode == 0


@pytest.mark.model
def test_real_tokenizer_edit_changes_the_token_that_holds_it():
    from tests.conftest import reference_tokenizer

    tokenizer = reference_tokenizer()  # the session's (the embedded model's)
    old_text = "def compute_total(items):\n    return sum(item.price for item in items)\n" * 3
    # Typing one character turns the token "item" into "items": a character diff
    # sees a pure insertion, the ids see a replaced token.
    at = old_text.index("item.price") + len("item")
    new_text = old_text[:at] + "s" + old_text[at:]
    old_ids = tokenizer(old_text)["input_ids"]
    new_ids = tokenizer(new_text)["input_ids"]
    assert len(new_ids) == len(old_ids)

    document = DocumentTokens(old_ids)
    plan = update(document, new_ids)
    assert_plan_rebuilds(old_ids, new_ids, plan)
    [(start, end)] = plan.encode_ranges()
    assert tokenizer.decode(new_ids[start:end]).strip() == "items"
    assert plan.tokens_encoded == 1 and plan.tokens_rerotated == 0
    assert document.stale_count == len(new_ids) - end

    # Two more edits far apart (rename, then delete the last line) coalesce into one plan.
    third_text = new_text.replace("compute_total", "compute_grand_total", 1)
    third_text = third_text[: third_text.rindex("def ")]
    third_ids = tokenizer(third_text)["input_ids"]
    plan = update(document, third_ids)
    assert_plan_rebuilds(new_ids, third_ids, plan)
    assert plan.tokens_encoded <= 3
    assert plan.tokens_reused >= len(third_ids) - 3


def test_append_records_fresh_tokens_after_the_cached_ones():
    tokens = DocumentTokens([1, 2, 3], stale=[(1, 2)])
    tokens.append([4, 5])
    assert tokens.token_ids == (1, 2, 3, 4, 5) and tokens.stale_intervals == ((1, 2),)
