"""The grounding service as a Ray Serve application (deployment classes: `timeexpert.serve`).

    serve run serve_apps.grounding:app checkpoint=runs/tiny allowed_roots=data/videos
    serve run serve_apps/config.yaml          # or: serve deploy serve_apps/config.yaml

`app` is a typed application builder: `serve run` validates the `key=value` arguments (or the
YAML's `args:`) against `GroundingAppArgs`. List arguments take a comma-separated string on the
command line. The bearer token comes from `auth_token` or the TIMEEXPERT_API_TOKEN environment
variable of the process that builds the app.
"""

# No `from __future__ import annotations`: Serve reads the builder's parameter annotation at
# runtime to validate the arguments into GroundingAppArgs.
import os

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from timeexpert.serve.app import build_application
from timeexpert.serve.settings import MIB, ModelServerConfig, ServiceConfig, VideoLimits

TOKEN_ENV = "TIMEEXPERT_API_TOKEN"


class GroundingAppArgs(BaseModel):
    """Arguments of `serve run serve_apps.grounding:app key=value ...`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="local dir, s3://, models:/NAME/VERSION or runs:/ID/PATH")
    allowed_roots: list[str] = Field(
        default_factory=list, description="storage roots video URIs may name (comma-separated)"
    )
    model_name: str = "timeexpert"
    auth_token: str = Field(default="", description=f"bearer token; default ${TOKEN_ENV}")
    version: str = "0.1.0"
    # video limits
    max_upload_mb: float = Field(default=32.0, gt=0)
    max_frames: int = Field(default=64, ge=1)
    max_fps: float = Field(default=4.0, gt=0)
    max_query_chars: int = Field(default=512, ge=1)
    decode_cache_entries: int = Field(default=64, ge=0)
    # model deployment
    max_batch_size: int = Field(default=8, ge=1, description="1 turns dynamic batching off")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)
    ep_size: int = Field(default=1, ge=1, description="> 1: expert-sharded replicas")
    ep_worker_num_cpus: float = Field(default=0.5, gt=0)
    device: str = "cpu"
    model_num_cpus: float = Field(default=1.0, ge=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    health_check_period_s: float = Field(default=10.0, gt=0, description="model replicas")
    health_check_timeout_s: float = Field(default=60.0, gt=0, description="model replicas")
    # decode and ingress deployments
    decoder_num_cpus: float = Field(default=0.5, ge=0)
    decoder_min_replicas: int = Field(default=1, ge=1)
    decoder_max_replicas: int = Field(default=2, ge=1)
    ingress_num_cpus: float = Field(default=0.25, ge=0)

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            model=ModelServerConfig(
                checkpoint=self.checkpoint, max_batch_size=self.max_batch_size,
                batch_wait_timeout_s=self.batch_wait_timeout_s, ep_size=self.ep_size,
                ep_worker_num_cpus=self.ep_worker_num_cpus, device=self.device,
            ),
            video=VideoLimits(
                allowed_roots=list(self.allowed_roots),
                max_upload_bytes=int(self.max_upload_mb * MIB), max_frames=self.max_frames,
                max_fps=self.max_fps, max_query_chars=self.max_query_chars,
                decode_cache_entries=self.decode_cache_entries,
            ),
            model_name=self.model_name,
            auth_token=self.auth_token or os.environ.get(TOKEN_ENV, ""),
            version=self.version,
        )

    def model_autoscaling(self) -> dict:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})"
            )
        return {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }


def app(args: GroundingAppArgs) -> Application:
    """The typed builder `serve run` / `serve deploy` call."""
    return build_application(
        args.service_config(),
        model_options={
            "autoscaling_config": args.model_autoscaling(),
            "ray_actor_options": {"num_cpus": args.model_num_cpus},
            "health_check_period_s": args.health_check_period_s,
            "health_check_timeout_s": args.health_check_timeout_s,
        },
        decoder_options={
            "autoscaling_config": {
                "min_replicas": args.decoder_min_replicas,
                "max_replicas": max(args.decoder_max_replicas, args.decoder_min_replicas),
                "target_ongoing_requests": 4,
            },
            "ray_actor_options": {"num_cpus": args.decoder_num_cpus},
        },
        ingress_options={"ray_actor_options": {"num_cpus": args.ingress_num_cpus}},
    )
