"""Factorized preference data (D2VLM sec. 5): dispreferred responses by event-level perturbation.

Each perturbation changes one factor of a clean answer and records what it did, so the pair says
exactly how the rejected response differs from the chosen one:

- temporal: `shift` an interval (by `delta` seconds, clamped to the video, length kept),
  `add` a false event (a copy of another event's caption at a free interval), `delete` an event,
  `merge` two neighbouring events (the union interval, captions joined with " and ");
- textual: `repeat` the previous event's caption, `distort` the caption's key words with a
  deterministic rule-based rewriter (word swaps from `KEYWORD_SWAPS`), or with any pluggable
  rewriter callable (an LLM) passed as `rewriter`.

    pairs = make_pairs(record.events, record.duration, seed=0)
    pairs[0].factor, pairs[0].detail, pairs[0].rejected
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from timeexpert.events import Event

TEMPORAL_FACTORS = ("shift", "add", "delete", "merge")
TEXTUAL_FACTORS = ("repeat", "distort")
FACTORS = TEMPORAL_FACTORS + TEXTUAL_FACTORS

# deterministic key-word distortion: each word and its swap (both directions)
_SWAP_PAIRS = [
    ("opens", "closes"), ("open", "close"), ("left", "right"), ("up", "down"), ("in", "out"),
    ("red", "blue"), ("green", "yellow"), ("black", "white"), ("big", "small"), ("large", "tiny"),
    ("man", "woman"), ("boy", "girl"), ("cat", "dog"), ("ball", "box"), ("door", "window"),
    ("sits", "stands"), ("walks", "runs"), ("enters", "leaves"), ("starts", "stops"),
    ("picks", "drops"), ("pushes", "pulls"), ("before", "after"), ("on", "off"), ("one", "two"),
    ("circle", "square"), ("moves", "stays"), ("fast", "slow"), ("appears", "disappears"),
]
KEYWORD_SWAPS: dict[str, str] = {**{a: b for a, b in _SWAP_PAIRS}, **{b: a for a, b in _SWAP_PAIRS}}
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(kw_only=True)
class PreferencePair:
    """A clean (chosen) answer and a dispreferred one that differs by one recorded factor."""

    chosen: list[Event]
    rejected: list[Event]
    factor: str  # one of FACTORS ("distort" also for a pluggable rewriter)
    kind: str  # "temporal" | "textual"
    index: int  # the event the factor changed (for "add": where the false event was inserted)
    detail: dict[str, Any] = field(default_factory=dict)  # what exactly changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": [e.to_dict() for e in self.chosen], "rejected": [e.to_dict() for e in self.rejected],
            "factor": self.factor, "kind": self.kind, "index": self.index, "detail": self.detail,
        }


def _copy(events: Sequence[Event]) -> list[Event]:
    return [copy.copy(e) for e in events]


def _check_index(events: Sequence[Event], index: int, factor: str, need: int = 1) -> None:
    if not 0 <= index <= len(events) - need:
        raise ValueError(f"{factor}: event index {index} out of range for {len(events)} events")


# --- temporal factors ---------------------------------------------------------------------------


def shift_event(events: Sequence[Event], index: int, delta: float, duration: float) -> PreferencePair:
    """Move event `index` by `delta` seconds, kept inside [0, duration] with its length."""
    _check_index(events, index, "shift")
    e = events[index]
    length = e.end - e.start
    start = min(max(e.start + delta, 0.0), max(duration - length, 0.0))
    start = round(start, 1)  # the serializer's resolution, so the pair survives a round trip
    applied = round(start - e.start, 1)
    if applied == 0:
        raise ValueError(f"shift: event {index} ({e.start}, {e.end}) cannot move by {delta} within {duration}")
    rejected = _copy(events)
    rejected[index] = Event(start=start, end=round(start + length, 1), score=e.score, caption=e.caption)
    return PreferencePair(chosen=_copy(events), rejected=rejected, factor="shift", kind="temporal",
                          index=index, detail={"delta": applied})


def add_false_event(events: Sequence[Event], duration: float, rng: random.Random) -> PreferencePair:
    """Insert a false event: another event's caption at the longest interval no event covers."""
    if not events:
        raise ValueError("add: needs at least one event to borrow a caption from")
    bounds = [0.0] + [t for e in sorted(events, key=lambda e: e.start) for t in (e.start, e.end)] + [duration]
    gaps = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2) if bounds[i + 1] - bounds[i] > 0.2]
    if not gaps:
        raise ValueError("add: the events leave no free interval for a false event")
    start, end = max(gaps, key=lambda g: g[1] - g[0])
    source = rng.randrange(len(events))
    false = Event(start=round(start, 1), end=round(end, 1), score=events[source].score, caption=events[source].caption)
    rejected = sorted(_copy(events) + [false], key=lambda e: (e.start, e.end))
    index = next(i for i, e in enumerate(rejected) if e is false)
    return PreferencePair(chosen=_copy(events), rejected=rejected, factor="add", kind="temporal",
                          index=index, detail={"event": false.to_dict(), "caption_from": source})


def delete_event(events: Sequence[Event], index: int) -> PreferencePair:
    _check_index(events, index, "delete")
    rejected = _copy(events)
    removed = rejected.pop(index)
    return PreferencePair(chosen=_copy(events), rejected=rejected, factor="delete", kind="temporal",
                          index=index, detail={"event": removed.to_dict()})


def merge_events(events: Sequence[Event], index: int) -> PreferencePair:
    """Events `index` and `index + 1` become one: the union interval, captions joined."""
    _check_index(events, index, "merge", need=2)
    a, b = events[index], events[index + 1]
    caption = " and ".join(c for c in (a.caption, b.caption) if c)
    scores = [s for s in (a.score, b.score) if s is not None]
    merged = Event(start=min(a.start, b.start), end=max(a.end, b.end),
                   score=max(scores) if scores else None, caption=caption)
    rejected = _copy(events[:index]) + [merged] + _copy(events[index + 2:])
    return PreferencePair(chosen=_copy(events), rejected=rejected, factor="merge", kind="temporal",
                          index=index, detail={"merged": [index, index + 1], "event": merged.to_dict()})


# --- textual factors ----------------------------------------------------------------------------


def repeat_caption(events: Sequence[Event], index: int) -> PreferencePair:
    """Event `index` (>= 1) repeats the previous event's caption."""
    _check_index(events, index, "repeat")
    if index < 1:
        raise ValueError("repeat: needs a previous event (index >= 1)")
    if events[index].caption == events[index - 1].caption:
        raise ValueError(f"repeat: event {index} already has the previous caption")
    rejected = _copy(events)
    rejected[index].caption = events[index - 1].caption
    return PreferencePair(chosen=_copy(events), rejected=rejected, factor="repeat", kind="textual",
                          index=index, detail={"old": events[index].caption, "new": events[index - 1].caption})


def rule_based_rewrite(caption: str) -> tuple[str, list[tuple[str, str]]]:
    """Swap every key word of KEYWORD_SWAPS (case kept); returns the new caption and the swaps."""
    swaps: list[tuple[str, str]] = []

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = KEYWORD_SWAPS.get(word.lower())
        if new is None:
            return word
        new = new.capitalize() if word[0].isupper() else new
        swaps.append((word, new))
        return new

    return _WORD.sub(swap, caption), swaps


def distort_caption(events: Sequence[Event], index: int,
                    rewriter: Callable[[str], str] | None = None) -> PreferencePair:
    """Distort event `index`'s key words: rule-based (default, deterministic) or `rewriter`."""
    _check_index(events, index, "distort")
    old = events[index].caption
    if rewriter is None:
        new, swaps = rule_based_rewrite(old)
        detail: dict[str, Any] = {"rewriter": "rule", "swaps": swaps}
    else:
        new = str(rewriter(old))
        detail = {"rewriter": getattr(rewriter, "__name__", type(rewriter).__name__)}
    if new == old:
        raise ValueError(f"distort: caption {old!r} has no key word to distort")
    detail.update(old=old, new=new)
    rejected = _copy(events)
    rejected[index].caption = new
    return PreferencePair(chosen=_copy(events), rejected=rejected, factor="distort", kind="textual",
                          index=index, detail=detail)


# --- a pair per applicable factor ---------------------------------------------------------------


def make_pairs(events: Sequence[Event], duration: float, *, factors: Sequence[str] = FACTORS,
               seed: int = 0, max_shift: float | None = None,
               rewriter: Callable[[str], str] | None = None) -> list[PreferencePair]:
    """One dispreferred response per applicable factor (deterministic by `seed`); factors that do
    not apply to these events (e.g. merge with one event) are skipped."""
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown:
        raise ValueError(f"unknown factors {unknown}; expected some of {list(FACTORS)}")
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    rng = random.Random(seed)
    events = list(events)
    pairs = []
    for factor in factors:
        try:
            if factor == "shift":
                i = rng.randrange(len(events)) if events else 0
                length = events[i].end - events[i].start if events else 0.0
                size = max(length, 0.2 * duration) if max_shift is None else max_shift
                pairs.append(shift_event(events, i, rng.choice((-1, 1)) * size, duration))
            elif factor == "add":
                pairs.append(add_false_event(events, duration, rng))
            elif factor == "delete":
                pairs.append(delete_event(events, rng.randrange(len(events)) if events else 0))
            elif factor == "merge":
                pairs.append(merge_events(events, rng.randrange(len(events) - 1) if len(events) > 1 else 0))
            elif factor == "repeat":
                pairs.append(repeat_caption(events, rng.randrange(1, len(events)) if len(events) > 1 else 0))
            elif factor == "distort":
                pairs.append(distort_caption(events, rng.randrange(len(events)) if events else 0, rewriter))
        except ValueError:
            continue  # the factor does not apply to these events
    return pairs
