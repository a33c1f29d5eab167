"""The local stack scripts (infra/local/up.sh, down.sh) start real servers and stop them cleanly."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import urllib.request
import uuid

import pytest
from local_stack_support import stack_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _processes_naming(text: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_up_use_down_leaves_nothing_behind(tmp_path_factory):
    # A short state path: Ray's unix sockets live under it.
    state = pathlib.Path(f"/tmp/te-stack-{uuid.uuid4().hex[:6]}")
    up = subprocess.run(
        [str(ROOT / "infra/local/up.sh"), str(state)], capture_output=True, text=True, timeout=240
    )
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        env = stack_env(state)

        # S3: write through s3fs, read back.
        code = (
            "import s3fs; fs = s3fs.S3FileSystem();"
            "fs.pipe('timeexpert/probe.txt', b'hello'); print(fs.cat('timeexpert/probe.txt').decode())"
        )
        s3 = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert s3.stdout.strip() == "hello", s3.stderr

        # MLflow: the tracking server answers its REST API on a SQL store.
        with urllib.request.urlopen(env["MLFLOW_TRACKING_URI"] + "/health", timeout=10) as r:
            assert r.read().decode().strip() == "OK"
        req = urllib.request.Request(
            env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/create",
            data=json.dumps({"name": "stack-probe"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "experiment_id" in json.loads(r.read())

        # Ray: a job submitted to the head runs to completion.
        job = subprocess.run(
            [str(ROOT / ".venv/bin/ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
             "--", "python", "-c", "import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert job.returncode == 0, job.stderr[-2000:]
        assert "cpus 4.0" in job.stdout
    finally:
        down = subprocess.run(
            [str(ROOT / "infra/local/down.sh"), str(state)], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert not (state / "env").exists()
    assert _processes_naming(str(state)) == []
    port = env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    assert _processes_naming(f"moto_server -H 127.0.0.1 -p {port}") == []
