"""The canonical types and THE serializer: exact round trips, strict parsing, the one IoU."""

from __future__ import annotations

import pytest

from timeexpert.events import (
    EOS, SEP, SWITCH, SYNC, Event, Record, Task, TokenType, gqa_answer_events, parse_pieces,
    prompt_query, read_gqa_answer, serialize_events, temporal_iou,
)

CASES = {
    "no events": [],
    "mr window at both ends": [Event(start=0.0, end=17.3, score=1.0)],
    "vhd clips": [Event(start=2.0, end=4.0, score=3.5), Event(start=10.0, end=12.0, score=0.0)],
    "dvc captions": [
        Event(start=0.0, end=3.2, score=2.0, caption="the red triangle appears"),
        Event(start=3.2, end=120.0, score=4.0, caption="the blue square moves right"),
    ],
}


@pytest.mark.parametrize("events", CASES.values(), ids=CASES.keys())
def test_round_trip_is_exact(events):
    pieces = serialize_events(events)
    assert pieces[-1] == (TokenType.TEXT, EOS)
    assert parse_pieces(pieces) == events


def test_grammar_of_one_event():
    pieces = serialize_events([Event(start=1.5, end=12.0, score=3.0, caption="a cat")])
    assert pieces == [
        (TokenType.TEXT, SWITCH),
        (TokenType.TIME, "1"), (TokenType.TIME, "."), (TokenType.TIME, "5"), (TokenType.TIME, SEP),
        (TokenType.TIME, "1"), (TokenType.TIME, "2"), (TokenType.TIME, "."), (TokenType.TIME, "0"),
        (TokenType.TIME, SYNC),
        (TokenType.SCORE, "3"), (TokenType.SCORE, "."), (TokenType.SCORE, "0"), (TokenType.SCORE, SYNC),
        (TokenType.TEXT, "a cat"),
        (TokenType.TEXT, EOS),
    ]


def test_cut_before_eos_keeps_complete_events_only():
    events = CASES["dvc captions"]
    pieces = serialize_events(events)[:-5]  # cut inside the second event's score
    assert parse_pieces(pieces) == events[:1]


@pytest.mark.parametrize(
    "pieces, message",
    [
        ([(TokenType.TIME, "1")], "expected text"),
        ([(TokenType.TEXT, SWITCH), (TokenType.TIME, SEP)], "malformed number"),
        ([(TokenType.TEXT, SWITCH), (TokenType.TIME, "1"), (TokenType.TIME, SYNC)], "unexpected"),
        ([(TokenType.TEXT, SWITCH), (TokenType.SCORE, "1")], "TIME number"),
        ([(TokenType.TEXT, SWITCH), (TokenType.TIME, "x")], "TIME number"),
    ],
)
def test_malformed_pieces_raise_saying_where(pieces, message):
    with pytest.raises(ValueError, match=message):
        parse_pieces(pieces)


def test_end_before_start_is_refused_unless_ordered():
    pieces = serialize_events([Event(start=1.0, end=2.0, score=0.0)])
    swapped = pieces[:1] + [(TokenType.TIME, "3")] + pieces[2:]  # start 3.0 > end 2.0
    with pytest.raises(ValueError, match="start <= end"):
        parse_pieces(swapped)
    assert parse_pieces(swapped, order_times=True) == [Event(start=2.0, end=3.0, score=0.0)]


def test_event_and_record_validation():
    with pytest.raises(ValueError, match="start <= end"):
        Event(start=5.0, end=1.0)
    with pytest.raises(ValueError, match="unknown task"):
        Record(id="a", video="v.mp4", duration=3.0, task="ocr", query="")
    with pytest.raises(ValueError, match="duration"):
        Record(id="a", video="v.mp4", duration=0.0, task=Task.MR, query="")
    record = Record(id="a", video="s3://b/v.mp4", duration=9.5, task="vhd", query="q",
                    events=[Event(start=1.0, end=2.0, score=2.0)], saliency=[0.0, 4.0])
    assert Record.from_dict(record.to_dict()) == record


def test_temporal_iou_values_and_shapes():
    assert temporal_iou([0, 10], [5, 15]) == pytest.approx(5 / 15)
    assert temporal_iou([0, 1], [2, 3]) == 0.0
    assert temporal_iou([2, 2], [2, 2]) == 0.0  # 0/0 defined as 0
    iou = temporal_iou([[0, 10], [0, 5]], [[0, 10], [5, 10], [20, 30]])
    assert iou.shape == (2, 3)
    assert iou.tolist() == [[1.0, 0.5, 0.0], [0.5, 0.0, 0.0]]


def test_gqa_record_prompt_and_answer():
    r = Record(id="v_qa", video="v.mp4", duration=20.0, task=Task.GQA,
               query="what colour is the circle that grows?", events=[Event(start=2.0, end=6.5)],
               options=["red", "blue", "dark blue"], answer=2)
    assert Record.from_dict(r.to_dict()) == r
    assert prompt_query(Task.GQA, r.query, r.options) == (
        "what colour is the circle that grows? Options: red; blue; dark blue.")
    assert prompt_query(Task.MR, "the red circle", None) == "the red circle"
    answer = gqa_answer_events(r.events, r.options, r.answer)  # grounding, then answering
    assert [(e.start, e.end, e.caption) for e in answer] == [(2.0, 6.5, "dark blue")]
    assert read_gqa_answer(answer, r.options) == (answer[0], 2)
    said = [Event(1.0, 5.0, caption="The answer is Blue.")]  # free text, case and punctuation
    assert read_gqa_answer(said, r.options)[1] == 1
    assert read_gqa_answer([Event(1.0, 5.0, caption="green")], r.options)[1] is None
    assert read_gqa_answer([], r.options) == (None, None)
    with pytest.raises(ValueError, match="index of one of its 3 options, got -1"):
        gqa_answer_events(r.events, r.options, -1)  # a record without its answer


@pytest.mark.parametrize("fields, message", [
    (dict(options=["red"], answer=0), "two or more non-empty answer options"),
    (dict(options=["red", "Red"], answer=0), "answer options must differ"),
    (dict(options=["red", "red."], answer=0), "answer options must differ"),
    (dict(options=["red", "blue"], answer=2), "answer 2 is not an index of its 2 options"),
    (dict(options=None, answer=None), "two or more non-empty answer options"),
])
def test_gqa_record_refuses_bad_options(fields, message):
    with pytest.raises(ValueError, match=message):
        Record(id="q", video="v.mp4", duration=10.0, task=Task.GQA, query="which?", **fields)


def test_options_belong_to_gqa_only():
    with pytest.raises(ValueError, match="options and answer belong to task gqa, not mr"):
        Record(id="q", video="v.mp4", duration=10.0, task=Task.MR, query="x", options=["a", "b"])
