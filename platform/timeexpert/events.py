"""The canonical event and record types, the one temporal IoU, THE event serializer (with the
number-vocabulary ids of its grammar tokens), and the per-clip saliency <-> scored windows
conversions.

Every part of the platform (data, model, eval, serve) speaks these types. Answers are a causal
sequence of events (t_m, s_m, c_m) (TimeExpert eq. 1-2, following TRACE): per event the
timestamps, then the saliency score, then the caption.

Serialized answer grammar (what `serialize_events` writes and `parse_pieces` reads)::

    answer  := TEXT* ( SWITCH time score TEXT* )* EOS
    time    := digits SEP digits SYNC        (start, end: time head)
    score   := digits SYNC                   (saliency: score head)

`digits` are symbols of NUMBER_SYMBOLS. SWITCH and EOS are text-vocabulary tokens emitted by the
LM head: SWITCH hands the next tokens to the time head, EOS ends the answer. After a time SYNC the
score head takes over, after a score SYNC the LM head. Zero events serialize to `[EOS]`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

# --- vocabularies ---------------------------------------------------------------------------

NUMBER_SYMBOLS: tuple[str, ...] = tuple("0123456789.")  # the 11 number tokens
SEP = "<sep>"  # between two numbers of one time segment
SYNC = "<sync>"  # closes a number sequence
NUMBER_VOCAB: tuple[str, ...] = NUMBER_SYMBOLS + (SEP, SYNC)  # vocab of the time and score heads
SWITCH = "<swi>"  # text-vocab token: an event's numbers follow (the switching token)
EOS = "<eos>"  # text-vocab token: the answer ends
EVI, EVI_END = "<evi>", "</evi>"  # text-vocab tokens of D2VLM's evidence (`models/evidence.py`)
# ids in the number vocabulary: the grammar tokens of the time and score heads
NUM_NUMBER_TOKENS = len(NUMBER_VOCAB)  # U = 13
NUMBER_TO_ID: dict[str, int] = {symbol: i for i, symbol in enumerate(NUMBER_VOCAB)}
DIGIT_IDS: tuple[int, ...] = tuple(NUMBER_TO_ID[str(d)] for d in range(10))
DOT_ID = NUMBER_TO_ID["."]
SEP_ID = NUMBER_TO_ID[SEP]
SYNC_ID = NUMBER_TO_ID[SYNC]
IGNORE_INDEX = -100  # label of tokens without a loss (the prompt, padding)
TIME_DECIMALS = 1  # timestamps are written with one decimal (0.1 s resolution)
SCORE_DECIMALS = 1  # saliency scores likewise


class Task(str, enum.Enum):
    """The four tasks: three VTG tasks and grounded QA."""

    MR = "mr"  # moment retrieval: query -> ranked windows
    VHD = "vhd"  # video highlight detection: query -> per-clip saliency (+ windows)
    DVC = "dvc"  # dense video captioning: video -> events with captions
    GQA = "gqa"  # grounded QA: question + options -> the evidence span, then the chosen option

    @classmethod
    def parse(cls, value: "str | Task") -> "Task":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown task {value!r}; expected one of {[t.value for t in cls]}"
            ) from None


class TokenType(enum.IntEnum):
    """Task type of every decoder token: gating statistics (A_t) and telemetry are kept per type."""

    TIME = 0
    SCORE = 1
    TEXT = 2
    VISUAL = 3
    QUERY = 4


NUM_TOKEN_TYPES = len(TokenType)


@dataclass
class Event:
    """One grounded event: an interval in seconds, an optional saliency score, a caption."""

    start: float
    end: float
    score: float | None = None
    caption: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"event times must be finite, got ({self.start}, {self.end})")
        if self.start < 0 or self.end < self.start:
            raise ValueError(
                f"event needs 0 <= start <= end, got start={self.start} end={self.end}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        return cls(
            start=float(d["start"]),
            end=float(d["end"]),
            score=None if d.get("score") is None else float(d["score"]),
            caption=str(d.get("caption", "")),
        )


@dataclass
class Record:
    """One canonical training/eval example, whatever public format it came from."""

    id: str  # unique within a dataset (e.g. qid, or video id + index)
    video: str  # URI of the video: a local path, file:// or s3://
    duration: float  # seconds
    task: Task
    query: str  # the query (MR/VHD) or instruction (DVC); may be empty for DVC
    events: list[Event] = field(default_factory=list)  # the target events, in time order
    saliency: list[float] | None = None  # per-clip saliency (VHD), clip length `clip_len`
    clip_len: float = 2.0  # seconds per saliency clip (QVHighlights uses 2 s)
    split: str = "train"
    # grounded QA (GQA): `query` is the question, `events` the evidence spans
    options: list[str] | None = None  # the answer options (GQA only)
    answer: int | None = None  # index of the right option (GQA; None when unknown)

    def __post_init__(self) -> None:
        self.task = Task.parse(self.task)
        if not self.duration > 0:
            raise ValueError(f"record {self.id!r}: duration must be > 0, got {self.duration}")
        if self.task != Task.GQA:
            if self.options is not None or self.answer is not None:
                raise ValueError(f"record {self.id!r}: options and answer belong to task gqa, "
                                 f"not {self.task.value}")
            return
        check_options(self.options, f"record {self.id!r}")
        if self.answer is not None and not 0 <= self.answer < len(self.options):
            raise ValueError(f"record {self.id!r}: answer {self.answer} is not an index of its "
                             f"{len(self.options)} options")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"] = self.task.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        return cls(
            id=str(d["id"]),
            video=str(d["video"]),
            duration=float(d["duration"]),
            task=Task.parse(d["task"]),
            query=str(d.get("query", "")),
            events=[Event.from_dict(e) for e in d.get("events", [])],
            saliency=None if d.get("saliency") is None else [float(s) for s in d["saliency"]],
            clip_len=float(d.get("clip_len", 2.0)),
            split=str(d.get("split", "train")),
            options=None if d.get("options") is None else [str(o) for o in d["options"]],
            answer=None if d.get("answer") is None else int(d["answer"]),
        )


# --- grounded QA: the prompt and the answer ---------------------------------------------------


def check_options(options: Any, where: str = "request") -> None:
    """ValueError unless `options` is a list of two or more distinct non-empty strings."""
    if (not isinstance(options, (list, tuple)) or len(options) < 2
            or not all(isinstance(o, str) and o.strip() for o in options)):
        raise ValueError(f"{where}: task gqa needs two or more non-empty answer options, "
                         f"got {options!r}")
    if len({_plain(o) for o in options}) != len(options):  # as `read_gqa_answer` compares them
        raise ValueError(f"{where}: answer options must differ, got {list(options)}")


def prompt_query(task: "Task | str", query: str, options: Sequence[str] | None = None) -> str:
    """The text a task's instruction template receives: the query itself, or for GQA the
    question followed by its options ("... Options: red; blue; green.")."""
    if Task.parse(task) != Task.GQA:
        return query
    check_options(options)
    return f"{query.strip()} Options: {'; '.join(o.strip() for o in options)}."


def gqa_answer_events(evidence: Sequence[Event], options: Sequence[str], answer: int) -> list[Event]:
    """The GQA answer, grounding then answering: the evidence spans, the chosen option written as
    the caption of the last one."""
    if not evidence:
        raise ValueError("a GQA answer needs at least one evidence span")
    if not 0 <= answer < len(options):  # -1: a record without its answer cannot be a target
        raise ValueError(f"a GQA answer needs the index of one of its {len(options)} options, "
                         f"got {answer}")
    events = [Event(start=e.start, end=e.end, score=e.score) for e in evidence]
    events[-1].caption = options[answer]
    return events


def gqa_hypothesis(question: str, option: str) -> str:
    """A grounded question with one of its options, asked as one moment query ("what colour is
    the square that blinks? red"): what the answer choice `gqa: options` grounds per option and trains on."""
    return f"{question} {option}"


def read_gqa_answer(events: Sequence[Event], options: Sequence[str]) -> tuple[Event | None, int | None]:
    """(the evidence span, the chosen option's index) of a GQA answer: the first event's span and
    the option its last caption names: equal to it (case and surrounding space and punctuation
    ignored), else the one option the caption holds as whole words ("the answer is red."); None
    for what the answer does not give or leaves ambiguous."""
    span = events[0] if events else None
    captions = [_plain(e.caption) for e in events if _plain(e.caption)]
    if not captions:
        return span, None
    wanted = [_plain(o) for o in options]
    if captions[-1] in wanted:
        return span, wanted.index(captions[-1])
    said = f" {captions[-1]} "
    inside = [i for i, o in enumerate(wanted) if f" {o} " in said]
    return span, inside[0] if len(inside) == 1 else None


def _plain(text: str) -> str:
    """Lower case, punctuation as space, single spaces: how answers and options are compared."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


# --- the one temporal IoU ------------------------------------------------------------------


def temporal_iou(
    a: Any, b: Any, *, hull: bool = False, eps: float = 0.0, dtype: Any = np.float64
) -> np.ndarray | float:
    """IoU of intervals `a` (..., N, 2) against `b` (..., M, 2) -> (..., N, M).

    Two single intervals (shape (2,)) give a float. An interval of zero length that lies inside
    the other has IoU 0 (intersection 0), and two identical points have IoU 0 too: the union is 0
    and we define 0/0 = 0, as the QVHighlights scorer does. An interval written end-first has no
    intersection with anything, so IoU 0.

    The denominator is length A + length B - overlap (Moment-DETR `compute_temporal_iou_batch_cross`,
    the detection AP), or with `hull` the span from the earliest start to the latest end (the
    official R@k and dense-captioning scorers: 2D-TAN, Moment-DETR
    `compute_temporal_iou_batch_paired`, TimeChat, densevid_eval, SODA), plus `eps`. Both are the
    union wherever the intervals overlap, but they round differently in float64: an IoU that is
    exactly 0.5 in decimals can come out as 0.5 by one and 0.49999999999999994 by the other, so a
    scorer that thresholds must use its reference's formula. `dtype=np.float32` computes as
    nncore's `temporal_iou` on torch float32 tensors (E.T. Bench), where an IoU of exactly 0.7 is
    0.69999999.
    """
    a_arr = np.asarray(a, dtype=dtype)
    b_arr = np.asarray(b, dtype=dtype)
    scalar = a_arr.ndim == 1 and b_arr.ndim == 1
    a_N2 = a_arr[..., :, None, :] if a_arr.ndim > 1 else a_arr[None, None, :]
    b_M2 = b_arr[..., None, :, :] if b_arr.ndim > 1 else b_arr[None, None, :]
    inter = np.clip(
        np.minimum(a_N2[..., 1], b_M2[..., 1]) - np.maximum(a_N2[..., 0], b_M2[..., 0]), 0, None
    )
    if hull:
        union = np.maximum(a_N2[..., 1], b_M2[..., 1]) - np.minimum(a_N2[..., 0], b_M2[..., 0])
    else:
        union = (a_N2[..., 1] - a_N2[..., 0]) + (b_M2[..., 1] - b_M2[..., 0]) - inter
    # overlapping intervals have a positive union by either formula; the rest have IoU 0
    iou = np.divide(inter, union + eps, out=np.zeros_like(inter), where=inter > 0)
    return float(iou[0, 0]) if scalar else iou


# --- the one serializer -----------------------------------------------------------------------


def format_number(value: float, decimals: int) -> list[str]:
    """A non-negative number as number symbols, e.g. 12.3 -> ['1', '2', '.', '3']."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"only finite non-negative numbers serialize, got {value}")
    return list(f"{value:.{decimals}f}")


def number_symbol_id(symbol: str) -> int:
    """One NUMBER_VOCAB symbol -> its id in the time/score vocabulary."""
    try:
        return NUMBER_TO_ID[symbol]
    except KeyError:
        raise ValueError(
            f"{symbol!r} is not a number symbol; expected one of {NUMBER_VOCAB}"
        ) from None


def timestamp_ids(seconds: float) -> list[int]:
    """A frame timestamp as time-token ids, e.g. 12.5 -> '1' '2' '.' '5' <sync>."""
    return [NUMBER_TO_ID[s] for s in format_number(float(seconds), TIME_DECIMALS)] + [SYNC_ID]


def serialize_events(events: Sequence[Event]) -> list[tuple[TokenType, str]]:
    """Events -> pieces `(token_type, piece)` in causal order (grammar in the module docstring).

    TIME/SCORE pieces are single symbols of NUMBER_VOCAB; TEXT pieces are a caption string (to be
    split by the text tokenizer) or one of SWITCH / EOS. A missing score is written as 0.
    """
    pieces: list[tuple[TokenType, str]] = []
    for event in events:
        pieces.append((TokenType.TEXT, SWITCH))
        pieces += [(TokenType.TIME, s) for s in format_number(event.start, TIME_DECIMALS)]
        pieces.append((TokenType.TIME, SEP))
        pieces += [(TokenType.TIME, s) for s in format_number(event.end, TIME_DECIMALS)]
        pieces.append((TokenType.TIME, SYNC))
        score = 0.0 if event.score is None else event.score
        pieces += [(TokenType.SCORE, s) for s in format_number(score, SCORE_DECIMALS)]
        pieces.append((TokenType.SCORE, SYNC))
        if event.caption:
            pieces.append((TokenType.TEXT, event.caption))
    pieces.append((TokenType.TEXT, EOS))
    return pieces


def _parse_number(symbols: list[str]) -> float:
    text = "".join(symbols)
    if not text or text.count(".") > 1 or text in {"."}:
        raise ValueError(f"malformed number {text!r}")
    return float(text)


def parse_pieces(
    pieces: Iterable[tuple[TokenType | int, str]], *, order_times: bool = False
) -> list[Event]:
    """Pieces (as written by `serialize_events` or produced by generation) -> events.

    Strict: a malformed sequence raises ValueError saying where. Consecutive TEXT pieces of one
    event are joined with a space into its caption. A sequence cut before EOS (a generation cap)
    keeps the complete events and drops the unfinished one. A model may generate an end before
    its start: `order_times=True` (generation) stores such an event with the two times swapped,
    the default raises as Event does.
    """
    events: list[Event] = []
    state = "text"  # text | start | end | score
    numbers: list[str] = []
    start = end = 0.0
    caption: list[str] = []
    current: Event | None = None

    def close_caption() -> None:
        if current is not None and caption:
            current.caption = " ".join(caption).strip()

    for i, (kind, piece) in enumerate(pieces):
        kind = TokenType(kind)
        if state == "text":
            if kind != TokenType.TEXT:
                raise ValueError(f"piece {i}: expected text, {SWITCH} or {EOS}, got {piece!r}")
            if piece == EOS:
                close_caption()
                return events
            if piece == SWITCH:
                close_caption()
                caption, current, state, numbers = [], None, "start", []
            elif current is not None:
                caption.append(piece)
            # text before the first event (a free-text preface) carries no event
            continue
        expected = TokenType.SCORE if state == "score" else TokenType.TIME
        if kind != expected or piece not in NUMBER_VOCAB:
            raise ValueError(f"piece {i}: expected a {expected.name} number symbol, got {piece!r}")
        if state == "start" and piece == SEP:
            start, numbers, state = _parse_number(numbers), [], "end"
        elif state == "end" and piece == SYNC:
            end, numbers, state = _parse_number(numbers), [], "score"
        elif state == "score" and piece == SYNC:
            score = _parse_number(numbers)
            if order_times:
                start, end = min(start, end), max(start, end)
            current = Event(start=start, end=end, score=score)
            events.append(current)
            numbers, state = [], "text"
        elif piece in (SEP, SYNC):
            raise ValueError(f"piece {i}: unexpected {piece!r} while reading the {state} number")
        else:
            numbers.append(piece)
    close_caption()
    return events  # cut before EOS: complete events only


# --- per-clip saliency <-> scored windows ---------------------------------------------------


def saliency_from_events(events: Sequence[Event], duration: float, clip_len: float) -> list[float]:
    """Per-clip saliency from scored windows: clip c covers [c*clip_len, (c+1)*clip_len); its
    saliency is the highest score of the windows overlapping it (0 when none)."""
    if not (duration > 0 and clip_len > 0):
        raise ValueError(f"need duration > 0 and clip_len > 0, got {duration} and {clip_len}")
    num_clips = max(1, math.ceil(duration / clip_len - 1e-9))
    starts_C = np.arange(num_clips) * clip_len
    ends_C = np.minimum(starts_C + clip_len, duration)
    sal_C = np.zeros(num_clips)
    for e in events:  # a handful of events per answer
        overlap_C = (np.minimum(ends_C, e.end) > np.maximum(starts_C, e.start)) | (
            (e.start == e.end) & (starts_C <= e.start) & (e.start < starts_C + clip_len)
        )
        sal_C = np.where(overlap_C, np.maximum(sal_C, e.score or 0.0), sal_C)
    return [float(s) for s in sal_C]


def saliency_events(
    saliency: Sequence[float], clip_len: float, duration: float, max_events: int | None = None
) -> list[Event]:
    """Per-clip saliency -> the scored windows a VHD answer holds: each run of consecutive clips
    with the same nonzero score is one window, highest scores first (then earlier), at most
    `max_events` of them. The inverse of `saliency_from_events` (exact when nothing is cut)."""
    if not (duration > 0 and clip_len > 0):
        raise ValueError(f"need duration > 0 and clip_len > 0, got {duration} and {clip_len}")
    sal_C = np.asarray(saliency, dtype=float)
    if sal_C.size == 0:
        return []
    # run boundaries: where the score changes (a handful of clips per video, vectorised anyway)
    starts = np.flatnonzero(np.r_[True, sal_C[1:] != sal_C[:-1]])
    ends = np.r_[starts[1:], sal_C.size]
    runs = [(float(sal_C[a]), int(a), int(b)) for a, b in zip(starts, ends) if sal_C[a] > 0]
    runs.sort(key=lambda r: (-r[0], r[1]))
    return [
        Event(start=a * clip_len, end=min(b * clip_len, duration), score=score)
        for score, a, b in runs[:max_events]
    ]
