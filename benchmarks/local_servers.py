"""Servers on loopback that a fault benchmark or test stops and starts again on the same port:
an S3 endpoint (moto) and an MLflow tracking server. Stopping one is an outage of that service;
what it stored survives the restart (moto keeps its buckets in the process, MLflow its SQLite
database and artifact folder)."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """moto's S3 server in this process on 127.0.0.1: `endpoint_url`, `stop()`, `start()`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer  # deferred: only the fault runs need moto

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        """The AWS settings that point s3fs, pyarrow and Ray's workers at it."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1"}


class MlflowServer:
    """`mlflow server` with its database, artifacts and log under `folder`, on one loopback port
    for its life: `stop()` and `start()` again is a tracking server restarting."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = pathlib.Path(folder)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
        folder = self.folder
        with open(folder / "log", "a") as log:
            self.proc = subprocess.Popen(
                [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                 "--artifacts-destination", str(folder / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        for _ in range(240):  # slow when the machine is busy
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(1)
        self.stop()
        raise RuntimeError("mlflow server did not start: " + (folder / "log").read_text()[-2000:])

    def stop(self) -> None:
        """Stop its process group (the server spawns a job runner)."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
