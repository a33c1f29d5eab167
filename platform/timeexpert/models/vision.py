"""The vision path: frame preprocessing, frame encoder, slot compression, projector.

TimeExpert sec. 3.1: each sampled frame is encoded into patch tokens, compressed to a few tokens
per frame (8 by default) by learned slot queries that cross-attend to the patch tokens, and
projected to the decoder width.

Shape letters: M frames (of all videos in the batch, flattened), C=3 channels, H/W pixels,
P patch tokens per frame, S slot tokens per frame, V vision width, D decoder width.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, SiglipVisionConfig, SiglipVisionModel


class FrameProcessor:
    """uint8 frames (T, H, W, 3) -> normalised float pixels (T, 3, image_size, image_size).

    Plays the role of a Hugging Face image processor. The data pipeline already resizes at decode,
    so resizing here (bilinear, antialiased) only happens for frames handed in at another size.
    """

    def __init__(self, *, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        # plain floats, not tensors: models are built on the meta device by from_pretrained
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"need 3 channel means and 3 positive stds, got {mean} and {std}")

    def __call__(self, frames_THWC: np.ndarray | torch.Tensor) -> torch.Tensor:
        frames = frames_THWC if torch.is_tensor(frames_THWC) else _as_tensor(frames_THWC)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"frames must have shape (T, H, W, 3) (RGB, channels last), got {tuple(frames.shape)}"
            )
        if frames.shape[0] == 0:
            raise ValueError("got zero frames; a video needs at least one frame")
        if frames.shape[1] == 0 or frames.shape[2] == 0:
            raise ValueError(f"frames have an empty spatial size {tuple(frames.shape[1:3])}")
        if frames.dtype == torch.uint8:
            pixels_MCHW = frames.permute(0, 3, 1, 2).float() / 255.0
        elif frames.is_floating_point():
            pixels_MCHW = frames.permute(0, 3, 1, 2).float()  # already in [0, 1]
        else:
            raise ValueError(f"frames must be uint8 (0-255) or float (0-1), got {frames.dtype}")
        if pixels_MCHW.shape[-2:] != (self.image_size, self.image_size):
            pixels_MCHW = F.interpolate(
                pixels_MCHW,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        mean_C = torch.tensor(self.mean).view(1, 3, 1, 1)
        std_C = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels_MCHW - mean_C) / std_C


def _as_tensor(frames: np.ndarray) -> torch.Tensor:
    """Frames as a tensor without a copy where torch allows one: a read-only array (decoded
    frames handed over by Ray's object store or Arrow) cannot share memory with a tensor, which
    `torch.as_tensor` would only warn about, so it is copied, once, in the uint8 it came in."""
    frames = np.asarray(frames)
    if not frames.flags.writeable:
        frames = frames.copy()
    return torch.from_numpy(frames)


class PatchViT(nn.Module):
    """A small ViT built from config: patch embedding, learned positions, pre-norm blocks."""

    def __init__(
        self, *, image_size: int, patch_size: int, width: int, num_layers: int, num_heads: int
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.pos_PV = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                num_heads,
                dim_feedforward=4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, pixels_MCHW: torch.Tensor) -> torch.Tensor:
        x_MPV = self.patch_embed(pixels_MCHW).flatten(2).transpose(1, 2) + self.pos_PV
        for block in self.blocks:
            x_MPV = block(x_MPV)
        return self.norm(x_MPV)


class SiglipFrameEncoder(nn.Module):
    """A SigLIP vision tower (transformers) returning its patch tokens, without the pooling head."""

    def __init__(self, siglip_config: dict[str, Any]) -> None:
        super().__init__()
        cfg = SiglipVisionConfig(**{**siglip_config, "vision_use_head": False})
        self.tower = SiglipVisionModel(cfg)

    def forward(self, pixels_MCHW: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixels_MCHW).last_hidden_state

    def load_pretrained(self, path: str) -> None:
        """Copy the weights of a local SigLIP checkpoint (a vision model or a full SigLIP)."""
        source = SiglipVisionModel.from_pretrained(path).state_dict()
        target = self.tower.state_dict()
        wanted = {k: v for k, v in source.items() if k in target}
        missing = sorted(set(target) - set(wanted))
        bad = [k for k, v in wanted.items() if v.shape != target[k].shape]
        if missing or bad:
            raise ValueError(
                f"SigLIP checkpoint {path!r} does not match the configured encoder: "
                f"missing {missing[:5]}, shape mismatch {bad[:5]}"
            )
        self.tower.load_state_dict(wanted, strict=False)


def siglip_config_from_path(path: str) -> dict[str, Any]:
    """The vision config dict of a local SigLIP checkpoint (vision model or full SigLIP)."""
    cfg = AutoConfig.from_pretrained(path)
    cfg = getattr(cfg, "vision_config", cfg)
    if cfg.model_type not in ("siglip_vision_model", "siglip2_vision_model"):
        raise ValueError(f"{path!r} is not a SigLIP checkpoint (model_type {cfg.model_type!r})")
    d = cfg.to_dict()
    for key in ("transformers_version", "architectures", "model_type", "_name_or_path"):
        d.pop(key, None)
    return d


class SlotCompressor(nn.Module):
    """Compress each frame's P patch tokens to S tokens by learned slot queries.

    One cross-attention of S learned queries over the frame's patch tokens, then an MLP, both
    residual and pre-norm (a Perceiver-resampler-style block; TimeExpert sec. 3.1 "slot-based
    compression").
    """

    def __init__(self, *, width: int, num_slots: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"vision width {width} must be divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.slots_SV = nn.Parameter(torch.randn(num_slots, width) * 0.02)
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, patches_MPV: torch.Tensor) -> torch.Tensor:
        """(M, P, V) patches -> (M, S, V) slots."""
        M, P, V = patches_MPV.shape
        S, h = self.slots_SV.shape[0], self.num_heads
        slots_MSV = self.slots_SV.expand(M, S, V)
        q_MhSd = self.q_proj(self.norm_q(slots_MSV)).view(M, S, h, V // h).transpose(1, 2)
        k_MPV, v_MPV = self.kv_proj(self.norm_kv(patches_MPV)).chunk(2, dim=-1)
        k_MhPd = k_MPV.reshape(M, P, h, V // h).transpose(1, 2)
        v_MhPd = v_MPV.reshape(M, P, h, V // h).transpose(1, 2)
        attn_MSV = (
            F.scaled_dot_product_attention(q_MhSd, k_MhPd, v_MhPd).transpose(1, 2).reshape(M, S, V)
        )
        x_MSV = slots_MSV + self.out_proj(attn_MSV)
        return x_MSV + self.mlp(self.norm_mlp(x_MSV))


class Projector(nn.Module):
    """Two-layer MLP from the vision width to the decoder width."""

    def __init__(self, vision_width: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_width, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x_MSV: torch.Tensor) -> torch.Tensor:
        return self.net(x_MSV)
