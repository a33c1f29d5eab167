"""Readers and writers: our canonical manifest and the public VTG annotation formats.

Every format maps to and from `timeexpert.events.Record`, so the same pipeline and scorers serve
synthetic and real datasets. Each format is a pair `parse_X(text, ...) -> list[Record]` /
`dump_X(records) -> str`, registered in FORMATS; `read_format` / `write_format` add storage I/O.

- manifest: JSONL of `Record.to_dict()` (ours; lossless).
- charades_sta: `vid start end##query` lines (MR). Durations are not in the file: pass them.
- qvhighlights: jsonl with `qid, query, duration, vid, relevant_windows, relevant_clip_ids,
  saliency_scores` (3 annotators, 0-4, per 2 s clip) (VHD; the windows are the MR target too).
  Our per-clip saliency is the annotators' mean; we write three equal integer scores.
- activitynet: ActivityNet Captions json `{vid: {duration, timestamps, sentences}}` (DVC).
- youcook2: YouCook2 json `{"database": {vid: {duration, subset, annotations: [{segment,
  sentence}]}}}` (DVC).
- sharegpt: Grounding-FT instruction data, a json list of `{id, video, duration, task,
  conversations: [{from: human, value}, {from: gpt, value}]}` with the MR answer
  "The moment happens from {start}s to {end}s." and the HD answer "The highlights are: {t}s, ...
  Their saliency scores are {s}, ..." (GroundVTS / TimeChat style templates, below).
- evidence: D2VLM / E.T.-style evidence data `{id, video, duration, task, time_gt,
  conversations}` where the i-th `<evi>...</evi>` span of the answer is grounded at `time_gt[i]`.
- NExT-GQA (GQA) is two files, so outside FORMATS: `timeexpert.data.nextgqa`.

Formats that carry no id give records ids derived from the video id (`{vid}_{k}`); formats that
carry no video URI get `video_pattern.format(vid=...)`, relative to the storage root by default.

Every public-format reader checks each row (`_checked`): times that parse, 0 <= start <= end, a
start inside the video, a query where the task asks one; an end past the video's duration is
clamped to it. A malformed row raises ValueError naming its line (or its video / item in the json
formats), or, given a `problems` list, is appended to it as a `RowProblem` and left out (a clamp
is appended as a note, the row kept): what `jobs/prepare_data.py --convert` reports.
"""

from __future__ import annotations

import collections
import json
import math
import posixpath
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from timeexpert import storage
from timeexpert.events import EVI, EVI_END, Event, Record, Task

DEFAULT_VIDEO_PATTERN = "videos/{vid}.mp4"  # relative to the storage root
# A dataset root holds the manifests (ROOT/manifests/SPLIT.jsonl) and the videos they name,
# relative to it (ROOT/videos/VID.mp4 by default): what `jobs/prepare_data.py` writes.
MANIFESTS_DIR = "manifests"


def dataset_root(manifest_uri: str) -> str:
    """The dataset root of a manifest: the folder above its `manifests/` folder (else the
    manifest's own folder)."""
    folder = posixpath.dirname(manifest_uri) or "."
    if posixpath.basename(folder) == MANIFESTS_DIR:
        return posixpath.dirname(folder) or "."
    return folder


@dataclass(frozen=True)
class RowProblem:
    """A malformed row of an annotation file."""

    where: int | str  # its line number (line-based formats), else its video or item
    message: str  # what is wrong
    refused: bool = True  # False: the row was kept, changed as the message says (a clamped end)


def place(uri: str, where: int | str) -> str:
    """`FILE:LINE` for a line, `FILE: video 'x'` for a json format's row."""
    return f"{uri}:{where}" if isinstance(where, int) else f"{uri}: {where}"


def _refuse(problems: list[RowProblem] | None, fmt: str, where: int | str, message: Any) -> None:
    """A malformed row: raised (ValueError naming it) unless the caller collects `problems`."""
    if problems is None:
        raise ValueError(f"{fmt} {'line ' if isinstance(where, int) else ''}{where}: {message}")
    problems.append(RowProblem(where, str(message)))


def _seconds(text: Any, what: str) -> float:
    """A time as the annotation writes it, in seconds."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text!r} is not a number of seconds")
    return value


QUERY_TASKS = (Task.MR, Task.VHD, Task.GQA)  # the tasks whose rows need a query


def _checked(record: Record, fmt: str, where: int | str,
             problems: list[RowProblem] | None) -> Record | None:
    """The row's record after the checks every format shares, or None when refused: a query
    where the task needs one, every event starting inside the video; an end past the video's
    duration is clamped to it (noted in `problems`)."""
    if record.task in QUERY_TASKS and not record.query.strip():
        _refuse(problems, fmt, where, f"empty query (task {record.task.value} needs one)")
        return None
    for e in record.events:
        if e.start >= record.duration:
            _refuse(problems, fmt, where, f"event {e.start:g}-{e.end:g} s starts at or after the "
                                          f"end of the video ({record.duration:g} s)")
            return None
    past = [e for e in record.events if e.end > record.duration]
    if not past:
        return record
    if problems is not None:
        problems.append(RowProblem(
            where, f"end {past[0].end:g} s is past the video's duration {record.duration:g} s: "
                   f"clamped to {record.duration:g} s", refused=False))
    return replace(record, events=[replace(e, end=min(e.end, record.duration)) for e in record.events])


def _row(build: Callable[[], Record], fmt: str, where: int | str,
         problems: list[RowProblem] | None) -> Record | None:
    """`build()`'s record after the shared checks (`_checked`), or None when the row is refused:
    a missing field or a value `build` cannot read is reported at `where`."""
    try:
        record = build()
    except KeyError as e:
        _refuse(problems, fmt, where, f"missing field {e}")
        return None
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        _refuse(problems, fmt, where, e)
        return None
    return _checked(record, fmt, where, problems)


def video_id(record: Record) -> str:
    """The id public formats use for a video: the file name without its extension."""
    return posixpath.splitext(posixpath.basename(record.video))[0]


def _t(x: float) -> str:
    """A timestamp as the templates write it (0.1 s, as events.TIME_DECIMALS)."""
    return f"{x:.1f}"


def json_number(x: float) -> float | int:
    """Integral floats as ints in JSON (12.0 -> 12), others unchanged."""
    return int(x) if float(x).is_integer() else float(x)


def num_clips(duration: float, clip_len: float) -> int:
    return max(1, math.ceil(round(duration / clip_len, 6)))


# --- canonical manifest ---------------------------------------------------------------------


def parse_manifest(text: str, *, skipped: collections.Counter | None = None) -> list[Record]:
    """JSONL records. A bad line raises ValueError naming it, or, when a `skipped` Counter is
    given, is counted under "bad_annotation" and left out."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(Record.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            if skipped is None:
                raise ValueError(f"manifest line {lineno}: {e}: {line[:200]!r}") from None
            skipped["bad_annotation"] += 1
    return records


def dump_manifest(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records)


def read_manifest(
    uri: str, *, skipped: collections.Counter | None = None, **storage_options: Any
) -> list[Record]:
    return parse_manifest(storage.read_text(uri, **storage_options), skipped=skipped)


def write_manifest(records: Iterable[Record], uri: str, **storage_options: Any) -> None:
    storage.write_text(uri, dump_manifest(records), **storage_options)


# --- Charades-STA ---------------------------------------------------------------------------


def parse_charades_sta(
    text: str,
    *,
    durations: Mapping[str, float],
    video_pattern: str = DEFAULT_VIDEO_PATTERN,
    split: str = "train",
    problems: list[RowProblem] | None = None,
) -> list[Record]:
    """`vid start end##query` lines -> MR records (durations per vid come from elsewhere; a
    video without one is unknown)."""
    records, counts = [], collections.Counter()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head, sep, query = line.partition("##")
        parts = head.split()
        try:
            if not sep or len(parts) != 3:
                raise ValueError(f"expected 'VID START END##QUERY', got {line!r}")
            vid, start, end = parts[0], _seconds(parts[1], "start"), _seconds(parts[2], "end")
            if vid not in durations:
                raise ValueError(f"unknown video {vid!r}: no duration given for it")
            record = Record(
                id=f"{vid}_{counts[vid]}",
                video=video_pattern.format(vid=vid),
                duration=float(durations[vid]),
                task=Task.MR,
                query=query.strip(),
                events=[Event(start=start, end=end)],
                split=split,
            )
        except ValueError as e:
            _refuse(problems, "Charades-STA", lineno, e)
            continue
        record = _checked(record, "Charades-STA", lineno, problems)
        if record is not None:
            records.append(record)
            counts[vid] += 1
    return records


def dump_charades_sta(records: Iterable[Record]) -> str:
    lines = []
    for r in records:
        for e in r.events[:1]:  # one moment per line, the first (Charades-STA has one)
            lines.append(f"{video_id(r)} {_t(e.start)} {_t(e.end)}##{r.query}\n")
    return "".join(lines)


# --- QVHighlights ---------------------------------------------------------------------------


def parse_qvhighlights(
    text: str,
    *,
    video_pattern: str = DEFAULT_VIDEO_PATTERN,
    split: str = "train",
    task: Task | str = Task.VHD,
    clip_len: float = 2.0,
    problems: list[RowProblem] | None = None,
) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        def build(line: str = line) -> Record:
            d = json.loads(line)
            duration = _seconds(d["duration"], "duration")
            clip_ids = [int(c) for c in d.get("relevant_clip_ids", [])]
            scores = d.get("saliency_scores", [])
            if len(scores) != len(clip_ids):
                raise ValueError(
                    f"{len(clip_ids)} relevant_clip_ids but {len(scores)} saliency_scores"
                )
            saliency = None
            if clip_ids:
                saliency = [0.0] * num_clips(duration, clip_len)
                for cid, s in zip(clip_ids, scores):
                    if not 0 <= cid < len(saliency):
                        raise ValueError(f"clip id {cid} outside 0..{len(saliency) - 1}")
                    saliency[cid] = sum(s) / len(s)
            return Record(
                id=str(d["qid"]),
                video=video_pattern.format(vid=d["vid"]),
                duration=duration,
                task=task,
                query=d["query"],
                events=[Event(start=_seconds(w[0], "start"), end=_seconds(w[1], "end"))
                        for w in d.get("relevant_windows", [])],
                saliency=saliency,
                clip_len=clip_len,
                split=split,
            )

        record = _row(build, "QVHighlights", lineno, problems)
        if record is not None:
            records.append(record)
    return records


def dump_qvhighlights(records: Iterable[Record]) -> str:
    lines = []
    for r in records:
        sal = r.saliency or []
        clip_ids = [i for i, s in enumerate(sal) if s > 0]
        lines.append(
            json.dumps(
                {
                    "qid": r.id,
                    "query": r.query,
                    "duration": json_number(r.duration),
                    "vid": video_id(r),
                    "relevant_windows": [[json_number(e.start), json_number(e.end)]
                                         for e in r.events],
                    "relevant_clip_ids": clip_ids,
                    "saliency_scores": [[int(round(sal[i]))] * 3 for i in clip_ids],
                }
            )
            + "\n"
        )
    return "".join(lines)


# --- ActivityNet Captions / YouCook2 --------------------------------------------------------


def parse_activitynet(
    text: str, *, video_pattern: str = DEFAULT_VIDEO_PATTERN, split: str = "train",
    problems: list[RowProblem] | None = None,
) -> list[Record]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"ActivityNet Captions json must be an object by video id, got {type(data)}")
    records = []
    for vid, d in data.items():
        where = f"video {vid!r}"
        def build(d: dict = d, vid: str = vid) -> Record:
            if len(d["timestamps"]) != len(d["sentences"]):
                raise ValueError(f"{len(d['timestamps'])} timestamps but {len(d['sentences'])} sentences")
            events = [
                Event(start=_seconds(t[0], "start"), end=_seconds(t[1], "end"), caption=s.strip())
                for t, s in zip(d["timestamps"], d["sentences"])
            ]
            return Record(
                id=vid,
                video=video_pattern.format(vid=vid),
                duration=_seconds(d["duration"], "duration"),
                task=Task.DVC,
                query="",
                events=events,
                split=split,
            )

        record = _row(build, "ActivityNet", where, problems)
        if record is not None:
            records.append(record)
    return records


def dump_activitynet(records: Iterable[Record]) -> str:
    return json.dumps(
        {
            video_id(r): {
                "duration": json_number(r.duration),
                "timestamps": [[json_number(e.start), json_number(e.end)] for e in r.events],
                "sentences": [e.caption for e in r.events],
            }
            for r in records
        },
        indent=1,
    )


_YC2_SUBSETS = {"training": "train", "validation": "val", "testing": "test"}


def parse_youcook2(text: str, *, video_pattern: str = DEFAULT_VIDEO_PATTERN,
                   problems: list[RowProblem] | None = None) -> list[Record]:
    data = json.loads(text)
    if "database" not in data:
        raise ValueError("YouCook2 json needs a top-level 'database' object")
    records = []
    for vid, d in data["database"].items():
        where = f"video {vid!r}"
        def build(d: dict = d, vid: str = vid) -> Record:
            subset = d.get("subset", "training")
            return Record(
                id=vid,
                video=video_pattern.format(vid=vid),
                duration=_seconds(d["duration"], "duration"),
                task=Task.DVC,
                query="",
                events=[
                    Event(start=_seconds(a["segment"][0], "start"), end=_seconds(a["segment"][1], "end"),
                          caption=a["sentence"])
                    for a in d["annotations"]
                ],
                split=_YC2_SUBSETS.get(subset, subset),
            )

        record = _row(build, "YouCook2", where, problems)
        if record is not None:
            records.append(record)
    return records


def dump_youcook2(records: Iterable[Record]) -> str:
    to_subset = {v: k for k, v in _YC2_SUBSETS.items()}
    return json.dumps(
        {
            "database": {
                video_id(r): {
                    "duration": json_number(r.duration),
                    "subset": to_subset.get(r.split, r.split),
                    "annotations": [
                        {"id": i, "segment": [json_number(e.start), json_number(e.end)],
                         "sentence": e.caption}
                        for i, e in enumerate(r.events)
                    ],
                }
                for r in records
            }
        },
        indent=1,
    )


# --- ShareGPT Grounding-FT instructions -----------------------------------------------------

MR_PROMPT = (
    "<video>\nFind the moment in the video that matches the query: '{query}'. "
    "Answer with its start and end time."
)
MR_ANSWER = "The moment happens {windows}."  # windows: "from {start}s to {end}s" joined by " and "
HD_PROMPT = (
    "<video>\nThe query is '{query}'. Which clips of the video are highlights for it, "
    "and how salient is each?"
)
HD_ANSWER = "The highlights are: {times}. Their saliency scores are {scores}."
DVC_PROMPT = "<video>\nLocalize a series of events in the video and describe each one."
DVC_ANSWER_LINE = "{start}s - {end}s: {caption}"  # one line per event

_QUERY_RE = re.compile(r"'(.*)'", re.S)
_WINDOW_RE = re.compile(r"from ([\d.]+)s to ([\d.]+)s")
_HD_RE = re.compile(r"The highlights are: (.*)\. Their saliency scores are (.*)\.$", re.S)
_DVC_RE = re.compile(r"^([\d.]+)s - ([\d.]+)s: (.*)$")


def _conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def _turns(d: dict) -> tuple[str, str]:
    conv = d["conversations"]
    human = next(c["value"] for c in conv if c["from"] == "human")
    gpt = next(c["value"] for c in conv if c["from"] == "gpt")
    return human, gpt


def _query_of(prompt: str) -> str:
    m = _QUERY_RE.search(prompt)
    if not m:
        raise ValueError(f"no quoted query in prompt {prompt[:120]!r}")
    return m.group(1)


def dump_sharegpt(records: Iterable[Record]) -> str:
    items = []
    for r in records:
        if r.task == Task.GQA:
            raise ValueError(f"record {r.id!r}: sharegpt holds MR, VHD and DVC; write GQA records "
                             "with write_nextgqa")
        if r.task == Task.MR:
            windows = " and ".join(f"from {_t(e.start)}s to {_t(e.end)}s" for e in r.events)
            conv = _conversation(MR_PROMPT.format(query=r.query), MR_ANSWER.format(windows=windows))
        elif r.task == Task.VHD:
            sal = r.saliency or []
            clips = [i for i, s in enumerate(sal) if s > 0]
            conv = _conversation(
                HD_PROMPT.format(query=r.query),
                HD_ANSWER.format(
                    times=", ".join(f"{_t(i * r.clip_len)}s" for i in clips),
                    scores=", ".join(f"{sal[i]:g}" for i in clips),
                ),
            )
        else:
            lines = [
                DVC_ANSWER_LINE.format(start=_t(e.start), end=_t(e.end), caption=e.caption)
                for e in r.events
            ]
            conv = _conversation(DVC_PROMPT, "\n".join(lines))
        items.append(
            {
                "id": r.id,
                "video": r.video,
                "duration": json_number(r.duration),
                "task": r.task.value,
                "split": r.split,
                "conversations": conv,
            }
        )
    return json.dumps(items, indent=1)


def parse_sharegpt(text: str, *, clip_len: float = 2.0,
                   problems: list[RowProblem] | None = None) -> list[Record]:
    records = []
    for i, d in enumerate(json.loads(text)):
        try:
            task = Task.parse(d["task"])
            human, gpt = _turns(d)
            duration = float(d["duration"])
            saliency, events, query = None, [], ""
            if task == Task.MR:
                query = _query_of(human)
                events = [Event(start=float(a), end=float(b)) for a, b in _WINDOW_RE.findall(gpt)]
            elif task == Task.VHD:
                query = _query_of(human)
                m = _HD_RE.search(gpt.strip())
                if not m:
                    raise ValueError(f"answer does not follow the HD template: {gpt[:120]!r}")
                times = [float(t.strip().rstrip("s")) for t in m.group(1).split(",") if t.strip()]
                scores = [float(s) for s in m.group(2).split(",") if s.strip()]
                saliency = [0.0] * num_clips(duration, clip_len)
                for t, s in zip(times, scores, strict=True):
                    saliency[int(round(t / clip_len))] = s
            else:
                for line in gpt.strip().splitlines():
                    m = _DVC_RE.match(line.strip())
                    if not m:
                        raise ValueError(f"answer line does not follow the DVC template: {line!r}")
                    events.append(Event(start=float(m[1]), end=float(m[2]), caption=m[3]))
            record = Record(
                id=str(d["id"]),
                video=d["video"],
                duration=duration,
                task=task,
                query=query,
                events=events,
                saliency=saliency,
                clip_len=clip_len,
                split=d.get("split", "train"),
            )
        except (KeyError, ValueError, TypeError, StopIteration) as e:
            _refuse(problems, "ShareGPT", f"item {i}", e)
            continue
        record = _checked(record, "ShareGPT", f"item {i}", problems)
        if record is not None:
            records.append(record)
    return records


# --- evidence (D2VLM / E.T.) ----------------------------------------------------------------

EVIDENCE_MR_PROMPT = (
    "<video>\nWatch the video carefully and find the visual event described by the sentence: "
    "'{query}'."
)
EVIDENCE_DVC_PROMPT = "<video>\nFind every visual event in the video and describe each one."
_EVI_RE = re.compile(re.escape(EVI) + r"(.*?)" + re.escape(EVI_END), re.S)
_EVIDENCE_TASKS = {"tvg": Task.MR, "dvc": Task.DVC}


def dump_evidence(records: Iterable[Record]) -> str:
    items = []
    for r in records:
        if r.task == Task.MR:
            prompt = EVIDENCE_MR_PROMPT.format(query=r.query)
            answer = " ".join(f"The event happens in {EVI}{EVI_END}." for _ in r.events)
            task = "tvg"
        elif r.task == Task.DVC:
            prompt = EVIDENCE_DVC_PROMPT
            answer = " ".join(f"{EVI}{e.caption}{EVI_END}" for e in r.events)
            task = "dvc"
        else:
            raise ValueError(f"record {r.id!r}: the evidence format holds mr and dvc, not {r.task.value}")
        items.append(
            {
                "id": r.id,
                "video": r.video,
                "duration": json_number(r.duration),
                "task": task,
                "split": r.split,
                "time_gt": [[json_number(e.start), json_number(e.end)] for e in r.events],
                "conversations": _conversation(prompt, answer),
            }
        )
    return json.dumps(items, indent=1)


def parse_evidence(text: str, *, problems: list[RowProblem] | None = None) -> list[Record]:
    records = []
    for i, d in enumerate(json.loads(text)):
        try:
            if d["task"] not in _EVIDENCE_TASKS:
                raise ValueError(f"task {d['task']!r} not one of {sorted(_EVIDENCE_TASKS)}")
            task = _EVIDENCE_TASKS[d["task"]]
            human, gpt = _turns(d)
            spans = _EVI_RE.findall(gpt)
            if len(spans) != len(d["time_gt"]):
                raise ValueError(
                    f"{len(spans)} {EVI} spans but {len(d['time_gt'])} time_gt intervals"
                )
            events = [
                Event(start=float(t[0]), end=float(t[1]), caption=s.strip() if task == Task.DVC else "")
                for t, s in zip(d["time_gt"], spans)
            ]
            record = Record(
                id=str(d["id"]),
                video=d["video"],
                duration=float(d["duration"]),
                task=task,
                query=_query_of(human) if task == Task.MR else "",
                events=events,
                split=d.get("split", "train"),
            )
        except (KeyError, ValueError, TypeError, StopIteration) as e:
            _refuse(problems, "evidence", f"item {i}", e)
            continue
        record = _checked(record, "evidence", f"item {i}", problems)
        if record is not None:
            records.append(record)
    return records


# --- registry and storage I/O ---------------------------------------------------------------


FORMATS: dict[str, tuple[Callable[..., list[Record]], Callable[[Iterable[Record]], str]]] = {
    "manifest": (parse_manifest, dump_manifest),
    "charades_sta": (parse_charades_sta, dump_charades_sta),
    "qvhighlights": (parse_qvhighlights, dump_qvhighlights),
    "activitynet": (parse_activitynet, dump_activitynet),
    "youcook2": (parse_youcook2, dump_youcook2),
    "sharegpt": (parse_sharegpt, dump_sharegpt),
    "evidence": (parse_evidence, dump_evidence),
}


def _format(name: str):
    if name not in FORMATS:
        raise ValueError(f"unknown annotation format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]


def read_format(name: str, uri: str, *, storage_options: dict | None = None, **kwargs: Any) -> list[Record]:
    """Read `uri` in the public format `name` (keyword arguments go to its parser)."""
    parse, _ = _format(name)
    return parse(storage.read_text(uri, **(storage_options or {})), **kwargs)


def write_format(
    name: str, records: Iterable[Record], uri: str, *, storage_options: dict | None = None
) -> None:
    _, dump = _format(name)
    storage.write_text(uri, dump(list(records)), **(storage_options or {}))
