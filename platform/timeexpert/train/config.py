"""The training run's typed config: one `TrainConfig` per stage run (torchtitan / litgpt style).

A pipeline (`timeexpert.train.stages.run_pipeline`) runs the same TrainConfig three times with
`stage` = 1, 2, 3, each stage initialised from the previous stage's checkpoint. `recipe` names
what the three stages train (`timeexpert.train.recipes.RECIPES`): TimeExpert sec. 3.5 or GroundVTS's
progressive stages; `fpo_steps` adds D2VLM's preference optimisation after the last stage;
`curriculum` trains the last stage on easier datasets first.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from timeexpert.devices import PRECISIONS

STAGES = (1, 2, 3)
ZERO_STAGES = (0, 1, 2)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
LR_SCHEDULES = ("constant", "cosine")
RECIPE_NAMES = ("timeexpert", "groundvts")  # the stage specs: `timeexpert.train.recipes.RECIPES`
CURRICULUM_STAGE = 3  # the stage the curriculum runs in: both recipes' last, all but vision trains


@dataclass(kw_only=True)
class TrainConfig:
    """One training run (one stage) of TimeExpert on Ray Train."""

    # --- what and where -----------------------------------------------------------------------
    data_root: str  # dataset root (local dir or s3://...) holding manifests/{split}.jsonl + videos
    preset: str = "tiny_cpu"  # model preset name in `timeexpert.presets`
    storage_root: str = ".cache/runs"  # checkpoints and Ray Train state: local dir or s3://...
    name: str = "timeexpert"  # run name: checkpoints go to {storage_root}/{name}-stage{stage}
    moe: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's MoE fields
    # (gating, num_experts, num_experts_per_token, alpha, tau_min, lambda_1, lambda_2, ...)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # other TimeExpertConfig fields

    # --- parallelism --------------------------------------------------------------------------
    num_workers: int = 2  # Ray Train workers (the data-parallel world)
    cpus_per_worker: float = 0.5  # logical CPUs each worker reserves (fractional on laptops)
    placement_strategy: str = "PACK"  # how the workers' bundles spread over the nodes (Ray's
    # placement group strategies; STRICT_SPREAD: one worker per node)
    use_gpu: bool = False  # NCCL + one GPU per worker instead of gloo on CPU
    ep_size: int = 1  # expert-parallel degree; divides num_workers and the model's max_experts
    zero_stage: int = 0  # 0: plain data parallel (explicit all-reduce); 1/2: DeepSpeed ZeRO
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" or "fp32" to
    # force one (`timeexpert.devices`). Parameters and optimizer state stay fp32 (master
    # weights); the MoE router's logits, softmax, aux and z-loss are fp32 in every mode

    # --- recipe -------------------------------------------------------------------------------
    recipe: str = "timeexpert"  # "timeexpert" (sec. 3.5: 1 task modules, 2 MoE decoder, 3 all
    # but vision) or "groundvts" (1 sampler warm-up, 2 joint with LoRA, 3 grounding FT)
    stage: int = 1  # which stage of the recipe this run is
    lora_rank: int = 8  # LoRA rank of the decoder attention in stages whose spec says lora
    lora_alpha: int = 16  # LoRA alpha (scale alpha / rank)
    num_steps: int = 20  # optimizer steps of this stage (every worker takes exactly this many)
    batch_size: int = 2  # examples per worker per step
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps, then the schedule
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" decay to min_lr_ratio
    min_lr_ratio: float = 0.1  # cosine: the last step's learning rate as a share of `lr`
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)
    seed: int = 0  # model init, data order and routing seeds
    expert_update_every: int = 10  # steps between token-adaptive add/prune (0: adaptive off)
    task_weights: dict[str, float] = field(default_factory=dict)  # per-task mixing of the data
    init_from: str = ""  # checkpoint URI whose weights this stage starts from ("" = fresh)
    shuffle_buffer: int = 16  # streaming: rows of each worker's local shuffle buffer; decode
    # once: any value > 0 shuffles each epoch's rows fully (0: off, rows in order)
    frame_jitter: bool = False  # training frames at random points of their segments (TSN), a
    # new draw each epoch; evaluation always takes the segment centres
    decode_once: bool = True  # each worker decodes its part of the training videos once, in its
    # own process before its first step, and keeps the frames in its memory; False: Ray Data
    # streams them, decoding every epoch (for a dataset far beyond the workers' memory)
    jitter_grid: int = 4  # decode_once + frame_jitter: frames decoded per segment; each epoch
    # draws one of them per segment (`data.pipeline.draw_segment_frames`)
    fpo_steps: int = 0  # D2VLM FPO steps after the pipeline's last stage (0: off; a Ray Train run)
    fpo_beta: float = 0.1  # FPO / DPO inverse temperature beta
    curriculum: list[str] = field(default_factory=list)  # dataset roots easier than data_root,
    # easiest first (e.g. the synthetic LADDER's levels). The pipeline runs stage 3 on each of
    # them for `curriculum_steps` steps, then on data_root for its own steps: every phase is a
    # `fit` from the previous phase's weights (a fresh optimizer and LR schedule), run name
    # {name}-cur{i}-stage3, evaluated on its own root's eval_split. The tokenizer comes from
    # data_root's train records. The steps are extra: for an equal budget, lower stage 3's steps.
    curriculum_steps: int = 0  # stage-3 steps on each curriculum root (>= 1 with a curriculum)

    # --- checkpoints, fault tolerance, logging ------------------------------------------------
    checkpoint_every: int = 10  # steps between checkpoints (the last step always checkpoints)
    num_checkpoints_kept: int = 2  # checkpoints kept on storage (the newest)
    max_failures: int = 0  # worker-group restarts from the last checkpoint before giving up
    storage_wait_s: float = 300.0  # how long a checkpoint write waits in all for storage that
    # does not answer (retried with a bounded backoff) before the worker fails
    log_every: int = 5  # steps between progress lines / Ray Train reports / MLflow metrics
    eval_split: str = "val"  # split evaluated at the end of the stage ("" = none)
    eval_max_records: int = 12  # records per task evaluated at the end of the stage (0 = none)
    eval_replicas: int = 1  # model replicas of the stage evaluation's actor pool (Ray Data), each
    # with cpus_per_worker CPUs and, with use_gpu, one GPU
    val_every: int = 0  # steps between scores of the model in training on `val_records` MR
    # queries of eval_split (`train.validation`, reported as val/mr/R1@0.5: what a sweep stops
    # on); a multiple of log_every, 0 = none
    val_records: int = 16  # the first this many MR queries (by id) of eval_split
    eval_captions: bool = False  # DVC caption metrics (METEOR/CIDEr/SODA_c, java) in stage evals
    tracking_uri: str = ""  # MLflow tracking URI ("" = no MLflow)
    experiment: str = "timeexpert"  # MLflow experiment name
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags (e.g. ablation=dense)
    mlflow_run_id: str = ""  # MLflow run the workers log step metrics to (set by the driver)
    profile_steps: int = 0  # torch profiler trace of this many steps on rank 0 (after one
    # warm-up step), saved as MLflow artifacts under profile/ (else under the run's folder)
    # fault injection, for testing fault tolerance: worker `fail_rank` exits (as a killed
    # process would) once, after step `fail_at_step` of a run that was not resumed (0 = never)
    fail_at_step: int = 0
    fail_rank: int = 1
    fail_after_part: str = ""  # a checkpoint part ("model.safetensors", "optim/rank_00000.pt",
    # ...): the exit happens in step `fail_at_step`'s checkpoint write instead, once the rank
    # has stored that part ("" = after the step)

    def __post_init__(self) -> None:
        if not self.data_root:
            raise ValueError("data_root is required (a dataset root with manifests/{split}.jsonl)")
        if self.recipe not in RECIPE_NAMES:
            raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {self.recipe!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage}")
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(
                f"zero_stage must be one of {ZERO_STAGES} (0 = plain data parallel; ZeRO-3 does "
                f"not support expert parallelism), got {self.zero_stage}"
            )
        for name in ("num_workers", "ep_size", "num_steps", "batch_size", "checkpoint_every",
                     "log_every", "num_checkpoints_kept"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers % self.ep_size:
            raise ValueError(
                f"ep_size ({self.ep_size}) must divide num_workers ({self.num_workers})"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fail_at_step < 0 or (self.fail_at_step and not 0 <= self.fail_rank < self.num_workers):
            raise ValueError(f"fail_at_step must be >= 0 and fail_rank in [0, num_workers = "
                             f"{self.num_workers}), got {self.fail_at_step} and {self.fail_rank}")
        if self.fail_after_part and not (self.fail_at_step % self.checkpoint_every == 0
                                         or self.fail_at_step == self.num_steps):
            raise ValueError(f"fail_after_part needs a checkpoint at fail_at_step: a multiple of "
                             f"checkpoint_every ({self.checkpoint_every}) or num_steps "
                             f"({self.num_steps}), got {self.fail_at_step}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got "
                             f"{self.placement_strategy!r}")
        if self.storage_wait_s < 0:
            raise ValueError(f"storage_wait_s must be >= 0, got {self.storage_wait_s}")
        if self.jitter_grid < 1 or self.profile_steps < 0:
            raise ValueError(f"jitter_grid must be >= 1 and profile_steps >= 0, got "
                             f"{self.jitter_grid} and {self.profile_steps}")
        if self.val_every < 0 or self.val_every % self.log_every or self.val_records < 1:
            raise ValueError(f"val_every must be a multiple of log_every ({self.log_every}) or 0, "
                             f"and val_records >= 1, got {self.val_every} and {self.val_records}")
        if self.val_every and not self.eval_split:
            raise ValueError("val_every scores queries of eval_split: set it (e.g. 'val')")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.fpo_steps < 0:
            raise ValueError(f"fpo_steps must be >= 0 (0 = no FPO), got {self.fpo_steps}")
        if not self.fpo_beta > 0:
            raise ValueError(f"fpo_beta must be > 0, got {self.fpo_beta}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.eval_replicas < 1:
            raise ValueError(f"eval_replicas must be >= 1, got {self.eval_replicas}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if isinstance(self.curriculum, str) or not all(
                isinstance(r, str) and r for r in self.curriculum):
            raise TypeError(f"curriculum must be a list of dataset roots (easiest first), e.g. "
                            f"['.cache/data/level0', '.cache/data/level1'], got {self.curriculum!r}")
        if self.data_root in self.curriculum:
            raise ValueError(f"curriculum lists data_root {self.data_root!r}: the pipeline trains "
                             "on data_root after the curriculum; list only easier datasets")
        if self.curriculum_steps < 0 or (self.curriculum and self.curriculum_steps < 1):
            raise ValueError(f"curriculum_steps must be >= 1 with a curriculum (>= 0 without), "
                             f"got {self.curriculum_steps}")
        if self.curriculum_steps and not self.curriculum:
            warnings.warn(f"curriculum_steps {self.curriculum_steps} is ignored: no curriculum "
                          "roots are set", stacklevel=3)

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step `step` (1-based): linear warm-up over
        `warmup_steps`, then constant or a cosine decay to `min_lr_ratio * lr` at `num_steps`."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.num_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**d)

    def run_name(self) -> str:
        return f"{self.name}-stage{self.stage}"
