"""Charades-STA / ActivityNet MR metrics: hand-computed cases, IoU properties, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timeexpert.eval import charades
from timeexpert.eval.metrics import recall_at_iou
from timeexpert.events import temporal_iou


def test_perfect():
    r = recall_at_iou([[[1, 5]], [[2.5, 7.5]]], [[1, 5], [2.5, 7.5]])
    assert r == {"R1@0.3": 100.0, "R1@0.5": 100.0, "R1@0.7": 100.0, "mIoU": 100.0, "num_queries": 2}


def test_missing_prediction_counts_as_miss():
    r = recall_at_iou([[[0, 10]], None, []], [[0, 10], [0, 10], [0, 10]])
    assert r["num_queries"] == 3
    assert r["R1@0.5"] == pytest.approx(100 / 3)
    assert r["mIoU"] == pytest.approx(100 / 3)


def test_disjoint_and_partial_overlap():
    # [0,10] vs [5,15]: IoU 5/15 = 1/3 -> hit at 0.3, miss at 0.5
    r = recall_at_iou([[[0, 10]], [[20, 30]]], [[5, 15], [0, 10]])
    assert r["R1@0.3"] == 50.0 and r["R1@0.5"] == 0.0
    assert r["mIoU"] == pytest.approx(100 * (1 / 3) / 2)


def test_threshold_tie_counts_as_hit():
    # IoU exactly 0.5 and 0.7 -> hits (>=), like 2D-TAN / Moment-DETR
    r = recall_at_iou([[[0, 5]], [[0, 7]]], [[0, 10], [0, 10]], thresholds=(0.5, 0.7))
    assert r["R1@0.5"] == 100.0 and r["R1@0.7"] == 50.0


def test_more_predictions_than_gt_only_top1_counts_for_r1():
    preds = [[[20, 30, 0.9], [0, 10, 0.8]]]  # ranked: a wrong window first
    r = recall_at_iou(preds, [[0, 10]], ks=(1, 5))
    assert r["R1@0.5"] == 0.0 and r["R5@0.5"] == 100.0 and r["mIoU"] == 0.0


def test_several_gt_windows_best_match():
    r = recall_at_iou([[[20, 30]]], [[[0, 10], [20, 30]]])
    assert r["R1@0.7"] == 100.0


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        recall_at_iou([None, None], [[0, 1]])
    with pytest.raises(ValueError, match="ks must be >= 1"):
        recall_at_iou([None], [[0, 1]], ks=(0,))


interval = st.tuples(
    st.floats(0, 1000, allow_nan=False), st.floats(0, 1000, allow_nan=False)
).map(lambda t: sorted(t))


@settings(max_examples=200, deadline=None)
@given(st.lists(interval, min_size=1, max_size=5), st.lists(interval, min_size=1, max_size=5))
def test_iou_symmetric_and_bounded(a, b):
    ab, ba = temporal_iou(a, b), temporal_iou(b, a)
    np.testing.assert_allclose(ab, ba.T)
    assert np.all(ab >= 0) and np.all(ab <= 1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(interval)
def test_iou_self_is_one(a):
    expected = 1.0 if a[1] > a[0] else 0.0  # a point has IoU 0 by definition (0/0 = 0)
    assert temporal_iou(a, a) == pytest.approx(expected)


@settings(max_examples=100, deadline=None)
@given(interval, interval)
def test_recall_monotone_in_threshold(a, b):
    r = recall_at_iou([[a]], [b], thresholds=(0.1, 0.3, 0.5, 0.7, 0.9))
    values = [r[f"R1@{t:g}"] for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert values == sorted(values, reverse=True)
    assert r["mIoU"] == pytest.approx(100 * temporal_iou(a, b))


def test_charades_cli(tmp_path, capsys):
    gt = tmp_path / "gt.txt"
    gt.write_text(
        "3MSZA 24.3 30.4##person turn a light on.\n"
        "3MSZA 1.0 5.0##person opens the door.\n"
        "ABCDE 0.0 8.0##a person is eating.\n"
    )
    preds = [
        {"qid": 0, "pred_relevant_windows": [[24.3, 30.4, 0.9]]},
        {"vid": "3MSZA", "query": "person opens the door.", "answer": "from 0:02 to 0:05"},
        # ABCDE has no prediction: a miss, not a parse failure
    ]
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps(p) for p in preds))
    assert charades.main(["--gt", str(gt), "--pred", str(tmp_path / "pred.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_queries"] == 3
    assert out["R1@0.7"] == pytest.approx(200 / 3)  # [2,5] vs [1,5]: IoU 0.75
    assert out["parse_failure_rate"] == 0.0
    assert out["missing_predictions"] == 1 and out["unmatched_predictions"] == 0


def test_charades_cli_names_unmatched_predictions_apart_from_parse_failures(tmp_path, capsys):
    (tmp_path / "gt.txt").write_text("3MSZA 24.3 30.4##person turn a light on.\n"
                                     "3MSZA 1.0 5.0##person opens the door.\n")
    preds = [
        {"vid": "3MSZA", "query": "person turn a light on", "pred_relevant_windows": [[24, 30]]},
        {"vid": "3MSZA", "query": "person opens the door.", "answer": "no idea"},
    ]
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps(p) for p in preds))
    assert charades.main(["--gt", str(tmp_path / "gt.txt"), "--pred", str(tmp_path / "pred.jsonl")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    # the row without the GT's trailing "." matches nothing; the second row does not parse
    assert out["unmatched_predictions"] == 1 and out["missing_predictions"] == 1
    assert out["parse_failure_rate"] == 50.0 and out["R1@0.5"] == 0.0
    assert "1 predictions match no GT query" in captured.err
    assert "query 'person turn a light on'" in captured.err
    assert "1 GT queries have no prediction" in captured.err and "qid 0" in captured.err


def test_charades_bad_gt_line(tmp_path, capsys):
    (tmp_path / "gt.txt").write_text("3MSZA 24.3 person##x\n")
    (tmp_path / "p.jsonl").write_text("")
    assert charades.main(["--gt", str(tmp_path / "gt.txt"), "--pred", str(tmp_path / "p.jsonl")]) == 2
    assert "gt.txt:1" in capsys.readouterr().err


# --- IoU exactly at a threshold: the official formula decides -----------------------------
# [0.6, 3.0] vs [1.2, 4.2]: overlap 3.0 - 1.2 = 1.8, span 4.2 - 0.6 = 3.6, both as in decimals,
# and 3.6 is exactly 2 x 1.8 in float64, so the official IoU (overlap / span) is 0.5: a hit at 0.5.
# The length-sum union 2.4 + 3.0 - 1.8 rounds to 3.6000000000000005: 0.49999999999999994, a miss.
# [2.9, 9.4] vs [1.6, 6.8] goes the other way: overlap 3.9, span 7.800000000000001 gives
# 0.49999999999999994 (a miss), 6.5 + 5.199999999999999 - 3.9 = 7.799999999999999 gives 0.5000000000000001.
TIE_HIT = ([0.6, 3.0], [1.2, 4.2])
TIE_MISS = ([2.9, 9.4], [1.6, 6.8])


def test_exact_half_iou_uses_the_official_span():
    assert temporal_iou(*TIE_HIT, hull=True) == 0.5 > temporal_iou(*TIE_HIT)
    assert temporal_iou(*TIE_MISS, hull=True) < 0.5 < temporal_iou(*TIE_MISS)
    for (pred, gt), hit in ((TIE_HIT, 100.0), (TIE_MISS, 0.0)):
        r = recall_at_iou([[pred]], [gt], thresholds=(0.5,))
        assert r["R1@0.5"] == hit, (pred, gt)
        assert r["mIoU"] == 100 * temporal_iou(pred, gt, hull=True)
        # among several GT windows the one of highest IoU counts, still by the span
        assert recall_at_iou([[pred]], [[[20, 30], gt]], thresholds=(0.5,))["R1@0.5"] == hit


def test_charades_cli_exact_half_iou(tmp_path, capsys):
    (tmp_path / "gt.txt").write_text(
        "AAAAA 1.2 4.2##a person sits.\nBBBBB 1.6 6.8##a person eats.\nCCCCC 0.6 3.0##a person runs.\n"
    )
    preds = [{"qid": 0, "pred_relevant_windows": [[0.6, 3.0]]},
             {"qid": 1, "pred_relevant_windows": [[2.9, 9.4]]},
             {"qid": 2, "pred_relevant_windows": [[1.2, 4.2]]}]
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps(p) for p in preds))
    assert charades.main(["--gt", str(tmp_path / "gt.txt"), "--pred", str(tmp_path / "pred.jsonl"),
                          "--thresholds", "0.5"]) == 0
    # hit, miss, hit (the span is symmetric); by the length-sum union: miss, hit, miss
    assert json.loads(capsys.readouterr().out)["R1@0.5"] == pytest.approx(200 / 3)
