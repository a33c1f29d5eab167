"""MLflow helpers: runs by explicit id (no global active run), step metrics, plots as artifacts.

A pipeline has one parent run and a nested run per stage (`create_run(parent_id=...)`); Train
workers log step metrics into the stage's run by id (`StepLogger`), the driver adds params, eval
metrics and plots. Everything is a no-op without a tracking URI. Nothing here starts a run at
import; jobs decide when.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from timeexpert.checkpoints import local_checkpoint

logger = logging.getLogger(__name__)

_BAD_KEY = re.compile(r"[^0-9A-Za-z_\-. /:]")


def metric_key(name: str) -> str:
    """The one MLflow spelling of a metric or parameter name: characters MLflow refuses (the
    "@" of "R1@0.5") become "_" ("mr/R1_0.5")."""
    return _BAD_KEY.sub("_", name)


def client(tracking_uri: str):
    # mlflow is imported where it is used, here and below: it takes seconds to import, and
    # importing timeexpert (or training without a tracking URI) must not pay for it
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created when missing."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def create_run(tracking_uri: str, experiment: str, run_name: str, *, parent_id: str = "",
               tags: Mapping[str, str] | None = None) -> str:
    """A new RUNNING run (nested under `parent_id` when given); returns its id."""
    all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run = client(tracking_uri).create_run(experiment_id(tracking_uri, experiment), tags=all_tags,
                                          run_name=run_name)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(metric_key(k), str(v)[:6000]) for k, v in flatten(params).items()]
    c = client(tracking_uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(float(v))]
    c = client(tracking_uri)
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i : i + 500])


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def log_artifact_file(tracking_uri: str, run_id: str, path: str, artifact_path: str = "") -> None:
    client(tracking_uri).log_artifact(run_id, path, artifact_path or None)


def register_checkpoint(tracking_uri: str, run_id: str, checkpoint_uri: str, name: str) -> str:
    """A new version of the registered MLflow model `name` (created when missing) holding the
    TimeExpert checkpoint at `checkpoint_uri` (any URI of `timeexpert.checkpoints`): the folder
    is logged as the run's `checkpoint` artifacts, which the version points at. Returns the
    version ("1", "2", ...): serve it as `models:/NAME/VERSION` (or `models:/NAME/latest`)."""
    from mlflow.exceptions import MlflowException  # deferred: see `client`

    if not name:
        raise ValueError("a registered model name is required, got ''")
    c = client(tracking_uri)
    with local_checkpoint(checkpoint_uri) as local:
        c.log_artifacts(run_id, local, "checkpoint")
    try:
        c.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{c.get_run(run_id).info.artifact_uri}/checkpoint"
    return str(c.create_model_version(name, source=source, run_id=run_id).version)


class StepLogger:
    """Step metrics from a Train worker into a run by id; a no-op without URI or run id.

    Training never waits for MLflow: `log` queues the metrics and a thread sends them in order.
    While the tracking server does not answer, they stay queued and go out when it answers again
    (one warning when it stops, one line when it is back, saying how long it was away). Dropped,
    with one warning each time saying how many: the oldest beyond `max_buffered` queued steps,
    and at `close` what the server has not taken within `close_timeout_s`."""

    def __init__(self, tracking_uri: str, run_id: str, *, max_buffered: int = 10_000,
                 close_timeout_s: float = 300.0) -> None:
        self.enabled = bool(tracking_uri and run_id)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.max_buffered, self.close_timeout_s = max_buffered, close_timeout_s
        self.sent = self.dropped = 0  # logged steps sent / dropped
        self._queue: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._cond = threading.Condition()
        self._closing, self._closing_at = False, 0.0
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._send, name="mlflow-steps", daemon=True)
            self._thread.start()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self._cond:
            self._queue.append((dict(metrics), step))
            if len(self._queue) > self.max_buffered:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("MLflow step metrics: more than %d steps waiting for %s; "
                                   "dropping the oldest (training goes on)", self.max_buffered,
                                   self.tracking_uri)
            self._cond.notify()

    def _send(self) -> None:
        down_since, wait = None, 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                metrics, step = self._queue[0]
            try:
                log_metrics(self.tracking_uri, self.run_id, metrics, step)
            except Exception as err:  # tracking must never kill training
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("MLflow at %s did not take step metrics (%s); keeping them "
                                   "and sending them when it answers (training goes on)",
                                   self.tracking_uri, err)
                with self._cond:  # close() may cut the wait short
                    self._cond.wait(timeout=wait)
                    if self._closing and time.monotonic() - self._closing_at > self.close_timeout_s:
                        return
                wait = min(wait * 2, 30.0)
                continue
            with self._cond:
                if self._queue:  # else close() gave up on it meanwhile
                    self._queue.popleft()
                self.sent += 1
            if down_since is not None:
                logger.warning("MLflow at %s answers again after %.0f s; sending the %d steps "
                               "kept meanwhile", self.tracking_uri,
                               time.monotonic() - down_since, len(self._queue) + 1)
                down_since, wait = None, 1.0

    def log_artifact(self, path: str, artifact_path: str = "") -> None:
        if self.enabled:
            try:
                log_artifact_file(self.tracking_uri, self.run_id, path, artifact_path)
            except Exception as err:  # tracking must never kill training
                logger.warning("MLflow artifact upload failed (training goes on): %s", err)

    def close(self) -> None:
        """Send what is queued, waiting up to `close_timeout_s`; drop the rest, saying so."""
        if self._thread is None:
            return
        with self._cond:
            self._closing, self._closing_at = True, time.monotonic()
            self._cond.notify_all()
        self._thread.join(timeout=self.close_timeout_s)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.dropped += left
            logger.warning("MLflow at %s did not answer within %.0f s at the end of training: "
                           "dropped %d steps of metrics (%d sent)", self.tracking_uri,
                           self.close_timeout_s, left, self.sent)
        self._thread = None


# --- plots -------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend; deferred on purpose: heavy, and only
    the plots need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def plot_expert_heatmap(routing: Mapping[str, Any], path: str, *, title: str = "") -> str | None:
    """TimeExpert Fig. 4-style heatmap: per layer, the share of each task token type's tokens
    that activated each expert (rows: token types, columns: expert slots). None for dense."""
    if "pairs" not in routing:
        return None
    plt = _pyplot()
    pairs = np.asarray(routing["pairs"], dtype=float)  # layer x type x expert
    tokens = np.asarray(routing["tokens"], dtype=float)  # layer x type
    types = list(routing["types"])
    keep = tokens.sum(0) > 0
    share = pairs / np.maximum(tokens[..., None], 1)
    num_layers = pairs.shape[0]
    fig, axes = plt.subplots(1, num_layers, figsize=(3 + 2.2 * num_layers, 3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(share[i][keep], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(int(keep.sum())), [t for t, k in zip(types, keep) if k])
    fig.colorbar(im, ax=axes[0].tolist(), label="share of tokens routed")
    fig.suptitle(title or "expert assignment per task token type")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_token_density(density_T, timestamps_T, path: str, *, intervals=(), title: str = "") -> str:
    """Per-frame density of kept tokens over time (PNG at `path`), ground-truth intervals shaded;
    log it with `log_artifact_file`. GroundVTS's token-density figure."""
    plt = _pyplot()
    density = [float(d) for d in density_T]
    times = [float(t) for t in timestamps_T]
    if len(density) != len(times):
        raise ValueError(f"got {len(density)} densities for {len(times)} timestamps")
    fig, ax = plt.subplots(figsize=(6, 2.5))
    for start, end in intervals:
        ax.axvspan(start, end, color="tab:green", alpha=0.2)
    ax.plot(times, density, marker="o", lw=1.5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("kept tokens / frame")
    ax.set_title(title or "token density")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(series: Mapping[str, Sequence[tuple[int, float]]], path: str, *, title: str = "") -> str:
    """Line plot of named (step, value) series, e.g. the losses or the active expert count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_stage_plots(tracking_uri: str, run_id: str, routing: Mapping[str, Any], *, stage: int) -> list[str]:
    """Loss curves and active-expert curve from the run's metric history, and the routing heatmap,
    as artifacts under `plots/`. Returns the artifact names written."""
    c = client(tracking_uri)
    names = []
    with tempfile.TemporaryDirectory() as d:
        losses = {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)]
                  for k in ("loss", "loss_time", "loss_score", "loss_text", "aux_loss", "z_loss")}
        files = [plot_curves(losses, os.path.join(d, f"loss_curves_stage{stage}.png"),
                             title=f"stage {stage} losses")]
        active = {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)]
                  for k in ("experts/num_active", "experts/mean_active")}
        files.append(plot_curves(active, os.path.join(d, f"active_experts_stage{stage}.png"),
                                 title=f"stage {stage} experts"))
        heat = plot_expert_heatmap(routing, os.path.join(d, f"expert_heatmap_stage{stage}.png"),
                                   title=f"stage {stage}: expert assignment per token type")
        if heat:
            files.append(heat)
        with open(os.path.join(d, f"routing_stage{stage}.json"), "w") as f:
            json.dump(routing, f)
        files.append(f.name)
        for path in files:
            c.log_artifact(run_id, path, "plots")
            names.append(f"plots/{os.path.basename(path)}")
    return names
