"""Trivial baselines and the one-call evaluator over canonical records, with the official writers."""

from __future__ import annotations

import json

import pytest

from timeexpert.eval import dvc, nextgqa
from timeexpert.eval.baselines import mean_normalised_interval, mr_baselines, trivial_baselines
from timeexpert.eval.evaluate import dvc_ground_truth, evaluate_predictions, write_predictions
from timeexpert.eval.metrics import load_jsonl
from timeexpert.events import Event, Record


def _mr(id_, dur, s, e, split="test"):
    return Record(id=id_, video=f"videos/{id_}.mp4", duration=dur, task="mr", query="q",
                  events=[Event(s, e)], split=split)


TRAIN = [_mr("a", 10, 2, 4, "train"), _mr("b", 10, 4, 6, "train")]


def test_mean_interval_hand_computed():
    assert mean_normalised_interval(TRAIN) == pytest.approx((0.3, 0.5))
    test = [_mr("t1", 20, 6, 10), _mr("t2", 20, 0, 2)]
    preds = mr_baselines(TRAIN, test)["mean_interval"]
    assert (preds["t1"][0].start, preds["t1"][0].end) == pytest.approx((6.0, 10.0))
    m = evaluate_predictions(test, preds, "mr")
    assert m["R1@0.7"] == 50.0 and m["mIoU"] == pytest.approx(50.0)
    assert m["mAP@0.5"] == 50.0 and m["parse_failure_rate"] == 0.0 and m["num_records"] == 2


def test_random_interval_is_seeded_and_inside_the_video():
    test = [_mr(f"t{i}", 30, 0, 5) for i in range(20)]
    a = mr_baselines(TRAIN, test, seed=3)["random_interval"]
    b = mr_baselines(TRAIN, test, seed=3)["random_interval"]
    c = mr_baselines(TRAIN, test, seed=4)["random_interval"]
    assert [(e[0].start, e[0].end) for e in a.values()] == [(e[0].start, e[0].end) for e in b.values()]
    assert [e[0].start for e in a.values()] != [e[0].start for e in c.values()]
    assert all(0 <= e[0].start <= e[0].end <= 30 for e in a.values())


def test_uniform_saliency_tie_handling():
    rec = Record(id="h", video="v.mp4", duration=8, task="vhd", query="q",
                 saliency=[0.0, 3.0, 0.0, 2.0], events=[Event(2, 4)])
    out = trivial_baselines([], [rec])
    u = out["vhd/uniform_saliency"]
    assert u["HL-min-Fair-mAP"] == pytest.approx(50.0)  # all tied: AP = fraction positive
    assert u["HL-min-Good-mAP"] == pytest.approx(25.0)
    assert u["HL-min-Fair-Hit1"] == 0.0  # argmax of a constant = clip 0, not salient
    assert "vhd/mean_interval" in out


def test_dvc_baselines_localization():
    def rec(id_, dur, events, split="test"):
        return Record(id=id_, video=f"{id_}.mp4", duration=dur, task="dvc", query="",
                      events=events, split=split)

    train = [rec("tr", 10, [Event(0, 5, caption="a man talks"), Event(5, 10, caption="a man talks")],
                 "train")]
    test = [rec("x", 20, [Event(0, 20, caption="someone cooks")]),
            rec("y", 20, [Event(0, 10, caption="a"), Event(10, 20, caption="b")])]
    out = trivial_baselines(train, test, captions=False)
    assert out["dvc/single_event"]["Precision@0.9"] == pytest.approx(50.0)  # x hit, y miss
    assert out["dvc/uniform_k"]["Recall@0.9"] == pytest.approx(50.0)  # k=2: y hit, x miss


class _Prediction:
    def __init__(self, events, saliency=None, text=""):
        self.events, self.saliency, self.text, self.num_tokens = events, saliency, text, 0


def test_evaluate_predictions_accepts_every_form_and_reports_failures():
    test = [_mr("t1", 20, 6, 10), _mr("t2", 20, 0, 2), _mr("t3", 20, 0, 2), _mr("t4", 20, 0, 2)]
    preds = {
        "t1": "The moment happens from 6.0s to 10.0s.",
        "t2": _Prediction([Event(0, 2, 0.9)]),
        "t3": "I don't know.",
        # t4 missing
    }
    m = evaluate_predictions(test, preds)
    # t3's answer is unparsable, t4 has none: each its own 25%
    assert m["R1@0.5"] == 50.0 and m["parse_failure_rate"] == 25.0 and m["no_answer_rate"] == 25.0
    with pytest.raises(ValueError, match="no 'dvc' records"):
        evaluate_predictions(test, preds, "dvc")


def test_writers_produce_files_the_official_scorers_read(tmp_path):
    test = [_mr("17", 20, 6, 10)]
    path = write_predictions(test, {"17": [Event(6, 10, 0.5), Event(0, 3)]}, "mr", tmp_path / "p.jsonl")
    (row,) = load_jsonl(path)
    assert row["qid"] == 17 and row["vid"] == "17"
    assert row["pred_relevant_windows"] == [[6, 10, 0.5], [0, 3, 1.0 / 2]]

    recs = [Record(id="v1", video="v1.mp4", duration=20, task="dvc", query="",
                   events=[Event(0, 10, caption="a man talks")])]
    preds = {"v1": "0.0 - 10.0 seconds, a man talks."}
    path = write_predictions(recs, preds, "dvc", tmp_path / "dvc.json")
    official = dvc.eval_dvc(dvc_ground_truth(recs), json.loads(path.read_text()), captions=False)
    ours = evaluate_predictions(recs, preds, captions=False)
    assert official["F1"] == ours["F1"] == 100.0


def test_frame_grid_ceiling_snaps_to_segment_boundaries():
    from timeexpert.eval.baselines import frame_grid_ceiling

    # 4 segments of 5 s: [6, 9] snaps to [5, 10] (IoU 0.6), [0, 2] to [0, 0] (empty: a miss)
    test = [_mr("t1", 20, 6, 9), _mr("t2", 20, 0, 2)]
    out = frame_grid_ceiling(test, num_frames=4)["mr/frame_grid"]
    assert out["R1@0.5"] == 50.0 and out["R1@0.7"] == 0.0
    fine = frame_grid_ceiling(test, num_frames=200)["mr/frame_grid"]  # 0.1 s segments: exact
    assert fine["R1@0.7"] == 100.0 and fine["mIoU"] == pytest.approx(100.0)
    dvc_rec = Record(id="d", video="d.mp4", duration=20, task="dvc", query="",
                     events=[Event(0, 10, caption="a"), Event(12, 19, caption="b")])
    d = frame_grid_ceiling([dvc_rec], num_frames=4)["dvc/frame_grid"]  # [0,10] exact, [10,20] 0.7
    assert d["Recall@0.5"] == 100.0 and d["Recall@0.9"] == 50.0
    with pytest.raises(ValueError, match="num_frames"):
        frame_grid_ceiling(test, num_frames=0)


def _qa(id_, answer, options=("red", "blue", "green", "cyan"), span=(2.0, 6.0), split="test"):
    return Record(id=id_, video=f"videos/{id_}.mp4", duration=20.0, task="gqa",
                  query="what colour is the circle that grows?", events=[Event(*span)],
                  options=list(options), answer=answer, split=split)


def test_gqa_scores_hand_computed_and_the_baselines():
    """Acc@QA, Acc@GQA (right option and IoP >= 0.5), IoU / IoP of the answer's first span;
    an unparsed answer stays in every denominator."""
    test = [_qa("q1", 0), _qa("q2", 1), _qa("q3", 2), _qa("q4", 3)]
    preds = {
        "q1": [Event(2.0, 6.0, caption="red")],  # right, exact span
        "q2": [Event(3.0, 5.0, caption="The answer is blue.")],  # right, IoP 1, IoU 0.5
        "q3": [Event(0.0, 20.0, caption="green")],  # right option, IoP 0.2: not grounded
        "q4": "I do not know",  # no span, no option
    }
    m = evaluate_predictions(test, preds, "gqa")
    assert m["Acc@QA"] == 75.0 and m["Acc@GQA"] == 50.0
    assert m["mIoU"] == pytest.approx((100 + 50 + 20 + 0) / 4)
    assert m["mIoP"] == pytest.approx((100 + 100 + 20 + 0) / 4)
    assert m["IoU@0.5"] == 50.0 and m["parse_failure_rate"] == 25.0 and m["num_records"] == 4
    train = [_qa("t1", 1, split="train"), _qa("t2", 1, split="train"), _qa("t3", 0, split="train")]
    base = trivial_baselines(train, test)
    # "blue" is the train split's most frequent answer: right on q2 only
    assert base["gqa/most_frequent_option"]["Acc@QA"] == 25.0
    assert base["gqa/whole_video"]["Acc@QA"] == 25.0
    assert base["gqa/whole_video"]["mIoP"] == pytest.approx(100 * 4 / 20)
    assert 0.0 <= base["gqa/random_option"]["Acc@QA"] <= 100.0


def test_gqa_predictions_written_for_the_nextgqa_scorer(tmp_path):
    test = [_qa("q1", 0), _qa("q2", 1)]
    preds = {"q1": [Event(2.0, 6.0, caption="red")], "q2": [Event(10.0, 12.0, caption="red")]}
    path = write_predictions(test, preds, "gqa", tmp_path / "ground.json")
    spans = json.loads(path.read_text())
    answers = json.loads((tmp_path / "ground_qa.json").read_text())
    assert spans == {"q1_0": [2.0, 6.0], "q2_0": [10.0, 12.0]}
    assert answers == {"q1_0": {"prediction": 0, "answer": 0}, "q2_0": {"prediction": 0, "answer": 1}}
    gt = {r.id: {"duration": r.duration, "location": {"0": [[2.0, 6.0]]}} for r in test}
    official = nextgqa.score_nextgqa(gt, spans, answers)
    ours = evaluate_predictions(test, preds, "gqa")
    assert official["Acc@GQA"] == ours["Acc@GQA"] == 50.0 and official["mIoU"] == ours["mIoU"]
