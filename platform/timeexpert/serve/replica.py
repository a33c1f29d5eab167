"""What a model replica runs, whatever holds the weights: the whole model in the replica
(`LocalModel`) or an expert-parallel group of workers (`sharded.ShardedModel`, whose workers call
`model_info` and `predict_isolated` too). The checkpoint loads once, in the constructor, from any
URI of `timeexpert.checkpoints`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from timeexpert.inference import GroundingModel, PredictRequest
from timeexpert.serve.inputs import Rejection
from timeexpert.serve.settings import ModelServerConfig


@dataclass
class ModelInfo:
    """What the model-info endpoint reports about a replica's model."""

    checkpoint: str
    gating: str
    num_layers: int
    max_experts: int
    active_experts: list[list[int]]
    ep_size: int
    experts_per_rank: int  # expert slots per layer held by each EP rank (max_experts / ep_size)
    image_size: int
    num_frames: int
    max_batch_size: int


def model_info(gm: GroundingModel, config: ModelServerConfig) -> ModelInfo:
    cfg = gm.model.config
    moe = cfg.moe_config()
    active = [
        [] if moe.gating == "dense" else layer.ffn.active_E.nonzero().flatten().tolist()
        for layer in gm.model.layers
    ]
    return ModelInfo(
        checkpoint=config.checkpoint, gating=moe.gating, num_layers=cfg.num_hidden_layers,
        max_experts=moe.max_experts, active_experts=active, ep_size=config.ep_size,
        experts_per_rank=getattr(gm.model.layers[0].ffn, "num_local_experts", moe.max_experts),
        image_size=cfg.image_size, num_frames=cfg.num_frames,
        max_batch_size=config.max_batch_size,
    )


def predict_isolated(gm: GroundingModel, requests: list[PredictRequest]) -> list:
    """`gm.predict_batch`, but a request the model refuses (ValueError) becomes a Rejection for
    that request alone: only a failed batch is retried one request at a time."""
    try:
        return gm.predict_batch(requests)
    except ValueError as err:
        if len(requests) == 1:
            return [_refused(err)]
    out = []
    for request in requests:
        try:
            out.append(gm.predict_batch([request])[0])
        except ValueError as err:
            out.append(_refused(err))
    return out


def _refused(err: ValueError) -> Rejection:
    return Rejection(422, "invalid_request", f"the model refused the request: {err}")


class LocalModel:
    """The monolithic backend: the whole model in the replica process."""

    def __init__(self, config: ModelServerConfig) -> None:
        self.config = config
        self.gm = GroundingModel.load(config.checkpoint, device=config.device)

    def info(self) -> ModelInfo:
        return model_info(self.gm, self.config)

    async def predict_batch(self, requests: list[PredictRequest]) -> list:
        # a thread keeps the replica's event loop free (health checks, batch assembly)
        return await asyncio.to_thread(predict_isolated, self.gm, requests)

    async def check_health(self) -> None:
        return None
