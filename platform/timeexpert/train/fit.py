"""The driver's side of a stage: one TorchTrainer run of `train_loop_per_worker` (`fit`).

Before the stages, the driver trains the text tokenizer once on the training split and saves it
under the storage root (`prepare_tokenizer`). A stage's run: the run's leftovers of a checkpoint
write cut short removed, the Ray Data pipeline built (for a decode-once run, the shuffled rows
split into one part per rank), the TorchTrainer started (`torch_trainer`: its workers, backend
and run config, shared with FPO's run) and its result read back into a `FitResult`.
"""

from __future__ import annotations

import collections
import logging
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from timeexpert import storage
from timeexpert.checkpoints import clean_incomplete
from timeexpert.data.pipeline import build_dataset
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.models.upcycle import dense_tokenizer
from timeexpert.presets import get_preset
from timeexpert.train.batches import data_config, rank_rows
from timeexpert.train.checkpoint import checkpoint_uri, storage_root
from timeexpert.train.config import TrainConfig
from timeexpert.train.loop import load_tokenizer, model_config, train_loop_per_worker

log = logging.getLogger(__name__)


# --- the text tokenizer, once per pipeline -------------------------------------------------------

MAX_CAPTIONS = 4096  # candidates of dense captioning by grounding the tokenizer keeps


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


def prepare_tokenizer(cfg: TrainConfig, train_records) -> str:
    """Train the text tokenizer once (driver) and save it under the storage root; returns URI."""
    tok = train_tokenizer(cfg, train_records)
    uri = storage.join_uri(storage_root(cfg), cfg.name, "tokenizer")
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        storage.upload_dir(d, uri)
    return uri


# --- one stage: a TorchTrainer run ---------------------------------------------------------------


@dataclass
class FitResult:
    """What one stage's Train run left behind."""

    checkpoint_uri: str  # the last checkpoint (a loadable model directory)
    metrics: dict[str, float]  # the metrics reported with it
    path: str  # the run's folder under the storage root
    removed_incomplete: list[str] = field(default_factory=list)  # checkpoint folders whose
    # write was cut short (a crash mid-write), removed before and after the run


def resume_notice(cfg: TrainConfig) -> str | None:
    """What to tell a user whose run name already has a folder under the storage root: Ray Train
    continues that run from its last checkpoint (and step count) instead of starting afresh."""
    run_dir = storage.join_uri(storage_root(cfg), cfg.run_name())
    if not storage.exists(run_dir):
        return None
    return (f"run {cfg.run_name()!r} already exists at {run_dir}: Ray Train resumes it from its "
            "last checkpoint; pass another --name (or remove that folder) to start afresh")


def torch_trainer(loop, loop_config: dict[str, Any], cfg: TrainConfig, *, name: str,
                  storage_path: str, datasets: dict | None = None, dataset_config=None,
                  checkpoint_config=None, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer of `cfg.num_workers` workers running `loop(loop_config)` (NCCL with
    `cfg.use_gpu`, else gloo), persisting into `storage_path`/`name` (through a filesystem that
    waits for S3 that stops answering, `storage.ray_storage`): a stage's run (`fit`) and FPO's
    (`train.fpo.train_fpo`)."""
    path, filesystem = storage.ray_storage(storage_path)
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
            storage_path=path,
            storage_filesystem=filesystem,
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
    return FitResult(checkpoint_uri=checkpoint_uri(result.checkpoint), metrics=metrics,
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
