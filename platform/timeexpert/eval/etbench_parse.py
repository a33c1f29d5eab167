"""E.T. Bench free-text parsing, as the official scorer reads a model's answer.

The official `evaluation/compute_metrics.py` (E.T. Bench evaluation kit, commit 2d7bce9) parses
every answer itself; its parse decides numbers, so these functions follow it rule for rule (the
project's own `timeexpert.eval.parse` is more forgiving and would score differently):

- `parse_spans` = `tvg_format`: every "a - b" pair of the lower-cased answer (minus signs are
  lost: "-5 - 3" is [3, 5]); else every "a to b" (spaces required: "00:00:35 to 00:00:41" is
  [0, 35]); else the first number of each sentence (split on ! ? and newlines only) that mentions
  start / end / happen, paired in order. Pairs are put in order (end-first ones swapped). The
  official's last branch (hh:mm:ss in such sentences) can never fire: the previous branch reads
  a number from the same sentences first, so it is left out.
- `parse_captions` = `dvc_format` (with `extract_time_from_paragraph` / `extract_time_part`):
  "a - b" pairs cut the text into captions (paired by position after dropping pieces of 5 or
  fewer characters); "start time: a ... end time: b" with "description:" lines; the "start time
  a, end time b" form trips the official `assert` and fails; else one event from the first
  sentence that yields a time (a lone number t becomes [t - 20, t + 20], or [t, t + 40] when
  t <= 20; mm:ss read as "01 - 0" by the first rule).
- `parse_choice` = the option-letter rules of `rvq_eval` / `gvq_eval`; a `None` result is where
  the official falls back to sentence similarity (`timeexpert.eval.etbench`).
- `parse_highlight` = `vhd_eval`'s first signed number.

A value the official `float()` cannot read ("1..5") makes the official scorer crash; here that
answer fails to parse instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PAIR = r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)"
_PAIR_RE = re.compile(_PAIR)
_PAIR_TEXT_RE = re.compile(r"(\d+\.*\d*\s*-\s*\d+\.*\d*)")
_TO_RE = re.compile(r"(\d+\.*\d*)\s* to \s*(\d+\.*\d*)")
_SENTENCE_SPLIT_RE = re.compile(r"[!?\n]")
_SENTENCE_NUMBER_RE = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
# any of the official keywords ('starts', 'ends', 'happens in', 'start time', 'end time', 'start',
# 'end', 'happen') is in a sentence exactly when one of these three substrings is
_SPAN_KEYWORDS = ("start", "end", "happen")
_START_COLON_RE = re.compile(r"(?:start(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", re.DOTALL | re.IGNORECASE)
_END_COLON_RE = re.compile(r"(?:end(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", re.DOTALL | re.IGNORECASE)
_START_END_COMMA_RE = re.compile(r"start time (\d+\.*\d*), end time (\d+\.*\d*)")
_DESCRIPTION_RE = re.compile(r"description: (.*)")
_BULLET_RE = re.compile(r"\*\s*(.*)")
_MMSS_RE = re.compile(r"\d+\.*\d*:\d+\.*\d*")
_NUMBER_RE = re.compile(r"\d+\.*\d*(?!\.)")
_SIGNED_NUMBER_RE = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")
_CHOICE_PAREN_RE = re.compile(r"\(([A-Za-z])\)")
_LETTER_END = (".", ",", " ", ")")
_CAPTION_RADIUS = 20  # extract_time_part: a lone time t becomes [t - 20, t + 20]


class _Unparsed(Exception):
    """Where the official code raises and its caller counts the answer as failed."""


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Unparsed(text) from None


def parse_spans(answer: str) -> list[list[float]] | None:
    """Every [start, end] the official `tvg_format` reads from an answer, or None (failed)."""
    text = answer.lower()
    try:
        spans = [[_float(a), _float(b)] for a, b in _PAIR_RE.findall(text)]
        if not spans:
            spans = [[_float(a), _float(b)] for a, b in _TO_RE.findall(text)]
        if not spans:
            times = []
            for sentence in _SENTENCE_SPLIT_RE.split(text):
                if any(k in sentence for k in _SPAN_KEYWORDS):
                    found = _SENTENCE_NUMBER_RE.findall(sentence)
                    if found:
                        times.append(_float(found[0]))
            spans = [[times[i], times[i + 1]] for i in range(0, len(times) // 2 * 2, 2)]
    except _Unparsed:
        return None
    return [[s, e] if e > s else [e, s] for s, e in spans] or None


def _paragraph_events(paragraph: str) -> tuple[list, list[str]]:
    """`extract_time_from_paragraph`: (timestamps, captions), paired by position."""
    paragraph = paragraph.lower()
    timestamps: list = [[_float(a), _float(b)] for a, b in _PAIR_RE.findall(paragraph)]
    captions: list[str] = []
    if timestamps:
        rest = paragraph
        for piece in _PAIR_TEXT_RE.findall(paragraph):
            rest = rest.replace(piece, "\n")
        captions = rest.replace("seconds", "").split("\n")
    else:
        starts, ends = _START_COLON_RE.findall(paragraph), _END_COLON_RE.findall(paragraph)
        if starts and ends:
            timestamps = [[_float(s), _float(e)] for s, e in zip(starts, ends)]
            captions = _DESCRIPTION_RE.findall(paragraph) or _BULLET_RE.findall(paragraph)
    if not timestamps and _START_END_COMMA_RE.search(paragraph):
        raise _Unparsed("the 'start time a, end time b' form (an official assert)")
    captions = [c.strip().strip(", ").rstrip() for c in captions if len(c) > 5]
    n = min(len(timestamps), len(captions))
    return timestamps[:n], captions[:n]


def _time_part(text: str) -> str | None:
    """`extract_time_part`: the "a - b" string the fallback reads one event's times from."""
    pairs = _PAIR_TEXT_RE.findall(text)
    if pairs:
        return pairs[0]
    colons = text.count(":")
    if colons == 1:
        found = _MMSS_RE.findall(text)
        if not found:
            raise _Unparsed(text)
        minutes, seconds = found[0].split(":")[:2]
        t = _int(minutes) * 60 + _int(seconds)
        return _radius_span(t)
    if colons == 2:
        found = _MMSS_RE.findall(text)
        if len(found) != 2:
            raise _Unparsed(text)
        start, end = ((_int(f.split(":")[0]) * 60 + _int(f.split(":")[1])) for f in found)
        return f"{start} - {end}"
    numbers = _NUMBER_RE.findall(text)
    if len(numbers) == 1:
        return _radius_span(_float(numbers[0]))
    if len(numbers) == 2:
        return f"{numbers[0]} - {numbers[1]}"
    if numbers:  # three or more: the official takes the first, which has no '-', and fails
        raise _Unparsed(text)
    return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Unparsed(text) from None


def _radius_span(t: float) -> str:
    if t > _CAPTION_RADIUS:
        return f"{t - _CAPTION_RADIUS} - {t + _CAPTION_RADIUS}"
    return f"{t} - {t + 2 * _CAPTION_RADIUS}"


def parse_captions(answer: str) -> tuple[list[list[float]], list[str]] | None:
    """(timestamps as [min, max], captions) as the official `dvc_format` reads them, or None."""
    try:
        timestamps, captions = _paragraph_events(answer)
    except _Unparsed:
        return None
    if not timestamps:
        pieces = answer.split("\n") if "\n" in answer else [c + "." for c in answer.split(".") if len(c) > 7]
        for piece in (p for p in pieces if len(p) > 7):
            parts = [p.strip(",") for p in piece.split("seconds")]
            try:
                time_part = _time_part(parts[0])
                if time_part is None:
                    continue
                bounds = time_part.split("-")
                if len(bounds) < 2:
                    continue
                start, end = round(_float(bounds[0].strip()), 2), round(_float(bounds[1].strip()), 2)
            except _Unparsed:
                continue
            timestamps, captions = [[start, end]], [parts[-1].strip()]
            break  # the official keeps only the first event of this fallback
    if not timestamps:
        return None
    return [[min(t), max(t)] for t in timestamps], captions


@dataclass(frozen=True)
class Choice:
    """An option letter read from an answer. `index` None: the official asks sentence similarity
    (with `text`); `counted_failed`: whether the official adds it to Failed when it does."""

    index: int | None
    text: str = ""
    empty: bool = False
    counted_failed: bool = False


def parse_choice(answer: str, num_options: int, task: str = "rvq") -> Choice:
    """The letter rules of `rvq_eval` (RAR/ECA/RVQ) or, with `task="gvq"`, of `gvq_eval`.

    `num_options` is the size of the letter map (RAR/ECA/RVQ: that of the group's first sample).
    A letter outside the map goes to similarity too, as in the official code; RVQ then does not
    count it as Failed.
    """
    letters = "abcde"[:num_options]
    matched_letter = False
    if task != "gvq":
        m = _CHOICE_PAREN_RE.search(answer)
        if m:
            matched_letter = True
            if m.group(1).lower() in letters:
                return Choice(letters.index(m.group(1).lower()))
        text = answer.lower()
        if text.startswith("best option:"):
            text = text[12:]
    else:
        text = answer[12:] if answer.lower().startswith("best option:") else answer
    text = text.lstrip().lstrip("(").lstrip()
    if not text:
        return Choice(None, empty=True, counted_failed=True)
    if len(text) == 1 or text[1] in _LETTER_END:
        matched_letter = True
        letter = text[0].lower()
        if letter in letters:
            return Choice(letters.index(letter))
    return Choice(None, text=text, counted_failed=task != "gvq" and not matched_letter)


def parse_highlight(answer: str) -> float | None:
    """`vhd_eval`: the first signed number of the answer ("0:85" -> 0, "1e3" -> 1), or None."""
    m = _SIGNED_NUMBER_RE.search(answer)
    return float(m.group(0)) if m else None
