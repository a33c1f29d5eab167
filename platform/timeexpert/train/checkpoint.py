"""Training checkpoints: one directory that is also a loadable model (`GroundingModel.load(uri)`).

Layout (every worker writes its part into its own local folder; `ray.train.report` merges them
into one checkpoint directory under the storage root, local or `s3://`)::

    config.json, model.safetensors          the model, rank 0: whole with EP=1; with EP > 1
                                            everything but the expert weights; routing state
                                            (active mask, A_t, G, W_g) inside
    experts/ep_{r:05d}-of-{P:05d}.safetensors  with EP = P > 1: EP rank r's expert slice, written
                                            by that rank of world rank 0's EP group (no rank
                                            gathers the experts)
    tokenizer files, grounding_templates.json  the tokenizer, rank 0
    train_state.json                        stage, step, data position (epoch, batch in epoch,
                                            samples), the TrainConfig, the layout (world size,
                                            EP degree, ZeRO stage), rank 0
    routing.json                            routing telemetry of the stage so far (plots), rank 0
    optim/rank_{r:05d}.pt                   each rank's local AdamW state (routed parameters, and
                                            dense ones without ZeRO) with the parameters' names:
                                            expert slices differ by rank
    optim/zero_dense.pt                     ZeRO-1/2: the dense parameters' full AdamW moments by
                                            name and the step, gathered from the partitions, rank 0
    commit/rank_{r:05d}.json                each rank's commit marker, stored after its parts:
                                            every part it stored with its size, the world size

Each rank stores its part itself (`upload`, Ray Train's `checkpoint_upload_fn`), waiting for
storage that does not answer, then its commit marker: Ray Train registers the checkpoint once
every rank has, and a reader takes only complete ones (`timeexpert.checkpoints`).

A run resumes at its own layout (each rank reads its own optimizer file) or at another world
size and EP degree with the same ZeRO stage (`read_optimizer_state`): the local AdamW state is
read by parameter name from the files of world rank 0's EP group, expert moments stitched and
re-cut to the new slices (`parallel.resharded_local_state`), and under ZeRO each rank takes its
new partition of the full dense moments (`Optimizers.load_dense_state`). The data position
(epoch, batch in epoch) is kept; at another world size each rank's share of an epoch differs, so
the rest of that epoch is drawn anew. Starting a new stage from a checkpoint (`init_from`) only
reads the weights, on any layout. A rank reads only
its own slice of the expert weights (`load_weights(d, ep_rank, ep_size)`, whatever EP degree
wrote them). `GroundingModel.load` reads either layout; `jobs/export.py` writes a checkpoint as
one plain model directory (what `from_pretrained` of other tools reads).

A run's checkpoints and Ray Train's run state live under its storage root (`storage_root`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs
import ray.train
import torch
from safetensors.torch import save_file
from torch import Tensor

from timeexpert import storage
from timeexpert.checkpoints import TRAIN_STATE, persist_checkpoint
from timeexpert.models.expert_parallel import WEIGHTS, expert_shard_file, is_expert_param
from timeexpert.models.processor import TimeExpertProcessor
from timeexpert.train.config import TrainConfig

ROUTING = "routing.json"
ZERO_DENSE = os.path.join("optim", "zero_dense.pt")  # ZeRO: the dense moments by name (rank 0)


def optim_file(rank: int) -> str:
    return os.path.join("optim", f"rank_{rank:05d}.pt")


def write_checkpoint(directory: str, *, rank: int, model, state: dict[str, Tensor], ep_rank: int,
                     ep_size: int, tokenizer, optimizers, train_state: dict[str, Any],
                     routing: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into `directory` (collective under ZeRO). `state`:
    this rank's weights (`parallel.checkpoint_state`; {} on ranks that write none): with EP > 1
    its expert slice goes to its shard file, and rank 0 writes the rest as the model."""
    if state and ep_size > 1:
        experts = {k: v.contiguous() for k, v in state.items() if is_expert_param(k)}
        path = os.path.join(directory, expert_shard_file(ep_rank, ep_size))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(experts, path, metadata={"format": "pt"})
        state = {k: v for k, v in state.items() if k not in experts}
    if rank == 0:
        write_model(directory, model.config, state)
        TimeExpertProcessor.from_config(model.config, tokenizer).save_pretrained(directory)
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump(train_state, f, indent=1)
        with open(os.path.join(directory, ROUTING), "w") as f:
            json.dump(routing, f)
    os.makedirs(os.path.join(directory, "optim"), exist_ok=True)
    torch.save(optimizers.state_dict(), os.path.join(directory, optim_file(rank)))
    dense = optimizers.dense_state()  # collective under ZeRO; rank 0's, None elsewhere
    if dense is not None:
        torch.save(dense, os.path.join(directory, ZERO_DENSE))


def write_model(directory: str, config, state: dict[str, Tensor]) -> None:
    """config.json and model.safetensors, the files `from_pretrained` reads. Not through
    `save_pretrained`: its first call in a process imports DeepSpeed (and with it MLflow) to
    unwrap the model, 3-4 s that every stage's first checkpoint paid. `state` holds copies
    (`parallel.checkpoint_state`): no two names share storage."""
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(directory, WEIGHTS), metadata={"format": "pt"})


def read_train_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return json.load(f)


def read_routing(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, ROUTING)) as f:
        return json.load(f)


def layout(world_size: int, ep_size: int, zero_stage: int) -> dict[str, int]:
    """The parallel layout a checkpoint is written with (train_state.json's "layout")."""
    return {"world_size": world_size, "ep_size": ep_size, "zero_stage": zero_stage}


def read_optimizer_state(directory: str, rank: int, current: dict[str, int]) -> dict[str, Any]:
    """What rank `rank` of the `current` layout (`layout`) resumes its optimizers from: its own
    file when the checkpoint was written with this layout (or before layouts were recorded);
    else {"reshard": the states of world rank 0's EP group}, read by name
    (`parallel.Optimizers.load_state_dict`). Another ZeRO stage is refused."""
    written = read_train_state(directory).get("layout")
    if written is not None and written["zero_stage"] != current["zero_stage"]:
        raise ValueError(
            f"checkpoint {directory!r} was written with zero_stage {written['zero_stage']}; resume "
            f"it with that stage (got {current['zero_stage']}), or start a new stage from it "
            "(init_from), which reads only the weights"
        )
    if written is None or written == current:
        state = load_optimizer_state(directory, rank)
    else:
        state = {"reshard": [load_optimizer_state(directory, r)
                             for r in range(written["ep_size"])]}
    dense = os.path.join(directory, ZERO_DENSE)
    if os.path.isfile(dense):
        state["zero_dense"] = torch.load(dense, weights_only=False)
    return state


def load_optimizer_state(directory: str, rank: int) -> dict[str, Any]:
    path = os.path.join(directory, optim_file(rank))
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {directory!r} has no optimizer state for rank {rank}; resume with the "
            "world size it was written with"
        )
    return torch.load(path, weights_only=False)


def storage_root(cfg: TrainConfig) -> str:
    """The run's storage root as Ray Train and Tune take it (its checkpoints and Ray Train's run
    state go under it): an s3:// URI as given, else an absolute local path."""
    scheme, _ = storage.split_scheme(cfg.storage_root)
    return cfg.storage_root if scheme == "s3" else os.path.abspath(storage.split_scheme(cfg.storage_root)[1])


def upload(checkpoint, dir_name: str, *, rank: int, world_size: int, budget_s: float,
           after_part=None) -> tuple[ray.train.Checkpoint, float]:
    """Store this rank's checkpoint folder as `dir_name` of the run (`persist_checkpoint`): the
    body of Ray Train's `checkpoint_upload_fn`. The rank's commit marker names the Ray node it
    ran on. Returns the stored checkpoint and the seconds waited for storage."""
    storage_context = ray.train.get_context().get_storage()
    path = storage_context.build_checkpoint_path_from_name(dir_name)
    stored = ray.train.Checkpoint(path, filesystem=storage_context.storage_filesystem)
    waited = persist_checkpoint(checkpoint.path, checkpoint_uri(stored), rank=rank,
                                world_size=world_size, budget_s=budget_s, after_part=after_part,
                                node=ray.get_runtime_context().get_node_id())
    return stored, waited


def checkpoint_uri(checkpoint) -> str:
    """A `ray.train.Checkpoint` -> the URI our storage module opens (s3://... or a local path)."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.S3FileSystem):
        return "s3://" + checkpoint.path.lstrip("/")
    return checkpoint.path
