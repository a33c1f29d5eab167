"""Training checkpoints: one directory that is also a loadable model (`GroundingModel.load(uri)`).

Layout (every worker writes its part into its own local folder; `ray.train.report` merges them
into one checkpoint directory under the storage root, local or `s3://`)::

    config.json, model.safetensors          the full (EP=1, experts gathered) model, rank 0;
                                            routing state (active mask, A_t, G, W_g) inside
    tokenizer files, grounding_templates.json  the tokenizer, rank 0
    train_state.json                        stage, step, data position (epoch, batch in epoch,
                                            samples), the TrainConfig, rank 0
    routing.json                            routing telemetry of the stage so far (plots), rank 0
    optim/rank_{r:05d}.pt                   each rank's local AdamW state (routed parameters, and
                                            dense ones without ZeRO): expert slices differ by rank
    zero/                                   DeepSpeed ZeRO optimizer partitions (ZeRO-1/2 only)

Resuming needs the same world size and EP degree (optimizer state is per rank); starting a new
stage from a checkpoint (`init_from`) only reads the weights, on any layout. A rank reads only
its own slice of the expert weights (`load_weights(d, ep_rank, ep_size)`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import pyarrow.fs
import torch
from safetensors import safe_open
from torch import Tensor

from timeexpert.models.expert_parallel import expert_rows
from timeexpert.models.processor import TimeExpertProcessor


TRAIN_STATE = "train_state.json"
ROUTING = "routing.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's index of a sharded save
ZERO_DIR = "zero"


def optim_file(rank: int) -> str:
    return os.path.join("optim", f"rank_{rank:05d}.pt")


def write_checkpoint(directory: str, *, rank: int, model, full_state: dict[str, Tensor], tokenizer,
                     optimizers, train_state: dict[str, Any], routing: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into `directory` (collective under ZeRO)."""
    if rank == 0:
        model.save_pretrained(directory, state_dict=full_state, safe_serialization=True)
        TimeExpertProcessor.from_config(model.config, tokenizer).save_pretrained(directory)
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump(train_state, f, indent=1)
        with open(os.path.join(directory, ROUTING), "w") as f:
            json.dump(routing, f)
    os.makedirs(os.path.join(directory, "optim"), exist_ok=True)
    torch.save(optimizers.state_dict(), os.path.join(directory, optim_file(rank)))
    optimizers.save_engine(os.path.join(directory, ZERO_DIR))


def read_train_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return json.load(f)


def read_routing(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, ROUTING)) as f:
        return json.load(f)


def copy_zero_state(directory: str) -> str:
    """A local copy of the checkpoint's ZeRO partitions (empty without ZeRO): DeepSpeed loads
    them after the checkpoint's own directory is gone."""
    copy = tempfile.mkdtemp(prefix="te-zero-")
    if os.path.isdir(os.path.join(directory, ZERO_DIR)):
        shutil.copytree(os.path.join(directory, ZERO_DIR), copy, dirs_exist_ok=True)
    return copy


def load_weights(directory: str, ep_rank: int = 0, ep_size: int = 1) -> dict[str, Tensor]:
    """The state dict of a checkpoint directory for EP rank `ep_rank` of `ep_size`: expert
    weights read as this rank's slice only (safetensors reads the rows asked for), everything
    else whole. `ep_size` 1: the full (EP=1) state dict."""
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(index):  # save_pretrained split a large model over several files
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, WEIGHTS)):
        files = [WEIGHTS]
    else:
        raise ValueError(f"{directory!r} holds no {WEIGHTS}: not a TimeExpert checkpoint")
    out = {}
    for file in files:
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                shape = part.get_shape()
                rows = expert_rows(name, shape[0] if shape else 0, ep_rank, ep_size)
                out[name] = f.get_tensor(name) if rows is None else part[rows]
    return out


def load_optimizer_state(directory: str, rank: int) -> dict[str, Any]:
    path = os.path.join(directory, optim_file(rank))
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {directory!r} has no optimizer state for rank {rank}; resume with the "
            "world size it was written with"
        )
    return torch.load(path, weights_only=False)


def checkpoint_uri(checkpoint) -> str:
    """A `ray.train.Checkpoint` -> the URI our storage module opens (s3://... or a local path)."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.S3FileSystem):
        return "s3://" + checkpoint.path.lstrip("/")
    return checkpoint.path
