"""The one typed config of the grounding service: `ServiceConfig`.

It is the argument of the Serve application builder (`serve_apps.grounding:app`): `serve run` /
`serve deploy` validate the YAML's `args:` (or `key=value` words, dotted for nested fields:
`model.checkpoint=...`) into it. Every Serve option the service sets — replicas, autoscaling,
CPUs, batching, health checks — is a field here and nowhere else; `*.deployment_options()` turn
it into the `Deployment.options` of each of the three deployments. pydantic, because this is the
application's HTTP-facing boundary with Serve (STYLE 4).

Local paths (the checkpoint, allowed roots, a `sqlite:///` tracking URI) are made absolute when
validated, in the process that builds the app: replicas run in other working directories.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIB = 1 << 20
TOKEN_ENV = "TIMEEXPERT_API_TOKEN"  # the bearer token when `auth_token` is not given


def absolute_local(uri: str) -> str:
    """`uri` with a relative local path made absolute (against the caller's working directory);
    a URI with a scheme (s3://, file://, models:/, runs:/ ...) as given."""
    if not uri or ":/" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Section):
    """Serve's `autoscaling_config` of one deployment (the only place it is set)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0, description="per replica")
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas "
                             f"({self.min_replicas})")
        return self


class VideoLimits(_Section):
    """What a request may ask of the video path (checked by the ingress, 4xx when exceeded)."""

    allowed_roots: list[str] = Field(
        default_factory=list,
        description="storage roots (local folders, s3://bucket/prefix) video URIs may name; a "
        "comma-separated string on the command line; empty: uploads / data URLs only")
    max_upload_mb: float = Field(default=32.0, gt=0, description="larger uploads get 413")
    max_frames: int = Field(default=64, ge=1, description="most frames a request may sample")
    max_fps: float = Field(default=4.0, gt=0, description="highest sampling rate a request may ask")
    max_query_chars: int = Field(default=512, ge=1, description="longest query / chat text")
    decode_cache_entries: int = Field(
        default=64, ge=0, description="decoded videos kept per ingress replica (LRU); 0: off")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        return [absolute_local(p) if isinstance(p, str) else p for p in value]

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)


class ModelServerConfig(_Section):
    """The model deployment: which checkpoint, how requests are batched, how it is sharded and
    scaled."""

    checkpoint: str = Field(
        min_length=1, description="local dir, file://, s3://, models:/NAME/VERSION (or "
        "models:/NAME/latest, models:/NAME@ALIAS), runs:/RUN_ID/PATH")
    tracking_uri: str = Field(
        default="", description="MLflow tracking URI of a models:/ or runs:/ checkpoint, set as "
        "MLFLOW_TRACKING_URI in the model replicas; empty: theirs")
    max_batch_size: int = Field(default=8, ge=1, description="@serve.batch size; 1: no batching")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0,
                                        description="how long a partial batch waits for more")
    ep_size: int = Field(default=1, ge=1,
                         description="expert-parallel workers per replica; 1: monolithic replica")
    ep_worker_num_cpus: float = Field(default=0.5, gt=0,
                                      description="CPUs each EP worker reserves (its bundle)")
    ep_timeout_s: float = Field(default=300.0, gt=0,
                                description="collective timeout: a lost EP worker fails, never hangs")
    ep_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="how a replica's bundles (its own, then one per EP worker) "
        "spread over the nodes (Ray's placement group strategies): PACK keeps the EP group's "
        "all-to-all on one node where it fits; STRICT_SPREAD puts every bundle on its own node")
    device: str = "cpu"
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs of a replica (its own bundle)")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_queued_requests: int = Field(
        default=64, ge=-1, description="requests the ingress lets wait for a busy replica (beyond "
        "the replicas' max_ongoing_requests); one more gets 503 with Retry-After at once (Serve's "
        "max_queued_requests); -1: no limit, latency grows without bound under overload")
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("checkpoint")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_local(value)

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, value: str) -> str:
        prefix = "sqlite:///"  # a relative database path, relative to this process
        if value.startswith(prefix) and not value.startswith(prefix + "/"):
            return prefix + os.path.abspath(value[len(prefix):])
        return value

    def deployment_options(self) -> dict[str, Any]:
        """`GroundingModelServer.options(...)`. With `ep_size > 1` the replica reserves
        `placement_group_bundles`: its own bundle, then one per EP worker."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.tracking_uri:  # inherited by the EP workers the replica starts
            actor["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": self.tracking_uri}}
        options: dict[str, Any] = {
            "autoscaling_config": self.autoscaling.model_dump(),
            "ray_actor_options": actor,
            "max_ongoing_requests": max(2 * self.max_batch_size, 8),
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.ep_size > 1:
            worker = {"CPU": self.ep_worker_num_cpus}
            if self.device.startswith("cuda"):
                worker["GPU"] = 1.0
            options["placement_group_bundles"] = (
                [{"CPU": self.num_cpus}] + [dict(worker) for _ in range(self.ep_size)])
            options["placement_group_strategy"] = self.ep_placement
        return options


class DecoderConfig(_Section):
    """The video-decoding deployment."""

    num_cpus: float = Field(default=0.5, ge=0)
    autoscaling: Autoscaling = Field(
        default_factory=lambda: Autoscaling(min_replicas=1, max_replicas=2,
                                            target_ongoing_requests=4))

    def deployment_options(self) -> dict[str, Any]:
        return {"autoscaling_config": self.autoscaling.model_dump(),
                "ray_actor_options": {"num_cpus": self.num_cpus}}


class IngressConfig(_Section):
    """The HTTP ingress deployment (light: validation and routing)."""

    num_cpus: float = Field(default=0.25, ge=0)
    num_replicas: int = Field(default=1, ge=1)
    retry_after_s: int = Field(default=1, ge=0,
                               description="the Retry-After of a 503 (overloaded, not ready)")

    def deployment_options(self) -> dict[str, Any]:
        return {"num_replicas": self.num_replicas, "ray_actor_options": {"num_cpus": self.num_cpus}}


class ServiceConfig(_Section):
    """The whole grounding service: the builder's argument (see the module docstring)."""

    model: ModelServerConfig
    video: VideoLimits = Field(default_factory=VideoLimits)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    model_name: str = Field(default="timeexpert",
                            description="the name requests may give in `model`; others get 404")
    auth_token: str = Field(default_factory=lambda: os.environ.get(TOKEN_ENV, ""),
                            description=f"bearer token on /v1/*; default ${TOKEN_ENV}; empty: none")
    version: str = Field(default="0.1.0", description="reported by the model-info endpoint")

    @model_validator(mode="before")
    @classmethod
    def _nest_dotted(cls, data: Any) -> Any:
        """`serve run ... model.checkpoint=X video.max_frames=8` -> nested sections."""
        if not isinstance(data, dict) or not any("." in str(k) for k in data):
            return data
        nested: dict[str, Any] = {}
        for key, value in data.items():
            *path, leaf = str(key).split(".")
            node = nested
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{key!r} sets a field inside {part!r}, which is not a section")
            node[leaf] = value
        return nested
