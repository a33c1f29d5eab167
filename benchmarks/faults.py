"""Faults a cluster meets, injected into real training runs on this machine: one row per fault.

    python -m benchmarks.faults [--json] [--outage-s 30] [--faults NAME ...]

Every run is the same small stage: tiny_cpu, 2 Ray Train workers at EP=2 (gloo), 8 steps of
batch 2, a checkpoint every 2 steps, up to 3 worker-group restarts, data and checkpoints on an
S3 endpoint (moto) on 127.0.0.1, step metrics to an MLflow server on 127.0.0.1. A fault-free run first gives the reference time.
The faults:

- `checkpoint_crash`: rank 0 dies in step 4's checkpoint write, once it has stored the model
  (`fail_after_part`): the group restarts from step 2's checkpoint; the half-written one is
  never read, and is reported and removed.
- `worker_killed`: rank 1 dies after step 3 (`fail_at_step`): the group restarts from step 2's.
- `s3_outage`: the S3 endpoint stops for `--outage-s` seconds as soon as the workers start
  storing the second checkpoint, so that write meets it: the write waits (bounded backoff) and
  the run goes on, no restart.
- `mlflow_outage`: the MLflow server stops for `--outage-s` seconds as soon as the first
  checkpoint is registered: the workers keep their step metrics and send them when it is back.
- `node_lost`: on a cluster of its own (`local_servers.LocalNodes`: `ray.cluster_utils.Cluster`,
  as Ray's tests build one): a head without CPUs and two worker nodes on this machine (at Ray's
  node IP: see `LocalNodes` for why not 127.0.0.1), each raylet with its own resources and its
  own TMPDIR, the two workers placed STRICT_SPREAD (one per node) and reading and writing only
  through S3. When the first checkpoint is registered, one worker node is removed (its processes
  killed, its TMPDIR deleted: a worker that used another node's local disk would fail loudly)
  and a new node joins; the run resumes from its last checkpoint on the nodes it has. The row
  names the nodes the last checkpoint's ranks ran on (`ran_on`, from their commit markers).

A row: `injected` (the fault happened: the crash was seen in the run's state, the outage met a
checkpoint write or a metrics send), `survived` (the stage reached its last step with every
sample counted), `data_lost` (the count of what is missing: checkpoints kept that are not
complete, samples off, MLflow steps missing), `recovery_s` (the run's wall time beyond the
fault-free run's). The last line with `--json`: {"faults": N, "survived": N, "lost": 0, ...}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from benchmarks.common import emit, parse_args
from benchmarks.local_servers import LocalNodes, MlflowServer, S3Endpoint

FAULTS = ("checkpoint_crash", "worker_killed", "s3_outage", "mlflow_outage", "node_lost")
BUCKET = "timeexpert-faults"
NUM_STEPS, BATCH, WORKERS = 8, 2, 2


def _args(parser) -> None:
    parser.add_argument("--outage-s", type=float, default=30.0,
                        help="how long the S3 endpoint and the MLflow server stay stopped")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))


def config(name: str, data_root: str, tracking_uri: str, **fault: Any):
    from timeexpert.train.config import TrainConfig

    return TrainConfig(
        preset="tiny_cpu", data_root=data_root, storage_root=f"s3://{BUCKET}/runs", name=name,
        stage=2, num_steps=NUM_STEPS, batch_size=BATCH, num_workers=WORKERS, ep_size=2,
        checkpoint_every=2, log_every=2, expert_update_every=2, eval_max_records=0,
        max_failures=3, tracking_uri=tracking_uri, experiment="faults", **fault)


def when_writing(run_dir: str, then: Callable[[], None], stop: threading.Event, *,
                 new_checkpoint: bool) -> threading.Thread:
    """A thread calling `then()` once Ray Train has registered a checkpoint of the run under
    `run_dir` (its run snapshot is stored) and, with `new_checkpoint`, as soon as the workers
    start storing the next one (a new checkpoint folder appears): the outage then meets that
    write, not the controller's snapshot write that follows a registration (which Ray Train does
    not retry). Polled every 0.2 s, at most 10 minutes."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from timeexpert import storage

    snapshot = storage.join_uri(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    fs = storage.filesystem(snapshot)[0]

    def watch() -> None:
        deadline = time.monotonic() + 600
        registered = None
        while not stop.is_set() and time.monotonic() < deadline:
            fs.invalidate_cache()
            if registered is None and storage.exists(snapshot):
                registered = set(storage.list_dirs(run_dir))
                if not new_checkpoint:
                    break
            elif registered is not None and set(storage.list_dirs(run_dir)) - registered:
                break
            time.sleep(0.2)
        else:
            return
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def outage(stop_service: Callable[[], None], start_service: Callable[[], None],
           seconds: float, log: dict) -> Callable[[], None]:
    """`then` of `when_writing`: stop the service, start it again `seconds` later."""
    def then() -> None:
        log["stopped_at"] = time.monotonic()
        stop_service()
        time.sleep(seconds)
        start_service()
        log["started_at"] = time.monotonic()
    return then


def check_run(result, cfg, tracking_uri: str) -> dict[str, Any]:
    """What the run lost: checkpoints kept that are not complete, samples off, MLflow steps
    missing (logged every 2 steps)."""
    from mlflow.tracking import MlflowClient

    from timeexpert import storage
    from timeexpert.checkpoints import check_checkpoint

    run_dir = storage.join_uri(cfg.storage_root, cfg.run_name())
    kept = [d for d in storage.list_dirs(run_dir) if d.startswith("checkpoint_")]
    incomplete = [d for d in kept if not check_checkpoint(storage.join_uri(run_dir, d)).complete]
    state = json.loads(storage.read_text(storage.join_uri(result.checkpoint_uri,
                                                          "train_state.json")))["state"]
    samples_off = int(result.metrics["samples"] != NUM_STEPS * BATCH * WORKERS)
    logged = {int(m.step) for m in
              MlflowClient(tracking_uri).get_metric_history(cfg.mlflow_run_id, "loss")}
    missing_steps = sorted(set(range(2, NUM_STEPS + 1, 2)) - logged)
    return {
        "step": int(result.metrics["step"]), "samples": int(result.metrics["samples"]),
        "restores": int(state.get("restores", 0)), "resumed_at": state.get("resumed_at", []),
        "checkpoints_kept": len(kept), "incomplete_kept": len(incomplete),
        "removed_incomplete": len(result.removed_incomplete),
        "storage_wait_s": round(float(result.metrics.get("checkpoint/storage_wait_s", 0.0)), 1),
        "mlflow_missing_steps": missing_steps,
        "lost": len(incomplete) + samples_off + len(missing_steps),
    }


class NodeLoss:
    """The `node_lost` cluster (`LocalNodes`): a head without CPUs and worker nodes a and b of 2
    CPUs, each with its own TMPDIR under `root`; `lose()` removes node b (its processes and its
    TMPDIR) and adds a fresh node c."""

    def __init__(self, root: str) -> None:
        self.nodes = LocalNodes(root)
        self.before = self.nodes.node_ids()

    def connect(self) -> None:
        self.nodes.connect(log_to_driver=False)

    def lose(self) -> None:
        self.nodes.remove("b")
        self.nodes.add("c")

    def ran_on(self, checkpoint_uri: str) -> list[str]:
        """The names of the nodes the checkpoint's ranks ran on, by rank."""
        from timeexpert import storage
        from timeexpert.checkpoints import COMMIT

        names = {node_id: name for ids in (self.before, self.nodes.node_ids())
                 for name, node_id in ids.items()}
        markers = sorted((json.loads(storage.read_text(f)) for f in
                          storage.list_files(storage.join_uri(checkpoint_uri, COMMIT))),
                         key=lambda m: m["rank"])
        return [names.get(m.get("node"), "?") for m in markers]

    def shutdown(self) -> None:
        self.nodes.shutdown()


def run_fault(name: str, data_root: str, tokenizer: str, mlflow: MlflowServer, s3: S3Endpoint,
              outage_s: float, nodes: NodeLoss | None = None) -> tuple[dict[str, Any], float]:
    """One training run with fault `name` ("none": fault-free). Returns (its check, seconds)."""
    from timeexpert import storage, tracking
    from timeexpert.train.fit import fit

    fault = {"checkpoint_crash": dict(fail_at_step=4, fail_rank=0,
                                      fail_after_part="model.safetensors"),
             "worker_killed": dict(fail_at_step=3, fail_rank=1),
             "node_lost": dict(placement_strategy="STRICT_SPREAD", cpus_per_worker=1.0)
             }.get(name, {})
    cfg = config(f"f-{name}", data_root, mlflow.uri, **fault)
    cfg = cfg.replace(mlflow_run_id=tracking.create_run(mlflow.uri, cfg.experiment, cfg.name))
    log: dict[str, float] = {}
    stop = threading.Event()
    watcher = None
    run_dir = storage.join_uri(cfg.storage_root, cfg.run_name())
    if name == "s3_outage":
        watcher = when_writing(run_dir, outage(s3.stop, s3.start, outage_s, log), stop,
                               new_checkpoint=True)
    elif name == "mlflow_outage":
        watcher = when_writing(run_dir, outage(mlflow.stop, mlflow.start, outage_s, log), stop,
                               new_checkpoint=False)
    elif name == "node_lost":
        watcher = when_writing(run_dir, nodes.lose, stop, new_checkpoint=False)
    t0 = time.perf_counter()
    try:
        result = fit(cfg, tokenizer_uri=tokenizer)
    finally:
        stop.set()
        if watcher is not None:  # the service back (or the node replaced) before going on
            watcher.join(timeout=outage_s + 300)
    seconds = time.perf_counter() - t0
    check = check_run(result, cfg, mlflow.uri)
    if nodes is not None:  # the nodes the last checkpoint's ranks ran on (their commit markers)
        check["ran_on"] = nodes.ran_on(result.checkpoint_uri)
    if name in ("s3_outage", "mlflow_outage"):
        check["outage_s"] = round(log["started_at"] - log["stopped_at"], 1) if log else 0.0
    tracking.end_run(mlflow.uri, cfg.mlflow_run_id)
    return check, seconds


def injected(name: str, check: dict[str, Any]) -> bool:
    """Whether the fault really happened in the run, read from what the run recorded."""
    if name in ("checkpoint_crash", "worker_killed", "node_lost"):
        return check["restores"] >= 1
    if name == "s3_outage":
        return check["outage_s"] > 0 and check["storage_wait_s"] > 0  # it met a write
    return check["outage_s"] > 0  # mlflow_outage


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _args)
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(key, value)
    s3 = S3Endpoint()
    s3.start()
    os.environ.update(s3.env())  # before ray.init: the workers inherit it
    tmp = tempfile.mkdtemp(prefix="faults-")
    mlflow = MlflowServer(tmp)
    mlflow.start()

    import ray

    from timeexpert import storage
    from timeexpert.data import formats, synth
    from timeexpert.train.fit import prepare_tokenizer

    rows: list[dict[str, Any]] = []
    nodes = None
    try:
        storage.filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        data_root = f"s3://{BUCKET}/data/mini"
        synth.generate(synth.SynthSpec(name="mini", num_videos={"train": 4, "val": 2, "test": 1},
                                       min_duration=8, max_duration=12, max_event_len=5),
                       data_root, seed=0, workers=1)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        tokenizer = prepare_tokenizer(
            config("tok", data_root, ""),
            formats.read_manifest(f"{data_root}/manifests/train.jsonl"))
        reference, reference_s = run_fault("none", data_root, tokenizer, mlflow, s3, args.outage_s)
        print(f"fault-free run: {reference_s:.1f} s, {reference}", file=sys.stderr)
        nodes = None
        for name in args.faults:
            try:
                if name == "node_lost":  # last: a multi-node cluster instead of the local one
                    ray.shutdown()
                    nodes = NodeLoss(tmp)
                    nodes.connect()
                check, seconds = run_fault(name, data_root, tokenizer, mlflow, s3,
                                           args.outage_s, nodes)
            except Exception as err:  # noqa: BLE001 - a run the fault broke is a row, not a crash
                rows.append({"fault": name, "injected": True, "survived": False,
                             "data_lost": None, "recovery_s": None, "error": repr(err)[:500]})
                print(f"{name}: the run failed: {err!r}", file=sys.stderr)
                continue
            row = {"fault": name, "injected": injected(name, check),
                   "survived": check["step"] == NUM_STEPS and check["samples"] == NUM_STEPS * BATCH * WORKERS,
                   "data_lost": check["lost"], "recovery_s": round(max(seconds - reference_s, 0.0), 1),
                   **check}
            rows.append(row)
            print(f"{name}: injected {row['injected']}, survived {row['survived']}, data lost "
                  f"{row['data_lost']}, recovery {row['recovery_s']} s ({check})", file=sys.stderr)
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        mlflow.stop()
        s3.stop()
    emit({
        "faults": len(rows),
        "injected": sum(r["injected"] for r in rows),
        "survived": sum(r["survived"] and r["injected"] for r in rows),
        "lost": sum(r["data_lost"] or 0 for r in rows),
        "failed_runs": sum(r["data_lost"] is None for r in rows),  # what they lost: unknown
        "reference_s": round(reference_s, 1),
        "outage_s": args.outage_s,
        "commit": commit(),
        "rows": rows,
    }, as_json=args.json)


if __name__ == "__main__":
    main()
