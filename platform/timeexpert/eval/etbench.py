"""E.T. Bench scorer and CLI: the twelve tasks, as the official evaluation kit scores them.

    python -m timeexpert.eval.etbench --pred dumped.json [--gt etbench_txt_v1.0.json] [--mode strict]

Input: the official dump, a json list of annotation samples (`task, source, idx, video, duration,
tgt, p, o, g, q`) each with the model's raw answer `a` (`compute_metrics.py <dumped.json>`). With
`--gt`, predictions are matched to the annotation by (task, source, idx) and only their `a` is
read; an annotation sample without a prediction is answered "" (a failed parse, a miss).

Output: `metrics` is the official `metrics.json` (task -> source -> figures, fractions rounded to
5 decimals), `overall` and `merged` the two tables the official writes only to its log (x100, 1
decimal; a task absent from the input is null instead of shifting the columns), and the
parse-failure count and rate over all samples (the official per-group `Failed`).

Reference: `evaluation/compute_metrics.py` of the E.T. Bench kit (PolyU-ChenLab/ETBench on the
Hugging Face hub, commit 2d7bce9 "Fix mapping error in GVQ evaluation"). Per task:

- RAR / ECA / RVQ `Acc` (`rvq_eval`), GVQ `Acc` (`gvq_eval`): the option letter by the rules of
  `etbench_parse.parse_choice`, else the option of highest sentence similarity to the answer
  (`"(A) <option>"`, ECA options as "s - e"); a similarity pick counts as Failed for RAR/ECA/RVQ
  unless a letter was seen; the letter map of RAR/ECA/RVQ is that of each group's first sample.
- TVG / EPM `F1` = mean over IoU 0.1/0.3/0.5/0.7 of the hit rate of the first parsed span,
  `mIoU`; TEM `mRec` likewise with the best of several GT spans; GVQ `mRec` counts the spans of
  correctly answered samples only. IoU is float32 (nncore on torch tensors) compared in Python,
  so an IoU of exactly 0.7 is 0.69999999 and misses 0.7.
- TAL `F1` per sample and threshold from the share of GT spans (recall) and of predicted spans
  (precision, duplicates included) with IoU >= threshold, compared in float32 (0.7 hits).
- EVS `F1` from 1000 one-second slots (bounds rounded half to even, start clamped at 0); it is
  the only task whose unparsed samples leave the denominator.
- VHD `F1`: the share of answers whose first number lies in a window of any annotator.
- DVC / SLC (`dvc_eval` + `DVCEval`): unparsed samples are dropped; detection P/R per video at
  IoU > 0.1/0.3/0.5/0.7 (the densevid IoU with its 1e-8), multiplied by parsed / total before
  F1; Bleu_1-4, METEOR, ROUGE_L, CIDEr and `SentSim` per video over the pairs (prediction, each
  GT caption of IoU >= threshold), averaged over parsed videos and thresholds. SentSim is the
  dot product of the normalised all-MiniLM-L6-v2 embeddings of the PTB-tokenised texts.
- A task's score is the unweighted mean over its sources.

Modes. `official` (default) is the official computation, deterministic: a predicted caption that
matches no GT caption is compared with a random 10-20 letter string, which the official draws
from the unseeded `random` module (its SentSim changes from run to run); here it comes from
`random.Random(seed)` (seed 0, as the golden files were made with `random.seed(0)`), drawn in
the official order: DVC/SLC groups in input order, thresholds, then videos in the order of the
official's Python `set` of video names under PYTHONHASHSEED=0 (the golden files' setting; that
order is asked of a Python started with it). `strict`: such a caption scores SentSim 0 (it
describes no GT event) instead of its similarity to random letters; nothing else changes.

The answer parsers are in `etbench_parse`, the Sim model and the DVC / SLC scorer in
`etbench_captions`; each task scorer is a function over a list of samples, for reuse by a model's
own evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from timeexpert.eval.dvc import Meteor
from timeexpert.eval.etbench_captions import (
    IOU_THRESHOLDS,
    MODES,
    UNMATCHED_SEED,
    SentenceSimilarity,
    check_mode,
    score_captioning,
    sentence_similarity,
)
from timeexpert.eval.etbench_parse import parse_choice, parse_highlight, parse_spans
from timeexpert.eval.metrics import load_json
from timeexpert.events import temporal_iou

TASKS: tuple[str, ...] = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc", "tem", "gvq")
NUM_SLOTS = 1000  # evs_eval's per-second maps
# The official Overall table: column -> (task, figure); "EVC" is the official spelling of ECA.
OVERALL_COLUMNS: dict[str, tuple[str, str]] = {
    "RAR (Acc)": ("rar", "Acc"), "EVC (Acc)": ("eca", "Acc"), "RVQ (Acc)": ("rvq", "Acc"),
    "TVG (F1)": ("tvg", "F1"), "EPM (F1)": ("epm", "F1"), "TAL (F1)": ("tal", "F1"),
    "EVS (F1)": ("evs", "F1"), "VHD (F1)": ("vhd", "F1"), "DVC (F1)": ("dvc", "F1"),
    "DVC (Sim)": ("dvc", "SentSim"), "SLC (F1)": ("slc", "F1"), "SLC (Sim)": ("slc", "SentSim"),
    "TEM (Rec)": ("tem", "mRec"), "GVQ (Rec)": ("gvq", "mRec"),
}
MERGED_COLUMNS: dict[str, tuple[str, ...]] = {
    "Acc (ref)": ("RAR (Acc)", "EVC (Acc)", "RVQ (Acc)"),
    "F1 (gnd)": ("TVG (F1)", "EPM (F1)", "TAL (F1)", "EVS (F1)", "VHD (F1)"),
    "F1 (cap)": ("DVC (F1)", "SLC (F1)"),
    "Sim (cap)": ("DVC (Sim)", "SLC (Sim)"),
    "Rec (com)": ("TEM (Rec)", "GVQ (Rec)"),
}
_REQUIRED = {  # fields each task's scorer reads besides `a`
    "rar": ("p", "o"), "eca": ("p", "o"), "rvq": ("p", "o"), "gvq": ("p", "o", "tgt"),
    "tvg": ("tgt",), "epm": ("tgt",), "tal": ("tgt",), "evs": ("tgt",), "vhd": ("tgt",),
    "tem": ("tgt",), "dvc": ("tgt", "g", "video"), "slc": ("tgt", "g", "video"),
}


# --- float32 IoU, as nncore computes it on torch tensors -----------------------------------------


def iou_f32(gt_G2: Any, pred_P2: Any) -> np.ndarray:
    """(G, P) float32 IoU = overlap / (length + length - overlap), inputs rounded to float32."""
    return temporal_iou(np.asarray(gt_G2, np.float32).reshape(-1, 2),
                        np.asarray(pred_P2, np.float32).reshape(-1, 2), dtype=np.float32)


def _f32_share(hits: np.ndarray) -> float:
    """`(x >= thr).float().mean().item()`: the share rounded to float32."""
    return float(np.float32(hits.sum()) / np.float32(hits.size))


# --- the task scorers: a list of samples (one task, one source) -> the official figures ----------


def score_choice(samples: Sequence[Mapping[str, Any]], sim: SentenceSimilarity | None = None) -> dict:
    """RAR / ECA / RVQ `Acc` (official `rvq_eval`); the letter map is the first sample's."""
    num_options = len(samples[0]["o"])
    if num_options not in (4, 5):
        raise ValueError(f"{_where(samples[0])}: {num_options} options; E.T. Bench has 4 or 5")
    hit = failed = 0
    for sample in samples:
        choice = parse_choice(sample["a"], num_options)
        index = choice.index
        if index is None and not choice.empty:
            index = _most_similar(choice.text, sample["o"], sim)
        failed += choice.counted_failed
        hit += index is not None and index == sample["p"]
    return {"Total": len(samples), "Failed": failed, "Acc": round(hit / len(samples), 5)}


def _most_similar(text: str, options: Sequence[Any], sim: SentenceSimilarity | None) -> int:
    """The option "(A) <option>" closest to the answer; the first on ties (official `>`)."""
    sim = sim or sentence_similarity()
    rendered = [f"({'ABCDE'[i]}) {f'{o[0]} - {o[1]}' if isinstance(o, (list, tuple)) else o}"
                for i, o in enumerate(options)]
    emb = sim.encode([text, *rendered])
    return int(np.argmax(emb[1:] @ emb[0]))


def _first_span_ious(samples: Sequence[Mapping[str, Any]]) -> tuple[list[float | None], int]:
    """Per sample the float32 IoU of the first parsed span with the best GT span (None: failed)."""
    out, failed = [], 0
    for sample in samples:
        spans = parse_spans(sample["a"])
        if spans is None:
            out.append(None)
            failed += 1
            continue
        out.append(float(iou_f32(sample["tgt"], spans[0]).max()))
    return out, failed


def _recall_figures(ious: Sequence[float | None], total: int, prefix: str) -> tuple[dict, float]:
    """mIoU and the hit rate at each threshold over `total` samples, and the rates' mean."""
    hits = [sum(1 for v in ious if v is not None and v >= t) for t in IOU_THRESHOLDS]
    out: dict[str, Any] = {"mIoU": round(sum(v for v in ious if v is not None) / total, 5)}
    recall = [h / total for h in hits]
    for r, t in zip(recall, IOU_THRESHOLDS):
        out[f"{prefix}@{t}"] = round(r, 5)
    return out, sum(recall) / len(recall)


def score_grounding(samples: Sequence[Mapping[str, Any]]) -> dict:
    """TVG / EPM (official `tvg_eval`): hit rate of the first span at each IoU, their mean as F1."""
    ious, failed = _first_span_ious(samples)
    figures, mean = _recall_figures(ious, len(samples), "F1")
    return {"Total": len(samples), "Failed": failed, **figures, "F1": round(mean, 5)}


def score_recall(samples: Sequence[Mapping[str, Any]]) -> dict:
    """TEM (official `tem_eval`): as TVG with several GT spans (the best one counts), `mRec`."""
    ious, failed = _first_span_ious(samples)
    figures, mean = _recall_figures(ious, len(samples), "R")
    return {"Total": len(samples), "Failed": failed, **figures, "mRec": round(mean, 5)}


def score_localization(samples: Sequence[Mapping[str, Any]]) -> dict:
    """TAL (official `tal_eval`): per-sample F1 of GT and predicted spans at each IoU, averaged."""
    f1_T = [0.0] * len(IOU_THRESHOLDS)
    failed = 0
    for sample in samples:
        spans = parse_spans(sample["a"])
        if spans is None:
            failed += 1
            continue
        iou_GP = iou_f32(sample["tgt"], spans)
        for j, t in enumerate(IOU_THRESHOLDS):
            hit_GP = iou_GP >= np.float32(t)
            if hit_GP.any():  # else the sample adds 0
                rec, prc = _f32_share(hit_GP.any(axis=1)), _f32_share(hit_GP.any(axis=0))
                f1_T[j] += 2 * prc * rec / (prc + rec)
    f1_T = [f / len(samples) for f in f1_T]
    out: dict[str, Any] = {"Total": len(samples), "Failed": failed}
    for f, t in zip(f1_T, IOU_THRESHOLDS):
        out[f"F1@{t}"] = round(f, 5)
    out["F1"] = round(sum(f1_T) / len(f1_T), 5)
    return out


def _slot_map(spans: Sequence[Sequence[float]], value: int) -> np.ndarray:
    """evs_eval's per-second map: slots [round(s) clamped at 0, round(e)) set, Python slicing."""
    slots = np.zeros(NUM_SLOTS, dtype=np.int64)
    for s, e in spans:
        slots[max(0, round(s)) : round(e)] = value
    return slots


def score_summarization(samples: Sequence[Mapping[str, Any]]) -> dict:
    """EVS (official `evs_eval`): slot F1 per parsed sample, averaged over parsed samples only."""
    f1s, failed = [], 0
    for sample in samples:
        spans = parse_spans(sample["a"])
        if spans is None:
            failed += 1
            continue
        both = _slot_map(sample["tgt"], 1) + _slot_map(spans, 2)
        tp, fp, fn = int((both == 3).sum()), int((both == 2).sum()), int((both == 1).sum())
        if tp == 0:
            f1s.append(0)
        else:
            rec, prc = tp / (tp + fn), tp / (tp + fp)
            f1s.append(2 * prc * rec / (prc + rec))
    return {"Total": len(samples), "Failed": failed, "F1": round(sum(f1s) / len(f1s), 5) if f1s else 0}


def score_highlight(samples: Sequence[Mapping[str, Any]]) -> dict:
    """VHD (official `vhd_eval`): the share of answers whose number is in a GT window (inclusive)."""
    hit = failed = 0
    for sample in samples:
        t = parse_highlight(sample["a"])
        if t is None:
            failed += 1
            continue
        gt = sample["tgt"]
        annotators = gt if isinstance(gt[0][0], (list, tuple)) else [gt]
        hit += any(w[0] <= t <= w[1] for windows in annotators for w in windows)
    return {"Total": len(samples), "Failed": failed, "F1": round(hit / len(samples), 5)}


def score_grounded_qa(samples: Sequence[Mapping[str, Any]], sim: SentenceSimilarity | None = None) -> dict:
    """GVQ (official `gvq_eval`): `Acc` of the option, `mRec` of the first span of right answers."""
    right, failed = [], 0
    for sample in samples:
        if len(sample["o"]) not in (4, 5):
            raise ValueError(f"{_where(sample)}: {len(sample['o'])} options; E.T. Bench has 4 or 5")
        choice = parse_choice(sample["a"], len(sample["o"]), task="gvq")
        if choice.empty:
            failed += 1
            right.append(False)
            continue
        index = choice.index if choice.index is not None else _most_similar(choice.text, sample["o"], sim)
        right.append(index == sample["p"])
    ious, span_failed = _first_span_ious([s for s, r in zip(samples, right) if r])
    figures, mean = _recall_figures(ious, len(samples), "R")
    return {"Total": len(samples), "Failed": failed + span_failed, **figures, "mRec": round(mean, 5),
            "Acc": round(sum(right) / len(samples), 5)}


# --- the benchmark ------------------------------------------------------------------------------


TASK_SCORERS: dict[str, Callable[..., dict]] = {
    "rar": score_choice, "eca": score_choice, "rvq": score_choice,
    "tvg": score_grounding, "epm": score_grounding, "tal": score_localization,
    "evs": score_summarization, "vhd": score_highlight,
    "dvc": score_captioning, "slc": score_captioning,
    "tem": score_recall, "gvq": score_grounded_qa,
}


def _where(sample: Mapping[str, Any]) -> str:
    return f"sample {sample.get('task')}/{sample.get('source')}/{sample.get('idx')}"


def check_samples(samples: Any) -> None:
    """Raise ValueError naming the first malformed sample (unknown task, missing field, bad `a`)."""
    if not isinstance(samples, list) or not samples:
        raise ValueError("E.T. Bench input must be a non-empty json list of samples")
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise ValueError(f"sample #{i} is not an object: {str(sample)[:80]!r}")
        task = sample.get("task")
        if task not in TASKS:
            raise ValueError(f"sample #{i}: unknown task {task!r}; E.T. Bench tasks are {list(TASKS)}")
        missing = [k for k in ("source", "a", *_REQUIRED[task]) if k not in sample]
        if missing:
            raise ValueError(f"{_where(sample)} (#{i}) lacks {missing}")
        if not isinstance(sample["a"], str):
            raise ValueError(f"{_where(sample)}: the answer 'a' must be a string, got {sample['a']!r}")


def score_etbench(
    samples: Sequence[Mapping[str, Any]],
    mode: str = "official",
    seed: int = UNMATCHED_SEED,
    sim: SentenceSimilarity | None = None,
) -> dict[str, Any]:
    """Every group (task, source) in input order, the Overall / Merged tables, the failure rate."""
    check_mode(mode)
    check_samples(samples)
    groups: dict[str, dict[str, list]] = {}
    for sample in samples:
        groups.setdefault(sample["task"], {}).setdefault(sample["source"], []).append(sample)
    rng = random.Random(seed)  # one stream for the run, as the official's global `random`
    metrics: dict[str, dict[str, dict]] = {}
    meteor = Meteor() if any(t in groups for t in ("dvc", "slc")) else None
    try:
        for task, sources in groups.items():
            scorer = TASK_SCORERS[task]
            for source, group in sources.items():
                if task in ("dvc", "slc"):
                    out = scorer(group, sim, mode=mode, rng=rng, meteor=meteor)
                elif task in ("rar", "eca", "rvq", "gvq"):
                    out = scorer(group, sim)
                else:
                    out = scorer(group)
                metrics.setdefault(task, {})[source] = out
    finally:
        if meteor is not None:
            meteor.close()
    total = sum(o["Total"] for s in metrics.values() for o in s.values())
    failed = sum(o["Failed"] for s in metrics.values() for o in s.values())
    overall, merged = overall_tables(metrics)
    return {"mode": mode, "seed": seed, "metrics": metrics, "overall": overall, "merged": merged,
            "total": total, "failed": failed, "parse_failure_rate": failed / total}


def overall_tables(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[dict, dict]:
    """The official Overall and Merged tables (x100, 1 decimal), None where a task is absent."""
    task_scores = {}
    for column, (task, key) in OVERALL_COLUMNS.items():
        values = [m[key] for m in metrics.get(task, {}).values()]
        task_scores[column] = round(sum(values) / len(values), 5) if values else None
    overall = {c: None if v is None else round(v * 100, 1) for c, v in task_scores.items()}
    merged = {}
    for column, parts in MERGED_COLUMNS.items():
        values = [task_scores[p] for p in parts]
        merged[column] = None if None in values else round(sum(values) * 100 / len(values), 1)
    return overall, merged


def join_predictions(gt: Sequence[Mapping[str, Any]], pred: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Annotation samples with the answer `a` of the prediction of the same (task, source, idx);
    "" (a failed parse) where there is none."""
    if not isinstance(pred, list):
        raise ValueError("E.T. Bench predictions must be a json list of {'task', 'source', 'idx', 'a'}")
    answers = {}
    for i, row in enumerate(pred):
        if not isinstance(row, Mapping) or not {"task", "source", "idx", "a"} <= set(row):
            raise ValueError(f"prediction #{i} needs 'task', 'source', 'idx' and 'a': {str(row)[:80]!r}")
        answers[(row["task"], row["source"], row["idx"])] = row["a"]
    return [{**s, "a": answers.get((s.get("task"), s.get("source"), s.get("idx")), "")} for s in gt]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="E.T. Bench scorer: the 12 tasks as the official kit scores them")
    parser.add_argument("--pred", required=True, help="the dumped json: annotation samples with the answer 'a'")
    parser.add_argument("--gt", help="annotation json; then --pred rows are matched by (task, source, idx)")
    parser.add_argument("--mode", choices=MODES, default="official",
                        help="official: the official numbers, unmatched captions vs seeded random strings; "
                        "strict: those captions score Sim 0")
    parser.add_argument("--seed", type=int, default=UNMATCHED_SEED, help="seed of the random strings (official)")
    args = parser.parse_args(argv)
    try:
        samples = load_json(args.pred)
        if args.gt:
            samples = join_predictions(load_json(args.gt), samples)
        result = score_etbench(samples, mode=args.mode, seed=args.seed)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
