"""NExT-GQA grounded-QA scorer and CLI: Acc@QA, Acc@GQA, mIoP, IoP@0.3/0.5, mIoU, IoU@0.3/0.5.

    python -m timeexpert.eval.nextgqa --gt gsub_test.json --gt-qa test.csv \
        --pred test_ground_ada.json --pred-qa test-res.json [--gs] [--mode strict]

Files, as the official repository (doc-doc/NExT-GQA) writes them:

- `--gt`: ``{video_id: {"duration", "location": {qid: [[s, e], ...]}, "fps"}}`` (`gsub_*.json`);
- `--gt-qa` (optional): the QA csv (`video_id,...,answer,qid,type,a0..a4`), for the per-type
  accuracies; without it Acc@QA is over the grounded questions with no breakdown;
- `--pred`: ``{"<video_id>_<qid>": [start, end]}`` in seconds, or with `--gs` normalised to [0, 1]
  (`*_ground_gs.json`: multiplied by the GT duration and rounded to 0.1 s, as the official does);
- `--pred-qa`: ``{"<video_id>_<qid>": {"prediction": int, "answer": int}}`` (`*-res.json`).

Mode `official` (default) computes what the official functions compute (`code/TempGQA/
eval_ground.py` `eval_ground` for the grounding figures and Acc@GQA, `eval_next.py` `eval_ground`
-> `accuracy_metric` for Acc@QA), quirks included:

- a GT question without a predicted span is skipped: the grounding denominator is the number of
  predicted GT questions, and Acc@GQA shares it;
- with several GT segments, IoU and IoP are maxima over the segments taken independently (never
  against their union); IoP = overlap / predicted length; thresholds are `>=`;
- a zero-length prediction has IoU 0 and IoP 1 when it lies in a GT segment (ends included), a
  reversed one IoU = IoP = 0; nothing is clipped or sorted;
- an answer is right when the prediction file's own `answer` equals its `prediction` (the csv's
  answer is never read); csv type TP counts as TN.

Two places where the official code raises instead, we score: a grounded question without a QA
prediction counts as a wrong answer (official: KeyError), and no predicted span at all is a
ValueError (official: ZeroDivisionError).

Mode `strict` changes what a user would not want from a benchmark: a GT question without a
predicted span scores IoU = IoP = 0 and stays in every denominator (an abstaining model cannot
raise its score), and, with `--gt-qa`, an answer is right when `prediction` is the index of the
csv's answer text among a0..a4.

All figures are percent at full precision (the official prints one or two decimals); the output
also counts the missing spans and answers (`missing_span_rate` is the parse-failure rate of a
model whose answers are parsed into these files).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from timeexpert.eval.metrics import load_json

MODES: tuple[str, ...] = ("official", "strict")
QA_TYPE_NAMES: dict[str, str] = {  # eval_next.py `map_name`, in its print order
    "CW": "Why", "CH": "How", "TN": "Bef&Aft", "TC": "When", "DC": "Cnt", "DL": "Loc",
    "DO": "Other", "C": "Acc_C", "T": "Acc_T", "D": "Acc_D",
}
_QA_GROUPS = ("CW", "CH", "TN", "TC", "DC", "DL", "DO")


def span_iou_iop(gt_span: Sequence[float], pred_span: Sequence[float]) -> tuple[float, float]:
    """(IoU, IoP) of one predicted span against one GT segment: NExT-GQA `get_tIoU`.

    Kept in the official order of operations (float64 values such as 0.33333333333333326 come
    from it). A zero-length prediction: IoU 0, IoP 1 inside the segment (inclusive), else 0.
    The IoU here is not `events.temporal_iou`: the official divides a possibly negative overlap
    by the hull and only the later max with 0 hides it, and IoP has no counterpart there.
    """
    start, end = pred_span[0], pred_span[-1]
    if start == end:
        return (0.0, 1.0) if gt_span[0] <= start <= gt_span[1] else (0.0, 0.0)
    hull = (min(gt_span[0], start), max(gt_span[-1], end))
    overlap = min(gt_span[-1], end) - max(gt_span[0], start)
    iou = overlap / (hull[1] - hull[0]) if hull[1] > hull[0] else 0.0
    iop = overlap / (end - start) if end > start else 0.0
    return float(iou), float(iop)


def _check_gt(gt_ground: Any) -> None:
    if not isinstance(gt_ground, Mapping) or not gt_ground:
        raise ValueError("NExT-GQA ground truth must be a non-empty {video_id: {'duration', 'location'}}")
    for vid, anno in gt_ground.items():
        if not isinstance(anno, Mapping) or not isinstance(anno.get("location"), Mapping):
            raise ValueError(f"GT video {vid!r}: expected {{'duration', 'location': {{qid: [[s, e]]}}}}, "
                             f"got {str(anno)[:80]!r}")


def _pred_span(key: str, value: Any, duration: float, gs: bool) -> Any:
    """The span as the official scores it: seconds as given, or with `gs` x duration, 0.1 s."""
    try:
        span = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        span = None
    if span is None or span.shape != (2,):
        raise ValueError(f"prediction {key!r}: expected [start, end], got {value!r}")
    if gs:  # eval_ground.py: np.round(np.asarray(span) * anno['duration'], 1)
        return np.round(span * duration, 1)
    return [float(span[0]), float(span[1])]


def _qa_correct(pred_qa: Mapping[str, Any] | None, key: str, answer_index: int | None = None) -> bool:
    """The official check `answer == prediction` from the QA file, or in strict mode the csv's
    answer index. A missing entry is a wrong answer."""
    row = (pred_qa or {}).get(key)
    if row is None:
        return False
    if not isinstance(row, Mapping) or "prediction" not in row:
        raise ValueError(f"QA prediction {key!r}: expected {{'prediction': int, 'answer': int}}, got {row!r}")
    if answer_index is not None:
        return row["prediction"] == answer_index
    if "answer" not in row:
        raise ValueError(f"QA prediction {key!r} has no 'answer' (the official mode reads it): {row!r}")
    return row["answer"] == row["prediction"]


def per_question(
    gt_ground: Mapping[str, Any],
    pred_ground: Mapping[str, Any],
    pred_qa: Mapping[str, Any] | None = None,
    gs: bool = False,
    answers: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Each GT question scored alone, in GT order: the official loop body of `eval_ground`.

    Rows: key, gt, pred (as given), and either `missing: True` or the span scored (seconds),
    max_tIoU, max_tIoP, the threshold flags and `gqa_correct` (QA right and IoP >= 0.5). `answers` (key -> option index) replaces the QA
    file's own `answer` field (strict mode).
    """
    _check_gt(gt_ground)
    rows = []
    for vid, anno in gt_ground.items():
        for qid, locs in anno["location"].items():
            key = f"{vid}_{qid}"
            if key not in pred_ground:
                rows.append({"key": key, "gt": locs, "pred": None, "missing": True})
                continue
            span = _pred_span(key, pred_ground[key], anno.get("duration", 0), gs)
            max_iou, max_iop = 0.0, 0.0
            for loc in locs:
                iou, iop = span_iou_iop(loc, span)
                max_iou, max_iop = max(max_iou, iou), max(max_iop, iop)
            qa_right = _qa_correct(pred_qa, key, None if answers is None else answers.get(key, -1))
            rows.append({
                "key": key, "gt": locs, "pred": pred_ground[key], "span": [float(x) for x in span],
                "max_tIoU": max_iou, "max_tIoP": max_iop,
                "IoU_ge_0_3": max_iou >= 0.3, "IoU_ge_0_5": max_iou >= 0.5,
                "IoP_ge_0_3": max_iop >= 0.3, "IoP_ge_0_5": max_iop >= 0.5,
                "gqa_correct": max_iop >= 0.5 and pred_qa is not None and qa_right,
                "qa": (pred_qa or {}).get(key),
            })
    return rows


def score_grounding(
    gt_ground: Mapping[str, Any],
    pred_ground: Mapping[str, Any],
    pred_qa: Mapping[str, Any] | None = None,
    gs: bool = False,
    mode: str = "official",
    answers: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Acc@GQA (with `pred_qa`), mIoP, IoP@0.3/0.5, mIoU, IoU@0.3/0.5 in percent: `eval_ground`.

    Sums run in GT order, as the official loop adds them, so the floats are the official ones.
    """
    _check_mode(mode)
    rows = per_question(gt_ground, pred_ground, pred_qa, gs, answers)
    scored = [r for r in rows if not r.get("missing")]
    count = len(rows) if mode == "strict" else len(scored)
    if not scored and mode == "official":
        raise ValueError(
            f"no span prediction matches any of the {len(rows)} GT questions "
            "(keys must be '<video_id>_<qid>')"
        )
    sum_iou = sum_iop = 0.0
    for r in scored:
        sum_iou += r["max_tIoU"]
        sum_iop += r["max_tIoP"]
    out: dict[str, Any] = {}
    if pred_qa is not None:
        out["Acc@GQA"] = sum(r["gqa_correct"] for r in scored) * 1.0 / count * 100
    out["mIoP"] = sum_iop / count * 100
    out["IoP@0.3"] = sum(r["IoP_ge_0_3"] for r in scored) * 1.0 / count * 100
    out["IoP@0.5"] = sum(r["IoP_ge_0_5"] for r in scored) * 1.0 / count * 100
    out["mIoU"] = sum_iou / count * 100
    out["IoU@0.3"] = sum(r["IoU_ge_0_3"] for r in scored) * 1.0 / count * 100
    out["IoU@0.5"] = sum(r["IoU_ge_0_5"] for r in scored) * 1.0 / count * 100
    out["num_questions"] = len(rows)
    out["num_scored"] = count
    out["num_missing_spans"] = len(rows) - len(scored)
    out["missing_span_rate"] = (len(rows) - len(scored)) / len(rows) if rows else 0.0
    return out


def read_qa_csv(path: str) -> list[dict[str, str]]:
    """The NExT-QA / NExT-GQA csv as rows of strings; checks the columns the scorer reads."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"video_id", "qid", "type"}
    if rows and not needed <= set(rows[0]):
        raise ValueError(f"{path}: QA csv needs columns {sorted(needed)}, has {sorted(rows[0])}")
    return rows


def answer_indices(qa_rows: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """key -> index of the csv's `answer` text among a0..a4 (-1 when it is none of them)."""
    out = {}
    for row in qa_rows:
        options = [row.get(f"a{i}") for i in range(5)]
        answer = row.get("answer")
        out[f"{row['video_id']}_{row['qid']}"] = options.index(answer) if answer in options else -1
    return out


def score_qa(
    gt_ground: Mapping[str, Any],
    pred_qa: Mapping[str, Any],
    qa_rows: Sequence[Mapping[str, str]] | None = None,
    answers: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Acc@QA over the grounded questions, with the per-type accuracies when the csv is given.

    `eval_next.py` `eval_ground`: csv rows outside the grounding subset are dropped, TP counts as
    TN, a type group is reported only when it has questions. Percent.
    """
    _check_gt(gt_ground)
    if qa_rows is None:
        keys_types = [(f"{vid}_{qid}", None) for vid, anno in gt_ground.items() for qid in anno["location"]]
    else:
        keys_types = []
        for row in qa_rows:
            vid, qid = str(row["video_id"]), str(row["qid"])
            if vid in gt_ground and qid in gt_ground[vid]["location"]:
                qtype = "TN" if row["type"] == "TP" else row["type"]
                if qtype not in _QA_GROUPS:
                    raise ValueError(f"QA csv row {vid}_{qid}: type {row['type']!r} is not one of "
                                     f"{list(_QA_GROUPS) + ['TP']}")
                keys_types.append((f"{vid}_{qid}", qtype))
    right = {k: _qa_correct(pred_qa, k, None if answers is None else answers.get(k, -1))
             for k, _ in keys_types}
    out: dict[str, Any] = {}
    if qa_rows is not None:
        acc = {g: 0 for g in (*_QA_GROUPS, "C", "T", "D")}
        cnt = dict.fromkeys(acc, 0)
        for key, qtype in keys_types:
            for g in (qtype, qtype[0]):
                acc[g] += right[key]
                cnt[g] += 1
        out["Acc@QA_by_type"] = {QA_TYPE_NAMES[g]: acc[g] * 100.0 / cnt[g] for g in acc if cnt[g]}
    out["Acc@QA"] = sum(right.values()) * 100.0 / len(keys_types) if keys_types else 0.0
    out["num_qa_questions"] = len(keys_types)
    out["num_missing_answers"] = sum(k not in pred_qa for k, _ in keys_types)
    return out


def score_nextgqa(
    gt_ground: Mapping[str, Any],
    pred_ground: Mapping[str, Any],
    pred_qa: Mapping[str, Any] | None = None,
    qa_rows: Sequence[Mapping[str, str]] | None = None,
    gs: bool = False,
    mode: str = "official",
) -> dict[str, Any]:
    """All NExT-GQA figures (module doc): Acc@QA (with `pred_qa`), then `score_grounding`'s."""
    _check_mode(mode)
    if not isinstance(pred_ground, Mapping):
        raise ValueError("span predictions must be {'<video_id>_<qid>': [start, end]}")
    if pred_qa is not None and not isinstance(pred_qa, Mapping):
        raise ValueError("QA predictions must be {'<video_id>_<qid>': {'prediction', 'answer'}}")
    answers = answer_indices(qa_rows) if mode == "strict" and qa_rows is not None else None
    out: dict[str, Any] = {"mode": mode, "gs": gs}
    if pred_qa is not None:
        out.update(score_qa(gt_ground, pred_qa, qa_rows, answers))
    out.update(score_grounding(gt_ground, pred_ground, pred_qa, gs, mode, answers))
    return out


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NExT-GQA scorer: Acc@QA, Acc@GQA, mIoP, IoP@k, mIoU, IoU@k")
    parser.add_argument("--gt", required=True, help="gsub_{split}.json {video_id: {duration, location}}")
    parser.add_argument("--gt-qa", help="the QA csv ({split}.csv) for per-type accuracies")
    parser.add_argument("--pred", required=True, help="spans {'<vid>_<qid>': [s, e]} (seconds; see --gs)")
    parser.add_argument("--pred-qa", help="answers {'<vid>_<qid>': {'prediction', 'answer'}} ({split}-res.json)")
    parser.add_argument("--gs", action="store_true", help="spans normalised to [0, 1] (*_ground_gs.json)")
    parser.add_argument("--mode", choices=MODES, default="official",
                        help="official: the official functions' numbers (missing spans skipped); strict: "
                        "missing spans score 0, answers checked against the csv")
    args = parser.parse_args(argv)
    try:
        metrics = score_nextgqa(
            load_json(args.gt), load_json(args.pred),
            load_json(args.pred_qa) if args.pred_qa else None,
            read_qa_csv(args.gt_qa) if args.gt_qa else None, gs=args.gs, mode=args.mode,
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
