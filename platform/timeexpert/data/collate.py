"""Pipeline batches as torch tensors: `iter_torch_batches(collate_fn=torch_collate())`. Apart
from `pipeline`, so that the decode tasks' worker processes never import torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numeric columns to tensors (copied: Ray hands out read-only arrays), text columns (id,
    task, query, events JSON ...) to lists of str."""
    return {
        k: torch.from_numpy(np.array(v)) if v.dtype.kind in "biuf" else [str(x) for x in v]
        for k, v in batch.items()
    }


def torch_collate():
    """A collate for `iter_torch_batches(collate_fn=torch_collate())` (Ray's default collate
    cannot convert string columns)."""
    class TorchCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return to_torch(batch)

    return TorchCollate()
