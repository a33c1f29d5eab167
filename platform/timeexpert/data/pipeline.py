"""Ray Data pipeline: manifest -> video bytes by URI -> the needed frames (decord, resized at
decode) -> optional preprocess / tokenize hooks -> batches for Ray Train or offline evaluation.

The driver reads the (small) manifest, refuses any video outside the storage root, applies the
per-task mixing and hands the rows to Ray Data; the videos are fetched and decoded in
`map_batches` tasks, streamed, so memory stays bounded whatever the number of videos. A bad
video or annotation is skipped and counted by reason (`VideoDataset.skip_summary()`), never a
crash. A decode-once training run does not stream: each worker decodes its rows
(`VideoDataset.rows`) in its own process with `decode_rows`, and `draw_segment_frames` draws each
epoch's TSN frames from a denser grid.

Output columns, one row per record (what `iter_batches` / `iter_torch_batches` yield, batched):

    id, task, query, split, video     str
    duration, clip_len                float64
    events                            str: JSON list of Event dicts (`record_from_row` parses)
    saliency                          str: JSON list of per-clip scores, or "null"
    options                           str: JSON list of GQA answer options, or "null"
    answer                            int64: index of the right GQA option, -1 when none
    video_captions                    str: JSON list of the video's captioned events (those of
                                      its DVC record among the records given), "[]" when none
    frames                            uint8 (T, H, W, 3), RGB, T = VideoConfig.frames_per_sample
    timestamps                        float32 (T,), seconds (0 where padded)
    frame_mask                        bool (T,): False for padding (fps sampling of short videos)

plus whatever columns the `tokenize` hook adds. For `iter_torch_batches` pass
`collate_fn=torch_collate()` of `data.collate` (text columns stay lists of str). This module does
not import torch: a decode task's worker process starts without it (2-3 s of a cold start). Pixel
normalisation belongs to the model's preprocessor: pass it as `preprocess` to run it inside the
pipeline, or apply it in the loop.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from timeexpert import storage
from timeexpert.config import DataConfig, VideoConfig
from timeexpert.data import formats
from timeexpert.data.video import VideoDecodeError, decode_frames
from timeexpert.events import Event, Record, Task

BatchFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# Reasons beyond the video ones (video.SKIP_REASONS): an annotation we cannot use, and a video
# that could not be fetched for another reason (permissions, network).
ANNOTATION_REASON = "bad_annotation"
UNREADABLE_REASON = "unreadable"
DURATION_TOLERANCE = 1.0  # seconds an event may run past the stated duration


def mix_tasks(records: Sequence[Record], weights: dict[str, float], seed: int) -> list[Record]:
    """Resample records so each task's share follows `weights` (same total, shuffled).

    A task short of its share is upsampled with replacement; tasks without weight are dropped.
    Empty `weights` returns the records unchanged.
    """
    if not weights:
        return list(records)
    by_task: dict[Task, list[Record]] = collections.defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    active = {Task.parse(t): w for t, w in weights.items() if w > 0}
    missing = [t.value for t in active if not by_task[t]]
    if missing:
        raise ValueError(f"task_weights ask for {missing} but the manifest has no such records")
    if not active:
        raise ValueError(f"task_weights {weights} give every task weight 0")
    rng = np.random.default_rng(seed)
    total, wsum = len(records), sum(active.values())
    out: list[Record] = []
    for task, w in active.items():
        pool, n = by_task[task], int(round(total * w / wsum))
        if n <= len(pool):
            out += [pool[i] for i in rng.choice(len(pool), n, replace=False)]
        else:
            out += pool + [pool[i] for i in rng.integers(len(pool), size=n - len(pool))]
    return [out[i] for i in rng.permutation(len(out))]


def caption_queries(records: Sequence[Record]) -> list[Record]:
    """MR records made from the captioned events of the DVC records: every captioned event of a
    video becomes a moment query (its caption the query, its span the target) unless the video
    already has an MR record with that query. Each video's events then all serve as targets of
    the same frames, the contrast that only reading the query can fit (the way dense-caption
    datasets become moment-retrieval ones, e.g. ActivityNet Captions)."""
    asked = {(r.video, r.query.strip().lower()) for r in records if r.task == Task.MR}
    out: list[Record] = []
    for r in records:
        if r.task != Task.DVC:
            continue
        for k, e in enumerate(r.events):
            key = (r.video, (e.caption or "").strip().lower())
            if not key[1] or key in asked:
                continue
            asked.add(key)
            out.append(Record(id=f"{r.id}_cap{k}", video=r.video, duration=r.duration,
                              task=Task.MR, query=e.caption, events=[Event(e.start, e.end)],
                              clip_len=r.clip_len, split=r.split))
    return out


def video_captions(records: Sequence[Record]) -> dict[str, list[Event]]:
    """video -> its captioned events, read off the DVC records: what happens in the video, which
    every row of it can then carry (training targets that need the whole video, e.g. the caption
    contrast of `TimeExpertConfig.captions_every_row`)."""
    return {r.video: [e for e in r.events if e.caption] for r in records if r.task == Task.DVC}


def record_from_row(row: dict[str, Any]) -> Record:
    """A pipeline row (or one row of a batch) back to a Record (frames left out)."""
    saliency = json.loads(row["saliency"])
    return Record(
        id=str(row["id"]),
        video=str(row["video"]),
        duration=float(row["duration"]),
        task=str(row["task"]),
        query=str(row["query"]),
        events=[Event.from_dict(e) for e in json.loads(row["events"])],
        saliency=saliency,
        clip_len=float(row["clip_len"]),
        split=str(row["split"]),
        options=row_options(row),
        answer=None if int(row.get("answer", -1)) < 0 else int(row["answer"]),
    )


def row_options(row: dict[str, Any]) -> list[str] | None:
    """The GQA answer options of a pipeline row (None for the other tasks)."""
    return json.loads(str(row["options"])) if "options" in row else None


def record_row(r: Record, video: str, captions: Sequence[Event] = ()) -> dict[str, Any]:
    """A record as a pipeline row; `captions`: its video's captioned events (`video_captions`)."""
    return {
        "id": r.id,
        "task": r.task.value,
        "query": r.query,
        "split": r.split,
        "video": video,
        "duration": float(r.duration),
        "clip_len": float(r.clip_len),
        "events": json.dumps([e.to_dict() for e in r.events]),
        "saliency": json.dumps(r.saliency),
        "options": json.dumps(r.options),
        "answer": -1 if r.answer is None else int(r.answer),
        "video_captions": json.dumps([e.to_dict() for e in captions]),
    }


def _skip_counter_class():
    @ray.remote(num_cpus=0)
    class SkipCounter:
        """Skipped records by id -> reason (a record skipped again in a later epoch counts once)."""

        def __init__(self) -> None:
            self.by_id: dict[str, str] = {}

        def add(self, items: list[tuple[str, str]]) -> None:
            for rid, reason in items:
                self.by_id.setdefault(rid, reason)

        def summary(self) -> dict[str, int]:
            return dict(collections.Counter(self.by_id.values()))

        def skipped(self) -> dict[str, str]:
            return dict(self.by_id)

    return SkipCounter


def _decode_video(uri: str, video: VideoConfig, storage_options: dict[str, Any],
                  rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """One video's frames (T, H, W, 3), timestamps (T,) and mask (T,), zero-padded to
    `frames_per_sample`; or the reason it was skipped."""
    t, h, w = video.frames_per_sample, video.height, video.width
    try:
        if storage.split_scheme(uri)[0] == "s3":  # one GET; decord then seeks in memory
            src: str | bytes = storage.read_bytes(uri, **storage_options)
        else:  # a local file: decord reads only the GOPs it needs
            src = storage.filesystem(uri)[1]
        d = decode_frames(
            src, num_frames=video.num_frames, fps=video.fps, max_frames=video.max_frames,
            size=(h, w), rng=rng,
        )
    except VideoDecodeError as e:
        return e.reason
    except FileNotFoundError:
        return "missing"
    except OSError:
        return UNREADABLE_REASON
    n = len(d.timestamps)
    f = np.zeros((t, h, w, 3), np.uint8)
    f[:n] = d.frames
    s = np.zeros((t,), np.float32)
    s[:n] = d.timestamps
    m = np.zeros((t,), bool)
    m[:n] = True
    return f, s, m


def _gather(batch: dict[str, np.ndarray], keep: list[int], decoded: list[tuple],
            video: VideoConfig) -> dict[str, np.ndarray]:
    """The kept rows of `batch` with their decoded (frames, timestamps, mask) as columns."""
    t, h, w = video.frames_per_sample, video.height, video.width
    out = {k: v[keep] for k, v in batch.items()}
    out["frames"] = np.stack([d[0] for d in decoded]) if decoded else np.zeros((0, t, h, w, 3), np.uint8)
    out["timestamps"] = np.stack([d[1] for d in decoded]) if decoded else np.zeros((0, t), np.float32)
    out["frame_mask"] = np.stack([d[2] for d in decoded]) if decoded else np.zeros((0, t), bool)
    return out


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    video: VideoConfig,
    storage_options: dict[str, Any],
    counter: Any = None,
    preprocess: BatchFn | None = None,
    tokenize: BatchFn | None = None,
) -> dict[str, np.ndarray]:
    """The map_batches function: fetch and decode each row's video; drop and count failures."""
    rng = np.random.default_rng() if video.jitter else None
    keep, decoded, skipped = [], [], []
    for i, (rid, uri) in enumerate(zip(batch["id"], batch["video"])):
        got = _decode_video(str(uri), video, storage_options, rng)
        if isinstance(got, str):
            skipped.append((str(rid), got))
            continue
        keep.append(i)
        decoded.append(got)
    if skipped and counter is not None:
        ray.get(counter.add.remote(skipped))  # wait: the summary must be complete at the end
    out = _gather(batch, keep, decoded, video)
    if preprocess is not None:
        out = preprocess(out)
    if tokenize is not None:
        out = tokenize(out)
    return out


def decode_rows(rows: Sequence[dict[str, Any]], config: DataConfig,
                counter: Any = None) -> dict[str, np.ndarray]:
    """Pipeline rows (`VideoDataset.rows`) decoded in this process, as `decode_batch` decodes
    them, each distinct video once (the records of a video, its MR queries, VHD, DVC and GQA
    rows, share its frames): column -> array of the decoded rows, failures skipped and counted
    on `counter` per row. What a training worker runs to hold its part of a decode-once run."""
    if not rows:
        raise ValueError("no rows to decode")
    rng = np.random.default_rng() if config.video.jitter else None
    by_video: dict[str, tuple | str] = {}
    keep, decoded, skipped = [], [], []
    for i, row in enumerate(rows):
        uri = str(row["video"])
        if uri not in by_video:
            by_video[uri] = _decode_video(uri, config.video, config.storage_options, rng)
        got = by_video[uri]
        if isinstance(got, str):
            skipped.append((str(row["id"]), got))
            continue
        keep.append(i)
        decoded.append(got)
    if skipped and counter is not None:
        ray.get(counter.add.remote(skipped))
    columns = {k: np.array([row[k] for row in rows]) for k in rows[0]}
    return _gather(columns, keep, decoded, config.video)


def draw_segment_frames(batch: dict[str, np.ndarray], num_frames: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """TSN segment sampling from a decoded grid: a batch decoded at `num_frames` x K uniform
    frames (K candidates per segment, `VideoConfig(num_frames=num_frames * K)`) -> `num_frames`
    frames, one drawn at random from each segment's K. How decode-once training keeps its frame
    jitter: the grid is decoded once, the draw is new every epoch."""
    grid = batch["frames"].shape[1]
    if grid % num_frames:
        raise ValueError(f"a grid of {grid} frames does not split into {num_frames} segments")
    k = grid // num_frames
    b = len(batch["frames"])
    pick_BT = np.arange(num_frames) * k + rng.integers(0, k, size=(b, num_frames))
    rows_B1 = np.arange(b)[:, None]
    out = dict(batch)
    for name in ("frames", "timestamps", "frame_mask"):
        out[name] = batch[name][rows_B1, pick_BT]
    return out


@dataclass
class VideoDataset:
    """A streaming Ray Dataset of decoded samples and the rows it decodes, with the skip
    accounting of its build."""

    dataset: Any  # ray.data.Dataset
    records: list[Record]  # the records fed to the pipeline (after checks and mixing)
    driver_skips: dict[str, int] = field(default_factory=dict)  # skipped before Ray (annotations)
    counter: Any = None  # SkipCounter actor handle
    rows: list[dict[str, Any]] = field(default_factory=list)  # the rows handed to Ray Data

    def skip_summary(self) -> dict[str, int]:
        """Records skipped so far, by reason. Complete once the dataset has been consumed."""
        counts = collections.Counter(self.driver_skips)
        if self.counter is not None:
            counts.update(ray.get(self.counter.summary.remote()))
        return dict(counts)

    def skipped_ids(self) -> dict[str, str]:
        """Record id -> reason, for the records skipped while decoding."""
        if self.counter is None:
            return {}
        return ray.get(self.counter.skipped.remote())

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """The summary as flat MLflow metrics: `{prefix}skipped/{reason}`, totals, records."""
        summary = self.skip_summary()
        out = {f"{prefix}skipped/{k}": float(v) for k, v in sorted(summary.items())}
        out[f"{prefix}skipped_total"] = float(sum(summary.values()))
        out[f"{prefix}records"] = float(len(self.records))
        return out


def build_dataset(
    config: DataConfig,
    *,
    split: str = "train",
    records: Sequence[Record] | None = None,
    preprocess: BatchFn | None = None,
    tokenize: BatchFn | None = None,
    shuffle: bool = False,
    preserve_order: bool = False,
) -> VideoDataset:
    """Build the streaming dataset of `split` (or of the given `records`).

    The manifest is `config.manifest` (with `{split}`) under `config.root`. Every video URI must
    resolve under `config.root` (relative URIs are taken relative to it), otherwise ValueError:
    the manifest is refused. `preprocess` and `tokenize` are batch functions (numpy dict in, numpy
    dict out, possibly an empty batch) run after decoding, in that order: data/ cannot import the
    model, so the model's preprocessor and tokenizer are injected here. `shuffle` permutes the
    records (seeded by config.seed); `preserve_order` keeps output order = record order.
    """
    driver_skips: collections.Counter = collections.Counter()
    if records is None:
        manifest = storage.resolve_under_root(config.manifest.format(split=split), config.root)
        records = formats.read_manifest(manifest, skipped=driver_skips, **config.storage_options)
    rows, kept, captions = [], [], video_captions(records)
    for r in mix_tasks(list(records), config.task_weights, config.seed):
        try:
            video = storage.resolve_under_root(r.video, config.root)
        except ValueError as e:
            raise ValueError(f"manifest refused: record {r.id!r}: {e}") from None
        if any(e.end > r.duration + DURATION_TOLERANCE for e in r.events) or (
            r.saliency is not None and len(r.saliency) != formats.num_clips(r.duration, r.clip_len)
        ):
            driver_skips[ANNOTATION_REASON] += 1
            continue
        rows.append(record_row(r, video, captions.get(r.video, ())))
        kept.append(r)
    if shuffle:
        order = np.random.default_rng(config.seed).permutation(len(rows))
        rows, kept = [rows[i] for i in order], [kept[i] for i in order]
    # pinned to the driver's node: a worker node may leave mid-run, and the count with it (a
    # soft affinity let Ray place it on a worker node)
    counter = _skip_counter_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    if not rows:
        raise ValueError(f"no usable records for split {split!r} under {config.root!r}")
    num_blocks = max(1, min(len(rows) // config.decode_batch_size, 2000))
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks)
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        decode_batch,
        batch_size=config.decode_batch_size,
        batch_format="numpy",
        num_cpus=config.decode_num_cpus,
        concurrency=config.decode_concurrency,
        fn_kwargs=dict(
            video=config.video,
            storage_options=config.storage_options,
            counter=counter,
            preprocess=preprocess,
            tokenize=tokenize,
        ),
    )
    return VideoDataset(dataset=ds, records=kept, driver_skips=dict(driver_skips), counter=counter,
                        rows=rows)
