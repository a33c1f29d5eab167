"""A real `mlflow server` (SQLite backend, proxied artifacts on the local disk) on loopback, for
the tests that track runs or serve registered models (`benchmarks.local_servers.MlflowServer`,
which the fault benchmark restarts too). (Holds no tests.)"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Iterator

from benchmarks.local_servers import MlflowServer


@contextlib.contextmanager
def running_mlflow_server(folder: pathlib.Path) -> Iterator[str]:
    """A started `MlflowServer` under `folder`; yields its URI, stops it at the end."""
    server = MlflowServer(folder)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()
