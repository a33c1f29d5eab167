"""The training loop: `train_loop_per_worker(config)` under Ray Train's TorchTrainer, and `fit`.

Per worker: build (tokenizer, model config, weights from the last checkpoint / the previous stage
/ fresh), shard (this rank's expert slice, optimizers: `parallel.py`), loop (Ray Data shard ->
tokens -> forward -> stage loss -> backward -> synced step -> token-adaptive add/prune), report
(progress line, MLflow step metrics from rank 0, checkpoints through `ray.train.report`). Rank 0
times each phase of the step (`StepTimes`: MLflow `time/<phase>` per report, `time_total/<phase>`
and one line at the end of the stage) and, with `profile_steps`, writes a torch profiler trace.
With `TrainConfig.decode_once` each worker decodes its part of the training videos once, before
its first step, and draws every epoch from them; else Ray Data streams decoded frames each epoch.

What each stage trains and which loss it counts: `train.recipes` (`TrainConfig.recipe`). With
D2VLM evidence tokens on, batches carry `evidence_frames`; with frame relevance, `frame_labels`
(and `frame_words`); their losses join every stage's.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from timeexpert import devices, storage
from timeexpert.checkpoints import clean_incomplete, local_copy, resumable
from timeexpert.config import DataConfig, VideoConfig
from timeexpert.data.pipeline import build_dataset, decode_rows, draw_segment_frames, row_options
from timeexpert.events import (Event, Task, TokenType, gqa_answer_events, gqa_hypothesis,
                               saliency_events)
from timeexpert.models.expert_parallel import load_weights
from timeexpert.models.evidence import encode_evidence_example, pad_targets
from timeexpert.models.frame_relevance import (
    IGNORE_FRAME,
    caption_targets,
    frame_labels,
    frame_word_labels,
    pad_caption_ids,
)
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.models.upcycle import dense_tokenizer
from timeexpert.presets import get_preset
from timeexpert.tracking import StepLogger
from timeexpert.train import checkpoint as ckpt
from timeexpert.train import parallel
from timeexpert.train.config import TrainConfig
from timeexpert.train.recipes import apply_lora, set_stage_trainable, stage_loss, stage_spec

log = logging.getLogger(__name__)

TOKEN_TYPE_NAMES = [t.name.lower() for t in TokenType]
MAX_CAPTIONS = 4096  # candidates of dense captioning by grounding the tokenizer keeps


# --- build helpers (driver and workers) --------------------------------------------------------


def model_config(cfg: TrainConfig, tokenizer):
    """The preset's TimeExpertConfig with the run's MoE / model overrides and the tokenizer's ids."""
    config = get_preset(cfg.preset).model
    for key, value in cfg.model_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model_overrides: {cfg.preset!r} config has no field {key!r}")
        setattr(config, key, value)
    if cfg.moe:
        moe = dict(config.moe or {})
        moe.update(cfg.moe)
        config.moe = moe
        config.moe_config()  # validates
    return config.with_tokenizer(tokenizer)


def train_tokenizer(cfg: TrainConfig, records) -> Any:
    """A text tokenizer trained in-process on the training split's queries, captions and answer
    options; for a decoder upcycled from a dense LM, that LM's own tokenizer (its embeddings
    index its ids). Either carries the split's distinct captions, most frequent first
    (`GroundingTokenizer.captions`)."""
    preset = get_preset(cfg.preset)
    counts = collections.Counter(e.caption.strip() for r in records for e in r.events
                                 if e.caption and e.caption.strip())
    captions = [c for c, _ in counts.most_common(MAX_CAPTIONS)]
    upcycle_from = cfg.model_overrides.get("upcycle_from", preset.model.upcycle_from)
    if upcycle_from:
        return dense_tokenizer(upcycle_from, captions)
    texts = ([r.query for r in records] + [e.caption for r in records for e in r.events]
             + [o for r in records for o in r.options or []])
    return GroundingTokenizer.train(texts, vocab_size=preset.tokenizer_vocab_size,
                                    captions=captions)


def load_tokenizer(uri: str):
    with local_copy(uri) as d:
        return GroundingTokenizer.from_pretrained(d)


def merged_lora_state(model, state: dict) -> dict:
    """A state dict with every LoRA-wrapped layer folded back into its plain weight
    (W + scale B A), so the checkpoint loads into a model without adapters."""
    out = {}
    for name, value in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            prefix, _, leaf = name.partition(".base_layer.")
            if leaf == "weight":
                value = value + model.get_submodule(prefix).get_delta_weight("default").detach()
            name = f"{prefix}.{leaf}"
        out[name] = value
    return out


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


def word_labels(row: dict[str, Any], times: list[float], tokenizer,
                every_row: bool = False) -> np.ndarray:
    """(T, V) targets of the frame-words BCE: for a row with its video's captioned events
    (`captioned_events`) each frame's multi-hot of the words of the captions of the events it
    falls in; IGNORE_FRAME rows for the others."""
    V = tokenizer.text_vocab_size
    events = captioned_events(row, tokenizer, every_row)
    if events is None:
        return np.full((len(times), V), IGNORE_FRAME, dtype=np.float32)
    return frame_word_labels(events, times, V)


def captioned_events(row: dict[str, Any], tokenizer, every_row: bool = False
                     ) -> list[tuple[float, float, list[int]]] | None:
    """What happens in a row's video, as (start, end, the word ids of its caption) of each
    captioned event (what frame words and the caption contrast learn from): a DVC row's own
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


def hard_negatives(captions: list[list[int]], bank: list[list[int]], n: int,
                   rng: np.random.Generator) -> list[list[int]]:
    """`n` captions of `bank` (text ids) that are none of a video's `captions` but are nearest to
    one of them: the fewest words not in that caption ("the red circle shrinks" for "the red
    circle grows"), ties in a random order. What the caption contrast must tell apart to bind
    every word, where a video's own captions often differ in colour alone."""
    own = {tuple(c) for c in captions}
    words = [set(c) for c in captions]
    pool = [c for c in bank if tuple(c) not in own]
    if not pool or n <= 0 or not words:
        return []
    distance = np.array([min(len(set(c) - w) for w in words) for c in pool], np.float64)
    order = np.lexsort((rng.random(len(pool)), distance))[:n]
    return [pool[i] for i in order]


def with_negatives(captions: tuple[list[list[int]], np.ndarray] | None, negatives: list[list[int]]
                   ) -> tuple[list[list[int]], np.ndarray] | None:
    """A row's `row_captions` + captions its video does not show (no frame covered)."""
    if captions is None or not negatives:
        return captions
    ids, covers_KT = captions
    none_NT = np.zeros((len(negatives), covers_KT.shape[1]), covers_KT.dtype)
    return ids + negatives, np.concatenate([covers_KT, none_NT])


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
    """A GQA row as the hypothesis `answer_from_frames` asks at inference (`gqa_hypothesis`):
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
    (`pad_captions`), with `caption_negatives` hard ones added (`hard_negatives`); with
    `answer_from_frames`, each GQA row a hypothesis (`hypothesis_row`). Both draw from a
    generator seeded by the step and the row's id (reruns see the same batches)."""
    encoded, pixels, targets, labels, words, captions = [], [], [], [], [], []
    for i in range(len(batch["id"])):
        mask = batch["frame_mask"][i] if "frame_mask" in batch else np.ones(len(batch["timestamps"][i]), bool)
        times = batch["timestamps"][i][mask].tolist()
        row = {k: v[i] for k, v in batch.items()}
        rng = np.random.default_rng([step, zlib.crc32(str(row["id"]).encode())])
        if (config.answer_from_frames and str(row["task"]) == Task.GQA.value
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
        if config.frame_words:
            words.append(word_labels(row, times, tokenizer, config.captions_every_row))
        if config.patch_relevance:
            own = row_captions(row, times, tokenizer, config.captions_every_row)
            if own is not None and config.caption_negatives:
                own = with_negatives(own, hard_negatives(own[0], tokenizer.caption_ids,
                                                         config.caption_negatives, rng))
            captions.append(own)
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
    if words:
        words_BTV = torch.full((len(words), max(len(x) for x in words), words[0].shape[1]),
                               IGNORE_FRAME)
        for b, x in enumerate(words):
            words_BTV[b, : len(x)] = torch.from_numpy(x)
        inputs["frame_words"] = words_BTV
    inputs.update(pad_captions(captions) or {})
    return inputs


def _batches(source, cfg: TrainConfig, epoch: int, skip: int, rank: int,
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


def rank_rows(rows: list, num_workers: int, batch_size: int) -> list[list]:
    """Equal contiguous parts of the (shuffled) rows, one per rank (the remainder dropped);
    refuses parts too small for one batch."""
    per_rank = len(rows) // num_workers
    if per_rank < batch_size:
        raise ValueError(f"{len(rows)} training records give each of the {num_workers} workers "
                         f"{per_rank}, fewer than one batch of {batch_size}; use a smaller "
                         "batch_size or fewer workers")
    return [rows[r * per_rank: (r + 1) * per_rank] for r in range(num_workers)]


def _decode_part(config: dict[str, Any], cfg: TrainConfig, mconfig, rank: int,
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


# --- where the time goes -------------------------------------------------------------------------

PHASES = ("data", "forward", "backward", "grad_sync", "optimizer", "experts", "report", "checkpoint")


class StepTimes:
    """Where a rank's loop time goes, by phase of the step (`PHASES`): perf_counter laps, each
    lap's seconds charged to the phase it ends, so the phases tile the loop's wall time. "data"
    is waiting for the shard's batch and tokenizing it; "grad_sync" the explicit gradient
    all-reduce (under ZeRO, DeepSpeed reduces dense gradients inside backward and its step);
    "experts" the A_t sync and token-adaptive add/prune; "report" the metric bookkeeping, the
    reduction over ranks, the progress line, MLflow and `ray.train.report`; "checkpoint" the
    state gather, the write and the report that persists it. No device sync is added: on CPU the
    laps are exact, on CUDA a phase holds its kernel launches and the GPU time lands in the phase
    of the next host wait (the all-reduce, the report's reduction)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.window_s = dict.fromkeys(PHASES, 0.0)
        self.total_s = dict.fromkeys(PHASES, 0.0)
        self.window_steps = self.total_steps = 0

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.window_s[phase] += now - self.last
        self.total_s[phase] += now - self.last
        self.last = now

    def skip(self) -> None:
        """Charge the time since the last lap to no phase (the profiler writing its trace)."""
        self.last = time.perf_counter()

    def step_done(self) -> None:
        self.window_steps += 1
        self.total_steps += 1

    def window(self) -> dict[str, float]:
        """Mean seconds per step of each phase since the last call (`time/<phase>`, and
        `time/step` their sum). A report's own cost is charged to the next window."""
        steps = max(self.window_steps, 1)
        out = {f"time/{k}": v / steps for k, v in self.window_s.items()}
        out["time/step"] = sum(self.window_s.values()) / steps
        self.window_s, self.window_steps = dict.fromkeys(PHASES, 0.0), 0
        return out

    def summary(self) -> dict[str, float]:
        """The stage so far: seconds per phase (`time_total/<phase>`), the loop and its steps."""
        out = {f"time_total/{k}": v for k, v in self.total_s.items()}
        out["time_total/loop"] = sum(self.total_s.values())
        out["time_total/steps"] = float(self.total_steps)
        return out


def _time_line(cfg: TrainConfig, total: dict[str, float]) -> str:
    """The stage's breakdown in one line: seconds per step and share of the loop per phase."""
    loop, steps = total["time_total/loop"], max(total["time_total/steps"], 1.0)
    parts = ", ".join(f"{k} {total[f'time_total/{k}'] / steps:.3f} "
                      f"({100 * total[f'time_total/{k}'] / max(loop, 1e-9):.0f}%)" for k in PHASES)
    return (f"[stage {cfg.stage}] {int(steps)} steps in {loop:.1f} s, {loop / steps:.3f} s/step "
            f"on rank 0: {parts}")


def _start_profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True)
    profiler.start()
    return profiler


def _save_profile(profiler, cfg: TrainConfig, first: int, last: int, logger) -> None:
    """Stop the profiler; its Chrome trace (Perfetto or chrome://tracing open the .json.gz) and
    its op table go to the stage's MLflow run under profile/, without MLflow under the run's
    folder of the storage root."""
    profiler.stop()
    name = f"stage{cfg.stage}_steps{first}-{last}_rank0"
    with tempfile.TemporaryDirectory(prefix="te-profile-") as d:
        raw = os.path.join(d, "trace.json")
        profiler.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(os.path.join(d, f"trace_{name}.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        with open(os.path.join(d, f"ops_{name}.txt"), "w") as f:
            f.write(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        if logger.enabled:
            for file in sorted(os.listdir(d)):
                logger.log_artifact(os.path.join(d, file), "profile")
            where = f"MLflow run {cfg.mlflow_run_id}, artifacts profile/"
        else:
            where = storage.join_uri(storage_root(cfg), cfg.run_name(), "profile")
            storage.upload_dir(d, where)
    log.info(f"[stage {cfg.stage}] profiler trace of steps {first}..{last} (rank 0): {where}")


# --- the loop ----------------------------------------------------------------------------------

# Ray 2.60 logs every `ray.train.report` (all metrics, once per rank) at INFO from a logger named
# by its file path (`logging.getLogger(__file__)` in this module of Ray's), not under `ray.train`,
# so neither `RunConfig(logging_config=...)` nor `ray.train.LoggingConfig`
# (ray-project/ray#61550, which filters `ray.train` records only) reaches it. Found by that name
# and raised to WARNING in the worker; no private module is imported.
_RAY_REPORT_LOGGER = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")


class _WorkerFormatter(logging.Formatter):
    """INFO as the bare message, a line tagged `[stage N`, `[rank N]` or `[fpo]`; a warning or an
    error as `LEVEL logger: message`. The jobs' driver prints a worker's line only in one of these
    forms (jobs/_common.py WORKER_LINE): the rest of the worker's output is Ray's."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno <= logging.INFO:
            return message
        return f"{record.levelname} {record.name}: {message}"


def worker_logging() -> None:
    """A Train worker's own lines (rank 0's progress, resume notices, warnings) to its stdout,
    which Ray keeps in the worker's log file; Ray's per-report INFO line silenced (above)."""
    package = logging.getLogger("timeexpert")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_WorkerFormatter())
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False  # once, whatever handlers Ray gave the root logger
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(_RAY_REPORT_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class Start:
    """Where a worker's stage starts."""

    weights: dict[str, Any] | None  # this rank's shard of the weights (None: fresh weights)
    state: dict[str, Any]  # stage, step, data position (epoch, batch in epoch), samples, restores
    routing: dict[str, Any]  # routing telemetry of the stage so far (a resumed run's)
    optim_state: dict[str, Any] | None = None  # the optimizers' state (resumed run,
    # `checkpoint.read_optimizer_state`)
    resumed: bool = False  # a restarted worker group, from the run's last checkpoint


@dataclass
class Worker:
    """What one worker built: its place, its data, its model shard and optimizers."""

    cfg: TrainConfig
    groups: parallel.ParallelGroups  # rank, EP / expert-DP groups, compute device
    tokenizer: Any
    mconfig: Any  # the model's TimeExpertConfig
    model: Any  # this rank's TimeExpertForGrounding (its expert slots only)
    optim: parallel.Optimizers
    spec: Any  # the stage's StageSpec
    logger: StepLogger | None  # rank 0 only
    data_stats: dict[str, float] = field(default_factory=dict)  # decode_s: this rank's decode
    storage_wait_s: float = 0.0  # this rank's checkpoint writes' wait for storage so far


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, shard, loop, report.
    `config`: {"train": TrainConfig dict, "tokenizer_uri": str; for a decode-once run "rows":
    the pipeline rows of each rank, which the rank decodes itself, and "skip_counter": the
    pipeline's skip counter (else the rank reads Ray Train's "train" dataset shard)}."""
    cfg = TrainConfig.from_dict(config["train"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()  # this worker's GPU, or the CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed use the current device
    worker_logging()
    torch.manual_seed(cfg.seed)
    groups = parallel.init_groups(cfg.ep_size, device)
    # build: the tokenizer, the model config, where the stage starts
    tokenizer = load_tokenizer(config["tokenizer_uri"])
    mconfig = model_config(cfg, tokenizer)
    start = _start(cfg, groups)
    stats: dict[str, float] = {}
    source = (_decode_part(config, cfg, mconfig, rank, stats) if "rows" in config
              else ray.train.get_dataset_shard("train"))
    segments = mconfig.num_frames if _draws_segments(cfg) else 0
    batches = _prefetch_first(_batches(source, cfg, start.state["epoch"],
                                       start.state["batch_in_epoch"], rank, segments))
    # shard: this rank's expert slots on its device, the stage's trainable set, the optimizers
    model, optim, spec = _shard(cfg, mconfig, groups, start)
    logger = StepLogger(cfg.tracking_uri, cfg.mlflow_run_id) if rank == 0 else None
    worker = Worker(cfg=cfg, groups=groups, tokenizer=tokenizer, mconfig=mconfig, model=model,
                    optim=optim, spec=spec, logger=logger, data_stats=stats)
    if rank == 0:
        log.info(_start_line(worker, start))
    # loop and report
    timer = _loop(worker, batches, start)
    if logger is not None:  # rank 0: the stage's breakdown, one line and MLflow
        total = timer.summary()
        log.info(_time_line(cfg, total))
        logger.log(total, cfg.num_steps)
        logger.close()


def _start(cfg: TrainConfig, groups: parallel.ParallelGroups) -> Start:
    """The run's last checkpoint (a restarted worker group), else `init_from`'s weights, else
    fresh ones. Of a checkpoint's experts only this rank's slice is read."""
    state = {"stage": cfg.stage, "step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # Ray Train registers a checkpoint once every rank committed its part; a complete one is
        # checked again here, and one damaged since gives way to the run's previous complete one
        with local_copy(resumable(ckpt.checkpoint_uri(restored))) as d:
            train_state = ckpt.read_train_state(d)
            start = Start(weights=load_weights(d, groups.ep_rank, groups.ep_size),
                          state=train_state["state"], routing=ckpt.read_routing(d),
                          optim_state=ckpt.read_optimizer_state(
                              d, groups.rank, _layout(cfg, groups)),
                          resumed=True)
        start.state["restores"] = start.state.get("restores", 0) + 1
        start.state["resumed_at"] = start.state.get("resumed_at", []) + [start.state["step"]]
        written = train_state.get("layout") or _layout(cfg, groups)
        other = ""
        if written != _layout(cfg, groups):  # samples are counted per rank: keep the run's total
            start.state["samples"] = (start.state["samples"] * written["world_size"]
                                      // groups.world_size)
            other = (f"; written by {written['world_size']} workers at EP {written['ep_size']}, "
                     "optimizer state resharded")
        log.info(f"[rank {groups.rank}] resumed from checkpoint at step {start.state['step']} "
                 f"(data position: epoch {start.state['epoch']}, batch "
                 f"{start.state['batch_in_epoch']}{other})")
        return start
    if cfg.init_from:
        with local_copy(cfg.init_from) as d:
            return Start(weights=load_weights(d, groups.ep_rank, groups.ep_size),
                         state=state, routing={})
    return Start(weights=None, state=state, routing={})


def _layout(cfg: TrainConfig, groups: parallel.ParallelGroups) -> dict[str, int]:
    return ckpt.layout(groups.world_size, groups.ep_size, cfg.zero_stage)


def _prefetch_first(batches: Iterator) -> Iterator:
    """`batches`, its first item fetched in a thread from now on: the shard's split and iterator
    starting up (a second or two) overlap the model and optimizer build."""
    pool = ThreadPoolExecutor(max_workers=1)
    first = pool.submit(next, batches)
    pool.shutdown(wait=False)

    def chained():
        yield first.result()
        yield from batches

    return chained()


def _shard(cfg: TrainConfig, mconfig, groups: parallel.ParallelGroups, start: Start):
    """This rank's model on its device, built on the meta device with only its expert slots
    materialised (`parallel.materialize` / `fresh_model`), the stage's trainable parameters (and
    LoRA adapters), and the optimizers with a resumed run's state."""
    if start.weights is None:
        model = parallel.fresh_model(mconfig, groups)  # seeded: identical on every rank
    else:
        model = parallel.materialize(TimeExpertForGrounding, mconfig, groups, start.weights)
        start.weights = None  # the model holds them now
    model.train()
    spec = stage_spec(cfg.recipe, cfg.stage, vision_pretrained=bool(mconfig.vision_path))
    if spec.lora:  # adapters start at B = 0: the model's function is unchanged
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    set_stage_trainable(model, spec)
    optim = parallel.Optimizers(model, groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                grad_clip=cfg.grad_clip, zero_stage=cfg.zero_stage,
                                batch_size=cfg.batch_size)
    if start.optim_state is not None:
        optim.load_state_dict(start.optim_state)
    return model, optim, spec


def _start_line(w: Worker, start: Start) -> str:
    cfg, spec = w.cfg, w.spec
    n_train = sum(p.numel() for p in w.model.parameters() if p.requires_grad)
    n_expert = sum(p.numel() for n, p in w.model.named_parameters() if parallel.is_expert_param(n))
    return (f"[stage {cfg.stage}: {cfg.recipe} {spec.name}{' +LoRA' if spec.lora else ''}] "
            f"{cfg.num_workers} workers, EP={cfg.ep_size}, ZeRO-{cfg.zero_stage}, "
            f"{w.groups.device}, {devices.compute_dtype(w.groups.device, cfg.precision)}, "
            f"{torch.get_num_threads()} torch threads per worker, {n_train} trainable "
            f"parameters on rank 0 ({n_expert} in its expert slots), "
            f"steps {start.state['step'] + 1}..{cfg.num_steps}")


@dataclass
class StepResult:
    out: Any  # the model's TimeExpertOutput
    loss: torch.Tensor
    lr: float
    grad_norm: torch.Tensor
    tokens: int  # real (unpadded) tokens of the batch
    added: int = 0  # experts added by token-adaptive routing at this step
    pruned: int = 0


def _loop(w: Worker, batches: Iterator, start: Start) -> StepTimes:
    """A step per batch; a report every `log_every` steps, a checkpoint every
    `checkpoint_every` and at the last step. Returns rank's step times."""
    cfg, state, rank = w.cfg, start.state, w.groups.rank
    window: dict[str, Any] = {}  # sums over the window; tensors until the report (no host sync)
    timer = StepTimes()
    profiler = None
    first_profiled = min(state["step"] + 2, cfg.num_steps)  # after one warm-up step
    last_profiled = min(first_profiled + cfg.profile_steps - 1, cfg.num_steps)
    for step in range(state["step"] + 1, cfg.num_steps + 1):
        t0 = time.perf_counter()
        if rank == 0 and cfg.profile_steps and step == first_profiled:
            profiler = _start_profiler()
        batch, epoch, index = next(batches)
        if step == state["step"] + 1 and "decode_s" in w.data_stats:
            timer.skip()  # waiting for this rank's decode: data/decode_s holds it, not the loop
        result = _step(w, batch, step, timer)
        state.update(step=step, epoch=epoch, batch_in_epoch=index,
                     samples=state["samples"] + len(batch["id"]))
        if (cfg.fail_at_step == step and rank == cfg.fail_rank and not start.resumed
                and not cfg.fail_after_part):
            _inject_failure(step, rank)
        _add_to_window(window, result, w.mconfig, time.perf_counter() - t0)
        timer.step_done()
        if profiler is not None and step == last_profiled:
            timer.lap("report")
            _save_profile(profiler, cfg, first_profiled, last_profiled, w.logger)
            profiler = None
            timer.skip()
        if step % cfg.log_every and step % cfg.checkpoint_every and step != cfg.num_steps:
            timer.lap("report")
            continue
        _report(w, step, result.lr, epoch, state, window, start, timer)
        window.clear()
    return timer


def _step(w: Worker, batch: dict, step: int, timer: StepTimes) -> StepResult:
    """One optimizer step: the batch's tokens on the device, forward and the stage's loss under
    the run's precision, backward, gradient sync, update, A_t sync and token-adaptive routing."""
    cfg, optim = w.cfg, w.optim
    inputs = devices.to_device(tokenize_batch(batch, w.tokenizer, w.mconfig, w.model, step),
                               w.groups.device)
    lr = cfg.learning_rate(step)
    optim.set_lr(lr)
    timer.lap("data")
    with devices.autocast(w.groups.device, cfg.precision):  # fp32 master weights and router
        out = optim.forward_module()(**inputs, return_logits=False)  # no full-vocab logits
        loss = stage_loss(out, cfg.stage, w.mconfig, cfg.recipe)
    timer.lap("forward")
    optim.backward(loss)
    timer.lap("backward")
    optim.sync()
    timer.lap("grad_sync")
    grad_norm = optim.update()
    timer.lap("optimizer")
    parallel.sync_routing_rates(w.model, w.groups)
    result = StepResult(out=out, loss=loss, lr=lr, grad_norm=grad_norm,
                        tokens=int(inputs["attention_mask"].sum()))
    if cfg.expert_update_every and cfg.stage > 1 and step % cfg.expert_update_every == 0:
        updates = parallel.update_experts(w.model, w.groups, optim.local)
        result.added = sum(len(u.added) for u in updates)
        result.pruned = sum(len(u.pruned) for u in updates)
    timer.lap("experts")
    return result


def _inject_failure(step: int, rank: int) -> None:
    """Fault injection (`TrainConfig.fail_at_step` / `fail_rank`): this worker exits as a killed
    process would, with no cleanup, so that Ray Train restarts the group from the last
    checkpoint."""
    log.warning(f"[rank {rank}] fail_at_step={step}: exiting to test fault tolerance")
    time.sleep(3)  # let the controller collect the last checkpoint report first
    os._exit(1)


def _add_to_window(window: dict[str, Any], r: StepResult, mconfig, seconds: float) -> None:
    """Add a step's losses and counts to the window's sums (every rank has every key: they are
    all-reduced by name)."""
    out = r.out
    values = {"loss": r.loss, "loss_time": out.loss_time, "loss_score": out.loss_score,
              "loss_text": out.loss_text, "aux_loss": out.aux_loss, "z_loss": out.z_loss,
              "grad_norm": r.grad_norm, "experts_added": r.added, "experts_pruned": r.pruned,
              "_steps": 1, "_tokens": r.tokens, "_seconds": seconds}
    if mconfig.frame_relevance:
        values["loss_frames"] = out.loss_frames
    if mconfig.evidence is not None:  # D2VLM
        values.update(loss_grounding=out.loss_grounding, loss_consistency=out.loss_consistency)
    for key, value in values.items():
        value = 0.0 if value is None else value
        window[key] = window.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)


def _report(w: Worker, step: int, lr: float, epoch: int, state: dict, window: dict,
            start: Start, timer: StepTimes) -> None:
    """Metrics averaged over ranks, routing telemetry summed over ranks, rank 0's progress line
    and MLflow metrics, `ray.train.report` (with a checkpoint every `checkpoint_every` steps and
    at the last step, each rank storing and committing its part: `_upload`)."""
    cfg, groups, routing_total = w.cfg, w.groups, start.routing
    metrics = _reduce_window(window, groups)
    routing = _routing_telemetry(w.model, groups)
    _accumulate(routing_total, routing)
    metrics.update(_routing_metrics(routing))
    metrics.update(step=step, stage=cfg.stage, lr=lr, epoch=epoch,
                   samples=state["samples"] * groups.world_size,
                   restores=state.get("restores", 0))  # worker-group restarts so far (MLflow)
    metrics["data/decode_s"] = _decode_seconds(w)
    metrics["checkpoint/storage_wait_s"] = w.storage_wait_s
    # expert parameters this rank holds: 1/EP of the model's (built and read sharded; only
    # rank 0 receives the whole stack, one tensor at a time, to write a checkpoint)
    metrics["experts/params_on_rank"] = float(sum(
        p.numel() for n, p in w.model.named_parameters() if parallel.is_expert_param(n)))
    w.model.reset_routing_telemetry()
    timer.lap("report")
    metrics.update(timer.window())  # this rank's; the result and MLflow keep rank 0's
    if w.logger is not None:
        log.info(_progress_line(cfg, metrics))
        w.logger.log(metrics, step)
    last = step == cfg.num_steps
    if step % cfg.checkpoint_every and not last:
        ray.train.report(metrics)
        timer.lap("report")
        return
    timer.lap("report")
    weights = parallel.checkpoint_state(w.model, groups)
    if w.spec.lora:
        weights = merged_lora_state(w.model, weights)
    with tempfile.TemporaryDirectory(prefix="te-ckpt-") as d:
        ckpt.write_checkpoint(d, rank=groups.rank, model=w.model, state=weights,
                              ep_rank=groups.ep_rank, ep_size=groups.ep_size,
                              tokenizer=w.tokenizer, optimizers=w.optim,
                              train_state={"state": state, "config": cfg.to_dict(),
                                           "layout": _layout(cfg, groups)},
                              routing=routing_total)
        if last:  # the stage's breakdown, but for the report below
            timer.lap("checkpoint")
            metrics.update(timer.summary())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_upload_fn=lambda c, name: _upload(w, c, name, step, start))
    timer.lap("checkpoint")


def _upload(w: Worker, checkpoint, dir_name: str, step: int, start: Start):
    """Ray Train's `checkpoint_upload_fn`: this rank stores its part and its commit marker
    (`checkpoint.upload`), waiting up to `storage_wait_s` for storage; the wait is logged and
    counted (`checkpoint/storage_wait_s` of the next reports). With `fail_after_part`, rank
    `fail_rank` exits once that part is stored (a crash in the middle of a checkpoint)."""
    cfg, rank = w.cfg, w.groups.rank
    after_part = None
    if (cfg.fail_after_part and cfg.fail_at_step == step and rank == cfg.fail_rank
            and not start.resumed):
        def after_part(name: str) -> None:
            if name == cfg.fail_after_part:
                _inject_failure(step, rank)
    stored, waited = ckpt.upload(checkpoint, dir_name, rank=rank,
                                 world_size=w.groups.world_size, budget_s=cfg.storage_wait_s,
                                 after_part=after_part)
    if waited:
        w.storage_wait_s += waited
        log.warning(f"[rank {rank}] the checkpoint of step {step} waited {waited:.1f} s for "
                    f"storage ({w.storage_wait_s:.1f} s in this run so far)")
    return stored


def _draws_segments(cfg: TrainConfig) -> bool:
    """A decode-once run with frame jitter decodes a grid and draws each epoch's frames from it."""
    return cfg.frame_jitter and cfg.decode_once and cfg.jitter_grid > 1


def _decode_seconds(w: Worker) -> float:
    """The slowest rank's decode-once seconds (0 when streaming), reduced over the ranks at the
    first report (every rank decoded its part before its first step) and kept."""
    if "decode_s_max" not in w.data_stats:
        value = torch.tensor([w.data_stats.get("decode_s", 0.0)], dtype=torch.float64,
                             device=w.groups.device)
        if w.groups.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        w.data_stats["decode_s_max"] = float(value)
    return w.data_stats["decode_s_max"]


def _reduce_window(window: dict[str, Any], groups) -> dict[str, float]:
    """Mean per step over the window, averaged over ranks; tokens/s over all ranks."""
    keys = sorted(k for k in window if not k.startswith("_"))
    steps = window["_steps"]
    values = torch.tensor([float(window[k]) / steps for k in keys]
                          + [float(window["_tokens"]), window["_seconds"]],
                          dtype=torch.float64,  # float(): the window's one host sync
                          device=groups.device)  # NCCL reduces device tensors only
    if groups.world_size > 1:
        dist.all_reduce(values)
        values[:-2] /= groups.world_size
        values[-1] /= groups.world_size  # mean wall time per rank
    out = {k: float(v) for k, v in zip(keys, values[:-2])}
    for k in ("experts_added", "experts_pruned"):  # every rank agrees: a count, not a mean
        out[k] = out[k] * steps
    out["tokens_per_s"] = float(values[-2] / max(float(values[-1]), 1e-9))
    return out


def _routing_telemetry(model, groups) -> dict[str, Any]:
    """Per layer: (type x expert) pair counts and tokens per type, summed over the world."""
    layers = [layer.ffn for layer in model.layers]
    if layers[0].cfg.gating == "dense":
        return {"gating": "dense"}
    pairs = torch.stack([m.tel_pairs_TE for m in layers]).double()
    tokens = torch.stack([m.tel_tokens_T for m in layers]).double()
    if groups.world_size > 1:
        flat = torch.cat([pairs.flatten(), tokens.flatten()])
        dist.all_reduce(flat)
        pairs = flat[: pairs.numel()].view_as(pairs)
        tokens = flat[pairs.numel():].view_as(tokens)
    return {
        "gating": layers[0].cfg.gating,
        "types": TOKEN_TYPE_NAMES,
        "pairs": pairs.tolist(),  # [layer][type][expert]
        "tokens": tokens.tolist(),  # [layer][type]
        "active": [int(m.active_E.sum()) for m in layers],
    }


def _accumulate(total: dict[str, Any], routing: dict[str, Any]) -> None:
    if routing.get("gating") == "dense":
        total.setdefault("gating", "dense")
        return
    if "pairs" not in total:
        total.update({k: v for k, v in routing.items()})
        total["active_history"] = []
    else:
        total["pairs"] = (np.asarray(total["pairs"]) + np.asarray(routing["pairs"])).tolist()
        total["tokens"] = (np.asarray(total["tokens"]) + np.asarray(routing["tokens"])).tolist()
        total["active"] = routing["active"]
    total["active_history"].append(routing["active"])


def _routing_metrics(routing: dict[str, Any]) -> dict[str, float]:
    """Mean activated experts per token (overall and per task type) and active expert count."""
    if routing.get("gating") == "dense":
        return {"experts/mean_active": 1.0, "experts/num_active": 1.0}
    pairs = np.asarray(routing["pairs"]).sum(0)  # type x expert, over layers
    tokens = np.asarray(routing["tokens"]).sum(0)  # type
    out = {
        "experts/mean_active": float(pairs.sum() / max(tokens.sum(), 1)),
        "experts/num_active": float(np.mean(routing["active"])),
    }
    for t, name in enumerate(TOKEN_TYPE_NAMES):
        if tokens[t]:
            out[f"experts/mean_active/{name}"] = float(pairs[t].sum() / tokens[t])
    return out


def _progress_line(cfg: TrainConfig, m: dict[str, float]) -> str:
    return (
        f"[stage {cfg.stage}] step {int(m['step'])}/{cfg.num_steps} loss {m['loss']:.4f} "
        f"(time {m['loss_time']:.3f} score {m['loss_score']:.3f} text {m['loss_text']:.3f} "
        f"aux {m['aux_loss']:.4f} z {m['z_loss']:.4f}"
        + (f" frames {m['loss_frames']:.3f}" if "loss_frames" in m else "")
        + f") {m['tokens_per_s']:.0f} tok/s, {m['time/step']:.2f} s/step (data "
        f"{m['time/data']:.2f}, sync {m['time/grad_sync']:.2f}) "
        f"experts {m['experts/num_active']:.1f} active, {m['experts/mean_active']:.2f}/token"
    )


# --- the driver side: one TorchTrainer run ------------------------------------------------------


@dataclass
class FitResult:
    """What one stage's Train run left behind."""

    checkpoint_uri: str  # the last checkpoint (a loadable model directory)
    metrics: dict[str, float]  # the metrics reported with it
    path: str  # the run's folder under the storage root
    removed_incomplete: list[str] = field(default_factory=list)  # checkpoint folders whose
    # write was cut short (a crash mid-write), removed before and after the run


def prepare_tokenizer(cfg: TrainConfig, train_records) -> str:
    """Train the text tokenizer once (driver) and save it under the storage root; returns URI."""
    tok = train_tokenizer(cfg, train_records)
    uri = storage.join_uri(storage_root(cfg), cfg.name, "tokenizer")
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        storage.upload_dir(d, uri)
    return uri


def storage_root(cfg: TrainConfig) -> str:
    """The run's storage root as Ray Train and Tune take it: an s3:// URI as given, else an
    absolute local path."""
    scheme, _ = storage.split_scheme(cfg.storage_root)
    return cfg.storage_root if scheme == "s3" else os.path.abspath(storage.split_scheme(cfg.storage_root)[1])


def resume_notice(cfg: TrainConfig) -> str | None:
    """What to tell a user whose run name already has a folder under the storage root: Ray Train
    continues that run from its last checkpoint (and step count) instead of starting afresh."""
    run_dir = storage.join_uri(storage_root(cfg), cfg.run_name())
    if not storage.exists(run_dir):
        return None
    return (f"run {cfg.run_name()!r} already exists at {run_dir}: Ray Train resumes it from its "
            "last checkpoint; pass another --name (or remove that folder) to start afresh")


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


def torch_trainer(loop, loop_config: dict[str, Any], cfg: TrainConfig, *, name: str,
                  storage_path: str, datasets: dict | None = None, dataset_config=None,
                  checkpoint_config=None, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer of `cfg.num_workers` workers running `loop(loop_config)` (NCCL with
    `cfg.use_gpu`, else gloo), persisting into `storage_path`/`name`: a stage's run (`fit`) and
    FPO's (`train.fpo.train_fpo`)."""
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),  # devices.backend
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=dataset_config,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (every report's full metrics, once per rank) stay in its log
            # files; the console gets warnings and our own progress line per `log_every` steps
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            checkpoint_config=checkpoint_config,
            callbacks=callbacks,
        ),
    )


def fit(cfg: TrainConfig, *, tokenizer_uri: str, callbacks: list | None = None) -> FitResult:
    """Run one stage as a TorchTrainer job on the connected Ray cluster."""
    notice = resume_notice(cfg)
    if notice:
        log.warning(notice)
    run_dir = storage.join_uri(storage_root(cfg), cfg.run_name())
    removed = clean_incomplete(run_dir, keep=_registered(run_dir))
    mconfig = model_config(cfg, load_tokenizer(tokenizer_uri))
    dataset = build_dataset(data_config(cfg, mconfig, train=True), split="train", shuffle=True,
                            preserve_order=True)
    dataset.dataset.context.enable_progress_bars = False  # progress lines come from rank 0
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True  # the same seed gives the same batches on every run
    loop_config: dict[str, Any] = {"train": cfg.to_dict(), "tokenizer_uri": tokenizer_uri}
    datasets = {"train": dataset.dataset}
    if cfg.decode_once:  # each rank decodes an equal part of the (shuffled) rows itself, once,
        # before its first step: no decode processes to start, no object-store round trip
        loop_config.update(skip_counter=dataset.counter,
                           rows=rank_rows(dataset.rows, cfg.num_workers, cfg.batch_size))
        datasets = {}
    trainer = torch_trainer(
        train_loop_per_worker, loop_config, cfg, name=cfg.run_name(),
        storage_path=storage_root(cfg), datasets=datasets or None,
        dataset_config=ray.train.DataConfig(execution_options=options),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_checkpoints_kept),
        callbacks=callbacks or None,
    )
    result = trainer.fit()
    removed += clean_incomplete(run_dir, keep=_registered(run_dir))
    if result.checkpoint is None:
        raise RuntimeError(f"stage {cfg.stage} finished without a checkpoint: {result.error}")
    metrics = dict(result.metrics or {})
    metrics.update(dataset.metrics())
    metrics.setdefault("data/decode_s", 0.0)
    return FitResult(checkpoint_uri=ckpt.checkpoint_uri(result.checkpoint), metrics=metrics,
                     path=result.path, removed_incomplete=removed)


def _registered(run_dir: str) -> set[str]:
    """The checkpoint folders Ray Train's run state at `run_dir` (its checkpoint manager's
    snapshot) names: `clean_incomplete` keeps those, as Ray refuses to resume a run whose
    snapshot names a missing folder."""
    try:
        text = storage.read_text(storage.join_uri(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME))
    except FileNotFoundError:
        return set()
    return set(re.findall(r"checkpoint_[0-9][0-9_.-]*", text))
