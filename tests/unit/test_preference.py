"""Factorized preference data: every perturbation factor changes the answer in exactly the
recorded way, deterministically."""

from __future__ import annotations

import random

import pytest

from timeexpert.data.preference import (
    FACTORS,
    KEYWORD_SWAPS,
    add_false_event,
    delete_event,
    distort_caption,
    make_pairs,
    merge_events,
    repeat_caption,
    rule_based_rewrite,
    shift_event,
)
from timeexpert.events import Event

EVENTS = [
    Event(1.0, 3.0, 0.9, "a man opens the door"),
    Event(4.0, 6.5, 0.5, "the red ball rolls left"),
    Event(7.0, 8.0, 0.7, "a cat sits on the sofa"),
]
DURATION = 12.0


def same(a: Event, b: Event) -> bool:
    return a.to_dict() == b.to_dict()


def unchanged_except(pair, changed: set[int]) -> bool:
    return all(same(c, r) for i, (c, r) in enumerate(zip(pair.chosen, pair.rejected)) if i not in changed)


def test_shift_moves_one_interval_by_the_recorded_delta():
    p = shift_event(EVENTS, 1, 2.0, DURATION)
    assert p.factor == "shift" and p.kind == "temporal" and p.detail["delta"] == 2.0
    assert len(p.rejected) == len(p.chosen) and unchanged_except(p, {1})
    r, c = p.rejected[1], p.chosen[1]
    assert (r.start, r.end) == (c.start + 2.0, c.end + 2.0) and r.caption == c.caption and r.score == c.score
    # clamped to the video, length kept, the applied delta recorded
    p = shift_event(EVENTS, 2, 10.0, DURATION)
    assert p.rejected[2].end == DURATION and p.detail["delta"] == 4.0
    with pytest.raises(ValueError, match="cannot move"):
        shift_event([Event(0.0, 12.0)], 0, 3.0, DURATION)


def test_add_inserts_exactly_the_recorded_false_event():
    p = add_false_event(EVENTS, DURATION, random.Random(0))
    assert len(p.rejected) == len(p.chosen) + 1
    added = p.rejected[p.index]
    assert added.to_dict() == p.detail["event"]
    assert added.caption == EVENTS[p.detail["caption_from"]].caption
    rest = p.rejected[: p.index] + p.rejected[p.index + 1:]
    assert all(same(a, b) for a, b in zip(rest, p.chosen))
    # the false event lies where no true event is
    assert all(added.end <= e.start or added.start >= e.end for e in EVENTS)


def test_delete_removes_exactly_the_recorded_event():
    p = delete_event(EVENTS, 0)
    assert p.detail["event"] == EVENTS[0].to_dict()
    assert [e.to_dict() for e in p.rejected] == [e.to_dict() for e in EVENTS[1:]]


def test_merge_joins_the_two_recorded_events():
    p = merge_events(EVENTS, 1)
    assert p.detail["merged"] == [1, 2] and len(p.rejected) == 2
    m = p.rejected[1]
    assert (m.start, m.end) == (4.0, 8.0) and m.caption == "the red ball rolls left and a cat sits on the sofa"
    assert m.to_dict() == p.detail["event"] and same(p.rejected[0], EVENTS[0])


def test_repeat_copies_the_previous_caption_only():
    p = repeat_caption(EVENTS, 2)
    assert p.kind == "textual" and unchanged_except(p, {2})
    r = p.rejected[2]
    assert r.caption == EVENTS[1].caption == p.detail["new"] and p.detail["old"] == EVENTS[2].caption
    assert (r.start, r.end, r.score) == (EVENTS[2].start, EVENTS[2].end, EVENTS[2].score)
    with pytest.raises(ValueError):
        repeat_caption(EVENTS, 0)


def test_distort_swaps_exactly_the_recorded_key_words():
    p = distort_caption(EVENTS, 1)
    assert unchanged_except(p, {1}) and p.detail["rewriter"] == "rule"
    assert p.detail["swaps"] == [("red", "blue"), ("ball", "box"), ("left", "right")]
    assert p.rejected[1].caption == "the blue box rolls right"
    # re-applying the recorded swaps to the chosen caption gives the rejected one
    words = EVENTS[1].caption.split()
    swaps = dict(p.detail["swaps"])
    assert " ".join(swaps.get(w, w) for w in words) == p.rejected[1].caption
    assert rule_based_rewrite("Cat opens")[0] == "Dog closes"  # deterministic, case kept
    assert all(KEYWORD_SWAPS[KEYWORD_SWAPS[k]] == k for k in KEYWORD_SWAPS)
    with pytest.raises(ValueError, match="no key word"):
        distort_caption([Event(0.0, 1.0, 1.0, "zebra")], 0)


def test_a_pluggable_rewriter_is_recorded():
    def llm(caption: str) -> str:
        return caption.replace("sofa", "table")

    p = distort_caption(EVENTS, 2, rewriter=llm)
    assert p.detail == {"rewriter": "llm", "old": EVENTS[2].caption, "new": "a cat sits on the table"}
    assert p.rejected[2].caption == "a cat sits on the table" and unchanged_except(p, {2})


def test_make_pairs_is_deterministic_and_covers_every_factor():
    a = make_pairs(EVENTS, DURATION, seed=3)
    b = make_pairs(EVENTS, DURATION, seed=3)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.factor for p in a] == list(FACTORS)
    for p in a:
        assert [e.to_dict() for e in p.chosen] == [e.to_dict() for e in EVENTS]
        assert [e.to_dict() for e in p.rejected] != [e.to_dict() for e in EVENTS]
    # one event: merge and repeat do not apply and are skipped
    single = make_pairs(EVENTS[:1], DURATION, seed=0)
    assert {p.factor for p in single} == {"shift", "add", "delete", "distort"}
    with pytest.raises(ValueError, match="unknown factors"):
        make_pairs(EVENTS, DURATION, factors=["swap"])
