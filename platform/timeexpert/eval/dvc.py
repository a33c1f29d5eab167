"""Dense video captioning metrics and CLI: localization P/R/F1, METEOR, CIDEr and SODA_c.

    python -m timeexpert.eval.dvc --gt val_1.json --pred submission.json [--protocol timechat]

Ground truth: ActivityNet Captions / YouCook2 json ``{vid: {"duration", "timestamps": [[s, e]...],
"sentences": [...]}}``. Predictions: the ActivityNet challenge json ``{"results": {vid:
[{"timestamp": [s, e], "sentence": "..."}, ...]}}`` (a bare ``{vid: [...]}`` is accepted too).

Two protocols; the JSON printed names the one used (all figures in percent):

- `timechat`, the default: TimeChat's `metrics/dvc/eval_dvc.py`, the evaluation whose numbers
  TimeChat, VTG-LLM, TRACE and TimeExpert report.
- `densevid`: the ActivityNet Captions evaluator (ranjaykrishna/densevid_eval `evaluate.py`, 2018
  version, before it switched to a random reference), with F1 of the averaged P and R as PDVC
  reports it.

Both:

- Localization precision/recall at tIoU 0.3/0.5/0.7/0.9 (`evaluate_detection(s)`): per video, a
  prediction (ground truth) is covered when some ground truth (prediction) has IoU > tIoU
  (strict); precision and recall are averaged over the GT videos, then over tIoUs.
- METEOR and CIDEr (`evaluate_tiou` / `evaluate_caption_scores`): every prediction is paired with
  each GT caption of IoU >= tIoU, or with a reference that matches nothing when there is none; the
  scorer runs per video on that video's pairs, videos are averaged, then tIoUs. pycocoevalcap's PTB
  tokenizer, METEOR 1.5 jar and CIDEr (IDF over the video's own pairs, as the official per-video
  call). Non-ASCII characters become spaces first, as densevid_eval and SODA do (TimeChat hands
  them to the tokenizer, where they become whatever the Java platform charset makes of them).
- IoU (`official_iou`): overlap / (span from the earliest start to the latest end + 1e-8). The
  official `min(span, length A + length B)` is the span whenever the windows overlap, and the
  1e-8 makes a pair exactly at the threshold (IoU 0.5 vs tIoU 0.5) a miss, as there.
- SODA_c as the official code computes it (fujiso/SODA `soda.py` type "c", one reference file):
  per video, predictions and GT sorted by their written start, the DP alignment maximising the
  sum of IoU x METEOR, precision = sum / #predictions, recall = sum / #GT, and their F-measure;
  `SODA_c`, `SODA_c-precision` and `SODA_c-recall` are the means of these over videos. METEOR has
  the GT caption as hypothesis and the prediction as reference (the official `compute_score(res,
  gt)` argument order). A window written end-first is kept as written (IoU 0 with everything).
  TimeChat's copy of SODA (`sodac`) aligns in file order with its own [min, max] IoU, and with more
  than 10 predictions in a video it pairs METEOR scores with the wrong predictions (their keys are
  sorted as strings); we follow the official code, which the papers cite.
- Missing videos count as empty predictions: P = R = F1 = METEOR = CIDEr = SODA_c = 0 for that
  video, as TimeChat and densevid_eval count them (the official SODA leaves them out).

Where they differ (timechat / densevid):

- F1, and F1@tIoU likewise: per video, 2PR/(P+R) of that video's tIoU-averaged P and R, then
  averaged over videos / 2PR/(P+R) of the averaged P and R.
- The reference of a prediction that no GT caption matches (METEOR, CIDEr): a random string of
  10-20 lowercase letters / the fixed `abc123!@#`.
- Windows written end-first, in P/R and the METEOR pairing: read as [min, max], as TimeChat's
  `iou` does / as written (IoU 0).
- Proposals per video: all / the first 1000.

METEOR pools the statistics of a video's pairs, so the unmatched reference's length counts in
its recall: one word for the random string, four tokens for `abc123!@#` (METEOR's `-norm` splits
it into `abc123 ! @ #`). TimeChat draws the random strings unseeded; we draw them from
`random.Random(UNMATCHED_SEED)` (seed 0), so the output is the same on every run. Any seed gives
the same score unless a random string happens to be a word of the prediction it is paired with.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import random
import string
import subprocess
import sys
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from timeexpert.eval.metrics import load_json
from timeexpert.events import temporal_iou

DVC_TIOUS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
PROTOCOLS: tuple[str, ...] = ("timechat", "densevid")
GARBAGE_REFERENCE = "abc123!@#"  # densevid_eval 2018's reference for a prediction that matches nothing
UNMATCHED_SEED = 0  # seeds the random references of the timechat protocol (module doc)
DENSEVID_MAX_PROPOSALS = 1000  # densevid_eval's --max-proposals-per-video
_PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                     ":", "-", "--", "...", ";"}  # pycocoevalcap PTBTokenizer


def remove_nonascii(text: str) -> str:
    """densevid_eval / SODA: non-ASCII characters become spaces before tokenization."""
    return "".join(c if ord(c) < 128 else " " for c in text)


def official_iou(pred_P2: Any, gt_G2: Any, official_eps: bool = True) -> np.ndarray:
    """densevid_eval / TimeChat / SODA IoU: overlap / (span + 1e-8); `official_eps=False` drops the 1e-8.

    Windows are taken as written (an end-first one has IoU 0); the timechat protocol reads them as
    [min, max] before calling this.
    """
    pred_P2 = np.asarray(pred_P2, dtype=np.float64).reshape(-1, 2)
    gt_G2 = np.asarray(gt_G2, dtype=np.float64).reshape(-1, 2)
    return temporal_iou(pred_P2, gt_G2, hull=True, eps=1e-8 if official_eps else 0.0)


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
    # deferred: pycocoevalcap is an optional dependency (see _pycocoevalcap_dir)
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


def _normalize_predictions(
    pred: Mapping[str, Any], max_proposals: int | None
) -> dict[str, list[dict]]:
    """{vid: [{"timestamp": [s, e] as written, "sentence"}]}, the first `max_proposals` of each."""
    results = pred.get("results", pred) if isinstance(pred, Mapping) else None
    if not isinstance(results, Mapping):
        raise ValueError("DVC predictions must be {'results': {vid: [{'timestamp', 'sentence'}]}}")
    out = {}
    for vid, items in results.items():
        rows = []
        for item in list(items)[:max_proposals]:
            s, e = (float(x) for x in item["timestamp"])
            rows.append({"timestamp": [s, e], "sentence": str(item.get("sentence", ""))})
        out[str(vid)] = rows
    return out


def _read_windows(windows: Any, protocol: str) -> np.ndarray:
    """Windows as the protocol's P/R and pairing IoU reads them: TimeChat's `iou` takes each as
    [min, max], densevid_eval as written."""
    w_N2 = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    return np.sort(w_N2, axis=1) if protocol == "timechat" else w_N2


def eval_dvc(
    ground_truth: Mapping[str, Mapping[str, Any]],
    predictions: Mapping[str, Any],
    tious: Sequence[float] = DVC_TIOUS,
    max_proposals: int | None = None,
    captions: bool = True,
    official_eps: bool = True,
    protocol: str = "timechat",
) -> dict[str, float]:
    """All DVC metrics (percent): Precision/Recall/F1, METEOR, CIDEr, SODA_c, and per-tIoU figures.

    `protocol`: "timechat" (default) or "densevid" (module doc). `max_proposals` per video: None
    takes the protocol's (all for timechat, 1000 for densevid). `captions=False` skips
    METEOR/CIDEr/SODA_c (no java needed).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if not ground_truth:
        raise ValueError("DVC ground truth is empty")
    if max_proposals is None and protocol == "densevid":
        max_proposals = DENSEVID_MAX_PROPOSALS
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
        vid: official_iou(_read_windows([p["timestamp"] for p in preds.get(vid, [])], protocol),
                          _read_windows(gts[vid][0], protocol), official_eps)
        for vid in vids
    }
    # per video and tIoU: the share of predictions (GT events) covered
    prec_VT = np.zeros((len(vids), len(tious)))
    rec_VT = np.zeros((len(vids), len(tious)))
    for v, vid in enumerate(vids):
        iou_PG = ious[vid]
        if iou_PG.shape[0] and iou_PG.shape[1]:
            for j, t in enumerate(tious):
                covered_PG = iou_PG > t
                prec_VT[v, j] = covered_PG.any(axis=1).mean()
                rec_VT[v, j] = covered_PG.any(axis=0).mean()
    out: dict[str, float] = {}
    for j, t in enumerate(tious):
        p_t, r_t = prec_VT[:, j].mean(), rec_VT[:, j].mean()
        out[f"Precision@{t:g}"], out[f"Recall@{t:g}"] = 100 * float(p_t), 100 * float(r_t)
        if protocol == "timechat":
            out[f"F1@{t:g}"] = 100 * float(_f1(prec_VT[:, j], rec_VT[:, j]).mean())
        else:
            out[f"F1@{t:g}"] = 100 * float(_f1(p_t, r_t))
    out["Precision"], out["Recall"] = 100 * float(prec_VT.mean()), 100 * float(rec_VT.mean())
    if protocol == "timechat":  # TimeChat's F1_Score: per video, then the mean over videos
        out["F1"] = 100 * float(_f1(prec_VT.mean(axis=1), rec_VT.mean(axis=1)).mean())
    else:
        out["F1"] = 100 * float(_f1(prec_VT.mean(), rec_VT.mean()))
    out["num_videos"] = len(vids)
    out["num_missing"] = sum(vid not in preds for vid in vids)
    if captions:
        out.update(_caption_metrics(vids, gts, preds, ious, tious, protocol))
    return out


def _f1(p: Any, r: Any) -> np.ndarray:
    """2PR/(P+R), 0 where P + R = 0; elementwise."""
    p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
    return np.divide(2 * p * r, p + r, out=np.zeros_like(p + r), where=p + r > 0)


def unmatched_reference(protocol: str, rng: random.Random) -> str:
    """The reference of a prediction that matches no GT caption (module doc)."""
    if protocol == "densevid":
        return GARBAGE_REFERENCE
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(10, 20)))


def _caption_metrics(vids, gts, preds, ious, tious, protocol) -> dict[str, float]:
    rng = random.Random(UNMATCHED_SEED)
    # the official pairs per (tIoU, video): (prediction, reference), untokenized
    raw_groups = []
    for t in tious:
        for vid in vids:
            pairs = []
            for p, pred in enumerate(preds.get(vid, [])):
                matched = np.nonzero(ious[vid][p] >= t)[0]
                # one pair per matched GT caption, as the official loop appends them
                pairs += [(pred["sentence"], gts[vid][1][g]) for g in matched]
                if not len(matched):
                    pairs.append((pred["sentence"], unmatched_reference(protocol, rng)))
            raw_groups.append(pairs)
    sentences = {s for pairs in raw_groups for pair in pairs for s in pair}
    for vid in vids:
        sentences.update(gts[vid][1] + [p["sentence"] for p in preds.get(vid, [])])
    sentences = sorted(sentences)
    tokenized = dict(zip(sentences, ptb_tokenize([remove_nonascii(s) for s in sentences])))
    groups = [[(tokenized[h], [tokenized[r]]) for h, r in pairs] for pairs in raw_groups]
    cider_G = [100 * cider(pairs) if pairs else 0.0 for pairs in groups]
    out: dict[str, float] = {}
    with Meteor() as meteor:
        meteor_G = [100 * score for score, _ in meteor.score_groups(groups)]
        n = len(vids)
        meteor_T = [float(np.mean(meteor_G[j * n : (j + 1) * n])) for j in range(len(tious))]
        cider_T = [float(np.mean(cider_G[j * n : (j + 1) * n])) for j in range(len(tious))]
        for t, m, c in zip(tious, meteor_T, cider_T):
            out[f"METEOR@{t:g}"], out[f"CIDEr@{t:g}"] = m, c
        out["METEOR"], out["CIDEr"] = float(np.mean(meteor_T)), float(np.mean(cider_T))
        out.update(_soda_c(vids, gts, preds, tokenized, meteor))
    return out


def _soda_c(vids, gts, preds, tokenized, meteor: Meteor) -> dict[str, float]:
    """fujiso/SODA type c (`SODA.evaluate`): precision, recall and F-measure per video, averaged.

    One METEOR batch for every (GT, prediction) pair of every video.
    """
    groups, iou_mats = [], []
    for vid in vids:
        # the official sorts by the written start, stably (`sorted(..., key=x["timestamp"][0])`)
        g_order = sorted(range(len(gts[vid][0])), key=lambda i: gts[vid][0][i][0])
        p_list = sorted(preds.get(vid, []), key=lambda p: p["timestamp"][0])
        g_caps = [tokenized[gts[vid][1][i]] for i in g_order]
        p_caps = [tokenized[p["sentence"]] for p in p_list]
        # official argument order: the GT caption is the hypothesis, the prediction the reference
        groups.append([(g, [p]) for g in g_caps for p in p_caps])
        iou_mats.append(official_iou([gts[vid][0][i] for i in g_order], [p["timestamp"] for p in p_list]))
    prf_V3 = np.zeros((len(vids), 3))
    for v, (iou_GP, (_, seg)) in enumerate(zip(iou_mats, meteor.score_groups(groups))):
        num_g, num_p = iou_GP.shape
        if num_g and num_p:
            total = soda_dp(iou_GP * np.asarray(seg).reshape(num_g, num_p))
            precision, recall = total / num_p, total / num_g
            prf_V3[v] = precision, recall, _f1(precision, recall)
    precision, recall, f_measure = 100 * prf_V3.mean(axis=0)
    return {
        "SODA_c": float(f_measure),
        "SODA_c-precision": float(precision),
        "SODA_c-recall": float(recall),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Dense video captioning scorer: localization P/R/F1, METEOR, CIDEr, SODA_c"
    )
    parser.add_argument("--gt", required=True,
                        help='ActivityNet Captions json: {VID: {"duration": s, "timestamps": [[start, '
                             'end], ...], "sentences": [caption, ...]}} (YouCook2 in that form)')
    parser.add_argument("--pred", required=True,
                        help='ActivityNet challenge json: {"results": {VID: [{"timestamp": [start, '
                             'end], "sentence": caption}, ...]}}, VID as in --gt')
    parser.add_argument("--tious", type=float, nargs="+", default=list(DVC_TIOUS))
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="timechat",
        help="timechat: TimeChat's eval_dvc.py, what the VTG-LLM papers report (per-video F1, "
        "random unmatched reference); densevid: the ActivityNet evaluator (F1 of the averaged P "
        "and R, reference 'abc123!@#'). SODA_c is the official fujiso/SODA one in both",
    )
    parser.add_argument("--max-proposals", type=int, default=None,
                        help="per video (default: the protocol's: all for timechat, 1000 for densevid)")
    parser.add_argument("--no-captions", action="store_true", help="localization only (no java)")
    args = parser.parse_args(argv)
    try:
        gt, pred = load_json(args.gt), load_json(args.pred)
        metrics = eval_dvc(gt, pred, args.tious, args.max_proposals,
                           captions=not args.no_captions, protocol=args.protocol)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predicted = set(pred.get("results", {}))
    without = [vid for vid in gt if vid not in predicted]
    unmatched = sorted(predicted - set(gt))
    if without:
        print(f"{len(without)} GT videos have no prediction; the first: {without[0]!r}", file=sys.stderr)
    if unmatched:
        print(f"{len(unmatched)} predicted videos are not in the GT (left out); the first: "
              f"{unmatched[0]!r}", file=sys.stderr)
    print(json.dumps({"protocol": args.protocol, **metrics}, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
