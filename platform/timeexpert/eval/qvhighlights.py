"""QVHighlights scorer CLI and prediction writer, in the official jsonl formats.

    python -m timeexpert.eval.qvhighlights --gt highlight_val_release.jsonl --pred preds.jsonl

prints the metrics JSON of Moment-DETR's `standalone_eval/eval.py` (same keys and structure:
"brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood", "full", "long", "middle", "short"),
computed by `timeexpert.eval.metrics.eval_qvhighlights`.

Prediction rows: {"qid", "query", "vid", "pred_relevant_windows": [[st, ed, score], ...],
"pred_saliency_scores": [one float per 2 s clip]}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

from timeexpert.eval.metrics import eval_qvhighlights, load_jsonl
from timeexpert.eval.parse import ParseResult
from timeexpert.events import Record


def official_qid(record_id: str) -> int | str:
    """Record ids of QVHighlights rows are the qid; written back as int when numeric."""
    return int(record_id) if str(record_id).isdigit() else record_id


def video_id(uri: str) -> str:
    """The official `vid` of a video URI: its file name without extension."""
    return pathlib.PurePosixPath(str(uri)).stem


def prediction_row(record: Record, parsed: ParseResult) -> dict[str, Any]:
    """One official prediction row. Windows keep the parsed order; a window without a score gets
    a rank score (1, 1/2, 1/3, ...) so the official sort by score keeps that order."""
    windows = [
        [e.start, e.end, float(e.score) if e.score is not None else 1.0 / (rank + 1)]
        for rank, e in enumerate(parsed.events)
    ]
    row: dict[str, Any] = {
        "qid": official_qid(record.id),
        "query": record.query,
        "vid": video_id(record.video),
        "pred_relevant_windows": windows,
    }
    if parsed.saliency is not None:
        row["pred_saliency_scores"] = list(parsed.saliency)
    return row


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="QVHighlights moment retrieval + highlight detection scorer "
        "(the official standalone_eval metrics)"
    )
    parser.add_argument("--gt", required=True,
                        help='official jsonl, a row a query: {"qid", "query", "vid", "duration", '
                             '"relevant_windows": [[start, end]], "relevant_clip_ids", "saliency_scores"}')
    parser.add_argument("--pred", required=True,
                        help='submission jsonl, a row a query: {"qid", "pred_relevant_windows": [[start, '
                             'end, score], ...], "pred_saliency_scores": [one per 2 s clip]}')
    parser.add_argument("--out", help="also write the metrics JSON to this path")
    parser.add_argument(
        "--no-match-number",
        action="store_true",
        help="official match_number=False: instead of requiring the same qids, score only the "
        "queries in both files (a GT query without a prediction row is left out, not a miss)",
    )
    parser.add_argument(
        "--skip-empty",
        action="store_true",
        help="official convention: queries with no predicted window are left out of MR mAP "
        "(default: they count as AP 0)",
    )
    args = parser.parse_args(argv)
    try:
        submission, ground_truth = load_jsonl(args.pred), load_jsonl(args.gt)
        if args.no_match_number:
            pred_qids, gt_qids = {d["qid"] for d in submission}, {d["qid"] for d in ground_truth}
            if gt_qids - pred_qids or pred_qids - gt_qids:
                print(f"left out: {len(gt_qids - pred_qids)} GT queries without a prediction, "
                      f"{len(pred_qids - gt_qids)} predictions matching no GT qid", file=sys.stderr)
        results = eval_qvhighlights(
            submission,
            ground_truth,
            match_number=not args.no_match_number,
            empty_as_zero=not args.skip_empty,
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=4)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
