"""Test-wide settings: caches inside the project, Ray auth off, the gpu marker, shared fixtures."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
SHARED = ROOT.parent / "shared"

# Before anything imports ray / torch / transformers / mlflow.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HOME", str(CACHE / "hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ.setdefault("MPLCONFIGDIR", str(CACHE / "matplotlib"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray's unix socket paths must stay under 107 bytes: the project folder unless it is too deep.
_ray_tmp = str(CACHE / "ray")
os.environ.setdefault("RAY_TMPDIR", _ray_tmp if len(_ray_tmp) <= 48 else f"/tmp/te-ray-{os.getuid()}")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_fixtures() -> pathlib.Path:
    """../shared/fixtures, or a clear skip when the checkout has no shared/ beside it."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip(f"official golden files not found at {path} (../shared is absent)")
    return path
