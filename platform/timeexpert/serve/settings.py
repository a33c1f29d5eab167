"""Typed settings of the grounding service (plain dataclasses; pydantic stays at the HTTP edge).

`ServiceConfig` is what the ingress, the decode deployment and the model deployment are built
from; `serve_apps/grounding.py` fills it from `serve run ... key=value` arguments or the serve
config YAML.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(kw_only=True)
class VideoLimits:
    """What a request may ask of the video path (checked by the ingress, 4xx when exceeded)."""

    allowed_roots: list[str]  # storage roots (local folders, s3://bucket/prefix) URIs may name;
    # empty: video by upload / data URL only
    max_upload_bytes: int = 32 * MIB  # an uploaded / data-URL video larger than this gets 413
    max_frames: int = 64  # most frames a request may sample (num_frames, or fps x duration cap)
    max_fps: float = 4.0  # highest sampling rate a request may ask for
    max_query_chars: int = 512  # longest query / chat text
    decode_cache_entries: int = 64  # decoded videos kept per ingress replica (LRU, object refs)

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_frames", "max_query_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_fps > 0:
            raise ValueError(f"max_fps must be > 0, got {self.max_fps}")
        if self.decode_cache_entries < 0:
            raise ValueError(f"decode_cache_entries must be >= 0, got {self.decode_cache_entries}")


@dataclass(kw_only=True)
class ModelServerConfig:
    """The model deployment: which checkpoint, how requests are batched, how it is sharded."""

    checkpoint: str  # local dir, file://, s3://, or an MLflow URI (models:/..., runs:/...)
    max_batch_size: int = 8  # @serve.batch size; 1 turns dynamic batching off
    batch_wait_timeout_s: float = 0.05  # how long a partial batch waits for more requests
    ep_size: int = 1  # expert-parallel workers per replica; 1 = the monolithic replica
    ep_worker_num_cpus: float = 0.1  # CPUs each EP worker reserves (a placement-group bundle)
    ep_timeout_s: float = 300.0  # gloo collective timeout: a lost worker fails, never hangs
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required (local dir, s3://, models:/ or runs:/ URI)")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")


@dataclass(kw_only=True)
class ServiceConfig:
    """The whole grounding service."""

    model: ModelServerConfig
    video: VideoLimits
    model_name: str = "timeexpert"  # the name requests may give in `model`; others get 404
    auth_token: str = ""  # bearer token required on /v1/*; empty = no auth
    version: str = "0.1.0"  # reported by the model-info endpoint
