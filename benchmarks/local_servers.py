"""Servers on loopback that a fault benchmark or test stops and starts again on the same port:
an S3 endpoint (moto) and an MLflow tracking server. Stopping one is an outage of that service;
what it stored survives the restart (moto keeps its buckets in the process, MLflow its SQLite
database and artifact folder). And a multi-node Ray cluster on this machine whose nodes leave
and join (`LocalNodes`)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


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


class LocalNodes:
    """A Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`, as Ray's own
    tests build one): a head without CPUs (the driver's node, where Ray Train's controller runs)
    and worker nodes of `cpus` CPUs, each with its own TMPDIR `root`/node-NAME (its local disk)
    and a small object store. `remove(name)` kills a node's processes and deletes its TMPDIR (its
    disk goes with it); `add(name)` starts a fresh one. `connect()` is the driver's `ray.init`.

    The nodes take Ray's own node IP (`ray.util.get_node_ip_address()`, the machine's address),
    not 127.0.0.1: `ray.init(address="127.0.0.1:PORT")` rewrites a loopback address into that IP
    (`services.resolve_ip_for_localhost`), and a head started on 127.0.0.1 listens on loopback
    only, so the driver would retry that address for ever and no job, no Train worker, would start.
    """

    OBJECT_STORE_BYTES = 100 * 1024 * 1024

    def __init__(self, root: str, names=("a", "b"), cpus: int = 2) -> None:
        from ray.cluster_utils import Cluster

        self.root = str(root)
        self.cpus = cpus
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False,
            "object_store_memory": self.OBJECT_STORE_BYTES})
        self.nodes = {}
        self._starter: ThreadPoolExecutor | None = None
        try:
            for name in names:
                self.add(name)
        except BaseException:
            self.cluster.shutdown()
            raise

    def tmpdir(self, name: str) -> str:
        return os.path.join(self.root, f"node-{name}")

    def add(self, name: str):
        """Start node `name`. From another thread than the main one (a fault injected while the
        driver trains), the node is started by a thread of this object's that lives until
        `shutdown()`: Ray starts a node's processes with PR_SET_PDEATHSIG (fate-sharing), which
        kills them as soon as the *thread* that started them ends (a node started by a watcher
        thread that then returns is gone at once). Off the main thread, Ray's `Node` cannot set
        its SIGTERM handler, so that is skipped there (each node's handler replaces the previous
        one anyway; the node's processes still go at exit and with this process)."""
        if threading.current_thread() is threading.main_thread():
            return self._add(name)
        if self._starter is None:
            self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-nodes")
        return self._starter.submit(self._add, name).result(timeout=300)

    def _add(self, name: str, attempts: int = 3):
        """A raylet whose dashboard agent is slow to write its ports (a loaded machine) aborts
        its start ("The current node timed out during startup"): such a start is tried again,
        `attempts` times in all, in a fresh TMPDIR."""
        args = dict(num_cpus=self.cpus, object_store_memory=self.OBJECT_STORE_BYTES,
                    env_vars={"TMPDIR": self.tmpdir(name)})
        for attempt in range(1, attempts + 1):
            shutil.rmtree(self.tmpdir(name), ignore_errors=True)
            os.makedirs(self.tmpdir(name))
            try:
                if threading.current_thread() is threading.main_thread():
                    self.nodes[name] = self.cluster.add_node(**args)
                else:
                    from unittest import mock

                    with mock.patch("ray._private.utils.set_sigterm_handler"):
                        self.nodes[name] = self.cluster.add_node(**args)
                return self.nodes[name]
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
                if attempt == attempts or "timed out during startup" not in str(e):
                    raise
                print(f"node {name}: start timed out (attempt {attempt} of {attempts}); again",
                      flush=True)

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        shutil.rmtree(self.tmpdir(name), ignore_errors=True)

    def node_ids(self) -> dict[str, str]:
        """{name: Ray node id} of the worker nodes there now."""
        return {name: node.node_id for name, node in self.nodes.items()}

    def connect(self, **init_args) -> None:
        import ray

        ray.init(address=self.cluster.address, **init_args)
        self.cluster.wait_for_nodes(timeout=60)

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            if self._starter is not None:
                self._starter.shutdown(wait=False)
