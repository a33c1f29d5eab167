"""The training recipes: what each stage trains and which loss terms it counts.

A stage is a `StageSpec`; a recipe is one dict of them (`RECIPES`, chosen by
`TrainConfig.recipe`):
- "timeexpert" (TimeExpert sec. 3.5): 1 task modules (slot compression + projector, time / score
  encoders, the three heads, the D2VLM evidence head, the frame-relevance head), CE only; 2 the MoE
  decoder (blocks, final norm, text embedding), CE + task-dependent aux + z-loss; 3 everything but
  the vision encoder.
- "groundvts" (GroundVTS sec. 3.3): 1 VTS warm-up (the token sampler), 2 sampler + projector +
  decoder with LoRA on attention (`apply_lora`), 3 grounding fine-tuning.
The loss of a stage is `models.timeexpert.combine_losses` over the stage's terms: the auxiliaries
of the modules that are on (frame relevance, frame words, D2VLM evidence) count in every stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from timeexpert.models.timeexpert import ALL_LOSSES, HEAD_LOSSES, combine_losses

VISION = "frame_encoder."  # the vision encoder's parameter prefix


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One training stage, declaratively: what trains and which loss terms count."""

    name: str  # for run names and logs
    trainable: tuple[str, ...]  # parameter-name prefixes trained ("" = every parameter)
    frozen: tuple[str, ...] = ()  # prefixes kept frozen even when `trainable` matches them
    losses: tuple[str, ...] = HEAD_LOSSES  # TimeExpertOutput loss fields combined
    lora: bool = False  # decoder attention through LoRA adapters (peft); the MoE experts, which
    # are grouped weights LoRA does not apply to, train in full


TIMEEXPERT_STAGES: dict[int, StageSpec] = {  # TimeExpert sec. 3.5
    1: StageSpec(name="task-modules",
                 trainable=("compressor.", "projector.", "time_encoder.", "score_encoder.",
                            "time_head.", "score_head.", "lm_head.", "evidence_head.",
                            "frame_head.", "patch_score.")),
    2: StageSpec(name="moe-decoder", trainable=("layers.", "norm.", "text_embed."),
                 losses=ALL_LOSSES),
    3: StageSpec(name="all-but-vision", trainable=("",), frozen=(VISION,), losses=ALL_LOSSES),
}
GROUNDVTS_STAGES: dict[int, StageSpec] = {  # GroundVTS sec. 3.3
    1: StageSpec(name="vts-warmup", trainable=("token_sampler.",)),
    2: StageSpec(name="joint-lora", trainable=("token_sampler.", "projector.", "layers."), lora=True,
                 losses=ALL_LOSSES),
    3: StageSpec(name="grounding-ft", trainable=("",), frozen=(VISION,), losses=ALL_LOSSES),
}
RECIPES: dict[str, dict[int, StageSpec]] = {"timeexpert": TIMEEXPERT_STAGES,
                                            "groundvts": GROUNDVTS_STAGES}


def stage_spec(recipe: str, stage: int, *, vision_pretrained: bool = True) -> StageSpec:
    """The recipe's stage. The recipes keep the vision encoder frozen, as the papers do with a
    pretrained SigLIP; a randomly initialised one (`vision_pretrained=False`: no `vision_path`,
    e.g. the CPU presets, with no weights to download) would stay random forever, so it trains
    wherever the projector trains."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    if stage not in RECIPES[recipe]:
        raise ValueError(f"stage must be one of {sorted(RECIPES[recipe])}, got {stage}")
    spec = RECIPES[recipe][stage]
    if vision_pretrained or not ("projector." in spec.trainable or "" in spec.trainable):
        return spec
    return dataclasses.replace(
        spec, trainable=tuple(dict.fromkeys(spec.trainable + (VISION,))),
        frozen=tuple(p for p in spec.frozen if p != VISION),
    )


def set_stage_trainable(model: nn.Module, spec: StageSpec) -> list[str]:
    """Freeze everything but the stage's modules (LoRA adapters, when present, train in a LoRA
    stage and the base weights they wrap stay frozen); returns the trainable parameter names."""
    names = []
    for name, p in model.named_parameters():
        train = name.startswith(spec.trainable) and not (spec.frozen and name.startswith(spec.frozen))
        if spec.lora and ".attn." in name:
            train = "lora_" in name
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def set_trainable(model, stage: int, recipe: str = "timeexpert") -> list[str]:
    """Freeze everything but the stage's modules; returns the trainable parameter names."""
    spec = stage_spec(recipe, stage, vision_pretrained=bool(model.config.vision_path))
    return set_stage_trainable(model, spec)


def stage_loss(out, stage: int, config, recipe: str = "timeexpert") -> torch.Tensor:
    """The stage's loss: `combine_losses` over the stage's terms (stage 2-3 of "timeexpert" is
    the model's own `out.loss`)."""
    return combine_losses(out, config, stage_spec(recipe, stage).losses)


def apply_lora(model: nn.Module, *, rank: int = 8, alpha: int = 16, dropout: float = 0.0) -> nn.Module:
    """LoRA adapters (peft) on the decoder's attention projections, in place."""
    from peft import LoraConfig, inject_adapter_in_model  # deferred on purpose: only LoRA stages

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=r"layers\.\d+\.attn\.(q|k|v|o)_proj")  # the decoder's only
    return inject_adapter_in_model(config, model)
