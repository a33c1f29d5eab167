"""Charades-STA (and any single-window MR set) scorer CLI: R@1 at IoU 0.3/0.5/0.7 and mIoU.

    python -m timeexpert.eval.charades --gt charades_sta_test.txt --pred preds.jsonl

Ground truth: the official Charades-STA txt, one query a line: ``VID START END##QUERY``.

Predictions: jsonl, one object per query (our format, QVHighlights-like)::

    {"qid": 17, "vid": "3MSZA", "query": "person turn a light on.",
     "pred_relevant_windows": [[24.3, 30.4, 0.9], [1.0, 5.2, 0.3]]}

- `qid` (optional): the 0-based line number of the query in the GT txt. Without it the row is
  matched by (`vid`, `query`), and applies to every GT line with that pair.
- `pred_relevant_windows`: ranked best first, [start, end] or [start, end, score] in seconds; or,
  instead, `"answer": "from 24.3s to 30.4s"`, free text parsed by `timeexpert.eval.parse`.

Every GT query counts; a query with no prediction or an unparseable answer is a miss (IoU 0).
Metrics (percent) are `timeexpert.eval.metrics.recall_at_iou`, and, apart from each other:
`missing_predictions` (GT queries no prediction row matched), `unmatched_predictions` (rows that
match no GT query: a qid out of range, or a (`vid`, `query`) pair not in the GT, e.g. a query
without the GT's trailing ".") and `parse_failure_rate` (percent of GT queries whose matched row
has an answer that does not parse, or neither windows nor an answer). The CLI names the first
of each on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from timeexpert.eval.metrics import MR_IOU_THRESHOLDS, load_jsonl, recall_at_iou
from timeexpert.eval.parse import parse_answer
from timeexpert.events import Task


def load_charades_gt(path: str) -> list[dict[str, Any]]:
    """Official txt -> [{"qid": line index, "vid", "query", "relevant_windows": [[s, e]]}]."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            head, sep, query = line.partition("##")
            parts = head.split()
            try:
                if not sep or len(parts) != 3:
                    raise ValueError
                vid, start, end = parts[0], float(parts[1]), float(parts[2])
            except ValueError:
                raise ValueError(
                    f"{path}:{i + 1}: expected 'VID START END##QUERY', got {line!r}"
                ) from None
            rows.append(
                {"qid": len(rows), "vid": vid, "query": query.strip(), "relevant_windows": [[start, end]]}
            )
    return rows


def _pred_windows(row: dict[str, Any]) -> tuple[list | None, bool]:
    if row.get("pred_relevant_windows") is not None:
        return row["pred_relevant_windows"], True
    if isinstance(row.get("answer"), str):
        parsed = parse_answer(row["answer"], Task.MR, row.get("duration"))
        return [[e.start, e.end] for e in parsed.events], parsed.ok
    return None, False


def match_predictions(
    ground_truth: list[dict[str, Any]], predictions: list[dict[str, Any]]
) -> tuple[list[dict[str, Any] | None], list[dict[str, Any]]]:
    """Each GT query's prediction row (None: no row matched it), and the rows that matched no GT
    query. A row matches by `qid`, else by its (`vid`, `query`) pair, exactly."""
    by_qid: dict[Any, dict] = {}
    by_pair: dict[tuple[str, str], dict] = {}
    for row in predictions:
        if row.get("qid") is not None:
            by_qid[int(row["qid"])] = row
        else:
            by_pair[(str(row.get("vid")), str(row.get("query", "")).strip())] = row
    matched = [by_qid.get(gt["qid"]) or by_pair.get((gt["vid"], gt["query"])) for gt in ground_truth]
    used = {id(row) for row in matched if row is not None}
    return matched, [row for row in predictions if id(row) not in used]


def eval_charades(
    ground_truth: list[dict[str, Any]],
    predictions: list[dict[str, Any]],
    thresholds: Sequence[float] = MR_IOU_THRESHOLDS,
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """R@k at each threshold, mIoU, num_queries over the GT queries; missing_predictions,
    unmatched_predictions (counts) and parse_failure_rate (percent of the GT queries)."""
    matched, unmatched = match_predictions(ground_truth, predictions)
    windows, failed = [], 0
    for row in matched:
        w, parsed = _pred_windows(row) if row is not None else (None, True)
        windows.append(w)
        failed += not parsed
    out = recall_at_iou(windows, [gt["relevant_windows"] for gt in ground_truth], thresholds, ks)
    out["missing_predictions"] = sum(row is None for row in matched)
    out["unmatched_predictions"] = len(unmatched)
    out["parse_failure_rate"] = 100.0 * failed / len(matched) if matched else 0.0
    return out


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {row[k]!r}" for k in ("qid", "vid", "query") if row.get(k) is not None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Charades-STA moment retrieval scorer (R@k, mIoU)")
    parser.add_argument("--gt", required=True,
                        help="the official Charades-STA txt, one query a line: "
                             "'VID START END##QUERY' (seconds)")
    parser.add_argument("--pred", required=True,
                        help='jsonl, one row a query: {"qid": GT line (0-based), "pred_relevant_windows": '
                             '[[start, end, score], ...]} best first; without qid, "vid" and "query" '
                             'as in the GT; "answer": "from 24.3s to 30.4s" instead of the windows')
    parser.add_argument("--ks", type=int, nargs="+", default=[1], help="R@k for these k")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(MR_IOU_THRESHOLDS))
    args = parser.parse_args(argv)
    try:
        ground_truth, predictions = load_charades_gt(args.gt), load_jsonl(args.pred)
        metrics = eval_charades(ground_truth, predictions, args.thresholds, args.ks)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    matched, unmatched = match_predictions(ground_truth, predictions)
    missing = [gt for gt, row in zip(ground_truth, matched) if row is None]
    if missing:
        print(f"{len(missing)} GT queries have no prediction (scored as misses); the first: "
              f"{_describe(missing[0])}", file=sys.stderr)
    if unmatched:
        print(f"{len(unmatched)} predictions match no GT query (by qid, else by vid and query "
              f"exactly); the first: {_describe(unmatched[0])}", file=sys.stderr)
    print(json.dumps(metrics, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
