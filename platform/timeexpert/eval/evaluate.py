"""One call from canonical records + predictions to metrics, and writers to the official formats.

`predict_records(checkpoint_uri, records, data)` generates a model's answers for records: the Ray
Data pipeline decodes the videos and streams them through an actor pool of model replicas.
`evaluate_predictions(records, predictions, task)` scores them. The pipeline calls both at the
end of a stage, `jobs/evaluate.py` on a split. Scoring dispatches by task:

- MR: R@1 at IoU 0.3/0.5/0.7 and mIoU (every record counts; no or unparseable answer = miss), and
  the QVHighlights-style mAP over IoU 0.5:0.05:0.95 (`mAP`, `mAP@0.5`, `mAP@0.75`) of the ranked,
  scored windows (unscored windows are ranked by their order).
- VHD: HL-mAP / HL-Hit1 at the Fair/Good/VeryGood thresholds (`timeexpert.eval.metrics.
  highlight_metrics`) against the record's per-clip saliency. Canonical records keep one score per
  clip (QVHighlights: the annotators' mean), so this is the one-annotator form; the official
  3-annotator figures come from the official files (`timeexpert.eval.qvhighlights`). The
  prediction's saliency is used when given, else derived from its scored windows. The MR
  metrics of its windows are reported too when the records have windows.
- DVC: `timeexpert.eval.dvc.eval_dvc` under its default `timechat` protocol (P/R/F1 at tIoU
  0.3-0.9, F1 per video then averaged, METEOR, CIDEr, SODA_c), the one the papers report.
- GQA: the NExT-GQA figures (`timeexpert.eval.nextgqa`, strict mode: a missing span or answer
  scores 0 and stays in every denominator): Acc@QA, Acc@GQA (right option and IoP >= 0.5), mIoP,
  IoP@0.3/0.5, mIoU, IoU@0.3/0.5, the evidence span being the answer's first window.

Every result carries `num_records`, `no_answer_rate` (percent of records without a prediction:
its video was skipped, or the predictions leave it out) and `parse_failure_rate` (percent of
records whose answer could not be parsed); both kinds score as misses.

A video that is not there is refused before anything is decoded (`check_videos`,
`MissingVideosError`): every record of it would score as a miss, and a wrong storage root would
report a model scoring zero. `predict_records(..., allow_missing=True)` scores them as misses.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray.data

from timeexpert import devices, storage
from timeexpert.data.pipeline import build_dataset, row_options
from timeexpert.eval import dvc as dvc_metrics
from timeexpert.eval import nextgqa
from timeexpert.eval.metrics import (
    QVH_IOU_THRESHOLDS,
    QVH_SALIENCY_MIN,
    average_precision_detection,
    highlight_metrics,
    recall_at_iou,
)
from timeexpert.eval.parse import ParseResult, as_parse_result
from timeexpert.eval.qvhighlights import prediction_row, write_jsonl
from timeexpert.events import Event, Record, Task, read_gqa_answer, saliency_from_events
from timeexpert.inference import GroundingModel, PredictRequest


def _select(records: Sequence[Record], task: Task | str | None) -> tuple[list[Record], Task]:
    if not records:
        raise ValueError("no records to evaluate")
    if task is None:
        tasks = {r.task for r in records}
        if len(tasks) != 1:
            raise ValueError(f"records mix tasks {sorted(t.value for t in tasks)}; pass task=")
        task = tasks.pop()
    task = Task.parse(task)
    chosen = [r for r in records if r.task == task]
    if not chosen:
        raise ValueError(f"no {task.value!r} records among {len(records)}")
    return chosen, task


class MissingVideosError(ValueError):
    """Videos of the records to score are not under the storage root."""

    def __init__(self, missing: Sequence[str], num_videos: int, root: str) -> None:
        self.missing, self.num_videos, self.root = list(missing), num_videos, root
        super().__init__(f"{len(self.missing)} of {num_videos} videos not found under the storage "
                         f"root {root!r}; the first: {self.missing[0]}")


def check_videos(records: Sequence[Record], root: str, storage_options: Mapping[str, Any] | None = None
                 ) -> None:
    """MissingVideosError unless every distinct video of `records` exists under `root` (relative
    URIs resolved against it, as the pipeline resolves them)."""
    videos = list(dict.fromkeys(storage.resolve_under_root(r.video, root) for r in records))
    missing = [v for v in videos if not storage.exists(v, **(storage_options or {}))]
    if missing:
        raise MissingVideosError(missing, len(videos), root)


def parse_all(
    records: Sequence[Record], predictions: Mapping[str, Any], task: Task
) -> list[ParseResult]:
    """Each record's prediction (any form `as_parse_result` takes) -> ParseResult; None if absent."""
    return [
        as_parse_result(predictions.get(r.id), task, r.duration, r.clip_len) for r in records
    ]


def _ranked_windows(events: Sequence[Event]) -> list[list[float]]:
    """[[start, end, score]]: an unscored window gets a rank score so its order is kept."""
    return [
        [e.start, e.end, float(e.score) if e.score is not None else 1.0 / (i + 1)]
        for i, e in enumerate(events)
    ]


def _mr_metrics(records: Sequence[Record], parsed: Sequence[ParseResult]) -> dict[str, float]:
    preds = [_ranked_windows(p.events) if p.ok else None for p in parsed]
    gts = [[[e.start, e.end] for e in r.events] for r in records]
    out = recall_at_iou(preds, gts)
    out.pop("num_queries")
    aps = [average_precision_detection(g, p or [], QVH_IOU_THRESHOLDS) for g, p in zip(gts, preds) if g]
    ap_T = np.mean(aps, axis=0) if aps else np.zeros(len(QVH_IOU_THRESHOLDS))
    out["mAP"] = 100.0 * float(ap_T.mean())
    out["mAP@0.5"] = 100.0 * float(ap_T[0])
    out["mAP@0.75"] = 100.0 * float(ap_T[QVH_IOU_THRESHOLDS.index(0.75)])
    return out


def _vhd_metrics(records: Sequence[Record], parsed: Sequence[ParseResult]) -> dict[str, float]:
    pred_scores, gt_scores = [], []
    for r, p in zip(records, parsed):
        if r.saliency is None:
            raise ValueError(f"VHD record {r.id!r} has no saliency to score against")
        gt_scores.append(np.asarray(r.saliency, dtype=np.float64)[:, None])
        if not p.ok:
            pred_scores.append(None)
        elif p.saliency is not None:
            pred_scores.append(p.saliency)
        else:
            scored = [Event(e.start, e.end, 1.0 if e.score is None else e.score) for e in p.events]
            pred_scores.append(saliency_from_events(scored, r.duration, r.clip_len))
    out: dict[str, float] = {}
    for name, min_score in QVH_SALIENCY_MIN.items():
        hl = highlight_metrics(pred_scores, gt_scores, min_score)
        out[f"HL-min-{name}-mAP"], out[f"HL-min-{name}-Hit1"] = hl["HL-mAP"], hl["HL-Hit1"]
    if all(r.events for r in records):
        out.update({f"MR-{k}": v for k, v in _mr_metrics(records, parsed).items()})
    return out


def dvc_ground_truth(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """Canonical DVC records -> ActivityNet-style GT json keyed by record id."""
    return {
        r.id: {
            "duration": r.duration,
            "timestamps": [[e.start, e.end] for e in r.events],
            "sentences": [e.caption for e in r.events],
        }
        for r in records
    }


def dvc_results(records: Sequence[Record], parsed: Sequence[ParseResult]) -> dict[str, Any]:
    """Parsed DVC answers -> the ActivityNet challenge prediction json, keyed by record id."""
    return {
        "version": "VERSION 1.0",
        "external_data": {"used": False, "details": ""},
        "results": {
            r.id: [{"timestamp": [e.start, e.end], "sentence": e.caption} for e in p.events]
            for r, p in zip(records, parsed)
            if p.ok
        },
    }


def gqa_files(records: Sequence[Record], parsed: Sequence[ParseResult]
              ) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, dict[str, int]]]:
    """GQA records and parsed answers -> the three NExT-GQA files: the GT spans
    (`{video: {"duration", "location": {qid: [[s, e]]}}}`, one "video" per record id, qid "0"),
    the predicted spans `{key: [s, e]}` and the answers `{key: {"prediction", "answer"}}`
    (prediction -1 when the answer names no option)."""
    gt, spans, answers = {}, {}, {}
    for r, p in zip(records, parsed):
        if r.answer is None:
            raise ValueError(f"GQA record {r.id!r} has no answer to score against")
        key = f"{r.id}_0"
        gt[r.id] = {"duration": r.duration, "location": {"0": [[e.start, e.end] for e in r.events]}}
        span, choice = read_gqa_answer(p.events, r.options) if p.ok else (None, None)
        if span is not None:
            spans[key] = [span.start, span.end]
        answers[key] = {"prediction": -1 if choice is None else choice, "answer": r.answer}
    return gt, spans, answers


def _gqa_metrics(records: Sequence[Record], parsed: Sequence[ParseResult]) -> dict[str, float]:
    gt, spans, answers = gqa_files(records, parsed)
    out = nextgqa.score_nextgqa(gt, spans, answers, mode="strict")
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Predictor:
    """One model replica of the evaluation's actor pool (`predict_records`): loads the checkpoint
    once, on the GPU Ray gave its actor (else the CPU), and answers batches of decoded rows with
    `GroundingModel.predict_batch`; each answer (a `Prediction`, pickled by Ray Data) leaves with
    the timestamps of its frames."""

    def __init__(self, checkpoint_uri: str, precision: str = "auto") -> None:
        self.device = devices.default_device()
        self.gm = GroundingModel.load(checkpoint_uri, device=str(self.device))
        self.precision = precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))]
        requests = [
            PredictRequest(frames_THWC=row["frames"][row["frame_mask"]],
                           timestamps_T=row["timestamps"][row["frame_mask"]], task=str(row["task"]),
                           query=str(row["query"]), duration=float(row["duration"]),
                           clip_len=float(row["clip_len"]), options=row_options(row))
            for row in rows
        ]
        with devices.autocast(self.device, self.precision):
            answers = self.gm.predict_batch(requests)
        return {
            "id": batch["id"],
            "prediction": _objects(answers),
            "timestamps": _objects([r.timestamps_T.tolist() for r in requests]),
        }


def _objects(values: list) -> np.ndarray:
    """A 1-d object column of `values` (numpy would make a list of equal-length lists 2-d)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def predict_records(
    checkpoint_uri: str, records: Sequence[Record], data, *, replicas: int = 1,
    num_cpus: float = 1.0, num_gpus: float = 0.0, precision: str = "auto", batch_size: int = 8,
    on_prediction: Callable[[Record, list[float], Any], None] | None = None,
    progress: Callable[[int, int], None] | None = None, allow_missing: bool = False,
) -> tuple[dict[str, Any], list[Record], dict[str, int]]:
    """The answers of the model at `checkpoint_uri` for `records`, off the driver: the Ray Data
    pipeline fetches and decodes the videos (`data`: a DataConfig: storage root, frames and
    size) and `map_batches` streams the decoded rows through an actor pool of `replicas` model
    replicas (`Predictor`; each reserving `num_cpus` CPUs and `num_gpus` GPUs, bf16 autocast on
    CUDA per `precision`), `batch_size` prompts at a time. Returns (record id -> Prediction, the
    records that passed the annotation checks, records skipped by reason); a record whose video
    was skipped has no prediction (a miss when scored), one refused for its annotation is not
    scored. `on_prediction(record, frame timestamps, prediction)` sees each answer;
    `progress(answered, total)` is called after each batch. Videos that are not there raise
    MissingVideosError before anything starts, unless `allow_missing` (then they are skipped as
    "missing", scored as misses)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if not allow_missing:
        check_videos(records, data.root, data.storage_options)
    dataset = build_dataset(data, records=records, preserve_order=True)
    dataset.dataset.context.enable_progress_bars = False
    answered = dataset.dataset.map_batches(
        Predictor, fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "precision": precision},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=num_cpus, num_gpus=num_gpus,
    )
    by_id = {r.id: r for r in dataset.records}
    predictions: dict[str, Any] = {}
    for batch in answered.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for rid, prediction, times in zip(batch["id"], batch["prediction"], batch["timestamps"]):
            predictions[str(rid)] = prediction
            if on_prediction is not None:
                on_prediction(by_id[str(rid)], list(times), prediction)
        if progress is not None:
            progress(len(predictions), len(records))
    return predictions, list(dataset.records), dataset.skip_summary()


def evaluate_predictions(
    records: Sequence[Record],
    predictions: Mapping[str, Any],
    task: Task | str | None = None,
    *,
    captions: bool = True,
) -> dict[str, float]:
    """Metrics of `predictions` (record id -> events / Prediction / answer text / None) on `records`.

    Only the records of `task` count (default: the records' one task). Records without a
    prediction are misses. `captions=False` skips the java caption metrics of DVC.
    """
    records, task = _select(records, task)
    parsed = parse_all(records, predictions, task)
    if task == Task.MR:
        out = _mr_metrics(records, parsed)
    elif task == Task.VHD:
        out = _vhd_metrics(records, parsed)
    elif task == Task.GQA:
        out = _gqa_metrics(records, parsed)
    else:
        out = dvc_metrics.eval_dvc(
            dvc_ground_truth(records), dvc_results(records, parsed), captions=captions
        )
        out.pop("num_videos", None)
    answered = [predictions.get(r.id) is not None for r in records]
    out["num_records"] = len(records)
    out["no_answer_rate"] = 100.0 * answered.count(False) / len(records)
    out["parse_failure_rate"] = 100.0 * sum(a and not p.ok for a, p in zip(answered, parsed)) / len(parsed)
    return out


def distinct_windows(records: Sequence[Record], predictions: Mapping[str, Any]) -> float | None:
    """Of the videos with two or more MR queries, the fraction whose queries all got different
    top-1 windows (a model that learnt the answer prior gives every query of a video the same
    window); a query without an answer counts as not distinct. None without such videos."""
    by_video: dict[str, list] = {}
    for r in records:
        if r.task == Task.MR:
            p = predictions.get(r.id)
            events = getattr(p, "events", None) or []
            top = (round(events[0].start, 3), round(events[0].end, 3)) if events else None
            by_video.setdefault(r.video, []).append(top)
    multi = [tops for tops in by_video.values() if len(tops) >= 2]
    if not multi:
        return None
    return float(np.mean([None not in tops and len(set(tops)) == len(tops) for tops in multi]))


def write_predictions(
    records: Sequence[Record],
    predictions: Mapping[str, Any],
    task: Task | str,
    path: str | pathlib.Path,
) -> pathlib.Path:
    """Predictions in the official file format of their task, for the official scorers.

    MR / VHD: QVHighlights submission jsonl (qid, query, vid, pred_relevant_windows,
    pred_saliency_scores); the same rows are our Charades-STA prediction format. DVC: the
    ActivityNet challenge json {"results": {id: [{"timestamp", "sentence"}]}}. GQA: NExT-GQA's
    span file `{"<id>_0": [start, end]}` at `path` and its answer file beside it
    (`<stem>_qa.json`), for `python -m timeexpert.eval.nextgqa`. Unparseable predictions are
    written as empty (MR/VHD rows with no windows; DVC videos and GQA spans left out).
    """
    records, task = _select(records, task)
    parsed = parse_all(records, predictions, task)
    path = pathlib.Path(path)
    if task == Task.GQA:
        _, spans, answers = gqa_files(records, parsed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spans))
        path.with_name(f"{path.stem}_qa.json").write_text(json.dumps(answers))
        return path
    if task == Task.DVC:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dvc_results(records, parsed)))
        return path
    rows = []
    for r, p in zip(records, parsed):
        row = prediction_row(r, p if p.ok else ParseResult())
        if task == Task.VHD and "pred_saliency_scores" not in row and p.ok:
            row["pred_saliency_scores"] = saliency_from_events(p.events, r.duration, r.clip_len)
        rows.append(row)
    write_jsonl(rows, path)
    return path

