"""Answer parsing: a table of real-world answers (well-formed and malformed) -> expected events."""

from __future__ import annotations

import pytest

from timeexpert.eval.parse import as_parse_result, parse_answer, parse_model_pieces, parse_time
from timeexpert.events import Event, TokenType, serialize_events

# (answer, task, duration, expected [(start, end, score, caption)] or None for a parse failure)
TABLE = [
    ("The event happens from 20.8s to 30.0s.", "mr", 60, [(20.8, 30.0, None, "")]),
    ("20.8 - 30.0 seconds", "mr", 60, [(20.8, 30.0, None, "")]),
    ("The moment is 10.5-20.", "mr", 60, [(10.5, 20.0, None, "")]),
    ("It occurs between 5 and 9.5 sec.", "mr", 60, [(5.0, 9.5, None, "")]),
    ("[12.5, 20]", "mr", 60, [(12.5, 20.0, None, "")]),
    ("The relevant moment: (0:12, 0:20)", "mr", 60, [(12.0, 20.0, None, "")]),
    ("1:05–1:20", "mr", None, [(65.0, 80.0, None, "")]),
    ("From 00:01:02.5 to 00:01:10", "mr", None, [(62.5, 70.0, None, "")]),
    ("01:02:03 ~ 01:02:09", "mr", None, [(3723.0, 3729.0, None, "")]),
    ("0-10s and 20-30s", "mr", 60, [(0, 10, None, ""), (20, 30, None, "")]),
    ("from 30 to 20", "mr", 60, [(20.0, 30.0, None, "")]),  # end first: swapped
    ("from 50 to 70 seconds", "mr", 60, [(50.0, 60.0, None, "")]),  # clipped to the video
    ("From 20.8 to 30.0 SECONDS.", "mr", 60, [(20.8, 30.0, None, "")]),
    # malformed / unusable
    ("I cannot find the moment in this video.", "mr", 60, None),
    ("", "mr", 60, None),
    ("It happens at 20.8 seconds.", "mr", 60, None),  # a point, not a window
    ("from 70 to 80 seconds", "mr", 60, None),  # entirely past the end
    ("1:75 - 2:00", "mr", None, None),  # 75 is not a valid second
    ("from twenty to thirty seconds", "mr", 60, None),
    # highlights
    (
        "The highlight timestamps are in the 12, 14, 16 seconds. "
        "Their saliency scores are 3.0, 2.7, 1.3.",
        "vhd", 20,
        [(12, 14, 3.0, ""), (14, 16, 2.7, ""), (16, 18, 1.3, "")],
    ),
    ("The highlights are: 12.0, 14.0, 16.0 seconds", "vhd", 20,
     [(12, 14, 1.0, ""), (14, 16, 1.0, ""), (16, 18, 1.0, "")]),
    ("The highlights are at 0:04 and 0:06.", "vhd", 20, [(4, 6, 1.0, ""), (6, 8, 1.0, "")]),
    ("There are no highlights.", "vhd", 20, None),
    # dense captions
    (
        "0.0 - 12.5 seconds, a man talks to the camera. 12.5 - 30.0 seconds, he cuts onions.",
        "dvc", 30,
        [(0, 12.5, None, "a man talks to the camera"), (12.5, 30, None, "he cuts onions")],
    ),
    (
        "A man talks from 0 to 12.5s. He cuts onions from 12.5 to 30s.",
        "dvc", 30,
        [(0, 12.5, None, "A man talks"), (12.5, 30, None, "He cuts onions")],
    ),
    ("12.0 - 20.0 seconds: add salt.\n20.0 - 25.0 seconds: stir.", "dvc", None,
     [(12, 20, None, "add salt"), (20, 25, None, "stir")]),
]


@pytest.mark.parametrize("answer, task, duration, expected", TABLE)
def test_answer_table(answer, task, duration, expected):
    result = parse_answer(answer, task, duration)
    if expected is None:
        assert not result.ok and result.error and result.events == []
        return
    assert result.ok, result.error
    got = [(e.start, e.end, e.score, e.caption) for e in result.events]
    assert len(got) == len(expected)
    for g, x in zip(got, expected):
        assert g[0] == pytest.approx(x[0]) and g[1] == pytest.approx(x[1])
        assert g[2] == (pytest.approx(x[2]) if x[2] is not None else None)
        assert g[3] == x[3]


def test_highlight_saliency_per_clip():
    r = parse_answer("The highlight timestamps are in the 2, 6 seconds. Their saliency scores are "
                     "3.5, 1.0", "vhd", duration=10, clip_len=2.0)
    assert r.saliency == [0.0, 3.5, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("text, seconds", [("20.8", 20.8), ("1:05", 65), ("01:02:03.5", 3723.5)])
def test_parse_time(text, seconds):
    assert parse_time(text) == pytest.approx(seconds)


def test_model_pieces_round_trip_and_failure():
    events = [Event(1.0, 4.5, 0.8, "a dog runs"), Event(5.0, 9.0, 0.2, "it jumps")]
    r = parse_model_pieces(serialize_events(events))
    assert r.ok and [(e.start, e.end, e.caption) for e in r.events] == [
        (1.0, 4.5, "a dog runs"), (5.0, 9.0, "it jumps")]
    bad = parse_model_pieces([(TokenType.TEXT, "<swi>"), (TokenType.TEXT, "oops")])
    assert not bad.ok and "piece 1" in bad.error


class _Prediction:  # what timeexpert.inference returns (duck-typed)
    def __init__(self, events, saliency=None, text=""):
        self.events, self.saliency, self.text, self.num_tokens = events, saliency, text, 0


def test_as_parse_result_accepts_every_form():
    assert not as_parse_result(None, "mr").ok
    assert as_parse_result([[1, 2, 0.5]], "mr").events[0].score == 0.5
    assert as_parse_result([{"start": 1, "end": 2}], "mr").events[0].end == 2
    assert as_parse_result("from 1 to 2 s", "mr").events[0].start == 1
    assert as_parse_result(_Prediction([Event(0, 1)]), "mr").ok
    assert as_parse_result(_Prediction([], text="3 - 4 seconds"), "mr").events[0].start == 3
    assert not as_parse_result(_Prediction([], text="no idea"), "mr").ok
    with pytest.raises(TypeError, match="int"):
        as_parse_result(5, "mr")
    with pytest.raises(TypeError, match="answer must be a str"):
        parse_answer(None)  # type: ignore[arg-type]
