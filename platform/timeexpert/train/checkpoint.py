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
stage from a checkpoint (`init_from`) only reads the weights, on any layout.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from timeexpert.models.processor import TimeExpertProcessor


TRAIN_STATE = "train_state.json"
ROUTING = "routing.json"
WEIGHTS = "model.safetensors"
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


def load_weights(directory: str) -> dict[str, Tensor]:
    """The full (EP=1) state dict of a checkpoint directory."""
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no {WEIGHTS}: not a TimeExpert checkpoint")
    return load_file(path)


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
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.S3FileSystem):
        return "s3://" + checkpoint.path.lstrip("/")
    return checkpoint.path
