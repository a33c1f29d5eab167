"""Moment retrieval and highlight detection metrics, number for number with the official scorers.

Two families, two references:

- Charades-STA / ActivityNet-Captions moment retrieval (`recall_at_iou`): R@k at IoU thresholds
  and mIoU of the top-1 window, as the 2D-TAN / MomentDiff-style evaluation loops compute them.
  Every ground-truth query is in the denominator: a query without a (parseable) prediction counts
  as a miss with IoU 0, never as absent.
- QVHighlights (`eval_qvhighlights` and its parts): Moment-DETR's `standalone_eval/eval.py`
  (jayleicn/moment_detr) and its `utils.py` (MMAction2's ActivityNet detection AP with VOC
  interpolation; the video2gif `get_ap` for highlight AP). Output dict has the official keys and
  structure, values rounded to two decimals like the official scorer.

IoU is `timeexpert.events.temporal_iou`, with the formula of the official code at each threshold:
R@k and mIoU divide the overlap by the hull of the two windows, the span from the earliest start
to the latest end (`hull=True`: 2D-TAN's `iou`, TimeChat's `eval_tvg.py`, Moment-DETR's
`compute_temporal_iou_batch_paired`, "not the correct union"); the detection AP divides by
length + length - overlap (Moment-DETR's `compute_temporal_iou_batch_cross`). The two are equal in
exact arithmetic but round differently, and one-decimal windows often sit exactly on 0.5 or 0.7.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from timeexpert.events import temporal_iou

QVH_IOU_THRESHOLDS: tuple[float, ...] = tuple(float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10))
QVH_LENGTH_RANGES: dict[str, tuple[float, float]] = {
    "short": (0, 10),
    "middle": (10, 30),
    "long": (30, 150),
    "full": (0, 150),
}
QVH_SALIENCY_MIN: dict[str, int] = {"Fair": 2, "Good": 3, "VeryGood": 4}
MR_IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)


def _windows(value: Any) -> np.ndarray:
    """A list of [start, end(, score)] -> (N, >=2) float array; None / empty -> (0, 2)."""
    if value is None:
        return np.zeros((0, 2))
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"windows must be a list of [start, end(, score)], got shape {arr.shape}")
    return arr


# --- Charades-STA / ActivityNet moment retrieval -------------------------------------------


def recall_at_iou(
    predictions: Sequence[Any],
    ground_truths: Sequence[Any],
    thresholds: Sequence[float] = MR_IOU_THRESHOLDS,
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """R@k at each IoU threshold and mIoU (top-1), in percent, over every ground-truth query.

    `predictions[i]`: the ranked windows of query i ([[start, end(, score)], ...], best first), or
    None / [] when the answer could not be parsed — that query counts as a miss (IoU 0).
    `ground_truths[i]`: its ground-truth window(s); with several, the best-matching one counts
    (Charades-STA and ActivityNet have one per query). A hit is IoU >= threshold, as in 2D-TAN's
    and Moment-DETR's scorers, with their hull IoU; among several ground-truth windows the one of
    highest length-sum IoU is taken (the first on ties), as Moment-DETR's `compute_mr_r1` picks it.
    Keys: "R1@0.3", ..., "R5@0.7" (for k in `ks`), "mIoU", "num_queries".
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"{len(predictions)} predictions for {len(ground_truths)} ground-truth queries; "
            "pass None for a query without a prediction"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")
    k_max = max(ks)
    n = len(ground_truths)
    # best IoU of each of the top-k_max predictions against the ground truth: (n, k_max)
    best_Q_K = np.zeros((n, k_max))
    for i, (pred, gt) in enumerate(zip(predictions, ground_truths)):
        pred_K2 = _windows(pred)[:k_max, :2]
        gt_G2 = _windows(gt)[:, :2]
        if len(pred_K2) and len(gt_G2):
            match_K = temporal_iou(pred_K2, gt_G2).argmax(axis=1)
            hull_KG = temporal_iou(pred_K2, gt_G2, hull=True)
            best_Q_K[i, : len(pred_K2)] = hull_KG[np.arange(len(pred_K2)), match_K]
    out: dict[str, float] = {}
    for k in ks:
        hit_Q = best_Q_K[:, :k].max(axis=1) if n else np.zeros(0)
        for thr in thresholds:
            out[f"R{k}@{thr:g}"] = 100.0 * float(np.mean(hit_Q >= thr)) if n else 0.0
    out["mIoU"] = 100.0 * float(best_Q_K[:, 0].mean()) if n else 0.0
    out["num_queries"] = n
    return out


# --- QVHighlights moment retrieval ----------------------------------------------------------


def average_precision_detection(
    gt_windows: Any, pred_windows: Any, thresholds: Sequence[float] = QVH_IOU_THRESHOLDS
) -> np.ndarray:
    """AP of one query's scored windows at each IoU threshold -> (len(thresholds),).

    Matches `compute_average_precision_detection` of Moment-DETR's `standalone_eval/utils.py`
    (MMAction2 / ActivityNet): predictions sorted by decreasing score (stable), each matched to the
    unmatched ground truth of highest IoU >= threshold (ties: the later one, as the official
    reversed argsort), then VOC-2011 interpolated AP. No predictions -> AP 0.
    """
    pred = _windows(pred_windows)
    gt_G2 = _windows(gt_windows)[:, :2]
    thr_T = np.asarray(thresholds, dtype=np.float64)
    if len(pred) == 0 or len(gt_G2) == 0:
        return np.zeros(len(thr_T))
    if pred.shape[1] < 3:
        raise ValueError(f"QVHighlights windows need a score: [start, end, score], got {pred[0]}")
    pred = pred[np.argsort(-pred[:, 2], kind="stable")]
    iou_PG = temporal_iou(pred[:, :2], gt_G2)
    num_p = len(pred)
    tp_TP = np.zeros((len(thr_T), num_p))
    locked_TG = np.zeros((len(thr_T), len(gt_G2)), dtype=bool)
    for p in range(num_p):
        order_G = np.argsort(iou_PG[p], kind="stable")[::-1]
        # candidates in decreasing IoU; the official loop stops at the first one under threshold
        cand_TG = (iou_PG[p][order_G][None, :] >= thr_T[:, None]) & ~locked_TG[:, order_G]
        has_T = cand_TG.any(axis=1)
        first_T = order_G[cand_TG.argmax(axis=1)]
        tp_TP[has_T, p] = 1
        locked_TG[np.nonzero(has_T)[0], first_T[has_T]] = True
    tp_cum_TP = np.cumsum(tp_TP, axis=1)
    fp_cum_TP = np.cumsum(1 - tp_TP, axis=1)
    recall_TP = tp_cum_TP / len(gt_G2)
    precision_TP = tp_cum_TP / (tp_cum_TP + fp_cum_TP)
    return _voc_interpolated_ap(precision_TP, recall_TP)


def _voc_interpolated_ap(precision_TP: np.ndarray, recall_TP: np.ndarray) -> np.ndarray:
    """VOCdevkit-2011 AP of each row (Moment-DETR `interpolated_precision_recall`).

    The official sum runs over the points where recall changes; the other terms are zero, so
    summing over all points is the same number.
    """
    num_t = precision_TP.shape[0]
    mprec = np.concatenate([np.zeros((num_t, 1)), precision_TP, np.zeros((num_t, 1))], axis=1)
    mrec = np.concatenate([np.zeros((num_t, 1)), recall_TP, np.ones((num_t, 1))], axis=1)
    mprec = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
    return np.sum((mrec[:, 1:] - mrec[:, :-1]) * mprec[:, 1:], axis=1)


def _filter_by_length(
    submission: list[dict], ground_truth: list[dict], len_range: tuple[float, float]
) -> tuple[list[dict], list[dict]]:
    """Moment-DETR `get_data_by_range`: keep GT windows with min < length <= max, and their queries."""
    lo, hi = len_range
    if (lo, hi) == QVH_LENGTH_RANGES["full"]:
        return submission, ground_truth
    gt_in: list[dict] = []
    for d in ground_truth:
        kept = [w for w in d["relevant_windows"] if lo < w[1] - w[0] <= hi]
        if kept:
            d = copy.copy(d)
            d["relevant_windows"] = kept
            gt_in.append(d)
    qids = {d["qid"] for d in gt_in}
    return [d for d in submission if d["qid"] in qids], gt_in


def qvh_mr_map(
    submission: list[dict],
    ground_truth: list[dict],
    thresholds: Sequence[float] = QVH_IOU_THRESHOLDS,
    max_pred_windows: int | None = 10,
    empty_as_zero: bool = True,
) -> dict[str, float]:
    """Moment-DETR `compute_mr_ap`: mean over queries of per-query AP -> {"0.5": ..., "average"}.

    Values in percent, unrounded. The first `max_pred_windows` windows of each prediction count
    (in file order, before sorting by score), as in the official scorer. A ground-truth query whose
    prediction is missing or empty has AP 0 (`empty_as_zero`, our default); the official scorer
    skips queries without predicted windows (`empty_as_zero=False`).
    """
    pred_by_qid = {d["qid"]: d.get("pred_relevant_windows") or [] for d in submission}
    aps = []
    for d in ground_truth:
        windows = pred_by_qid.get(d["qid"], [])
        if max_pred_windows is not None:
            windows = windows[:max_pred_windows]
        if not windows and not empty_as_zero:
            continue
        aps.append(average_precision_detection(d["relevant_windows"], windows, thresholds))
    ap_T = np.mean(aps, axis=0) if aps else np.zeros(len(thresholds))
    out = {str(float(f"{t:.2f}")): 100.0 * float(a) for t, a in zip(thresholds, ap_T)}
    out["average"] = 100.0 * float(np.mean(ap_T))
    return out


def qvh_mr_r1(
    submission: list[dict],
    ground_truth: list[dict],
    thresholds: Sequence[float] = QVH_IOU_THRESHOLDS,
) -> dict[str, float]:
    """Moment-DETR `compute_mr_r1`: top-1 window vs its best-matching GT window, IoU >= threshold.

    Percent, unrounded, with the official hull IoU (`recall_at_iou`). Over the ground-truth
    queries; a missing or empty prediction is a miss (the official scorer would fail on it).
    """
    pred_by_qid = {d["qid"]: d.get("pred_relevant_windows") or [] for d in submission}
    r = recall_at_iou(
        [pred_by_qid.get(d["qid"]) for d in ground_truth],
        [d["relevant_windows"] for d in ground_truth],
        thresholds=thresholds,
    )
    return {str(float(f"{t:.2f}")): r[f"R1@{t:g}"] for t in thresholds}


def eval_moment_retrieval_qvh(
    submission: list[dict], ground_truth: list[dict], empty_as_zero: bool = True
) -> dict[str, dict[str, dict[str, float]]]:
    """Moment-DETR `eval_moment_retrieval`: MR-mAP and MR-R1 for short/middle/long/full (unrounded)."""
    out = {}
    for name, len_range in QVH_LENGTH_RANGES.items():
        sub, gt = _filter_by_length(submission, ground_truth, len_range)
        out[name] = {
            "MR-mAP": qvh_mr_map(sub, gt, empty_as_zero=empty_as_zero),
            "MR-R1": qvh_mr_r1(sub, gt),
        }
    return out


# --- QVHighlights highlight detection --------------------------------------------------------


def saliency_average_precision(y_true: Any, y_score: Any) -> float:
    """Interpolated AP of a ranking, as Moment-DETR's `get_ap` (video2gif) with sklearn's PR curve.

    All-negative labels -> 0, all-positive -> 1 (the official special cases). Tied scores form one
    threshold (sklearn `precision_recall_curve`), so a constant score gives AP = fraction positive.
    AP = mean, over the points where recall increases, of the interpolated precision (max precision
    at any recall >= that point).
    """
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} differ in length")
    if len(y_true) == 0 or np.all(y_true == y_true[0]):
        return 0.0 if len(y_true) == 0 or y_true[0] == 0 else 1.0
    order = np.argsort(-y_score, kind="stable")
    score_s, true_s = y_score[order], y_true[order]
    # last index of each distinct score (thresholds from high to low)
    last = np.r_[np.nonzero(np.diff(score_s))[0], len(score_s) - 1]
    tps = np.cumsum(true_s)[last]
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    interp = np.maximum.accumulate(precision[::-1])[::-1]
    rises = np.diff(np.r_[0.0, recall]) != 0
    return float(np.mean(interp[rises]))


def qvh_gt_saliency(gt: Mapping[str, Any], clip_len: float = 2.0) -> np.ndarray:
    """Moment-DETR `mk_gt_scores`: (int(duration / clip_len), annotators) scores, 0 off the relevant clips."""
    num_clips = int(gt["duration"] / clip_len)
    scores = np.asarray(gt["saliency_scores"], dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    full = np.zeros((num_clips, scores.shape[1] if scores.size else 3))
    ids = np.asarray(gt["relevant_clip_ids"], dtype=np.int64)
    if len(ids) and ids.max() >= num_clips:
        raise ValueError(
            f"qid {gt.get('qid')!r}: relevant clip id {ids.max()} outside the {num_clips} clips "
            f"of a {gt['duration']} s video"
        )
    full[ids] = scores
    return full


def highlight_metrics(
    pred_scores: Sequence[Any], gt_scores: Sequence[np.ndarray], min_score: float
) -> dict[str, float]:
    """HL-mAP and HL-Hit1 (percent, unrounded) of Moment-DETR `compute_hl_ap` / `compute_hl_hit1`.

    `pred_scores[i]`: per-clip predicted saliency of query i (None = no prediction: all zeros).
    `gt_scores[i]`: (clips, annotators) GT scores; a clip is positive for an annotator when its score
    >= `min_score`. Predictions are cut or zero-padded to the GT clip count (for AP). HIT@1: the
    first clip of maximal predicted score (np.argmax) is a hit when any annotator marks it positive;
    a top clip past the video's clips is a miss. mAP averages AP over queries x annotators.
    """
    n = len(gt_scores)
    if len(pred_scores) != n:
        raise ValueError(f"{len(pred_scores)} saliency predictions for {n} ground-truth queries")
    hits = np.zeros(n)
    aps = []
    for i, (pred, gt) in enumerate(zip(pred_scores, gt_scores)):
        binary_CA = (np.asarray(gt) >= min_score).astype(np.float64)
        pred_arr = np.zeros(0) if pred is None else np.asarray(pred, dtype=np.float64).ravel()
        if len(pred_arr):
            top = int(np.argmax(pred_arr))
            if top < len(binary_CA):
                hits[i] = binary_CA[top].max()
        fitted = np.zeros(len(binary_CA))
        m = min(len(pred_arr), len(binary_CA))
        fitted[:m] = pred_arr[:m]
        aps += [saliency_average_precision(binary_CA[:, a], fitted) for a in range(binary_CA.shape[1])]
    return {
        "HL-mAP": 100.0 * float(np.mean(aps)) if aps else 0.0,
        "HL-Hit1": 100.0 * float(np.mean(hits)) if n else 0.0,
    }


def eval_highlight_qvh(
    submission: list[dict], ground_truth: list[dict], clip_len: float = 2.0
) -> dict[str, dict[str, float]]:
    """Moment-DETR `eval_highlight`: {"HL-min-Fair": {"HL-mAP", "HL-Hit1"}, ...} (unrounded)."""
    pred_by_qid = {d["qid"]: d.get("pred_saliency_scores") for d in submission}
    preds = [pred_by_qid.get(d["qid"]) for d in ground_truth]
    gts = [qvh_gt_saliency(d, clip_len) for d in ground_truth]
    return {
        f"HL-min-{name}": highlight_metrics(preds, gts, min_score)
        for name, min_score in QVH_SALIENCY_MIN.items()
    }


def _round_tree(tree: Any, digits: int) -> Any:
    if isinstance(tree, dict):
        return type(tree)((k, _round_tree(v, digits)) for k, v in tree.items())
    return float(f"{tree:.{digits}f}")


def eval_qvhighlights(
    submission: list[dict],
    ground_truth: list[dict],
    match_number: bool = True,
    empty_as_zero: bool = True,
    digits: int | None = 2,
) -> OrderedDict:
    """Moment-DETR `eval_submission`: the official metrics dict ("brief", "HL-min-Fair", ..., "full").

    `submission`: official prediction rows (qid, pred_relevant_windows [[st, ed, score]...],
    pred_saliency_scores); `ground_truth`: official GT rows. With `match_number` the qids must be
    the same sets (the official check); without it, as the official `match_number=False`, only the
    queries in both are scored: a GT query without a prediction row is left out, not a miss. MR
    metrics are computed when any row has `pred_relevant_windows`, HL metrics when any has
    `pred_saliency_scores`. Values rounded to `digits` like the official scorer (None: unrounded).
    """
    if not ground_truth:
        raise ValueError("ground truth is empty")
    pred_qids = [d["qid"] for d in submission]
    gt_qids = {d["qid"] for d in ground_truth}
    if match_number and set(pred_qids) != gt_qids:
        missing, extra = gt_qids - set(pred_qids), set(pred_qids) - gt_qids
        raise ValueError(
            f"qids of ground truth and submission differ: {len(missing)} missing "
            f"(e.g. {sorted(missing, key=str)[:3]}), {len(extra)} extra "
            f"(e.g. {sorted(extra, key=str)[:3]}); pass match_number=False to score the queries "
            "in both only"
        )
    shared = gt_qids & set(pred_qids)
    if not shared:
        raise ValueError("no qid of the submission is in the ground truth: are they the same split?")
    submission = [d for d in submission if d["qid"] in shared]
    ground_truth = [d for d in ground_truth if d["qid"] in shared]
    metrics: dict[str, Any] = {}
    brief: dict[str, float] = {}
    if any("pred_relevant_windows" in d for d in submission):
        mr = eval_moment_retrieval_qvh(submission, ground_truth, empty_as_zero=empty_as_zero)
        metrics.update(mr)
        mr_brief = {
            "MR-full-mAP": mr["full"]["MR-mAP"]["average"],
            "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
            "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"],
            "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
            "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"],
            "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
            "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"],
            "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"],
        }
        brief.update(sorted(mr_brief.items()))
    if any("pred_saliency_scores" in d for d in submission):
        hl = eval_highlight_qvh(submission, ground_truth)
        metrics.update(hl)
        brief.update({f"{k}-{sub.split('-')[1]}": v[sub] for k, v in hl.items() for sub in v})
    out = OrderedDict(brief=OrderedDict(brief))
    out.update(sorted(metrics.items()))
    return _round_tree(out, digits) if digits is not None else out


def load_jsonl(path: str) -> list[dict]:
    """Rows of a jsonl file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_json(path: str) -> Any:
    """A json file's content; invalid JSON is a ValueError naming the file."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
