"""Dense video captioning metrics and CLI: localization P/R/F1, METEOR, CIDEr and SODA_c.

    python -m timeexpert.eval.dvc --gt val_1.json --pred submission.json

Ground truth: ActivityNet Captions / YouCook2 json ``{vid: {"duration", "timestamps": [[s, e]...],
"sentences": [...]}}``. Predictions: the ActivityNet challenge json ``{"results": {vid:
[{"timestamp": [s, e], "sentence": "..."}, ...]}}`` (a bare ``{vid: [...]}`` is accepted too).

References and conventions (all figures in percent):

- Localization precision/recall at tIoU 0.3/0.5/0.7/0.9: the ActivityNet dense-captioning
  evaluator (ranjaykrishna/densevid_eval `evaluate.py`, 2018 version, `evaluate_detection`): per
  video, a prediction (ground truth) is covered when some ground truth (prediction) has IoU >
  tIoU (strict); precision and recall are averaged over the GT videos, then over tIoUs. F1 is
  2PR/(P+R) of the averaged P and R (as PDVC reports it).
- METEOR and CIDEr: the same evaluator's `evaluate_tiou`: every prediction is paired with each GT
  caption of IoU >= tIoU, or with the garbage reference 'abc123!@#' when none; the scorer runs per
  video on that video's pairs, videos are averaged, then tIoUs. pycocoevalcap's PTB tokenizer,
  METEOR 1.5 jar and CIDEr (IDF over the video's own pairs, as the official per-video call).
- SODA_c: fujiso/SODA `soda.py` type "c": predictions and GT sorted by start, the DP alignment
  maximising the sum of IoU x METEOR, F1 of (sum / #predictions, sum / #GT) over the whole set.
  The official code scores METEOR with the GT caption as hypothesis and the prediction as
  reference (its `compute_score(res, gt)` argument order); we keep that so the numbers match. The
  official code prints precision and recall swapped; F1 is symmetric, ours are labelled right.
- IoU: `events.temporal_iou`, adjusted by the official evaluators' 1e-8 in the denominator, so a
  pair exactly at the threshold (IoU 0.5 vs tIoU 0.5) is a miss as there (`official_eps=False` for
  plain IoU).
- Missing videos count as empty predictions (P = R = METEOR = CIDEr = 0 for that video, its GT
  events in SODA's denominator); the official evaluators drop them or fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from timeexpert.events import temporal_iou

DVC_TIOUS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
GARBAGE_REFERENCE = "abc123!@#"  # densevid_eval's reference for a prediction that matches nothing
_PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                     ":", "-", "--", "...", ";"}  # pycocoevalcap PTBTokenizer


def remove_nonascii(text: str) -> str:
    """densevid_eval / SODA: non-ASCII characters become spaces before tokenization."""
    return "".join(c if ord(c) < 128 else " " for c in text)


def official_iou(pred_P2: Any, gt_G2: Any, official_eps: bool = True) -> np.ndarray:
    """`temporal_iou` with densevid_eval's `inter / (union + 1e-8)` when `official_eps`."""
    pred_P2 = np.asarray(pred_P2, dtype=np.float64).reshape(-1, 2)
    gt_G2 = np.asarray(gt_G2, dtype=np.float64).reshape(-1, 2)
    iou = temporal_iou(pred_P2, gt_G2)
    if not official_eps:
        return iou
    lengths = (pred_P2[:, 1] - pred_P2[:, 0])[:, None] + (gt_G2[:, 1] - gt_G2[:, 0])[None, :]
    union = lengths / (1.0 + iou)  # union = la + lb - inter and inter = iou * union
    return np.divide(iou * union, union + 1e-8, out=np.zeros_like(iou), where=union > 0)


# --- java scorers from pycocoevalcap ------------------------------------------------------------


def _pycocoevalcap_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pycocoevalcap is not installed; pip install pycocoevalcap==1.2")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (lower-cased, punctuation removed), one java run for all.

    Same jar, flags and punctuation list as `PTBTokenizer.tokenize`; empty sentences stay empty
    (the java tokenizer would drop their line and shift every later sentence).
    """
    unique = sorted({s.replace("\n", " ") for s in sentences if s.strip()})
    if not unique:
        return ["" for _ in sentences]
    jar_dir = _pycocoevalcap_dir() / "tokenizer"
    cmd = ["java", "-cp", "stanford-corenlp-3.4.1.jar", "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase"]
    proc = subprocess.run(cmd, cwd=jar_dir, input="\n".join(unique).encode(), capture_output=True)
    lines = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(lines) < len(unique):
        raise RuntimeError(f"PTB tokenizer failed (rc {proc.returncode}): {proc.stderr.decode()[-500:]}")
    table = {
        s: " ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATIONS)
        for s, line in zip(unique, lines)
    }
    return [table.get(s.replace("\n", " "), "") for s in sentences]


class Meteor:
    """One METEOR 1.5 process (pycocoevalcap's jar and flags), pipelined, closed on exit.

    `score_groups` returns per group what pycocoevalcap's `Meteor.compute_score` returns for it
    (the aggregate over the group's segments, and each segment's score), but sends every line of
    every group in one stream instead of one round trip per segment.
    """

    def __init__(self) -> None:
        cmd = ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self._proc = subprocess.Popen(cmd, cwd=_pycocoevalcap_dir() / "meteor", stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "Meteor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()

    def _exchange(self, lines: list[str], replies: int) -> list[str]:
        def write() -> None:
            for line in lines:
                self._proc.stdin.write((line + "\n").encode())
            self._proc.stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        out = []
        for _ in range(replies):
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("METEOR process ended early (is java 8+ installed?)")
            out.append(line.decode().strip())
        writer.join()
        return out

    def score_groups(
        self, groups: Sequence[Sequence[tuple[str, Sequence[str]]]]
    ) -> list[tuple[float, list[float]]]:
        """groups of (hypothesis, references) -> [(aggregate, [segment scores])] per group."""
        pairs = [p for g in groups for p in g]
        if not pairs:
            return [(0.0, []) for _ in groups]
        score_lines = []
        for hyp, refs in pairs:
            hyp = hyp.replace("|||", "").replace("  ", " ")
            score_lines.append(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)))
        stats = self._exchange(score_lines, len(score_lines))
        eval_lines, replies, k = [], 0, 0
        for g in groups:
            if g:
                eval_lines.append("EVAL ||| " + " ||| ".join(stats[k : k + len(g)]))
                replies += len(g) + 1
            k += len(g)
        values = [float(v) for v in self._exchange(eval_lines, replies)]
        out, k = [], 0
        for g in groups:
            if not g:
                out.append((0.0, []))
                continue
            out.append((values[k + len(g)], values[k : k + len(g)]))
            k += len(g) + 1
        return out


def cider(pairs: Sequence[tuple[str, Sequence[str]]]) -> float:
    """pycocoevalcap `Cider().compute_score` over (hypothesis, references) pairs (IDF over them)."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: list(refs) for i, (_, refs) in enumerate(pairs)}
    res = {i: [hyp] for i, (hyp, _) in enumerate(pairs)}
    return float(Cider().compute_score(gts, res)[0])


# --- the metrics --------------------------------------------------------------------------------


def soda_dp(score_GP: np.ndarray) -> float:
    """SODA's `chased_dp_assignment` value: max sum of scores over order-preserving 1-1 pairings.

    dp[i, j] = max(dp[i-1, j], dp[i, j-1], dp[i-1, j-1] + s[i, j]), one row at a time with a
    running maximum.
    """
    num_g, num_p = score_GP.shape
    if num_g == 0 or num_p == 0:
        return 0.0
    prev = np.zeros(num_p + 1)  # dp of the previous row, with a 0 column in front
    for i in range(num_g):
        cand = np.maximum(prev[1:], prev[:-1] + score_GP[i])
        prev = np.r_[0.0, np.maximum.accumulate(cand)]
    return float(prev[-1])


def _normalize_predictions(pred: Mapping[str, Any], max_proposals: int) -> dict[str, list[dict]]:
    results = pred.get("results", pred) if isinstance(pred, Mapping) else None
    if not isinstance(results, Mapping):
        raise ValueError("DVC predictions must be {'results': {vid: [{'timestamp', 'sentence'}]}}")
    out = {}
    for vid, items in results.items():
        rows = []
        for item in list(items)[:max_proposals]:
            s, e = (float(x) for x in item["timestamp"])
            rows.append({"timestamp": [min(s, e), max(s, e)], "sentence": str(item.get("sentence", ""))})
        out[str(vid)] = rows
    return out


def eval_dvc(
    ground_truth: Mapping[str, Mapping[str, Any]],
    predictions: Mapping[str, Any],
    tious: Sequence[float] = DVC_TIOUS,
    max_proposals: int = 1000,
    captions: bool = True,
    official_eps: bool = True,
) -> dict[str, float]:
    """All DVC metrics (percent): Precision/Recall/F1, METEOR, CIDEr, SODA_c, and per-tIoU figures.

    `captions=False` skips METEOR/CIDEr/SODA_c (no java needed). Conventions in the module doc.
    """
    if not ground_truth:
        raise ValueError("DVC ground truth is empty")
    preds = _normalize_predictions(predictions, max_proposals)
    vids = list(ground_truth)
    gts = {}
    for vid in vids:
        g = ground_truth[vid]
        if len(g["timestamps"]) != len(g["sentences"]):
            raise ValueError(
                f"video {vid!r}: {len(g['timestamps'])} timestamps but {len(g['sentences'])} sentences"
            )
        gts[vid] = ([[float(a), float(b)] for a, b in g["timestamps"]], [str(s) for s in g["sentences"]])
    ious = {
        vid: official_iou([p["timestamp"] for p in preds.get(vid, [])], gts[vid][0], official_eps)
        for vid in vids
    }
    out: dict[str, float] = {}
    prec_T, rec_T = [], []
    for t in tious:
        p_v, r_v = [], []
        for vid in vids:
            iou_PG = ious[vid]
            covered = iou_PG > t
            p_v.append(covered.any(axis=1).mean() if iou_PG.shape[0] else 0.0)
            r_v.append(covered.any(axis=0).mean() if iou_PG.shape[1] and iou_PG.shape[0] else 0.0)
        prec_T.append(100 * float(np.mean(p_v)))
        rec_T.append(100 * float(np.mean(r_v)))
        out[f"Precision@{t:g}"], out[f"Recall@{t:g}"] = prec_T[-1], rec_T[-1]
        out[f"F1@{t:g}"] = _f1(prec_T[-1], rec_T[-1])
    out["Precision"], out["Recall"] = float(np.mean(prec_T)), float(np.mean(rec_T))
    out["F1"] = _f1(out["Precision"], out["Recall"])
    out["num_videos"] = len(vids)
    out["num_missing"] = sum(vid not in preds for vid in vids)
    if captions:
        out.update(_caption_metrics(vids, gts, preds, ious, tious))
    return out


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _caption_metrics(vids, gts, preds, ious, tious) -> dict[str, float]:
    sentences = [GARBAGE_REFERENCE]
    for vid in vids:
        sentences += gts[vid][1] + [p["sentence"] for p in preds.get(vid, [])]
    tokenized = dict(zip(sentences, ptb_tokenize([remove_nonascii(s) for s in sentences])))
    garbage = tokenized[GARBAGE_REFERENCE]
    out: dict[str, float] = {}
    with Meteor() as meteor:
        # densevid_eval pairs per (tIoU, video)
        groups, cider_T = [], []
        for t in tious:
            cider_v = []
            for vid in vids:
                pairs = []
                for p, pred in enumerate(preds.get(vid, [])):
                    hyp = tokenized[pred["sentence"]]
                    matched = np.nonzero(ious[vid][p] >= t)[0]
                    refs = [tokenized[gts[vid][1][g]] for g in matched] or [garbage]
                    # one pair per matched GT caption, as the official loop appends them
                    pairs += [(hyp, [r]) for r in refs]
                groups.append(pairs)
                cider_v.append(100 * cider(pairs) if pairs else 0.0)
            cider_T.append(float(np.mean(cider_v)))
        meteor_scores = meteor.score_groups(groups)
        n = len(vids)
        meteor_T = [100 * float(np.mean([s for s, _ in meteor_scores[i * n : (i + 1) * n]]))
                    for i in range(len(tious))]
        for t, m, c in zip(tious, meteor_T, cider_T):
            out[f"METEOR@{t:g}"], out[f"CIDEr@{t:g}"] = m, c
        out["METEOR"], out["CIDEr"] = float(np.mean(meteor_T)), float(np.mean(cider_T))
        out.update(_soda_c(vids, gts, preds, tokenized, meteor))
    return out


def _soda_c(vids, gts, preds, tokenized, meteor: Meteor) -> dict[str, float]:
    """fujiso/SODA type c over all videos: one METEOR batch for every (GT, prediction) pair."""
    groups, shapes, iou_mats = [], [], []
    for vid in vids:
        g_order = sorted(range(len(gts[vid][0])), key=lambda i: gts[vid][0][i][0])
        p_list = sorted(preds.get(vid, []), key=lambda p: p["timestamp"][0])
        g_caps = [tokenized[gts[vid][1][i]] for i in g_order]
        p_caps = [tokenized[p["sentence"]] for p in p_list]
        # official argument order: the GT caption is the hypothesis, the prediction the reference
        groups.append([(g, [p]) for g in g_caps for p in p_caps])
        shapes.append((len(g_caps), len(p_caps)))
        iou_mats.append(
            official_iou([gts[vid][0][i] for i in g_order], [p["timestamp"] for p in p_list])
            if p_list else np.zeros((len(g_caps), 0))
        )
    total, n_pred, n_gold = 0.0, 0, 0
    for (num_g, num_p), iou_GP, (_, seg) in zip(shapes, iou_mats, meteor.score_groups(groups)):
        if num_p:
            total += soda_dp(iou_GP * np.asarray(seg).reshape(num_g, num_p))
        n_gold += num_g
        n_pred += num_p
    precision = total / n_pred if n_pred else 0.0
    recall = total / n_gold if n_gold else 0.0
    return {
        "SODA_c": 100 * _f1(precision, recall),
        "SODA_c-precision": 100 * precision,
        "SODA_c-recall": 100 * recall,
    }


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Dense video captioning scorer: localization P/R/F1, METEOR, CIDEr, SODA_c"
    )
    parser.add_argument("--gt", required=True, help="ActivityNet/YouCook2 GT json {vid: {...}}")
    parser.add_argument("--pred", required=True, help="prediction json {'results': {vid: [...]}}")
    parser.add_argument("--tious", type=float, nargs="+", default=list(DVC_TIOUS))
    parser.add_argument("--max-proposals", type=int, default=1000, help="per video, as densevid_eval")
    parser.add_argument("--no-captions", action="store_true", help="localization only (no java)")
    args = parser.parse_args(argv)
    try:
        metrics = eval_dvc(load_json(args.gt), load_json(args.pred), args.tious,
                           args.max_proposals, captions=not args.no_captions)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
