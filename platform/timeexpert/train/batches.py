"""A run's data, from pipeline rows to model inputs: where the data changes form on its way to the
model.

Rows: what the Ray Data pipeline decodes for a run (`data_config`: the model's frames and size,
the training frame jitter). Batches of rows: a decode-once run splits the shuffled rows into
equal parts, one per rank (`rank_rows`), and each rank decodes its part once (`decode_part`);
else each worker streams its Ray Data shard. `worker_batches` yields a worker's endless batches
from either, resuming at a data position. Tensors: `tokenize_batch` turns a batch into the
model's inputs: the prompt and answer tokens, the frames' pixels and, per the model's heads, the
D2VLM evidence targets, the frame-relevance labels, the captions of the caption contrast and the
GQA hypotheses.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from typing import Any, Iterator

import numpy as np
import torch

from timeexpert.config import DataConfig, VideoConfig
from timeexpert.data.pipeline import decode_rows, draw_segment_frames, row_options
from timeexpert.events import Event, Task, gqa_answer_events, gqa_hypothesis, saliency_events
from timeexpert.models.evidence import encode_evidence_example, pad_targets
from timeexpert.models.frame_relevance import (
    IGNORE_FRAME,
    caption_targets,
    frame_labels,
    pad_caption_ids,
)
from timeexpert.models.tokenizer import collate
from timeexpert.train.config import TrainConfig

log = logging.getLogger(__name__)


# --- rows: what the pipeline decodes, and each worker's batches of them -------------------------


def data_config(cfg: TrainConfig, mconfig, *, train: bool = False):
    """The Ray Data config of a run: the model's frames and size; `train` adds the run's frame
    jitter (evaluation always decodes the segment centres): drawn at decode when streaming, and
    for a decode-once run a grid of `jitter_grid` frames per segment the loop draws from (each
    worker decodes its part itself, `decode_rows`; Ray Data streams the other runs)."""
    jitter = train and cfg.frame_jitter
    grid = cfg.jitter_grid if jitter and cfg.decode_once else 1
    return DataConfig(
        root=cfg.data_root,
        video=VideoConfig(num_frames=mconfig.num_frames * grid, height=mconfig.image_size,
                          width=mconfig.image_size, jitter=jitter and not cfg.decode_once),
        task_weights=dict(cfg.task_weights), seed=cfg.seed, decode_num_cpus=0.25,
    )


def rank_rows(rows: list, num_workers: int, batch_size: int) -> list[list]:
    """Equal contiguous parts of the (shuffled) rows, one per rank (the remainder dropped);
    refuses parts too small for one batch."""
    per_rank = len(rows) // num_workers
    if per_rank < batch_size:
        raise ValueError(f"{len(rows)} training records give each of the {num_workers} workers "
                         f"{per_rank}, fewer than one batch of {batch_size}; use a smaller "
                         "batch_size or fewer workers")
    return [rows[r * per_rank: (r + 1) * per_rank] for r in range(num_workers)]


def decode_part(config: dict[str, Any], cfg: TrainConfig, mconfig, rank: int,
                stats: dict[str, float]):
    """A decode-once run: the function that decodes this rank's part of the training rows in
    this process (no Ray Data task processes to start; the rank's cores are idle until its first
    step) and records the seconds it took in `stats`."""
    def decode() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        rows = decode_rows(config["rows"][rank], data_config(cfg, mconfig, train=True),
                           config.get("skip_counter"))
        stats["decode_s"] = time.perf_counter() - t0
        if rank == 0:
            log.info(f"[stage {cfg.stage}] each worker decoded its part of the training records "
                     f"once (rank 0: {len(rows['id'])} in {stats['decode_s']:.1f} s)")
        return rows

    return decode


def worker_batches(source, cfg: TrainConfig, epoch: int, skip: int, rank: int,
                   segments: int = 0) -> Iterator[tuple[dict, int, int]]:
    """Endless (batch, epoch, index in epoch), resuming at the data position (epoch, `skip`
    batches already consumed). `source`: a function that returns this rank's decoded rows
    (decode once: called once, by the first `next`; each epoch is then a permutation of the rows
    seeded by (seed, rank, epoch) with `shuffle_buffer` on, in order without), or the worker's
    Ray Data shard (streaming: decoded afresh each epoch). `segments` > 0: the rows hold a
    decoded grid of frames and each batch draws one frame per segment (TSN jitter of a
    decode-once run), seeded by (seed, rank, epoch) so a resumed epoch draws alike."""
    rows = source() if callable(source) else None
    while True:
        n = 0
        rng = np.random.default_rng([cfg.seed, rank, epoch]) if segments else None
        if rows is not None:
            batches = epoch_batches(rows, cfg.batch_size,
                                    [cfg.seed, rank, epoch] if cfg.shuffle_buffer else None)
        else:
            kwargs = {}
            if cfg.shuffle_buffer:
                kwargs = dict(local_shuffle_buffer_size=cfg.shuffle_buffer,
                              local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank)
            batches = source.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                          drop_last=True, **kwargs)
        for batch in batches:
            n += 1
            if rng is not None:  # drawn for skipped batches too: a resumed epoch draws alike
                batch = draw_segment_frames(batch, segments, rng)
            if n <= skip:
                continue
            yield batch, epoch, n
        if n == 0:
            raise ValueError(
                f"worker {rank} got no full batch of {cfg.batch_size} from its part of the data; "
                "use a smaller batch_size or fewer workers"
            )
        epoch, skip = epoch + 1, 0


def epoch_batches(rows: dict[str, np.ndarray], batch_size: int,
                  seed: list[int] | None) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of full batches of `rows`, in a permutation seeded by `seed` (None: in order);
    the last partial batch is dropped."""
    n = len(next(iter(rows.values()))) if rows else 0
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    for i in range(n // batch_size):
        take = order[i * batch_size: (i + 1) * batch_size]
        yield {k: v[take] for k, v in rows.items()}


def draws_segments(cfg: TrainConfig) -> bool:
    """A decode-once run with frame jitter decodes a grid and draws each epoch's frames from it."""
    return cfg.frame_jitter and cfg.decode_once and cfg.jitter_grid > 1


# --- tensors: a batch of rows -> the model's inputs -------------------------------------------


def answer_events(row: dict[str, Any], max_events: int) -> list[Event]:
    """The events a pipeline row's answer serializes (the SFT target, FPO's chosen side): a VHD
    record with per-clip saliency answers its scored highlight windows (so the score head learns
    saliency); otherwise the record's events."""
    saliency = json.loads(str(row["saliency"])) if "saliency" in row else None
    if str(row["task"]) == Task.VHD.value and saliency:
        return saliency_events(saliency, float(row["clip_len"]), float(row["duration"]),
                               max_events)
    events = [Event.from_dict(e) for e in json.loads(str(row["events"]))]
    if str(row["task"]) == Task.GQA.value:  # grounding then answering
        return gqa_answer_events(events, row_options(row), int(row["answer"]))
    return events


def relevance_labels(row: dict[str, Any], times: list[float]) -> np.ndarray:
    """Per-frame targets of the frame-relevance BCE for a pipeline row: MR, 1 inside the queried
    windows; DVC ("describe every event"), 1 inside any event; VHD, the saliency (0-4) of the
    clip each frame falls in, over 4 (a near miss scores part: attribute-level supervision);
    IGNORE_FRAME where a row has no target."""
    task = str(row["task"])
    if task in (Task.MR.value, Task.DVC.value, Task.GQA.value):
        windows = [(e["start"], e["end"]) for e in json.loads(str(row["events"]))]
        return frame_labels(windows, times)
    if task == Task.VHD.value and "saliency" in row:
        clip_len = float(row["clip_len"])
        saliency = json.loads(str(row["saliency"]))
        windows = [(c * clip_len, (c + 1) * clip_len) for c in range(len(saliency))]
        return frame_labels(windows, times, weights=[s / 4.0 for s in saliency])
    return np.full(len(times), IGNORE_FRAME, dtype=np.float32)


def captioned_events(row: dict[str, Any], tokenizer, every_row: bool = False
                     ) -> list[tuple[float, float, list[int]]] | None:
    """What happens in a row's video, as (start, end, the word ids of its caption) of each
    captioned event (what the caption contrast learns from): a DVC row's own
    events; with `every_row`, any row's `video_captions` (the pipeline's column: its video's DVC
    events); None for a row that does not know them (an MR / VHD row names one event of its
    video)."""
    if str(row["task"]) == Task.DVC.value:
        events = json.loads(str(row["events"]))
    elif every_row and "video_captions" in row:
        events = json.loads(str(row["video_captions"]))
    else:
        return None
    return [(e["start"], e["end"], tokenizer.encode_text(e["caption"]))
            for e in events if e.get("caption")] or None


def row_captions(row: dict[str, Any], times: list[float], tokenizer, every_row: bool = False
                 ) -> tuple[list[list[int]], np.ndarray] | None:
    """The caption contrast's targets of a row (`captioned_events`): the word ids of each caption
    and the (K, T) frames each one's event covers; None for a row without captions."""
    events = captioned_events(row, tokenizer, every_row)
    return caption_targets(events, times) if events else None


def pad_captions(captions: list[tuple[list[list[int]], np.ndarray] | None]
                 ) -> dict[str, torch.Tensor] | None:
    """Rows' `row_captions` -> caption_ids (B, K, L), -1 padding, and caption_frames (B, K, T),
    IGNORE_FRAME padding; None when no row has captions."""
    present = [c for c in captions if c is not None]
    if not present:
        return None
    K = max(len(ids) for ids, _ in present)
    L = max(len(x) for ids, _ in present for x in ids)
    T = max(covers.shape[1] for _, covers in present)
    ids_BKL = torch.full((len(captions), K, L), -1, dtype=torch.long)
    frames_BKT = torch.full((len(captions), K, T), IGNORE_FRAME)
    for b, c in enumerate(captions):
        if c is None:
            continue
        ids_BKL[b, : len(c[0])] = pad_caption_ids(c[0], L)
        frames_BKT[b, : c[1].shape[0], : c[1].shape[1]] = torch.from_numpy(c[1])
    return {"caption_ids": ids_BKL, "caption_frames": frames_BKT}


def hypothesis_row(row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A GQA row as the hypothesis `GroundingModel.ground_options` asks at inference (`gqa_hypothesis`):
    the question with one of its options as a moment query, whose moment is the evidence when
    the option is the answer and none when it is not. The right option half the time, else a
    wrong one drawn uniformly."""
    options, answer = row_options(row), int(row["answer"])
    wrong = [k for k in range(len(options)) if k != answer]
    k = answer if not wrong or rng.random() < 0.5 else int(rng.choice(wrong))
    return {**row, "task": Task.MR.value, "query": gqa_hypothesis(str(row["query"]), options[k]),
            "events": row["events"] if k == answer else "[]", "options": "null", "answer": -1}


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer, config, model,
                   step: int = 0) -> dict[str, Any]:
    """A pipeline batch (frames, timestamps, task, query, events) -> model inputs. With evidence
    tokens on (D2VLM), the D2VLM answer and its (B, K, T) `evidence_frames` targets; with frame
    relevance on, the (B, T) `frame_labels`; with `patch_relevance`, the rows' captions
    (`pad_captions`); with the answer choice `gqa: options`, each GQA row a hypothesis
    (`hypothesis_row`, drawn from a generator seeded by the step and the row's id: reruns see
    the same batches)."""
    encoded, pixels, targets, labels, captions = [], [], [], [], []
    grounds_options = config.answer_choice().gqa == "options"
    for i in range(len(batch["id"])):
        mask = batch["frame_mask"][i] if "frame_mask" in batch else np.ones(len(batch["timestamps"][i]), bool)
        times = batch["timestamps"][i][mask].tolist()
        row = {k: v[i] for k, v in batch.items()}
        rng = np.random.default_rng([step, zlib.crc32(str(row["id"]).encode())])
        if (grounds_options and str(row["task"]) == Task.GQA.value
                and row_options(row) and int(row.get("answer", -1)) >= 0):
            row = hypothesis_row(row, rng)
        task, query = str(row["task"]), str(row["query"])
        events = answer_events(row, config.max_events)
        if config.evidence is not None:
            duration = float(batch["duration"][i]) if "duration" in batch else None
            enc, target_KT = encode_evidence_example(
                tokenizer, task, query, times, events, tokens_per_frame=config.tokens_per_frame,
                duration=duration, max_length=config.max_position_embeddings,
                query_first=config.query_first, options=row_options(row))
            targets.append(target_KT)
        else:
            enc = tokenizer.encode_example(task, query, times, events,
                                           tokens_per_frame=config.tokens_per_frame,
                                           max_length=config.max_position_embeddings,
                                           query_first=config.query_first,
                                           options=row_options(row))
        if config.frame_relevance:
            labels.append(relevance_labels(row, times))
        if config.patch_relevance:
            captions.append(row_captions(row, times, tokenizer, config.captions_every_row))
        encoded.append(enc)
        pixels.append(model.preprocess_frames(batch["frames"][i][mask]))
    inputs = collate(encoded)
    inputs["pixel_values"] = torch.cat(pixels)
    if targets:
        inputs["evidence_frames"] = pad_targets(targets)
    if labels:
        labels_BT = torch.full((len(labels), max(len(x) for x in labels)), IGNORE_FRAME)
        for b, x in enumerate(labels):
            labels_BT[b, : len(x)] = torch.from_numpy(x)
        inputs["frame_labels"] = labels_BT
    inputs.update(pad_captions(captions) or {})
    return inputs
