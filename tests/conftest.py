"""Test-wide settings: caches inside the project, Ray auth off, the gpu marker, shared fixtures."""

from __future__ import annotations

import os
import pathlib
import shutil

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
if not shutil.which("nvidia-smi"):  # with a GPU, DeepSpeed detects CUDA itself
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


class S3Server:
    """A moto S3 server on loopback: `endpoint_url`, `bucket`, `root` (s3://bucket), and
    `storage_options` (s3fs keyword arguments, for code that takes them explicitly)."""

    def __init__(self, endpoint_url: str, bucket: str):
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.root = f"s3://{bucket}"
        self.storage_options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
        }


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1 with one bucket; the AWS_* env vars (endpoint,
    keys, region) point at it for the session and are restored at teardown. Set before any
    `ray.init` in the same session so Ray workers inherit them. Yields an `S3Server`."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}
        )
        bucket = "timeexpert-test"
        fs.mkdir(bucket)
        yield S3Server(endpoint, bucket)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-wait
    stalls when other processes hold the cores (measured: 5 s vs 134 s for the overfit test)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
