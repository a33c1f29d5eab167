"""Typed configs, one small dataclass per component (torchtitan / litgpt style).

Named presets combining them live in `timeexpert.presets` (one registry). The model's own
Hugging Face config (`TimeExpertConfig`) is built from these in `timeexpert.models.timeexpert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
