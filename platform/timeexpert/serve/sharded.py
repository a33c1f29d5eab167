"""Expert-sharded model replicas: one Serve replica drives an EP group of worker actors.

The replica's placement group has `1 + ep_size` bundles (`placement_group_bundles`): bundle 0
for the replica itself, bundle r + 1 for EP worker r. Autoscaling a deployment therefore adds or
removes whole groups, and Ray kills a replica's workers with it (they are owned by it).

Each worker loads the same EP=1 checkpoint, keeps its slice of every MoE layer's expert slots
(`expert_parallel.shard_state_dict`) and the full non-expert weights, and joins a gloo process
group (NCCL on GPUs). For a batch every rank runs the same forward pass and generation loop on
the same inputs; inside each MoE layer the (token, expert) pairs travel to the expert owners by
all-to-all and back (`MoELayer` with `ep_group`). Ranks take identical decisions (same weights,
same inputs, same expert outputs), so they stay in lockstep; rank 0's answer is returned. A
collective timeout (`ep_timeout_s`) turns a lost or diverged rank into an error, never a hang.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import uuid

import ray
import torch.distributed as dist
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from timeexpert.inference import GroundingModel
from timeexpert.models.expert_parallel import shard_state_dict
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.serve.replica import model_info, predict_isolated
from timeexpert.serve.settings import ModelServerConfig


class EPWorker:
    """Rank `rank` of an EP group of `ep_size` (a Ray actor; see `ShardedModel`)."""

    def __init__(self, rank: int, ep_size: int) -> None:
        self.rank, self.ep_size = rank, ep_size
        self.gm = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port (rank 0 hosts the gloo store)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, address: str, port: int, config: ModelServerConfig) -> None:
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
            world_size=self.ep_size, timeout=datetime.timedelta(seconds=config.ep_timeout_s),
        )
        full = GroundingModel.load(config.checkpoint)  # EP=1 weights, on CPU
        model = TimeExpertForGrounding(full.model.config, ep_group=dist.group.WORLD)
        model.load_state_dict(shard_state_dict(full.model.state_dict(), self.rank, self.ep_size))
        self.gm = GroundingModel(model, full.tokenizer, device=config.device)
        self.config = config

    def info(self):
        return model_info(self.gm, self.config)  # the active mask is replicated on every rank

    def predict_batch(self, requests: list) -> list:
        return predict_isolated(self.gm, requests)

    def local_experts(self) -> int:
        layer = self.gm.model.layers[0].ffn
        return getattr(layer, "num_local_experts", 0)

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        """The Ray node this rank runs on."""
        return ray.get_runtime_context().get_node_id()


def _replica_tag() -> str:
    """`app#deployment#replica` of the Serve replica creating the workers (unique per replica)."""
    try:
        ctx = serve.get_replica_context()
        return f"{ctx.app_name}#{ctx.deployment}#{ctx.replica_id.unique_id}"
    except RayServeException:  # not inside a replica (a direct test)
        return uuid.uuid4().hex[:8]


class ShardedModel:
    """The expert-sharded backend of `GroundingModelServer` (same interface as `LocalModel`)."""

    def __init__(self, config: ModelServerConfig) -> None:
        self.config = config
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < 1 + config.ep_size:
            raise ValueError(
                f"ep_size={config.ep_size} needs the deployment's placement_group_bundles to hold "
                f"1 + {config.ep_size} bundles (the replica, then one per EP worker); got "
                f"{None if pg is None else len(pg.bundle_specs)}"
            )
        worker_cls = ray.remote(EPWorker)
        tag = _replica_tag()
        self.workers = [
            worker_cls.options(
                name=f"EP_WORKER::{tag}#rank{rank}",  # findable in `ray list actors`, dashboard
                num_cpus=config.ep_worker_num_cpus,
                num_gpus=1 if config.device.startswith("cuda") else 0,
                max_concurrency=2,  # a health ping answers while a batch runs
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1,
                    placement_group_capture_child_tasks=False,
                ),
            ).remote(rank, config.ep_size)
            for rank in range(config.ep_size)
        ]
        address, port = ray.get(self.workers[0].rendezvous_address.remote())
        ray.get([w.setup.remote(address, port, config) for w in self.workers])
        self.local_experts = ray.get([w.local_experts.remote() for w in self.workers])

    def info(self):
        return ray.get(self.workers[0].info.remote())

    async def predict_batch(self, requests: list) -> list:
        batch = ray.put(requests)  # one copy in the object store, read by every rank
        answers = await asyncio.gather(*[w.predict_batch.remote(batch) for w in self.workers])
        return answers[0]

    async def check_health(self) -> None:
        # a dead worker raises RayActorError here: Serve marks the replica unhealthy and
        # replaces it, placement group and workers included
        await asyncio.wait_for(
            asyncio.gather(*[w.ping.remote() for w in self.workers]), timeout=30
        )
