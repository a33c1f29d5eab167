"""The three-stage recipe (TimeExpert sec. 3.5) as one pipeline, each stage from the previous one.

    from timeexpert.train.stages import run_pipeline
    result = run_pipeline(cfg, stages=(1, 2, 3))          # cfg: TrainConfig, stage field ignored
    result.checkpoint_uri                                  # the last stage's model directory
    result.stages[2].eval_metrics["mr/R1@0.5"]             # eval on cfg.eval_split per stage

Any stage runs alone from a checkpoint: `run_pipeline(cfg, stages=(3,), resume_from=uri)`.
`cfg.recipe` picks what the stages train ("timeexpert" or "groundvts", `train.recipes.RECIPES`);
`cfg.fpo_steps > 0` adds D2VLM's FPO after the last stage (`result.fpo`, a Ray Train run of
`train.fpo.train_fpo`); `run_pipeline(cfg, stages=(), resume_from=uri)` runs FPO alone.
`cfg.curriculum` (dataset roots, easiest first) runs stage 3 on each of them before stage 3 on
`cfg.data_root` (`result.curriculum`); `plan_phases` says which `fit` runs on what, in order.
With token sampling on, each stage's evaluation plots the per-frame token density of the first
video of each task (GroundVTS's token-density curve) into the stage's MLflow run.
MLflow (when `cfg.tracking_uri` is set): one parent run per pipeline (or the caller's
`parent_run_id`), a nested run per stage with params, the workers' step metrics, the stage's
eval metrics and plots (loss curves, active experts, expert-assignment heatmap) as artifacts.
A stage scores `cfg.eval_max_records` records per task of `cfg.eval_split`, not the whole split:
its MLflow metrics carry the sample in their names (`eval/val12/mr/R1@0.5`: 12 val records,
`sample_names`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from timeexpert import storage, tracking
from timeexpert.checkpoints import read_config
from timeexpert.data import formats
from timeexpert.eval.evaluate import distinct_windows, evaluate_predictions, predict_records
from timeexpert.events import Task
from timeexpert.models.configuration_timeexpert import TimeExpertConfig
from timeexpert.train.batches import data_config
from timeexpert.train.checkpoint import storage_root
from timeexpert.train.config import CURRICULUM_STAGE, STAGES, TrainConfig
from timeexpert.train.fit import FitResult, fit, prepare_tokenizer
from timeexpert.train.fpo import train_fpo

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: int | str  # 1, 2, 3, or "fpo"
    checkpoint_uri: str  # the stage's last checkpoint: a loadable model directory
    train_metrics: dict[str, float]  # metrics reported with that checkpoint (+ data skips)
    eval_metrics: dict[str, float]  # "{task}/{metric}" on cfg.eval_split ({} when off)
    mlflow_run_id: str = ""  # the stage's nested run ("" without MLflow)
    seconds: float = 0.0  # wall time of the stage (train + eval)
    data_root: str = ""  # the dataset it trained and evaluated on


@dataclass
class PipelineResult:
    stages: dict[int, StageResult] = field(default_factory=dict)
    parent_run_id: str = ""  # the pipeline's MLflow run ("" without MLflow)
    tokenizer_uri: str = ""
    fpo: StageResult | None = None  # the FPO stage after the last stage (cfg.fpo_steps > 0)
    curriculum: list[StageResult] = field(default_factory=list)  # per cfg.curriculum root, in order

    @property
    def checkpoint_uri(self) -> str:
        if self.fpo is not None:
            return self.fpo.checkpoint_uri
        return self.stages[max(self.stages)].checkpoint_uri

    def summary(self) -> dict[str, float]:
        """Flat `stage{n}/...` metrics of every stage (train and eval)."""
        out = {}
        for n, s in self.stages.items():
            out.update({f"stage{n}/train/{k}": v for k, v in s.train_metrics.items()
                        if isinstance(v, (int, float))})
            out.update({f"stage{n}/eval/{k}": v for k, v in s.eval_metrics.items()})
        for i, s in enumerate(self.curriculum, 1):
            out.update({f"curriculum{i}/train/{k}": v for k, v in s.train_metrics.items()
                        if isinstance(v, (int, float))})
            out.update({f"curriculum{i}/eval/{k}": v for k, v in s.eval_metrics.items()})
        if self.fpo is not None:
            out.update({f"fpo/train/{k.removeprefix('fpo/')}": v for k, v in self.fpo.train_metrics.items()})
            out.update({f"fpo/eval/{k}": v for k, v in self.fpo.eval_metrics.items()})
        return out


@dataclass(frozen=True)
class Phase:
    """One `fit` of the pipeline: a recipe stage on one dataset, from the previous phase's weights."""

    stage: int
    data_root: str
    num_steps: int
    name: str  # run name: checkpoints under {storage_root}/{name}-stage{stage}
    curriculum: int = 0  # 1-based place of data_root in cfg.curriculum (0: the stage's own data)


def plan_phases(cfg: TrainConfig, stages: Sequence[int],
                steps: dict[int, int] | None = None) -> list[Phase]:
    """The pipeline's fits in order: each stage on cfg.data_root (`steps` overrides
    cfg.num_steps per stage), stage 3 preceded by one phase per cfg.curriculum root."""
    phases = []
    for stage in stages:
        if stage == CURRICULUM_STAGE:
            phases += [Phase(stage=stage, data_root=root, num_steps=cfg.curriculum_steps,
                             name=f"{cfg.name}-cur{i}", curriculum=i)
                       for i, root in enumerate(cfg.curriculum, 1)]
        phases.append(Phase(stage=stage, data_root=cfg.data_root, name=cfg.name,
                            num_steps=(steps or {}).get(stage, cfg.num_steps)))
    if cfg.curriculum and CURRICULUM_STAGE not in stages:
        warnings.warn(f"the curriculum is ignored: it runs in stage {CURRICULUM_STAGE}, and the "
                      f"stages run are {list(stages)}", stacklevel=2)
    return phases


def check_curriculum(cfg: TrainConfig) -> None:
    """Every curriculum root holds a train manifest (and the eval split's, when evaluating)."""
    splits = ["train"] + ([cfg.eval_split] if cfg.eval_split and cfg.eval_max_records > 0 else [])
    for root in cfg.curriculum:
        for split in splits:
            if not storage.exists(storage.join_uri(root, "manifests", f"{split}.jsonl")):
                raise ValueError(
                    f"curriculum root {root!r} has no manifests/{split}.jsonl; render a ladder "
                    f"level there (python jobs/prepare_data.py --synthetic level0 --out {root}) "
                    "or fix the path"
                )


def run_pipeline(cfg: TrainConfig, *, stages: Sequence[int] = STAGES, resume_from: str | None = None,
                 parent_run_id: str = "", steps: dict[int, int] | None = None,
                 callbacks: list | None = None) -> PipelineResult:
    """Run the given stages in order on the connected Ray cluster; each starts from the previous
    stage's checkpoint (the first from `resume_from` / `cfg.init_from`, else fresh weights).
    `steps` overrides `cfg.num_steps` per stage. Stage 3 runs on each `cfg.curriculum` root
    first (`plan_phases`), each phase from the previous one's checkpoint."""
    stages = list(stages)
    bad = [s for s in stages if s not in STAGES] or (stages != sorted(set(stages)))
    if bad or not (stages or cfg.fpo_steps):
        raise ValueError(f"stages must be increasing values of {STAGES} (or none with "
                         f"fpo_steps > 0), got {stages}")
    start_from = resume_from or cfg.init_from
    if not stages and not start_from:
        raise ValueError("FPO alone needs a checkpoint: pass resume_from (or cfg.init_from)")
    phases = plan_phases(cfg, stages, steps)
    if any(p.curriculum for p in phases):
        check_curriculum(cfg)
    if start_from:
        tokenizer_uri = start_from  # a checkpoint holds its tokenizer
    else:
        train = formats.read_manifest(storage.join_uri(cfg.data_root, "manifests", "train.jsonl"))
        tokenizer_uri = prepare_tokenizer(cfg, train)
    result = PipelineResult(tokenizer_uri=tokenizer_uri)
    uri = cfg.tracking_uri
    own_parent = bool(uri) and not parent_run_id
    if own_parent:
        parent_run_id = tracking.create_run(uri, cfg.experiment, cfg.name, tags=cfg.tags)
        tracking.log_params(uri, parent_run_id, {**cfg.to_dict(), "stages": stages})
    result.parent_run_id = parent_run_id
    status = "FAILED"
    try:
        for phase in phases:
            sr = _run_phase(cfg, phase, start_from, tokenizer_uri, parent_run_id, callbacks)
            if phase.curriculum:
                result.curriculum.append(sr)
            else:
                result.stages[phase.stage] = sr
            start_from = sr.checkpoint_uri
        if cfg.fpo_steps:
            result.fpo = _run_fpo(cfg, start_from, parent_run_id)
        status = "FINISHED"
    finally:
        if own_parent:
            tracking.end_run(uri, parent_run_id, status)
    return result


def _run_phase(cfg: TrainConfig, phase: Phase, start_from: str, tokenizer_uri: str,
               parent_run_id: str, callbacks: list | None) -> StageResult:
    """One phase of the pipeline (a stage, or a curriculum phase of stage 3) from the checkpoint
    `start_from` ("": fresh weights): its MLflow child run, its `fit`, its evaluation and its log
    lines."""
    uri = cfg.tracking_uri
    t0 = time.perf_counter()
    stage = phase.stage
    stage_cfg = cfg.replace(stage=stage, init_from=start_from or "", data_root=phase.data_root,
                            name=phase.name, num_steps=phase.num_steps, curriculum=[],
                            curriculum_steps=0)
    label = f"stage {stage}" + (f" curriculum {phase.curriculum}/{len(cfg.curriculum)} "
                                f"({phase.data_root})" if phase.curriculum else "")
    run_id = ""
    if uri:
        tags = {**cfg.tags, "stage": str(stage)}
        if phase.curriculum:
            tags["curriculum"] = str(phase.curriculum)
        run_id = tracking.create_run(uri, cfg.experiment, stage_cfg.run_name(),
                                     parent_id=parent_run_id, tags=tags)
        stage_cfg = stage_cfg.replace(mlflow_run_id=run_id)
        tracking.log_params(uri, run_id, stage_cfg.to_dict())
    log.info(f"== {label}: {stage_cfg.num_steps} steps from "
             f"{stage_cfg.init_from or 'fresh weights'}")
    try:
        fitted: FitResult = fit(stage_cfg, tokenizer_uri=tokenizer_uri, callbacks=callbacks)
        eval_metrics = _evaluate_and_plot(fitted.checkpoint_uri, stage_cfg, run_id)
    except BaseException:
        if uri:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    sr = StageResult(stage=stage, checkpoint_uri=fitted.checkpoint_uri,
                     train_metrics=fitted.metrics, eval_metrics=eval_metrics,
                     mlflow_run_id=run_id, seconds=time.perf_counter() - t0,
                     data_root=phase.data_root)
    log.info(f"== {label} done in {sr.seconds:.0f} s: checkpoint {sr.checkpoint_uri}; "
             + ", ".join(f"{k} {v:.3f}" for k, v in
                         sample_names(eval_metrics, stage_cfg.eval_split).items()
                         if k.endswith(("R1@0.5", "HIT@1-VeryGood", "F1", "mIoU"))))
    if uri:
        _log_stage(uri, run_id, sr, parent_run_id,
                   f"curriculum{phase.curriculum}" if phase.curriculum else f"stage{stage}",
                   stage_cfg.eval_split)
    return sr


def _run_fpo(cfg: TrainConfig, start_from: str, parent_run_id: str) -> StageResult:
    """D2VLM FPO from `start_from` (a Ray Train run, `train_fpo`), evaluated like a stage; its
    checkpoint lands in the run `{cfg.name}-fpo` under the storage root, as a stage's does."""
    t0 = time.perf_counter()
    uri, run_id = cfg.tracking_uri, ""
    name = f"{cfg.name}-fpo"
    if uri:
        run_id = tracking.create_run(uri, cfg.experiment, name, parent_id=parent_run_id,
                                     tags={**cfg.tags, "stage": "fpo"})
        tracking.log_params(uri, run_id, {**cfg.to_dict(), "init_from": start_from})
    log.info(f"== fpo: {cfg.fpo_steps} steps from {start_from}")
    output_uri = storage.join_uri(storage_root(cfg), name, "checkpoint")
    try:
        train_metrics = train_fpo(start_from, cfg, output_uri=output_uri, mlflow_run_id=run_id)
        eval_metrics = _evaluate_and_plot(output_uri, cfg, run_id)
    except BaseException:
        if uri:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    sr = StageResult(stage="fpo", checkpoint_uri=output_uri, train_metrics=train_metrics,
                     eval_metrics=eval_metrics, mlflow_run_id=run_id,
                     seconds=time.perf_counter() - t0)
    if uri:
        named = sample_names(eval_metrics, cfg.eval_split)
        tracking.log_metrics(uri, run_id, {f"eval/{k}": v for k, v in named.items()},
                             step=cfg.fpo_steps)
        tracking.set_tags(uri, run_id, {"checkpoint_uri": output_uri})
        tracking.end_run(uri, run_id)
        if parent_run_id:
            tracking.log_metrics(uri, parent_run_id, {f"fpo/eval/{k}": v for k, v in named.items()})
    log.info(f"== fpo done in {sr.seconds:.0f} s: checkpoint {output_uri}; margin "
             f"{train_metrics.get('fpo/first_margin', 0):.3f} -> "
             f"{train_metrics.get('fpo/reward_margin', 0):.3f}")
    return sr


def _evaluate_and_plot(checkpoint_uri: str, cfg: TrainConfig, run_id: str) -> dict[str, float]:
    """`evaluate_checkpoint`, and its token-density plots (token sampling on) into the run."""
    with tempfile.TemporaryDirectory(prefix="te-plots-") as d:
        metrics = evaluate_checkpoint(checkpoint_uri, cfg, plot_dir=d)
        if cfg.tracking_uri and run_id:
            for name in sorted(os.listdir(d)):
                tracking.log_artifact_file(cfg.tracking_uri, run_id, os.path.join(d, name), "plots")
    return metrics


def sample_names(metrics: dict[str, float], split: str) -> dict[str, float]:
    """Evaluation metrics named by the sample they were computed on, its split and its number of
    records of the metric's task: "mr/R1@0.5" of 12 val records -> "val12/mr/R1@0.5"."""
    return {f"{split}{int(metrics[key.split('/', 1)[0] + '/num_records'])}/{key}": value
            for key, value in metrics.items()}


def _log_stage(uri: str, run_id: str, sr: StageResult, parent_run_id: str, prefix: str,
               split: str) -> None:
    named = sample_names(sr.eval_metrics, split)
    tracking.log_metrics(uri, run_id, {f"eval/{k}": v for k, v in named.items()},
                         step=int(sr.train_metrics.get("step", 0)))
    tracking.log_metrics(uri, run_id, {k: v for k, v in sr.train_metrics.items()
                                       if k.startswith("data/")})
    tracking.set_tags(uri, run_id, {"checkpoint_uri": sr.checkpoint_uri})
    try:
        routing = json.loads(storage.read_text(storage.join_uri(sr.checkpoint_uri, "routing.json")))
    except (OSError, ValueError):
        routing = {}
    tracking.log_stage_plots(uri, run_id, routing, stage=sr.stage)
    tracking.end_run(uri, run_id)
    if parent_run_id:
        tracking.log_metrics(uri, parent_run_id, {f"{prefix}/eval/{k}": v for k, v in named.items()})


# --- evaluation at the end of a stage ----------------------------------------------------------


def evaluate_checkpoint(checkpoint_uri: str, cfg: TrainConfig, *, split: str | None = None,
                        max_records: int | None = None, batch_size: int = 8,
                        plot_dir: str = "", progress=None, keep: dict | None = None
                        ) -> dict[str, float]:
    """Generate answers with the checkpoint for up to `max_records` records per task of `split`
    and score them (`timeexpert.eval.evaluate`): {"mr/R1@0.5": ..., "vhd/...", "dvc/..."}.
    `plot_dir`: where to write `token_density_{task}.png` (the per-frame density of kept visual
    tokens of each task's first video, GroundVTS) when the model samples tokens. `progress(answered,
    total)`: called after each batch (`predict_records`). `keep`: a dict that receives the scored
    `records` and their `predictions` (record id -> Prediction), for per-video statistics."""
    split = cfg.eval_split if split is None else split
    max_records = cfg.eval_max_records if max_records is None else max_records
    if not split or max_records <= 0:
        return {}
    records = formats.read_manifest(storage.join_uri(cfg.data_root, "manifests", f"{split}.jsonl"))
    chosen = [r for t in Task for r in [r for r in records if r.task == t][:max_records]]
    if not chosen:
        return {}
    mconfig = TimeExpertConfig.from_dict(read_config(checkpoint_uri))  # its frames and size

    def plot_density(record, timestamps_T, pred) -> None:
        plot = os.path.join(plot_dir, f"token_density_{record.task.value}.png") if plot_dir else ""
        if plot and pred.token_density is not None and not os.path.exists(plot):
            tracking.plot_token_density(pred.token_density, timestamps_T, plot,
                                        intervals=[(e.start, e.end) for e in record.events],
                                        title=f"{record.task.value}: {record.query[:60]}")

    predictions, scored, _ = predict_records(
        checkpoint_uri, chosen, data_config(cfg, mconfig), replicas=cfg.eval_replicas,
        num_cpus=max(cfg.cpus_per_worker, 0.25), num_gpus=1.0 if cfg.use_gpu else 0.0,
        precision=cfg.precision, batch_size=batch_size, on_prediction=plot_density,
        progress=progress,
    )
    if keep is not None:
        keep.update(records=scored, predictions=predictions)
    out: dict[str, float] = {}
    for task in Task:
        task_records = [r for r in scored if r.task == task]
        if task_records:
            metrics = evaluate_predictions(task_records, predictions, task, captions=cfg.eval_captions)
            out.update({f"{task.value}/{k}": float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float))})
    distinct = distinct_windows(scored, predictions)
    if distinct is not None:
        out["mr/distinct_windows"] = 100.0 * distinct
    return out
