"""A real `mlflow server` (SQLite backend, proxied artifacts on the local disk) on loopback, for
the tests that track runs or serve registered models. (Holds no tests.)"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator


@contextlib.contextmanager
def running_mlflow_server(folder: pathlib.Path) -> Iterator[str]:
    """Start `mlflow server` with its database, artifacts and log under `folder`; yield its URI;
    stop its process group (the server spawns a job runner) at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(folder / "log", "w")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # slow when the machine is busy
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        else:
            raise RuntimeError("mlflow server did not start: " + (folder / "log").read_text()[-2000:])
        if proc.poll() is not None:
            raise RuntimeError("mlflow server exited: " + (folder / "log").read_text()[-2000:])
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
