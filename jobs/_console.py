"""What a job shows a person at the terminal: its own lines, one progress bar per long step, and
nothing of Ray's internals (`_common.init_ray` applies the first three below to every job).

- `driver_logging(path)`: the driver's log records (timeexpert's, Ray's, MLflow's, Python
  warnings) go to `path`; the terminal keeps errors and timeexpert's warnings.
- `driver_log_file(path)`: the file of a `driver_logging()` that was not given one.
- `native_stderr_to(path)`: what native code writes to stderr (Ray's C++ core) goes to `path`.
- `Bar`: a one-line progress bar on stderr, redrawn in place; `Bar.progress` is the
  `progress(done, total)` hook the library's long calls take.
- `TrainingProgress`: a Ray Train callback that feeds a `Bar` per training stage.
- `serve_with_progress`: `serve.run` with a bar of the deployments that are up.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import time
from ray import serve
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def driver_logging(path: str | None = None) -> None:
    """Send this process's log records, INFO and up, to `path` (None: held until
    `driver_log_file` names the file, e.g. in Ray's session directory, known once `ray.init`
    returns); show on the terminal only what `timeexpert` logs (its stage lines; warnings) and
    errors. The two handlers sit on the root logger. Ray, Ray Data and MLflow give their loggers
    their own terminal handlers and no propagation: those handlers are removed and the records
    propagate to the root (their file handlers, like Ray Data's ray-data.log, stay; `ray.init`
    restyles only the `ray` logger's own handlers, of which none is left). Python warnings
    (libraries' deprecations, such as Ray Data's RayDeprecationWarning) are logged through
    `py.warnings`, so they go to the file too."""
    if path is None:  # never flushed by itself: no target yet, and no level above CRITICAL
        to_file = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    else:
        to_file = logging.FileHandler(path)
        to_file.setFormatter(logging.Formatter(_FORMAT))
    to_file.setLevel(logging.INFO)
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.INFO)
    to_console.addFilter(
        lambda record: record.levelno >= logging.ERROR or record.name.startswith("timeexpert")
    )
    to_console.setFormatter(_ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [to_file, to_console]
    root.setLevel(logging.INFO)
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers[:] = [h for h in logger.handlers if not _to_terminal(h)]
            logger.propagate = True
    logging.captureWarnings(True)


def driver_log_file(path: str) -> None:
    """The records a `driver_logging()` without a file held, and the later ones, to `path`;
    nothing where the records go to a file already (or were not routed)."""
    root = logging.getLogger()
    for held in [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        to_file = logging.FileHandler(path)
        to_file.setFormatter(logging.Formatter(_FORMAT))
        to_file.setLevel(held.level)
        held.setTarget(to_file)
        held.close()  # hands the held records to the file
        root.removeHandler(held)
        root.addHandler(to_file)


def native_stderr_to(path: str) -> None:
    """Point file descriptor 2 at `path`, for what native code writes to stderr: the C++ core of
    Ray's driver copies each ERROR line of its own log file (python-core-driver-*.log) there, such
    as Ray Data's "Actor with class name: 'MapWorker(...)' ... has constructor arguments in the
    object store and max_restarts > 0", and no Ray setting turns that copy off alone
    (RAY_BACKEND_LOG_LEVEL=fatal would drop every Ray process's errors from its log file too).
    Python's `sys.stderr` (bars, log records, tracebacks) keeps the terminal on a copy of the
    descriptor; a Python crash report or a C++ FATAL of Ray's lands in `path`. Nothing where
    `sys.stderr` is not this process's own (a test runner captures it)."""
    old = sys.stderr
    if old is None or old is not sys.__stderr__:
        return
    old.flush()
    terminal = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = open(terminal, "w", buffering=1, encoding=old.encoding, errors=old.errors)
    for handler in logging.getLogger().handlers:  # driver_logging's terminal handler
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(sys.stderr)


class _ConsoleFormatter(logging.Formatter):
    """INFO as the bare message (a stage line); a warning or error with its level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno <= logging.INFO:
            return message
        return f"{record.levelname} {record.name}: {message}"


def _to_terminal(handler: logging.Handler) -> bool:
    """A stream handler that is not a file's: Ray's, Ray Data's and MLflow's console handlers."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class Bar:
    """`label [#####.....] done/total unit  elapsed  note`, redrawn in place on stderr (at most
    5 times a second on a terminal; at every tenth of the way into a file or pipe) and ended with
    a newline by `close` (or the `with` block)."""

    WIDTH = 24

    def __init__(self, label: str, total: int | None, unit: str = "", stream=None) -> None:
        """`total=None`: not known yet; the first `progress(done, total)` call gives it."""
        if total is not None and total < 1:
            raise ValueError(f"a progress bar needs total >= 1 (or None), got {total}")
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done, self.note = 0, ""
        self._drawn_at, self._drawn_tenth, self._closed = 0.0, -1, False
        self._drawn: tuple | None = None  # (done, note) last drawn
        self._draw()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def progress(self, done: int, total: int) -> None:
        """A library's `progress(done, total)` hook (synth.generate, predict_records)."""
        self.total = max(total, 1)
        self.update(done)

    def update(self, done: int, note: str = "") -> None:
        if self.total is None:
            raise ValueError("update() before the bar's total is known; call progress(done, total)")
        self.done, self.note = min(max(done, 0), self.total), note
        now = time.perf_counter()
        tenth = 10 * self.done // self.total
        if (self.tty and now - self._drawn_at >= 0.2) or tenth > self._drawn_tenth:
            self._draw()

    def close(self) -> None:
        if not self._closed and self.total is not None:
            self._closed = True
            if self._drawn != (self.done, self.note):
                self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        if self.total is None:
            return
        filled = self.WIDTH * self.done // self.total
        elapsed = time.perf_counter() - self.t0
        line = (f"  {self.label:<22}[{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{self.done}/{self.total}{' ' + self.unit if self.unit else ''}  "
                f"{elapsed:4.0f} s  {self.note}")
        self.stream.write("\r" + line.ljust(100))
        self.stream.flush()
        self._drawn_at, self._drawn_tenth = time.perf_counter(), 10 * self.done // self.total
        self._drawn = (self.done, self.note)


class TrainingProgress(UserCallback):
    """Each Ray Train report's (stage, step, loss), put on a Ray queue. Ray Train runs callbacks
    in its controller actor, not in the driver, so the driver's `bars` thread draws them."""

    def __init__(self, steps: dict[int, int]) -> None:
        self.steps = dict(steps)  # stage -> its number of steps (the bar's total)
        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint) -> None:
        report = metrics[0] if metrics else {}
        if "step" in report and "stage" in report:
            self.queue.put_nowait((int(report["stage"]), int(report["step"]),
                                   float(report.get("loss", float("nan")))))

    def bars(self) -> "_BarThread":
        """A thread drawing one bar per stage until `stop()`."""
        return _BarThread(self)


class _BarThread(threading.Thread):
    def __init__(self, progress: TrainingProgress) -> None:
        super().__init__(name="training-progress", daemon=True)
        self.progress = progress
        self._stop_event = threading.Event()
        self.bar: Bar | None = None
        self.stage = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                stage, step, loss = self.progress.queue.get(timeout=0.5)
            except Empty:
                continue
            if stage != self.stage:
                self._close_bar()
                self.stage = stage
                self.bar = Bar(f"stage {stage}", self.progress.steps.get(stage, step), "steps")
            self.bar.update(step, f"loss {loss:.3f}")
            if step >= self.bar.total:
                self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self._close_bar()


def serve_with_progress(application, *, name: str, num_deployments: int, route_prefix: str = "/",
                        logging_config: dict | None = None) -> None:
    """`serve.run(application)` (in this thread), with a bar of its deployments that are HEALTHY,
    drawn by a second thread until `serve.run` returns."""
    done = threading.Event()
    with Bar("Serve start", num_deployments, "deployments") as bar:

        def poll() -> None:
            while not done.wait(0.5):
                bar.update(_healthy(name))

        poller = threading.Thread(target=poll, name="serve-progress", daemon=True)
        poller.start()
        try:
            serve.run(application, name=name, route_prefix=route_prefix,
                      logging_config=logging_config)
        finally:
            done.set()
            poller.join(timeout=5)
        bar.update(_healthy(name))


def _healthy(app_name: str) -> int:
    app = serve.status().applications.get(app_name)
    if app is None:
        return 0
    return sum(d.status == "HEALTHY" for d in app.deployments.values())
