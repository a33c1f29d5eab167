"""What the training jobs share: Ray connection, config from flags, data preparation."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "platform"), ROOT):  # `python jobs/x.py` from a working dir:
    if _path not in sys.path:  # the package, and serve_apps/
        sys.path.insert(0, _path)

# RAY_TRAIN_ENABLE_PRINT_PATCH=0 (propagated to the Train workers): the patch logs each print and,
# once anything wraps sys.stdout, prints it too: every progress line reached the user twice.
# DS_ACCELERATOR is not forced here: each worker sets cpu only without CUDA (timeexpert.devices).
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}.items():
    os.environ.setdefault(_k, _v)
# transformers draws a "Loading weights" bar at every model load (each evaluation, each Serve
# replica): the jobs draw their own bars.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# TE_RAY_VERBOSE=1: Ray's output on the terminal as Ray prints it. Otherwise the terminal shows the
# job's own lines and Ray's output stays in its log files (the session's `logs/`): here what the
# driver would print of its workers and of the raylet, in `init_ray` the driver's own.
VERBOSE = os.environ.get("TE_RAY_VERBOSE") == "1"
# A line of our workers' `timeexpert` logger (timeexpert.train.loop.worker_logging): rank 0's
# progress lines, tagged `[stage N`, `[rank N]` or `[fpo]`, and warnings, `WARNING timeexpert...`.
WORKER_LINE = r"^(\[(stage|rank) \d+\b|\[fpo\]|(WARNING|ERROR|CRITICAL) timeexpert\b)"
if not VERBOSE:
    # Ray's log deduplicator (Ray's "Configuring Logging" guide; read when `ray` is imported) sees
    # every line the driver prints of a worker (with `log_to_driver`) and every message the raylet
    # sends it ("(raylet) Task ServeController.graceful_shutdown failed ...", "N PYTHON worker
    # processes have been started"): it prints our workers' lines (the allow regex wins) and
    # skips the rest (".*"), which the workers' log files keep. Train's controller, its
    # PlacementGroupCleaner, Ray Data's and Serve's actors are Ray's workers too.
    # MLFLOW_CONFIGURE_LOGGING=false: MLflow, imported when a job first tracks a run (after
    # `init_ray` routed the driver's records), would give its logger a terminal handler of its own.
    for _k, _v in {"RAY_DEDUP_LOGS": "1", "RAY_DEDUP_LOGS_ALLOW_REGEX": WORKER_LINE,
                   "RAY_DEDUP_LOGS_SKIP_REGEX": ".*", "MLFLOW_CONFIGURE_LOGGING": "false"}.items():
        os.environ.setdefault(_k, _v)

# After the path and the environment above (both must be set before these imports)
import _console  # noqa: E402
import ray  # noqa: E402

from timeexpert import storage  # noqa: E402
from timeexpert.data import synth  # noqa: E402
from timeexpert.presets import get_preset  # noqa: E402
from timeexpert.train.config import TrainConfig  # noqa: E402


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags every training job takes. The local stack's settings are their defaults once
    its env file is sourced (`source .cache/local-stack/env`, written by infra/local/up.sh): its
    storage (TE_STORAGE_ROOT), its MLflow server (MLFLOW_TRACKING_URI); `connect_ray` joins its
    Ray head (TE_RAY_GCS_ADDRESS)."""
    stack_storage = os.environ.get("TE_STORAGE_ROOT")
    p.add_argument("--preset", default="tiny_cpu", help="model + training preset (timeexpert.presets)")
    p.add_argument("--data-root", default=".cache/data/tiny", help="dataset root (local or s3://)")
    p.add_argument("--synthetic", choices=sorted(synth.SIZES),
                   help="generate this synthetic benchmark under --data-root when it has none")
    p.add_argument("--storage-root", default=f"{stack_storage}/runs" if stack_storage else ".cache/runs",
                   help="checkpoints: local dir or s3:// (default: $TE_STORAGE_ROOT/runs, else .cache/runs)")
    p.add_argument("--name", default="timeexpert", help="run name")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    p.add_argument("--zero", type=int, default=0, help="0 plain DP, 1/2 DeepSpeed ZeRO")
    p.add_argument("--steps", type=int, help="steps per stage (default: the preset's)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; none: no tracking)")
    p.add_argument("--experiment", default="timeexpert")
    p.add_argument("--settings", default="", metavar="URI",
                   help="TrainConfig fields from a JSON file, local or s3:// (a sweep's "
                        "--best-out), applied before --set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="any TrainConfig field, value as JSON (e.g. --set 'moe={\"gating\":\"topk\"}')")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of a local Ray instance")


def read_stack_env(state_dir: str) -> dict[str, str]:
    """The variables infra/local/up.sh wrote to STATE_DIR/env (`export K=V ...` lines)."""
    env = {}
    with open(os.path.join(state_dir, "env")) as f:
        for line in f:
            for assignment in line.removeprefix("export ").split():
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def connect_ray(num_cpus: int) -> bool:
    """Connect to the local stack's Ray head (TE_RAY_GCS_ADDRESS, from its env file), else to the
    cluster of RAY_ADDRESS (`ray job submit`), else start a local Ray of `num_cpus`; nothing when
    connected already. True when this call connected."""
    if ray.is_initialized():
        return False
    if os.environ.get("TE_RAY_GCS_ADDRESS"):  # the env file's RAY_ADDRESS is the job server's URL
        init_ray(address=os.environ["TE_RAY_GCS_ADDRESS"])
    elif os.environ.get("RAY_ADDRESS"):  # ray job submit / a running cluster
        init_ray()
    else:  # no dashboard: on a few cores it is not worth its process (Ray Train's
        # PlacementGroupCleaner, which asks its State API, warns into its own log file instead)
        init_ray(num_cpus=num_cpus, include_dashboard=False)
    return True


def init_ray(**options) -> None:
    """`ray.init(**options)`, the terminal kept for the job's own lines unless TE_RAY_VERBOSE=1
    (which also prints the workers' output, whatever `log_to_driver` says). Of the workers'
    output the terminal shows our workers' lines (above); the driver's own output goes to files:
    its log records (Ray's, Ray Data's, MLflow's, Python warnings; the terminal keeps
    timeexpert's and errors) where the job sends them (`_console.driver_logging`), else to
    `driver-PID.log` in the Ray session's `logs/`; what native code writes to stderr (the C++
    core of Ray's driver copies its ERROR lines there) to `driver-PID.err` beside it."""
    if VERBOSE:
        ray.init(**{**options, "log_to_driver": True})
        return
    if not logging.getLogger().handlers:  # as logging.basicConfig: logging that a job (or a
        _console.driver_logging()  # test runner) set up stays as it is
    logs = os.path.join(ray.init(**options).address_info["session_dir"], "logs")
    _console.driver_log_file(os.path.join(logs, f"driver-{os.getpid()}.log"))
    _console.native_stderr_to(os.path.join(logs, f"driver-{os.getpid()}.err"))


def prepare_data(args) -> None:
    if args.synthetic and not storage.exists(storage.join_uri(args.data_root, "manifests", "train.jsonl")):
        print(f"generating the {args.synthetic} synthetic benchmark under {args.data_root}", flush=True)
        synth.generate(args.synthetic, args.data_root, seed=0)


def read_settings(path: str) -> dict:
    """The JSON object of TrainConfig fields at `path` (`--settings`, local or s3://); SystemExit
    naming the file when it is not one."""
    try:
        fields = json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--settings {path}: {e}") from None
    if not isinstance(fields, dict):
        raise SystemExit(f"--settings {path}: expected a JSON object of TrainConfig fields, got "
                         f"{type(fields).__name__}")
    return fields


def train_config(args, **extra):
    fields = dict(get_preset(args.preset).train)
    fields.update(preset=args.preset, data_root=args.data_root, storage_root=args.storage_root,
                  name=args.name, num_workers=args.workers, ep_size=args.ep, zero_stage=args.zero,
                  tracking_uri=args.tracking_uri, experiment=args.experiment)
    if args.steps:
        fields["num_steps"] = args.steps
    if args.settings:
        fields.update(read_settings(args.settings))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=JSON, got {item!r}")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    fields.update(extra)
    return TrainConfig.from_dict(fields)
