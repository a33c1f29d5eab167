"""DVC metrics: hand-computed localization cases, SODA's DP, and METEOR/CIDEr/SODA_c against a
direct transcription of the official loops on pycocoevalcap's own scorers."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from timeexpert.eval import dvc
from timeexpert.eval.dvc import eval_dvc, official_iou, soda_dp

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
    p, rc = r["Precision"], r["Recall"]
    assert r["F1"] == pytest.approx(2 * p * rc / (p + rc))
    assert r["num_missing"] == 1 and r["num_videos"] == 3


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


def _official_reference(gt, pred, tious):
    """densevid_eval 2018 `evaluate_tiou` and fujiso/SODA type c, on pycocoevalcap's scorers."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok, meteor, res_all = PTBTokenizer(), Meteor(), pred["results"]
    out = {"METEOR": [], "CIDEr": []}
    for t in tious:
        cur_res, cur_gts, vid2ids, uid = {}, {}, {}, 0
        for vid in gt:
            vid2ids[vid] = []
            for p in res_all.get(vid, []):
                added = False
                for ci, ts in enumerate(gt[vid]["timestamps"]):
                    if official_iou([p["timestamp"]], [ts])[0, 0] >= t:
                        cur_res[uid] = [{"caption": dvc.remove_nonascii(p["sentence"])}]
                        cur_gts[uid] = [{"caption": dvc.remove_nonascii(gt[vid]["sentences"][ci])}]
                        vid2ids[vid].append(uid)
                        uid, added = uid + 1, True
                if not added:
                    cur_res[uid] = [{"caption": dvc.remove_nonascii(p["sentence"])}]
                    cur_gts[uid] = [{"caption": "abc123!@#"}]
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
    # SODA c
    total, n_g, n_p = 0.0, 0, 0
    for vid in gt:
        gts = sorted(zip(gt[vid]["timestamps"], gt[vid]["sentences"]), key=lambda x: x[0][0])
        ps = sorted(res_all.get(vid, []), key=lambda x: x["timestamp"][0])
        n_g += len(gts)
        n_p += len(ps)
        if not ps:
            continue
        pt = tok.tokenize({i: [{"caption": dvc.remove_nonascii(p["sentence"])}] for i, p in enumerate(ps)})
        gtt = tok.tokenize({i: [{"caption": dvc.remove_nonascii(s)}] for i, (_, s) in enumerate(gts)})
        res = {i: pt[i] for i in range(len(ps))}
        scores = np.array([meteor.compute_score(res, {i: gtt[gi] for i in range(len(ps))})[1]
                           for gi in range(len(gts))])
        iou = official_iou([g[0] for g in gts], [p["timestamp"] for p in ps])
        total += _soda_bruteforce(iou * scores)
    prec, rec = total / n_p, total / n_g
    return {"METEOR": np.mean(out["METEOR"]), "CIDEr": np.mean(out["CIDEr"]),
            "SODA_c": 100 * 2 * prec * rec / (prec + rec)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java")
def test_caption_metrics_match_official_loops(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "pred.json").write_text(json.dumps(PRED))
    assert dvc.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]) == 0
    ours = json.loads(capsys.readouterr().out)
    ref = _official_reference(GT, PRED, dvc.DVC_TIOUS)
    for key in ("METEOR", "CIDEr", "SODA_c"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert 0 < ours["SODA_c"] < 100 and ours["METEOR"] > 0
