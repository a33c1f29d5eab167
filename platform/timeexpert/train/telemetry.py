"""What a training worker tells about its run: where the time goes, the profiler trace, the
progress line and the step metrics.

Rank 0 times each phase of the step (`StepTimes`: MLflow `time/<phase>` per report,
`time_total/<phase>` and one line at the end of the stage, `time_line`) and, with
`profile_steps`, writes a torch profiler trace (`start_profiler`, `save_profile`). Every report
reduces the window's losses and counts over the ranks (`reduce_window`) and sums the routing
telemetry of the experts over the world (`routing_telemetry`, `routing_metrics`); rank 0 prints
`progress_line` and sends the metrics to MLflow. `worker_logging` routes a worker's own lines to
its log and silences Ray's line per report.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from timeexpert import storage
from timeexpert.events import TokenType
from timeexpert.train.checkpoint import storage_root
from timeexpert.train.config import TrainConfig

log = logging.getLogger(__name__)


# --- where the time goes -------------------------------------------------------------------------

VAL_METRIC = "val/mr/R1@0.5"  # the validation score of `val_every` (`train.validation`)
PHASES = ("data", "forward", "backward", "grad_sync", "optimizer", "experts", "validate", "report",
          "checkpoint")


class StepTimes:
    """Where a rank's loop time goes, by phase of the step (`PHASES`): perf_counter laps, each
    lap's seconds charged to the phase it ends, so the phases tile the loop's wall time. "data"
    is waiting for the shard's batch and tokenizing it; "grad_sync" the explicit gradient
    all-reduce (under ZeRO, DeepSpeed reduces dense gradients inside backward and its step);
    "experts" the A_t sync and token-adaptive add/prune; "validate" the validation score of
    `val_every` (`train.validation`); "report" the metric bookkeeping, the
    reduction over ranks, the progress line, MLflow and `ray.train.report`; "checkpoint" the
    state gather, the write and the report that persists it. No device sync is added: on CPU the
    laps are exact, on CUDA a phase holds its kernel launches and the GPU time lands in the phase
    of the next host wait (the all-reduce, the report's reduction)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.window_s = dict.fromkeys(PHASES, 0.0)
        self.total_s = dict.fromkeys(PHASES, 0.0)
        self.window_steps = self.total_steps = 0

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.window_s[phase] += now - self.last
        self.total_s[phase] += now - self.last
        self.last = now

    def skip(self) -> None:
        """Charge the time since the last lap to no phase (the profiler writing its trace)."""
        self.last = time.perf_counter()

    def step_done(self) -> None:
        self.window_steps += 1
        self.total_steps += 1

    def window(self) -> dict[str, float]:
        """Mean seconds per step of each phase since the last call (`time/<phase>`, and
        `time/step` their sum). A report's own cost is charged to the next window."""
        steps = max(self.window_steps, 1)
        out = {f"time/{k}": v / steps for k, v in self.window_s.items()}
        out["time/step"] = sum(self.window_s.values()) / steps
        self.window_s, self.window_steps = dict.fromkeys(PHASES, 0.0), 0
        return out

    def summary(self) -> dict[str, float]:
        """The stage so far: seconds per phase (`time_total/<phase>`), the loop and its steps."""
        out = {f"time_total/{k}": v for k, v in self.total_s.items()}
        out["time_total/loop"] = sum(self.total_s.values())
        out["time_total/steps"] = float(self.total_steps)
        return out


def time_line(cfg: TrainConfig, total: dict[str, float]) -> str:
    """The stage's breakdown in one line: seconds per step and share of the loop per phase."""
    loop, steps = total["time_total/loop"], max(total["time_total/steps"], 1.0)
    parts = ", ".join(f"{k} {total[f'time_total/{k}'] / steps:.3f} "
                      f"({100 * total[f'time_total/{k}'] / max(loop, 1e-9):.0f}%)" for k in PHASES)
    return (f"[stage {cfg.stage}] {int(steps)} steps in {loop:.1f} s, {loop / steps:.3f} s/step "
            f"on rank 0: {parts}")


# --- the profiler trace -------------------------------------------------------------------------


def start_profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True)
    profiler.start()
    return profiler


def save_profile(profiler, cfg: TrainConfig, first: int, last: int, logger) -> None:
    """Stop the profiler; its Chrome trace (Perfetto or chrome://tracing open the .json.gz) and
    its op table go to the stage's MLflow run under profile/, without MLflow under the run's
    folder of the storage root."""
    profiler.stop()
    name = f"stage{cfg.stage}_steps{first}-{last}_rank0"
    with tempfile.TemporaryDirectory(prefix="te-profile-") as d:
        raw = os.path.join(d, "trace.json")
        profiler.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(os.path.join(d, f"trace_{name}.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        with open(os.path.join(d, f"ops_{name}.txt"), "w") as f:
            f.write(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        if logger.enabled:
            for file in sorted(os.listdir(d)):
                logger.log_artifact(os.path.join(d, file), "profile")
            where = f"MLflow run {cfg.mlflow_run_id}, artifacts profile/"
        else:
            where = storage.join_uri(storage_root(cfg), cfg.run_name(), "profile")
            storage.upload_dir(d, where)
    log.info(f"[stage {cfg.stage}] profiler trace of steps {first}..{last} (rank 0): {where}")


# --- a worker's lines ---------------------------------------------------------------------------

# Ray 2.60 logs every `ray.train.report` (all metrics, once per rank) at INFO from a logger named
# by its file path (`logging.getLogger(__file__)` in this module of Ray's), not under `ray.train`,
# so neither `RunConfig(logging_config=...)` nor `ray.train.LoggingConfig`
# (ray-project/ray#61550, which filters `ray.train` records only) reaches it. Found by that name
# and raised to WARNING in the worker; no private module is imported.
_RAY_REPORT_LOGGER = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")


class _WorkerFormatter(logging.Formatter):
    """INFO as the bare message, a line tagged `[stage N`, `[rank N]` or `[fpo]`; a warning or an
    error as `LEVEL logger: message`. The jobs' driver prints a worker's line only in one of these
    forms (jobs/_common.py WORKER_LINE): the rest of the worker's output is Ray's."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno <= logging.INFO:
            return message
        return f"{record.levelname} {record.name}: {message}"


def worker_logging() -> None:
    """A Train worker's own lines (rank 0's progress, resume notices, warnings) to its stdout,
    which Ray keeps in the worker's log file; Ray's per-report INFO line silenced (above)."""
    package = logging.getLogger("timeexpert")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_WorkerFormatter())
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False  # once, whatever handlers Ray gave the root logger
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(_RAY_REPORT_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)


def progress_line(cfg: TrainConfig, m: dict[str, float]) -> str:
    return (
        f"[stage {cfg.stage}] step {int(m['step'])}/{cfg.num_steps} loss {m['loss']:.4f} "
        f"(time {m['loss_time']:.3f} score {m['loss_score']:.3f} text {m['loss_text']:.3f} "
        f"aux {m['aux_loss']:.4f} z {m['z_loss']:.4f}"
        + (f" frames {m['loss_frames']:.3f}" if "loss_frames" in m else "")
        + (f", val R1@0.5 {m[VAL_METRIC]:.2f}" if VAL_METRIC in m else "")
        + f") {m['tokens_per_s']:.0f} tok/s, {m['time/step']:.2f} s/step (data "
        f"{m['time/data']:.2f}, sync {m['time/grad_sync']:.2f}) "
        f"experts {m['experts/num_active']:.1f} active, {m['experts/mean_active']:.2f}/token"
    )


# --- the step metrics, over the ranks -----------------------------------------------------------


def reduce_window(window: dict[str, Any], groups) -> dict[str, float]:
    """Mean per step over the window, averaged over ranks; tokens/s over all ranks."""
    keys = sorted(k for k in window if not k.startswith("_"))
    steps = window["_steps"]
    values = torch.tensor([float(window[k]) / steps for k in keys]
                          + [float(window["_tokens"]), window["_seconds"]],
                          dtype=torch.float64,  # float(): the window's one host sync
                          device=groups.device)  # NCCL reduces device tensors only
    if groups.world_size > 1:
        dist.all_reduce(values)
        values[:-2] /= groups.world_size
        values[-1] /= groups.world_size  # mean wall time per rank
    out = {k: float(v) for k, v in zip(keys, values[:-2])}
    for k in ("experts_added", "experts_pruned"):  # every rank agrees: a count, not a mean
        out[k] = out[k] * steps
    out["tokens_per_s"] = float(values[-2] / max(float(values[-1]), 1e-9))
    return out


TOKEN_TYPE_NAMES = [t.name.lower() for t in TokenType]


def routing_telemetry(model, groups) -> dict[str, Any]:
    """Per layer: (type x expert) pair counts and tokens per type, summed over the world."""
    layers = [layer.ffn for layer in model.layers]
    if layers[0].cfg.gating == "dense":
        return {"gating": "dense"}
    pairs = torch.stack([m.tel_pairs_TE for m in layers]).double()
    tokens = torch.stack([m.tel_tokens_T for m in layers]).double()
    if groups.world_size > 1:
        flat = torch.cat([pairs.flatten(), tokens.flatten()])
        dist.all_reduce(flat)
        pairs = flat[: pairs.numel()].view_as(pairs)
        tokens = flat[pairs.numel():].view_as(tokens)
    return {
        "gating": layers[0].cfg.gating,
        "types": TOKEN_TYPE_NAMES,
        "pairs": pairs.tolist(),  # [layer][type][expert]
        "tokens": tokens.tolist(),  # [layer][type]
        "active": [int(m.active_E.sum()) for m in layers],
    }


def accumulate_routing(total: dict[str, Any], routing: dict[str, Any]) -> None:
    """Add a report's `routing_telemetry` to the stage's `total` (the checkpoint's routing.json):
    counts summed, the active experts of each report kept in order."""
    if routing.get("gating") == "dense":
        total.setdefault("gating", "dense")
        return
    if "pairs" not in total:
        total.update({k: v for k, v in routing.items()})
        total["active_history"] = []
    else:
        total["pairs"] = (np.asarray(total["pairs"]) + np.asarray(routing["pairs"])).tolist()
        total["tokens"] = (np.asarray(total["tokens"]) + np.asarray(routing["tokens"])).tolist()
        total["active"] = routing["active"]
    total["active_history"].append(routing["active"])


def routing_metrics(routing: dict[str, Any]) -> dict[str, float]:
    """Mean activated experts per token (overall and per task type) and active expert count."""
    if routing.get("gating") == "dense":
        return {"experts/mean_active": 1.0, "experts/num_active": 1.0}
    pairs = np.asarray(routing["pairs"]).sum(0)  # type x expert, over layers
    tokens = np.asarray(routing["tokens"]).sum(0)  # type
    out = {
        "experts/mean_active": float(pairs.sum() / max(tokens.sum(), 1)),
        "experts/num_active": float(np.mean(routing["active"])),
    }
    for t, name in enumerate(TOKEN_TYPE_NAMES):
        if tokens[t]:
            out[f"experts/mean_active/{name}"] = float(pairs[t].sum() / tokens[t])
    return out
