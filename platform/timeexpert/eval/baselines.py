"""Trivial baselines, so every reported number comes with the floor it has to beat.

`trivial_baselines(train_records, test_records, seed=0)` scores, on the test records of each task
present, through the same `evaluate_predictions` as the model:

- MR `mean_interval`: the train split's mean normalised (start/duration, end/duration) of each
  record's first window, applied to each test video's duration (the "prior" baseline of the
  Charades-STA bias studies). `random_interval`: two uniform times in [0, duration], sorted,
  from `numpy.random.default_rng(seed)`.
- VHD `uniform_saliency`: every clip gets the same score. As in the official scorer, tied scores
  form a single threshold, so HL-mAP equals the fraction of positive clips, and HIT@1 takes the
  first clip (np.argmax returns the first maximum). Also `mean_interval` on its windows.
- DVC `single_event`: one event covering the whole video; `uniform_k`: k equal consecutive events,
  k = the train split's mean event count (rounded, at least 1). Captions: the train split's most
  frequent caption (empty when it has none).
- GQA `most_frequent_option`: of each question's options, the one the train split answers most
  often (the first on a tie), with MR's `mean_interval` as its span; `random_option`: a uniform
  option and a `random_interval` span (seeded); `whole_video`: the most frequent option with the
  whole video as its span (IoP is then the evidence's share of the video).

And the ceiling above them, `frame_grid_ceiling(test_records, num_frames)`: the ground truth with
every start and end snapped to the nearest boundary of `num_frames` equal segments, the frames a
model samples (one per segment, `data.video.frame_indices`). It is what a model that finds every
event and places it to its segment would score (MR and DVC localisation), so a target above it
asks for resolution the frames do not give.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from timeexpert.eval.evaluate import evaluate_predictions
from timeexpert.events import Event, Record, Task


def mean_normalised_interval(train_records: Sequence[Record]) -> tuple[float, float]:
    """Mean (start/duration, end/duration) of each train record's first window; (0, 1) if none."""
    spans = [(r.events[0].start / r.duration, r.events[0].end / r.duration)
             for r in train_records if r.events]
    if not spans:
        return 0.0, 1.0
    start, end = np.mean(spans, axis=0)
    return float(min(start, 1.0)), float(min(max(end, start), 1.0))


def _most_common_caption(train_records: Sequence[Record]) -> str:
    counts = collections.Counter(e.caption for r in train_records for e in r.events if e.caption)
    return counts.most_common(1)[0][0] if counts else ""


def mr_baselines(train_records, test_records, seed: int = 0) -> dict[str, dict[str, list[Event]]]:
    """Baseline name -> {record id: [window]} for MR-style records."""
    s, e = mean_normalised_interval(train_records)
    rng = np.random.default_rng(seed)
    random = {}
    for r in test_records:
        a, b = np.sort(rng.uniform(0, r.duration, 2))
        random[r.id] = [Event(float(a), float(b), score=1.0)]
    return {
        "mean_interval": {r.id: [Event(s * r.duration, e * r.duration, score=1.0)] for r in test_records},
        "random_interval": random,
    }


def dvc_baselines(train_records, test_records) -> dict[str, dict[str, list[Event]]]:
    caption = _most_common_caption(train_records)
    counts = [len(r.events) for r in train_records if r.events]
    k = max(1, int(round(float(np.mean(counts))))) if counts else 1
    uniform = {}
    for r in test_records:
        edges = np.linspace(0, r.duration, k + 1)
        uniform[r.id] = [Event(float(a), float(b), caption=caption) for a, b in zip(edges[:-1], edges[1:])]
    return {
        "single_event": {r.id: [Event(0.0, r.duration, caption=caption)] for r in test_records},
        "uniform_k": uniform,
    }


def gqa_baselines(train_records, test_records, seed: int = 0) -> dict[str, dict[str, list[Event]]]:
    """Baseline name -> {record id: [the span, captioned with the chosen option]} (GQA)."""
    answered = collections.Counter(r.options[r.answer] for r in train_records
                                   if r.answer is not None)
    rng = np.random.default_rng(seed)
    prior = mr_baselines(train_records, test_records, seed)
    out: dict[str, dict[str, list[Event]]] = {"most_frequent_option": {}, "random_option": {},
                                               "whole_video": {}}
    for r in test_records:
        frequent = max(r.options, key=lambda o: (answered[o], -r.options.index(o)))
        mean_span, random_span = prior["mean_interval"][r.id][0], prior["random_interval"][r.id][0]
        out["most_frequent_option"][r.id] = [Event(mean_span.start, mean_span.end, caption=frequent)]
        out["random_option"][r.id] = [Event(random_span.start, random_span.end,
                                            caption=r.options[int(rng.integers(len(r.options)))])]
        out["whole_video"][r.id] = [Event(0.0, r.duration, caption=frequent)]
    return out


def frame_grid_ceiling(
    test_records: Sequence[Record], num_frames: int, captions: bool = False
) -> dict[str, dict[str, Any]]:
    """"{task}/frame_grid" -> metrics of the ground truth snapped to `num_frames` segments (MR and
    DVC records; module doc). `captions=True` adds the DVC caption metrics of the GT captions."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    out: dict[str, dict[str, Any]] = {}
    for task in (Task.MR, Task.DVC):
        test = [r for r in test_records if r.task == task]
        if not test:
            continue
        preds = {}
        for r in test:
            edges_G = np.linspace(0.0, r.duration, num_frames + 1)
            times_E2 = np.array([[e.start, e.end] for e in r.events]).reshape(-1, 2)
            snapped_E2 = edges_G[np.abs(times_E2[..., None] - edges_G).argmin(-1)]
            preds[r.id] = [Event(float(a), float(b), score=1.0, caption=e.caption)
                           for (a, b), e in zip(snapped_E2, r.events)]
        out[f"{task.value}/frame_grid"] = evaluate_predictions(test, preds, task, captions=captions)
    return out


class _Saliency:  # a Prediction-like object carrying only a saliency list
    def __init__(self, saliency: list[float]) -> None:
        self.events: list[Event] = []
        self.saliency = saliency
        self.text = ""


def trivial_baselines(
    train_records: Sequence[Record],
    test_records: Sequence[Record],
    seed: int = 0,
    captions: bool = True,
) -> dict[str, dict[str, Any]]:
    """"{task}/{baseline}" -> metrics on the test records of that task (module doc for each).

    `captions=False` skips the java caption metrics of the DVC baselines.
    """
    out: dict[str, dict[str, Any]] = {}
    for task in Task:
        test = [r for r in test_records if r.task == task]
        if not test:
            continue
        train = [r for r in train_records if r.task == task]
        if task == Task.MR:
            for name, preds in mr_baselines(train, test, seed).items():
                out[f"mr/{name}"] = evaluate_predictions(test, preds, task)
        elif task == Task.GQA:
            for name, preds in gqa_baselines(train, test, seed).items():
                out[f"gqa/{name}"] = evaluate_predictions(test, preds, task)
        elif task == Task.VHD:
            uniform = {
                r.id: _Saliency([1.0] * len(r.saliency or [0.0])) for r in test
            }
            out["vhd/uniform_saliency"] = evaluate_predictions(test, uniform, task)
            if all(r.events for r in test):
                preds = mr_baselines(train, test, seed)["mean_interval"]
                out["vhd/mean_interval"] = evaluate_predictions(test, preds, task)
        else:
            for name, preds in dvc_baselines(train, test).items():
                out[f"dvc/{name}"] = evaluate_predictions(test, preds, task, captions=captions)
    return out
