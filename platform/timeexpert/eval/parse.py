"""Answers -> events: free text from any VTG model, or the model's own event tokens.

Every parse returns a `ParseResult` with an `ok` flag, so each evaluation reports its parse-failure
rate. Free-text forms understood (case-insensitive, several windows per answer):

- windows: "from 20.8s to 30.0s", "20.8 - 30.0 seconds", "between 5 and 9.5 sec", "[12.5, 20]",
  "(0:12, 0:20)", "01:02:03.5 to 01:02:10", "1:05–1:20"; mm:ss and hh:mm:ss times;
- highlights (TimeChat / VTG-LLM style): "The highlight timestamps are in the 12, 14, 16
  seconds. Their saliency scores are 3.0, 2.7, 1.3" -> one clip-long event per timestamp with its
  score, and a per-clip saliency list when the duration is known;
- dense captions: each window's caption is the text after it up to the next window
  ("0.0 - 12.5 seconds, a man talks. 12.5 - 30 seconds, he cuts onions."), or the text before it
  when the answer puts captions first ("A man talks from 0 to 12.5s.").

A window written end-first ("from 30 to 20") is swapped, as most grounding-LLM evaluation scripts
do. With a known duration, windows are clipped to [0, duration] and a window starting at or after
the end of the video is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from timeexpert.events import Event, Task, TokenType, parse_pieces

_UNIT = r"(?:\s*(?:s|sec|secs|second|seconds)\b)?"
_TIME = r"(\d+(?::\d{1,2}){0,2}(?:\.\d+)?)"
_BRACKETED = rf"[\[(]\s*{_TIME}{_UNIT}\s*,\s*{_TIME}{_UNIT}\s*[\])]"
_RANGED = (
    rf"(?:\bfrom\s+)?{_TIME}{_UNIT}\s*(?:-|–|—|~|\bto\b|\buntil\b|\btill\b)\s*{_TIME}{_UNIT}"
)
_BETWEEN = rf"\bbetween\s+{_TIME}{_UNIT}\s+and\s+{_TIME}{_UNIT}"  # "and" only after "between"
_WINDOW_RE = re.compile(rf"{_BRACKETED}|{_BETWEEN}|{_RANGED}", re.IGNORECASE)
_NUMBER_RE = re.compile(_TIME)
_HIGHLIGHT_RE = re.compile(r"highlight|salien", re.IGNORECASE)
_SCORES_RE = re.compile(r"(?:saliency\s+)?scores?\b[^0-9]*", re.IGNORECASE)
_CAPTION_STRIP = " \t\n,.;:-–—"
_CAPTION_PREFIX_RE = re.compile(r"^(?:s|sec|secs|seconds?)?[\s,.;:]*", re.IGNORECASE)


@dataclass
class ParseResult:
    """What one answer parsed to. `ok` False: nothing usable (scored as a miss, counted as failure)."""

    events: list[Event] = field(default_factory=list)
    saliency: list[float] | None = None  # per clip of `clip_len` seconds, when parsed
    ok: bool = True
    error: str = ""  # why the parse failed (empty when ok)


def parse_time(text: str) -> float:
    """'20.8' -> 20.8, '1:05' -> 65.0, '01:02:03.5' -> 3723.5. Raises ValueError on a bad clock."""
    parts = text.strip().split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"not a time: {text!r}") from None
    if len(values) > 3 or any(v >= 60 for v in values[1:]):
        raise ValueError(f"not a time: {text!r} (expected ss, mm:ss or hh:mm:ss)")
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    return seconds


def _clip(start: float, end: float, duration: float | None) -> tuple[float, float] | None:
    if end < start:
        start, end = end, start
    if duration is not None:
        if start >= duration:
            return None
        end = min(end, duration)
    return start, end


def _parse_highlights(text: str, duration: float | None, clip_len: float) -> ParseResult:
    """'... timestamps are 12, 14 seconds. Their saliency scores are 3.0, 2.7' -> clip events."""
    m = _SCORES_RE.search(text)
    times_text, scores_text = (text[: m.start()], text[m.end() :]) if m else (text, "")
    try:
        times = [parse_time(t) for t in _NUMBER_RE.findall(times_text)]
        scores = [float(s) for s in _NUMBER_RE.findall(scores_text) if ":" not in s]
    except ValueError as e:
        return ParseResult(ok=False, error=str(e))
    if not times:
        return ParseResult(ok=False, error=f"no highlight timestamps in {text[:80]!r}")
    if scores and len(scores) != len(times):
        scores = (scores + [scores[-1]] * len(times))[: len(times)]
    scores = scores or [1.0] * len(times)
    events = []
    for t, s in zip(times, scores):
        window = _clip(t, t + clip_len, duration)
        if window is not None:
            events.append(Event(start=window[0], end=window[1], score=s))
    if not events:
        return ParseResult(ok=False, error=f"every highlight lies past the {duration} s video")
    saliency = None
    if duration is not None:
        saliency = [0.0] * max(1, int(duration / clip_len))
        for e in events:
            idx = min(int(e.start // clip_len), len(saliency) - 1)
            saliency[idx] = max(saliency[idx], float(e.score or 0.0))
    return ParseResult(events=events, saliency=saliency)


def parse_answer(
    text: str,
    task: Task | str = Task.MR,
    duration: float | None = None,
    clip_len: float = 2.0,
) -> ParseResult:
    """A free-text answer -> events (+ saliency for highlights); forms in the module docstring.

    MR: the windows in answer order (the first is the top-1). VHD: highlight timestamp/score lists,
    or windows when the answer gives windows. DVC: windows with their captions. GQA: the evidence
    window(s) with the answer as the caption ("From 3s to 7.5s. The answer is red.")
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    task = Task.parse(task)
    if task == Task.VHD and _HIGHLIGHT_RE.search(text) and not _WINDOW_RE.search(text):
        return _parse_highlights(text, duration, clip_len)
    matches = list(_WINDOW_RE.finditer(text))
    if not matches:
        if task == Task.VHD and _NUMBER_RE.search(text):
            return _parse_highlights(text, duration, clip_len)
        return ParseResult(ok=False, error=f"no time window in {text[:80]!r}")
    windows: list[tuple[float, float] | None] = []
    try:
        for m in matches:
            a, b = [g for g in m.groups() if g is not None]
            windows.append(_clip(parse_time(a), parse_time(b), duration))
    except ValueError as e:
        return ParseResult(ok=False, error=str(e))
    captions = [""] * len(matches)
    if task in (Task.DVC, Task.GQA):  # GQA: the answer is the text after its evidence span
        bounds = [0] + [x for m in matches for x in (m.start(), m.end())] + [len(text)]
        before = [text[bounds[2 * i] : bounds[2 * i + 1]] for i in range(len(matches))]
        after = [text[bounds[2 * i + 2] : bounds[2 * i + 3]] for i in range(len(matches))]
        after = [_CAPTION_PREFIX_RE.sub("", a).strip(_CAPTION_STRIP) for a in after]
        before = [b.strip(_CAPTION_STRIP) for b in before]
        # captions first ("A man talks from 0 to 5s. ...") when text leads and nothing trails
        use_before = bool(before[0]) and not after[-1]
        captions = before if use_before else after
        captions = [re.sub(r"\s*\b(?:from|between|at)$", "", c).strip(_CAPTION_STRIP) for c in captions]
    events = [
        Event(start=w[0], end=w[1], caption=c) for w, c in zip(windows, captions) if w is not None
    ]
    if not events:
        return ParseResult(ok=False, error=f"every window lies past the {duration} s video")
    return ParseResult(events=events)


def parse_model_pieces(pieces: Iterable[tuple[TokenType | int, str]]) -> ParseResult:
    """The model's own event tokens -> events, through THE serializer `events.parse_pieces`.

    A malformed piece sequence is a parse failure (ok False, the serializer's message as error);
    an event generated end-first is swapped (`order_times=True`), as free-text windows are.
    """
    try:
        return ParseResult(events=parse_pieces(pieces, order_times=True))
    except ValueError as e:
        return ParseResult(ok=False, error=str(e))


def as_parse_result(
    value: Any, task: Task | str, duration: float | None = None, clip_len: float = 2.0
) -> ParseResult:
    """Whatever a prediction is given as -> ParseResult.

    Accepted: None (missing: a failure), a ParseResult, a free-text str, a list of Events (or
    event dicts, or [start, end(, score)] lists), or a Prediction-like object with `.events`
    (and optional `.saliency`, `.text`); such an object with no events but a text is parsed from
    its text. Anything else raises TypeError naming the type.
    """
    if value is None:
        return ParseResult(ok=False, error="no prediction")
    if isinstance(value, ParseResult):
        return value
    if isinstance(value, str):
        return parse_answer(value, task, duration, clip_len)
    if isinstance(value, (list, tuple)):
        return ParseResult(events=[_as_event(v) for v in value])
    if hasattr(value, "events"):
        events = [_as_event(v) for v in (value.events or [])]
        saliency = getattr(value, "saliency", None)
        saliency = None if saliency is None else [float(s) for s in saliency]
        text = getattr(value, "text", None)
        if not events and not saliency and isinstance(text, str) and text.strip():
            return parse_answer(text, task, duration, clip_len)
        if not events and not saliency:
            return ParseResult(ok=False, error="prediction has no events")
        return ParseResult(events=events, saliency=saliency)
    raise TypeError(
        f"prediction must be None, str, a list of events or have .events, got {type(value).__name__}"
    )


def _as_event(value: Any) -> Event:
    if isinstance(value, Event):
        return value
    if isinstance(value, Mapping):
        return Event.from_dict(value)
    if isinstance(value, (list, tuple)) and len(value) in (2, 3):
        start, end = float(value[0]), float(value[1])
        score = float(value[2]) if len(value) == 3 else None
        return Event(start=start, end=end, score=score)
    raise TypeError(f"not an event: {value!r} (expected Event, dict or [start, end(, score)])")
