"""QVHighlights scorer against the official scorer's own golden output, plus hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from timeexpert.eval import qvhighlights
from timeexpert.eval.metrics import (
    average_precision_detection,
    eval_qvhighlights,
    highlight_metrics,
    load_jsonl,
    saliency_average_precision,
)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree}


@pytest.fixture(scope="module")
def golden(shared_fixtures):
    d = shared_fixtures / "qvhighlights"
    return (
        load_jsonl(d / "sample_val_preds.jsonl"),
        load_jsonl(d / "highlight_val_release.jsonl"),
        json.loads((d / "sample_val_preds_metrics_raw.json").read_text()),
    )


def test_golden_every_figure_matches_official(golden):
    preds, gt, official = golden
    ours = eval_qvhighlights(preds, gt)
    assert list(ours) == list(official)  # same keys, same order
    assert list(ours["brief"]) == list(official["brief"])
    flat_ours, flat_official = _flatten(ours), _flatten(official)
    assert set(flat_ours) == set(flat_official)
    mismatches = {
        k: (flat_ours[k], v) for k, v in flat_official.items() if abs(flat_ours[k] - v) > 1e-9
    }
    assert not mismatches, mismatches


def test_cli_prints_official_json(golden, shared_fixtures, capsys, tmp_path):
    d = shared_fixtures / "qvhighlights"
    # a subset keeps the CLI test quick; the full file is checked above
    preds, gt, _ = golden
    qids = {row["qid"] for row in gt[:200]}
    for name, rows in (("gt", gt), ("pred", preds)):
        qvhighlights.write_jsonl([r for r in rows if r["qid"] in qids], tmp_path / f"{name}.jsonl")
    rc = qvhighlights.main(
        ["--gt", str(tmp_path / "gt.jsonl"), "--pred", str(tmp_path / "pred.jsonl"),
         "--out", str(tmp_path / "m.json")]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "m.json").read_text())
    assert set(printed) == {"brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood",
                            "full", "long", "middle", "short"}
    assert d.is_dir()


def test_cli_rejects_mismatched_qids(tmp_path, capsys):
    gt = [{"qid": 1, "duration": 10, "relevant_windows": [[0, 4]],
           "relevant_clip_ids": [0, 1], "saliency_scores": [[4, 4, 4], [2, 2, 2]]}]
    qvhighlights.write_jsonl(gt, tmp_path / "gt.jsonl")
    qvhighlights.write_jsonl([{"qid": 2, "pred_relevant_windows": [[0, 4, 1]]}],
                             tmp_path / "pred.jsonl")
    assert qvhighlights.main(["--gt", str(tmp_path / "gt.jsonl"),
                              "--pred", str(tmp_path / "pred.jsonl")]) == 2
    assert "qids of ground truth and submission differ" in capsys.readouterr().err


# --- hand-computed AP cases ----------------------------------------------------------------


@pytest.mark.parametrize(
    "gt, pred, expected",
    [
        ([[0, 10]], [[0, 10, 0.9]], 1.0),  # perfect
        ([[0, 10]], [], 0.0),  # empty
        ([[0, 10]], [[20, 30, 0.9]], 0.0),  # disjoint
        ([[0, 10]], [[0, 10, 0.9], [0, 10, 0.8]], 1.0),  # duplicate -> FP after full recall
        ([[0, 10]], [[20, 30, 0.9], [0, 10, 0.5]], 0.5),  # FP ranked first: P = 1/2 at R = 1
        ([[0, 10], [20, 30]], [[0, 10, 0.9]], 0.5),  # one of two GT found
        ([[0, 10], [20, 30]], [[20, 30, 0.2], [0, 10, 0.9]], 1.0),  # sorted by score
    ],
)
def test_detection_ap_hand_computed(gt, pred, expected):
    ap = average_precision_detection(gt, pred, thresholds=[0.5])
    assert ap[0] == pytest.approx(expected)


def test_detection_ap_iou_threshold_partial_overlap():
    # IoU([0,10],[5,10]) = 0.5: a hit at 0.5 (>=), a miss at 0.55
    ap = average_precision_detection([[0, 10]], [[5, 10, 1.0]], thresholds=[0.5, 0.55])
    assert ap.tolist() == [1.0, 0.0]


def test_detection_ap_one_gt_matched_once():
    # two predictions overlapping one GT: the second is a FP at every threshold
    ap = average_precision_detection([[0, 10]], [[0, 9, 0.9], [1, 10, 0.8]], thresholds=[0.5])
    assert ap[0] == pytest.approx(1.0)


def test_saliency_ap_hand_computed_and_ties():
    # ranks: + - + -  -> precisions at the recall rises: 1, 2/3 -> mean 5/6
    assert saliency_average_precision([1, 0, 1, 0], [4, 3, 2, 1]) == pytest.approx(5 / 6)
    # all scores tied: one threshold, AP = fraction positive
    assert saliency_average_precision([1, 0, 0, 1], [0.5] * 4) == pytest.approx(0.5)
    assert saliency_average_precision([0, 0, 0], [1, 2, 3]) == 0.0  # official special cases
    assert saliency_average_precision([1, 1], [1, 2]) == 1.0


def test_saliency_ap_matches_sklearn_get_ap_formula():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        y = (rng.random(n) < 0.4).astype(float)
        s = rng.integers(0, 5, n).astype(float)  # many ties
        if len(set(y)) == 1:
            continue
        precision, recall, _ = sklearn_metrics.precision_recall_curve(y, s)
        precision = np.maximum.accumulate(precision)
        ref = np.mean(precision[np.where(np.diff(recall.astype(np.float32)))])
        assert saliency_average_precision(y, s) == pytest.approx(ref)


def test_highlight_hit1_and_padding():
    gt = [np.array([[0, 0, 0], [4, 1, 1], [2, 2, 2]])]
    # top clip 1: VeryGood for annotator 0 only -> hit at every threshold (max over annotators)
    assert highlight_metrics([[0.1, 0.9, 0.5]], gt, 4)["HL-Hit1"] == 100.0
    # top clip past the video -> miss; short prediction is zero-padded for AP
    assert highlight_metrics([[0, 0, 0, 5]], gt, 2)["HL-Hit1"] == 0.0
    assert highlight_metrics([None], gt, 2)["HL-Hit1"] == 0.0


# --- thresholds at an exact 0.5 and the unmatched queries ------------------------------------


def _gt_row(qid, window):
    return {"qid": qid, "duration": 10, "relevant_windows": [window],
            "relevant_clip_ids": [0, 1], "saliency_scores": [[4, 4, 4], [2, 2, 2]]}


def test_r1_at_exact_half_uses_the_span_and_map_the_length_sum():
    # Moment-DETR: R1 by `compute_temporal_iou_batch_paired` (overlap / span), AP by
    # `..._batch_cross` (overlap / (len + len - overlap)). [0.6, 3.0] vs [1.2, 4.2]: 1.8 / 3.6 = 0.5
    # exactly, 1.8 / 3.6000000000000005 < 0.5; [2.9, 9.4] vs [1.6, 6.8]: 3.9 / 7.800000000000001
    # < 0.5, 3.9 / 7.799999999999999 > 0.5 (test_metrics_mr has the float64 arithmetic)
    gt = [_gt_row(1, [1.2, 4.2]), _gt_row(2, [1.6, 6.8])]
    sub = [{"qid": 1, "pred_relevant_windows": [[0.6, 3.0, 1.0]]},
           {"qid": 2, "pred_relevant_windows": [[2.9, 9.4, 1.0]]}]
    for rows, r1, ap in ((gt[:1], 100.0, 0.0), (gt[1:], 0.0, 100.0)):
        qids = {d["qid"] for d in rows}
        out = eval_qvhighlights([d for d in sub if d["qid"] in qids], rows, digits=None)
        assert out["full"]["MR-R1"]["0.5"] == r1
        assert out["full"]["MR-mAP"]["0.5"] == ap


def test_no_match_number_drops_unmatched_queries(tmp_path, capsys):
    gt = [_gt_row(1, [0, 4]), _gt_row(2, [4, 8])]
    sub = [{"qid": 1, "pred_relevant_windows": [[0, 4, 1.0]], "pred_saliency_scores": [1.0, 0.5]},
           {"qid": 3, "pred_relevant_windows": [[0, 4, 1.0]]}]  # 3 is not in the GT
    out = eval_qvhighlights(sub, gt, match_number=False)
    # official match_number=False: only qid 1 is scored (2 has no prediction, 3 no GT): its window
    # is exact (R1 100, AP 100) and its top clip 0 has scores 4, 4, 4 (HIT@1 100 at VeryGood);
    # scoring qid 2 as a miss would have halved R1, mAP and HIT@1
    assert out["brief"]["MR-full-R1@0.5"] == 100.0
    assert out["brief"]["MR-full-mAP"] == 100.0
    assert out["brief"]["HL-min-VeryGood-Hit1"] == 100.0
    with pytest.raises(ValueError, match="qids of ground truth and submission differ"):
        eval_qvhighlights(sub, gt)
    qvhighlights.write_jsonl(gt, tmp_path / "gt.jsonl")
    qvhighlights.write_jsonl(sub, tmp_path / "pred.jsonl")
    argv = ["--gt", str(tmp_path / "gt.jsonl"), "--pred", str(tmp_path / "pred.jsonl")]
    assert qvhighlights.main(argv + ["--no-match-number"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
