"""DVC metrics: hand-computed cases of each protocol (F1, the unmatched reference of METEOR,
SODA_c per video, windows written end-first), SODA's DP, and METEOR/CIDEr/SODA_c against a direct
transcription of the official loops on pycocoevalcap's own scorers."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import string

import numpy as np
import pytest

from timeexpert.eval import dvc
from timeexpert.eval.dvc import eval_dvc, official_iou, soda_dp

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java")

GT = {
    "v1": {"duration": 30, "timestamps": [[10, 30], [0, 10]],
           "sentences": ["He cuts some onions.", "A man talks to the camera."]},
    "v2": {"duration": 20, "timestamps": [[0, 20]], "sentences": ["a dog runs in a park"]},
    "v3": {"duration": 20, "timestamps": [[0, 5]], "sentences": ["someone sings"]},
}
PRED = {"results": {
    "v1": [{"timestamp": [0, 10], "sentence": "a man talks to the camera"},
           {"timestamp": [12, 30], "sentence": "he cuts onions"}],
    "v2": [{"timestamp": [5, 20], "sentence": "a cat sleeps"},
           {"timestamp": [0, 3], "sentence": "a dog runs"}],
    # v3 missing: counts as an empty prediction
}}


def test_localization_hand_computed():
    r = eval_dvc(GT, PRED, captions=False)
    # tIoU 0.5: v1 P=1 R=1 ; v2 [5,20] vs [0,20] IoU .75 -> P=1/2 R=1 ; v3 missing P=R=0
    assert r["Precision@0.5"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert r["Recall@0.5"] == pytest.approx(100 * 2 / 3)
    # tIoU 0.9: [12,30] vs [10,30] IoU exactly 0.9 is not > 0.9
    assert r["Precision@0.9"] == pytest.approx(100 * 0.5 / 3)
    # per video over tIoU .3/.5/.7/.9: v1 P = R = (1+1+1+.5)/4 = .875, F1 .875;
    # v2 P = (.5+.5+.5+0)/4 = .375, R = (1+1+1+0)/4 = .75, F1 = 2(.375)(.75)/1.125 = .5; v3 0
    assert r["F1"] == pytest.approx(100 * (0.875 + 0.5 + 0) / 3)  # timechat: mean of per-video F1
    assert r["Precision"] == pytest.approx(100 * 1.25 / 3) and r["Recall"] == pytest.approx(100 * 1.625 / 3)
    assert r["num_missing"] == 1 and r["num_videos"] == 3
    d = eval_dvc(GT, PRED, captions=False, protocol="densevid")
    # densevid: F1 of the averaged P = 1.25/3, R = 1.625/3: 2(1.25)(1.625)/(3 x 2.875)
    assert d["F1"] == pytest.approx(100 * 4.0625 / 8.625)
    assert (d["Precision"], d["Recall"]) == pytest.approx((r["Precision"], r["Recall"]))


def test_f1_per_video_vs_of_averages():
    gt = {
        "a": {"duration": 30, "timestamps": [[0, 10]], "sentences": ["x"]},
        "b": {"duration": 90, "timestamps": [[0, 10], [10, 20]], "sentences": ["x", "y"]},
        "c": {"duration": 30, "timestamps": [[0, 10]], "sentences": ["x"]},  # nothing matches
    }
    pred = {"results": {
        "a": [{"timestamp": [0, 10], "sentence": "x"}],
        "b": [{"timestamp": w, "sentence": "x"} for w in ([0, 10], [30, 40], [50, 60], [70, 80])],
        "c": [{"timestamp": [20, 30], "sentence": "x"}],
    }}
    # at tIoU .5: a P = R = 1, F1 1; b P = 1/4, R = 1/2, F1 = 2(1/8)/(3/4) = 1/3; c P = R = F1 = 0
    tc = eval_dvc(gt, pred, tious=[0.5], captions=False)
    assert tc["F1"] == pytest.approx(100 * (1 + 1 / 3 + 0) / 3)  # 44.44
    assert tc["F1@0.5"] == pytest.approx(tc["F1"])
    # P = (1 + 1/4 + 0)/3 = 5/12, R = (1 + 1/2 + 0)/3 = 1/2: F1 = (5/12)/(11/12) = 5/11 (45.45)
    dv = eval_dvc(gt, pred, tious=[0.5], captions=False, protocol="densevid")
    assert dv["F1"] == pytest.approx(100 * 5 / 11) and dv["F1@0.5"] == pytest.approx(dv["F1"])
    assert tc["Precision"] == dv["Precision"] == pytest.approx(100 * 5 / 12)


def test_end_first_windows_and_proposal_cap_by_protocol():
    gt = {"a": {"duration": 30, "timestamps": [[0, 10], [10, 20]], "sentences": ["x", "y"]}}
    pred = {"results": {"a": [{"timestamp": [20, 10], "sentence": "y"},
                              {"timestamp": [0, 10], "sentence": "x"}]}}
    # TimeChat's iou reads [20, 10] as [10, 20]: both predictions and events covered
    assert eval_dvc(gt, pred, tious=[0.5], captions=False)["F1"] == pytest.approx(100.0)
    # densevid_eval takes it as written: min(20, 10) - max(10, 20) < 0, no overlap; P = R = 1/2
    assert eval_dvc(gt, pred, tious=[0.5], captions=False, protocol="densevid")["F1"] == pytest.approx(50.0)
    # densevid_eval keeps the first 1000 proposals of a video, TimeChat all of them
    many = {"results": {"a": [{"timestamp": [25, 30], "sentence": "z"}] * 1000
                        + [{"timestamp": [0, 10], "sentence": "x"}]}}
    assert eval_dvc(gt, many, tious=[0.5], captions=False)["Precision"] == pytest.approx(100 / 1001)
    assert eval_dvc(gt, many, tious=[0.5], captions=False, protocol="densevid")["Precision"] == 0.0


def test_unknown_protocol_is_an_error():
    with pytest.raises(ValueError, match="timechat"):
        eval_dvc(GT, PRED, captions=False, protocol="pdvc")


@pytest.mark.parametrize("preds, expected", [
    ({"results": {"a": [{"timestamp": [0, 10], "sentence": "x"}]}}, (100.0, 100.0)),  # perfect
    ({"results": {}}, (0.0, 0.0)),  # empty
    ({"results": {"a": [{"timestamp": [20, 30], "sentence": "x"}]}}, (0.0, 0.0)),  # disjoint
    ({"results": {"a": [{"timestamp": [0, 10], "sentence": "x"}] * 4}}, (100.0, 100.0)),  # dups
    ({"results": {"a": [{"timestamp": [0, 10], "sentence": "x"},
                        {"timestamp": [40, 50], "sentence": "y"}]}}, (50.0, 100.0)),
])
def test_localization_cases(preds, expected):
    gt = {"a": {"duration": 60, "timestamps": [[0, 10]], "sentences": ["x"]}}
    r = eval_dvc(gt, preds, tious=[0.5], captions=False)
    assert (r["Precision"], r["Recall"]) == pytest.approx(expected)


def test_official_iou_eps_at_threshold():
    assert official_iou([[0, 5]], [[0, 10]])[0, 0] < 0.5 <= official_iou([[0, 5]], [[0, 10]], False)[0, 0]
    # the official denominator is the span: [0.6, 3.0] vs [1.2, 4.2] is 1.8 / 3.6 = 0.5 exactly in
    # float64 (3.6 is 2 x 1.8), where 2.4 + 3.0 - 1.8 = 3.6000000000000005 would give 0.49999999999999994
    assert official_iou([[0.6, 3.0]], [[1.2, 4.2]], False)[0, 0] == 0.5
    assert official_iou([[10, 0]], [[0, 10]])[0, 0] == 0.0  # end-first, as written: no overlap


# Captions made of content words only (no METEOR function word), so that, with alpha = 0.85 of
# METEOR 1.5's English parameters, a video's pooled METEOR is Fmean = P R / (0.85 P + 0.15 R),
# P = matched / hypothesis words, R = matched / reference words, when every matched pair is
# identical (an identical pair adds no fragmentation) and the others share no word.
A, B, T = "onions carrots potatoes", "guitar violin piano", "tomatoes peppers"
CAPTION_GT = {
    "m": {"duration": 30, "timestamps": [[0, 10]], "sentences": [A]},
    "n": {"duration": 30, "timestamps": [[0, 10]], "sentences": [B]},  # no matched prediction
    "e": {"duration": 30, "timestamps": [[0, 10], [10, 20]], "sentences": [A, B]},
}
CAPTION_PRED = {"results": {
    "m": [{"timestamp": [0, 10], "sentence": A}, {"timestamp": [20, 30], "sentence": T}],
    "n": [{"timestamp": [20, 30], "sentence": B}],
    "e": [{"timestamp": [20, 10], "sentence": B}, {"timestamp": [0, 10], "sentence": A}],  # end-first
}}


def _fmean(p, r):
    return p * r / (0.85 * p + 0.15 * r)


@pytest.fixture(scope="module")
def caption_scores():
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need java")
    return {protocol: eval_dvc(CAPTION_GT, CAPTION_PRED, tious=[0.5], protocol=protocol)
            for protocol in dvc.PROTOCOLS}


@pytest.mark.slow
def test_meteor_unmatched_reference_by_protocol(caption_scores):
    tc, dv = caption_scores["timechat"], caption_scores["densevid"]
    # m pairs (A, A) and (T, unmatched). timechat: a one-word random reference, so hypothesis
    # words 3 + 2, reference words 3 + 1: P = 3/5, R = 3/4, Fmean = .45 / (.51 + .1125) = .7229.
    # densevid: METEOR's -norm splits 'abc123!@#' into 4 tokens: R = 3/7, Fmean = .4478
    m_tc, m_dv = _fmean(3 / 5, 3 / 4), _fmean(3 / 5, 3 / 7)
    # n: its one prediction overlaps nothing, so it is scored against the unmatched reference: 0
    # e: timechat reads [20, 10] as [10, 20]: (B, B) and (A, A), METEOR 1; densevid: (B, unmatched)
    # and (A, A): P = 3/6, R = 3/7, Fmean = .4380
    e_dv = _fmean(3 / 6, 3 / 7)
    assert tc["METEOR"] == pytest.approx(100 * (m_tc + 0 + 1) / 3, abs=1e-9)  # 57.43
    assert dv["METEOR"] == pytest.approx(100 * (m_dv + 0 + e_dv) / 3, abs=1e-9)  # 29.52


@pytest.mark.slow
def test_soda_c_per_video_then_averaged_and_end_first_kept(caption_scores):
    # METEOR(GT caption, prediction) is 1 for identical captions, 0 for captions sharing no word.
    # m: the DP keeps ([0,10] A, [0,10] A): IoU 10/(10 + 1e-8) x 1 = 1; P = 1/2, R = 1/1, F = 2/3.
    # n: IoU 0, F = 0. e: the official SODA keeps [20, 10] as written (sorted by its start 20,
    # after [0, 10]; IoU 0 with [10, 20]), so the DP gets 1 from (A, A): P = R = F = 1/2.
    # Means over videos: F (2/3 + 0 + 1/2)/3 = 7/18, P (1/2 + 0 + 1/2)/3 = 1/3, R (1 + 0 + 1/2)/3
    # = 1/2. (Pooled over videos, P = 2/5, R = 2/4: F = 4/9; with [20, 10] swapped, F = 2/3.)
    for protocol, r in caption_scores.items():
        assert r["SODA_c"] == pytest.approx(100 * 7 / 18, rel=1e-6), protocol
        assert r["SODA_c-precision"] == pytest.approx(100 / 3, rel=1e-6), protocol
        assert r["SODA_c-recall"] == pytest.approx(50.0, rel=1e-6), protocol


def _soda_bruteforce(s):
    g, p = s.shape
    best = 0.0
    for k in range(1, min(g, p) + 1):
        for rows in itertools.combinations(range(g), k):
            for cols in itertools.combinations(range(p), k):
                best = max(best, sum(s[r, c] for r, c in zip(rows, cols)))
    return best


def test_soda_dp_equals_bruteforce():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.random((int(rng.integers(1, 5)), int(rng.integers(1, 5))))
        s[s < 0.4] = 0
        assert soda_dp(s) == pytest.approx(_soda_bruteforce(s))
    assert soda_dp(np.zeros((3, 0))) == 0.0


def _iou_as_official(i1, i2):
    """densevid_eval / SODA `iou`, transcribed (TimeChat's reads each window as [min, max] first)."""
    (s1, e1), (s2, e2) = i1, i2
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2)
    return inter / (union + 1e-8)


def _official_reference(gt, pred, tious, protocol):
    """densevid_eval 2018 `evaluate_tiou` (protocol densevid) or TimeChat's `match_captions` /
    `evaluate_caption_scores` (its own unseeded random references), and fujiso/SODA type c,
    on pycocoevalcap's scorers."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def read(w):
        return sorted(w) if protocol == "timechat" else w

    def unmatched():
        if protocol == "densevid":
            return "abc123!@#"
        return "".join(random.choice(string.ascii_lowercase) for _ in range(random.randint(10, 20)))

    tok, meteor, res_all = PTBTokenizer(), Meteor(), pred["results"]
    out = {"METEOR": [], "CIDEr": []}
    for t in tious:
        cur_res, cur_gts, vid2ids, uid = {}, {}, {}, 0
        for vid in gt:
            vid2ids[vid] = []
            for p in res_all.get(vid, []):
                added = False
                for ci, ts in enumerate(gt[vid]["timestamps"]):
                    if _iou_as_official(read(p["timestamp"]), read(ts)) >= t:
                        cur_res[uid] = [{"caption": dvc.remove_nonascii(p["sentence"])}]
                        cur_gts[uid] = [{"caption": dvc.remove_nonascii(gt[vid]["sentences"][ci])}]
                        vid2ids[vid].append(uid)
                        uid, added = uid + 1, True
                if not added:
                    cur_res[uid] = [{"caption": dvc.remove_nonascii(p["sentence"])}]
                    cur_gts[uid] = [{"caption": unmatched()}]
                    vid2ids[vid].append(uid)
                    uid += 1
        tr, tg = tok.tokenize(cur_res), tok.tokenize(cur_gts)
        for name, scorer in (("METEOR", meteor), ("CIDEr", Cider())):
            per_vid = []
            for vid in gt:
                ids = vid2ids[vid]
                per_vid.append(scorer.compute_score({i: tg[i] for i in ids}, {i: tr[i] for i in ids})[0]
                               if ids else 0)
            out[name].append(100 * np.mean(per_vid))
    # SODA c: `SODA.evaluate`, F-measure per video, then the mean
    f_v = []
    for vid in gt:
        gts = sorted(zip(gt[vid]["timestamps"], gt[vid]["sentences"]), key=lambda x: x[0][0])
        ps = sorted(res_all.get(vid, []), key=lambda x: x["timestamp"][0])
        if not ps:
            f_v.append(0.0)
            continue
        pt = tok.tokenize({i: [{"caption": dvc.remove_nonascii(p["sentence"])}] for i, p in enumerate(ps)})
        gtt = tok.tokenize({i: [{"caption": dvc.remove_nonascii(s)}] for i, (_, s) in enumerate(gts)})
        res = {i: pt[i] for i in range(len(ps))}
        scores = np.array([meteor.compute_score(res, {i: gtt[gi] for i in range(len(ps))})[1]
                           for gi in range(len(gts))])
        iou = np.array([[_iou_as_official(p["timestamp"], g[0]) for p in ps] for g in gts])
        best = _soda_bruteforce(iou * scores)
        prec, rec = best / len(ps), best / len(gts)
        f_v.append(2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0)
    return {"METEOR": np.mean(out["METEOR"]), "CIDEr": np.mean(out["CIDEr"]),
            "SODA_c": 100 * np.mean(f_v)}


@pytest.mark.slow
@needs_java
@pytest.mark.parametrize("protocol", dvc.PROTOCOLS)
def test_caption_metrics_match_official_loops(tmp_path, capsys, protocol):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "pred.json").write_text(json.dumps(PRED))
    argv = ["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]
    assert dvc.main(argv + ["--protocol", protocol]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["protocol"] == protocol
    random.seed(12345)  # a different draw from ours: the score does not depend on the letters
    ref = _official_reference(GT, PRED, dvc.DVC_TIOUS, protocol)
    for key in ("METEOR", "CIDEr", "SODA_c"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert 0 < ours["SODA_c"] < 100 and ours["METEOR"] > 0
