"""Where tensors live and in which precision they compute: one policy for training, stage
evaluation and FPO.

- Device: inside a Ray Train worker, `ray.train.torch.get_device()` (the GPU Ray assigned the
  worker, or the CPU); everywhere else `default_device()` (CUDA when present, else the CPU).
- Collectives: NCCL on CUDA devices, gloo on CPUs (`backend`).
- Precision (`autocast`): "bf16" computes matmuls in bfloat16 under `torch.autocast` while the
  parameters (the optimizer's master weights) stay fp32; "fp32" computes in fp32; "auto" is
  bf16 on CUDA and fp32 on the CPU. The MoE router's logits, softmax and losses stay fp32 in
  every mode (`models.moe`).
- DeepSpeed picks its accelerator itself (CUDA where present); `DS_ACCELERATOR=cpu` is set only in
  a process without CUDA, where detection would otherwise warn (`configure_deepspeed`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def default_device() -> torch.device:
    """CUDA (the current device) when this process sees one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend(device: torch.device) -> str:
    """The torch.distributed backend for tensors on `device`: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype matmuls run in under `precision` on `device` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast on `device` when `precision` asks for it (fp32 parameters untouched); a
    no-op for fp32."""
    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def to_device(batch: dict, device: torch.device) -> dict:
    """`batch` with every tensor moved to `device` (other values as they are)."""
    non_blocking = torch.device(device).type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def configure_deepspeed() -> None:
    """Before importing deepspeed: force its CPU accelerator only where there is no CUDA (its
    detection warns on a CPU-only machine); with CUDA, DeepSpeed detects it itself."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
