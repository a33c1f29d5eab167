"""tests/gpu: the CUDA path (bf16 training steps, grouped-GEMM experts, EP over NCCL, inference).
Every test here is marked `gpu` and skipped, with the reason, where torch sees no CUDA device;
`tests/gpu/run.sh` runs them on a GPU machine under a time limit."""

from __future__ import annotations

import pathlib

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(
                    reason="tests/gpu needs a CUDA GPU: torch.cuda.is_available() is False here"))


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, this machine has {torch.cuda.device_count()}")
