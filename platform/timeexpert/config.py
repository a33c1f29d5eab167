"""Typed configs, one small dataclass per component (torchtitan / litgpt style).

Named presets combining them live in `timeexpert.presets` (one registry). The model's own
Hugging Face config (`TimeExpertConfig`) is built from these in
`timeexpert.models.configuration_timeexpert`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from timeexpert.events import Task

GatingMode = Literal["dense", "topk", "dynamic"]


@dataclass(kw_only=True)
class MoEConfig:
    """One MoE FFN layer of the decoder (TimeExpert sec. 3.2-3.4)."""

    dim: int  # model width D
    hidden_dim: int  # width F of each SwiGLU expert
    gating: GatingMode = "dynamic"  # dense: one FFN; topk: eq. 3-4; dynamic: eq. 5-6
    num_experts: int = 4  # experts active at initialisation
    max_experts: int = 8  # pre-allocated expert slots (static shapes); >= num_experts
    num_experts_per_token: int = 2  # k of topk gating (named so: transformers rejects `top_k`)
    alpha: float = 0.1  # weight of the task-type activation rate A_t in dynamic gating (eq. 5)
    rate_momentum: float = 0.99  # EMA momentum of A_t, the per-task-type activation rate
    add_threshold: float = 0.1  # add an expert when this share of task tokens activated none
    tau_min: float = 0.01  # prune an expert whose activation rate stays under this
    lambda_1: float = 0.01  # weight of the load term of the task-dependent aux loss (eq. 9)
    lambda_2: float = 0.001  # weight of the expert-embedding norm term (eq. 9)
    z_loss_weight: float = 0.001  # router z-loss weight

    def __post_init__(self) -> None:
        if self.gating not in ("dense", "topk", "dynamic"):
            raise ValueError(f"gating must be dense, topk or dynamic, got {self.gating!r}")
        if not 1 <= self.num_experts <= self.max_experts:
            raise ValueError(
                f"need 1 <= num_experts <= max_experts, got {self.num_experts} and "
                f"{self.max_experts}"
            )
        if self.gating == "topk" and not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"topk gating needs 1 <= num_experts_per_token <= num_experts "
                f"({self.num_experts}), got {self.num_experts_per_token}"
            )


@dataclass(kw_only=True)
class VideoConfig:
    """Which frames a sample decodes, and at what size (resized at decode)."""

    num_frames: int | None = 8  # uniform frames per video; None when sampling by `fps`
    fps: float | None = None  # target sampling rate instead of `num_frames` (capped)
    max_frames: int = 128  # cap for `fps` sampling; shorter videos are padded to it (frame_mask)
    height: int = 224  # decoded frame height, pixels
    width: int = 224  # decoded frame width, pixels
    jitter: bool = False  # training augmentation: a random frame in each of the `num_frames`
    # segments instead of its centre, drawn anew each epoch (not reproducible run to run)

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError(
                f"set exactly one of num_frames and fps, got num_frames={self.num_frames} "
                f"fps={self.fps}"
            )
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(
                f"max_frames, height and width must be >= 1, got {self.max_frames}, "
                f"{self.height}, {self.width}"
            )

    @property
    def frames_per_sample(self) -> int:
        """T of every sample's `frames` (T, H, W, 3)."""
        return self.num_frames if self.num_frames is not None else self.max_frames


@dataclass(kw_only=True)
class DataConfig:
    """Where the dataset lives and how the Ray Data pipeline streams it."""

    root: str = ".cache/data"  # storage root: a local folder or s3://bucket/prefix
    manifest: str = "manifests/{split}.jsonl"  # manifest URI, relative to `root`; {split} filled
    video: VideoConfig = field(default_factory=VideoConfig)  # frame sampling and size
    task_weights: dict[str, float] = field(default_factory=dict)  # e.g. {"mr": 2, "dvc": 1}:
    # resample records to these task shares (same total); empty: as in the manifest
    decode_batch_size: int = 16  # videos per decode task (map_batches batch size)
    decode_num_cpus: float = 1.0  # CPUs reserved per decode task
    decode_concurrency: int | None = None  # most decode tasks at once; None: Ray Data decides
    seed: int = 0  # seed of the task mixing
    storage_options: dict[str, Any] = field(default_factory=dict)  # s3fs options (else AWS_* env)

    def __post_init__(self) -> None:
        tasks = [t.value for t in Task]
        bad = {t: w for t, w in self.task_weights.items() if t not in tasks or w < 0}
        if bad:
            raise ValueError(
                f"task_weights must map tasks of {tasks} to weights >= 0, got {bad}"
            )
        if self.decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {self.decode_batch_size}")
