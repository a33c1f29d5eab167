"""NExT-GQA (GQA) <-> records: two files, so outside `formats.FORMATS`.

The QA csv `video_id,frame_count,width,height,question,answer,qid,type,a0,...,a4` and the
grounding json `{video_id: {"duration", "location": {qid: [[start, end], ...]}, "fps"}}`. A
question is a record only when the json grounds it (the official grounded subset); its id is
`{video_id}_{qid}`. We write frame_count / width / height 0, fps null and type "DO" (what the
canonical record does not keep). The scorer of its answers is `timeexpert.eval.nextgqa`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterable

from timeexpert import storage
from timeexpert.data.formats import DEFAULT_VIDEO_PATTERN, json_number, video_id
from timeexpert.events import Event, Record, Task

NEXTGQA_OPTIONS = 5  # a0..a4
NEXTGQA_COLUMNS = ("video_id", "frame_count", "width", "height", "question", "answer", "qid", "type",
                   *(f"a{i}" for i in range(NEXTGQA_OPTIONS)))


def parse_nextgqa(qa_text: str, ground_text: str, *, video_pattern: str = DEFAULT_VIDEO_PATTERN,
                  split: str = "test") -> list[Record]:
    """NExT-GQA's QA csv and grounding json -> GQA records (the grounded questions, csv order)."""
    rows = list(csv.DictReader(io.StringIO(qa_text)))
    missing = set(NEXTGQA_COLUMNS[:8]) - set(rows[0] if rows else NEXTGQA_COLUMNS)
    if missing:
        raise ValueError(f"NExT-GQA csv lacks columns {sorted(missing)}")
    ground = json.loads(ground_text)
    if not isinstance(ground, dict):
        raise ValueError("NExT-GQA grounding json must map video ids to {duration, location}")
    records = []
    for line, row in enumerate(rows, 2):
        vid, qid = str(row["video_id"]), str(row["qid"])
        spans = ground.get(vid, {}).get("location", {}).get(qid)
        if not spans:
            continue  # not in the grounded subset
        options = [row[c] for c in NEXTGQA_COLUMNS[8:] if row.get(c)]
        if row["answer"] not in options:
            raise ValueError(f"NExT-GQA csv line {line}: answer {row['answer']!r} is none of its "
                             f"options {options}")
        try:
            records.append(Record(
                id=f"{vid}_{qid}", video=video_pattern.format(vid=vid),
                duration=float(ground[vid]["duration"]), task=Task.GQA, query=row["question"],
                events=[Event(start=float(s), end=float(e)) for s, e in spans],
                options=options, answer=options.index(row["answer"]), split=split))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"NExT-GQA question {vid}_{qid}: {err}") from None
    return records


def dump_nextgqa(records: Iterable[Record]) -> tuple[str, str]:
    """GQA records -> (the QA csv, the grounding json) in NExT-GQA's layout. The qid is the
    record id after `{video_id}_` (the whole id when it does not start so)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=NEXTGQA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    ground: dict[str, dict] = {}
    for r in records:
        if r.task != Task.GQA or r.answer is None:
            raise ValueError(f"record {r.id!r}: NExT-GQA holds answered GQA records, got task "
                             f"{r.task.value} with answer {r.answer}")
        if len(r.options) > NEXTGQA_OPTIONS:
            raise ValueError(f"record {r.id!r}: NExT-GQA holds at most {NEXTGQA_OPTIONS} options")
        vid = video_id(r)
        qid = r.id[len(vid) + 1:] if r.id.startswith(f"{vid}_") else r.id
        options = {f"a{i}": o for i, o in enumerate(r.options)}
        writer.writerow({"video_id": vid, "frame_count": 0, "width": 0, "height": 0,
                         "question": r.query, "answer": r.options[r.answer], "qid": qid,
                         "type": "DO", **options})
        entry = ground.setdefault(vid, {"duration": json_number(r.duration), "location": {}, "fps": None})
        entry["location"][qid] = [[json_number(e.start), json_number(e.end)] for e in r.events]
    return out.getvalue(), json.dumps(ground)


def read_nextgqa(qa_uri: str, ground_uri: str, *, storage_options: dict | None = None,
                 **kwargs: Any) -> list[Record]:
    """`parse_nextgqa` of two stored files (keyword arguments go to it)."""
    opts = storage_options or {}
    return parse_nextgqa(storage.read_text(qa_uri, **opts), storage.read_text(ground_uri, **opts),
                         **kwargs)


def write_nextgqa(records: Iterable[Record], qa_uri: str, ground_uri: str, *,
                  storage_options: dict | None = None) -> None:
    qa_text, ground_text = dump_nextgqa(list(records))
    storage.write_text(qa_uri, qa_text, **(storage_options or {}))
    storage.write_text(ground_uri, ground_text, **(storage_options or {}))
