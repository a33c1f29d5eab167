"""NExT-GQA scorer against the official functions' output on the golden files, plus hand cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from timeexpert.eval import nextgqa
from timeexpert.eval.nextgqa import per_question, read_qa_csv, score_nextgqa, span_iou_iop

PRED_SETS = ("near", "noisy", "degenerate")
GROUNDING_FIGURES = ("Acc@GQA", "mIoP", "IoP@0.3", "IoP@0.5", "mIoU", "IoU@0.3", "IoU@0.5")


@pytest.fixture(scope="module")
def golden(shared_fixtures):
    d = shared_fixtures / "nextgqa"
    return d, json.loads((d / "gt_gsub.json").read_text()), read_qa_csv(str(d / "gt_qa.csv"))


def _load(d, name):
    return json.loads((d / name).read_text())


@pytest.mark.parametrize("name", PRED_SETS)
@pytest.mark.parametrize("gs", [False, True])
def test_golden_grounding_and_qa_match_official(golden, name, gs):
    d, gt, rows = golden
    official = _load(d, f"official_metrics_{name}.json")
    suffix = "_gs" if gs else ""
    ours = score_nextgqa(gt, _load(d, f"pred_{name}_ground{suffix}.json"), _load(d, f"pred_{name}_qa.json"),
                         rows, gs=gs)
    ground = official["ground_gs" if gs else "ground_seconds"]
    for key in GROUNDING_FIGURES:
        assert ours[key] == pytest.approx(ground["derived_percent"][key], abs=1e-9), key
    assert ours["num_scored"] == ground["final_locals"]["cnt"]
    assert ours["num_missing_spans"] == 15 - ground["final_locals"]["cnt"]
    qa = official["qa"]["final_locals"]
    assert ours["Acc@QA"] == pytest.approx(official["qa"]["derived_percent"]["Acc@QA"], abs=1e-9)
    assert ours["num_qa_questions"] == qa["all_cnt"]
    expected_types = {nextgqa.QA_TYPE_NAMES[g]: 100.0 * qa["group_acc"][g] / n
                      for g, n in qa["group_cnt"].items() if n}
    assert ours["Acc@QA_by_type"] == pytest.approx(expected_types, abs=1e-9)


@pytest.mark.parametrize("name", PRED_SETS)
def test_golden_per_question_matches_official(golden, name):
    d, gt, _ = golden
    official = _load(d, f"official_per_question_{name}.json")
    qa = _load(d, f"pred_{name}_qa.json")
    for key, gs in (("ground_seconds", False), ("ground_gs", True)):
        suffix = "_gs" if gs else ""
        ours = per_question(gt, _load(d, f"pred_{name}_ground{suffix}.json"), qa, gs=gs)
        assert [r["key"] for r in ours] == [r["key"] for r in official[key]]
        for mine, theirs in zip(ours, official[key]):
            for field, value in theirs.items():
                if isinstance(value, float):
                    assert mine[field] == pytest.approx(value, abs=1e-12), (key, theirs["key"], field)
                else:
                    assert mine[field] == value, (key, theirs["key"], field)


def test_cli_prints_the_official_figures(golden, tmp_path):
    d, _, _ = golden
    proc = subprocess.run(
        [sys.executable, "-m", "timeexpert.eval.nextgqa", "--gt", str(d / "gt_gsub.json"),
         "--gt-qa", str(d / "gt_qa.csv"), "--pred", str(d / "pred_degenerate_ground_gs.json"),
         "--pred-qa", str(d / "pred_degenerate_qa.json"), "--gs"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    official = _load(d, "official_metrics_degenerate.json")
    for key in GROUNDING_FIGURES:
        assert out[key] == pytest.approx(official["ground_gs"]["derived_percent"][key], abs=1e-9)
    assert out["Acc@QA"] == pytest.approx(40.0)
    assert out["num_missing_spans"] == 3 and out["missing_span_rate"] == pytest.approx(0.2)


# --- hand-computed cases ------------------------------------------------------------------------


def test_iou_iop_by_hand():
    assert span_iou_iop([0, 10], [5, 15]) == pytest.approx((5 / 15, 5 / 10))
    assert span_iou_iop([10, 20], [-5, 100]) == pytest.approx((10 / 105, 10 / 105))  # no clipping
    assert span_iou_iop([0, 10], [4, 4]) == (0.0, 1.0)  # a point inside: IoP 1
    assert span_iou_iop([0, 10], [10, 10]) == (0.0, 1.0)  # at the end point, inclusive
    assert span_iou_iop([0, 10], [11, 11]) == (0.0, 0.0)
    iou, iop = span_iou_iop([0, 10], [8, 2])  # reversed: negative overlap, kept out by the max
    assert iou < 0 and iop == 0.0


def test_several_gt_segments_take_independent_maxima_not_the_union():
    gt = {"v": {"duration": 60, "location": {"0": [[40.0, 45.0], [50.0, 55.0]]}}}
    row = per_question(gt, {"v_0": [40.0, 55.0]})[0]
    assert row["max_tIoU"] == pytest.approx(1 / 3) and row["max_tIoP"] == pytest.approx(1 / 3)
    # a short span inside one segment and a long one: the maxima come from different segments
    gt = {"v": {"duration": 60, "location": {"0": [[0.0, 4.0], [10.0, 30.0]]}}}
    row = per_question(gt, {"v_0": [2.0, 12.0]})[0]
    assert row["max_tIoU"] == pytest.approx(2 / 12)  # against [0, 4]: 2 / 12; [10, 30]: 2 / 28
    assert row["max_tIoP"] == pytest.approx(2 / 10)


def test_missing_span_official_skips_strict_counts_zero():
    gt = {"v": {"duration": 20, "location": {"0": [[0.0, 10.0]], "1": [[10.0, 20.0]]}}}
    qa = {"v_0": {"prediction": 1, "answer": 1}, "v_1": {"prediction": 0, "answer": 2}}
    spans = {"v_0": [0.0, 10.0], "other_9": [1.0, 2.0]}  # v_1 missing, an unknown key ignored
    official = score_nextgqa(gt, spans, qa)
    assert official["mIoU"] == 100.0 and official["Acc@GQA"] == 100.0 and official["num_scored"] == 1
    assert official["Acc@QA"] == 50.0 and official["missing_span_rate"] == 0.5
    strict = score_nextgqa(gt, spans, qa, mode="strict")
    assert strict["mIoU"] == 50.0 and strict["IoU@0.5"] == 50.0 and strict["Acc@GQA"] == 50.0


def test_gs_spans_are_scaled_by_duration_and_rounded():
    gt = {"v": {"duration": 30, "location": {"0": [[0.0, 10.0]]}}}
    row = per_question(gt, {"v_0": [0.0, 0.33335]}, gs=True)[0]  # 10.0005 -> 10.0
    assert row["span"] == [0.0, 10.0] and row["max_tIoU"] == 1.0


def test_strict_checks_answers_against_the_csv():
    gt = {"v": {"duration": 20, "location": {"0": [[0.0, 10.0]]}}}
    rows = [{"video_id": "v", "qid": "0", "type": "CW", "answer": "b", "a0": "a", "a1": "b", "a2": "c",
             "a3": "d", "a4": "e"}]
    qa = {"v_0": {"prediction": 3, "answer": 3}}  # the file's own answer disagrees with the csv
    assert score_nextgqa(gt, {"v_0": [0, 10]}, qa, rows)["Acc@QA"] == 100.0
    assert score_nextgqa(gt, {"v_0": [0, 10]}, qa, rows, mode="strict")["Acc@QA"] == 0.0


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    gt = {"v": {"duration": 20, "location": {"0": [[0.0, 10.0]]}}}
    with pytest.raises(ValueError, match=r"'v_0'.*\[start, end\]"):
        score_nextgqa(gt, {"v_0": [1, 2, 3]})
    with pytest.raises(ValueError, match="no span prediction matches"):
        score_nextgqa(gt, {"w_0": [1, 2]})
    with pytest.raises(ValueError, match=r"mode must be one of \['official', 'strict'\], got 'lenient'"):
        score_nextgqa(gt, {"v_0": [1, 2]}, mode="lenient")
    with pytest.raises(ValueError, match="GT video 'v'"):
        score_nextgqa({"v": [1, 2]}, {"v_0": [1, 2]})
    with pytest.raises(ValueError, match="type 'XX'"):
        score_nextgqa(gt, {"v_0": [1, 2]}, {"v_0": {"prediction": 0, "answer": 0}},
                      [{"video_id": "v", "qid": "0", "type": "XX"}])
    assert nextgqa.main(["--gt", str(tmp_path / "absent.json"), "--pred", str(tmp_path / "p.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert nextgqa.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
