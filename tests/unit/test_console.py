"""The jobs' console (jobs/_console.py, jobs/_common.py): the progress bar, where the driver's log
records and native stderr go, which of the workers' lines the driver prints."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def console(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import _console

    return _console


def test_bar_draws_in_place_at_each_tenth_into_a_file(console):
    out = io.StringIO()  # not a terminal: redrawn at each tenth of the way, not on a timer
    with console.Bar("stage 2", 20, "steps", stream=out) as bar:
        for step in range(1, 21):
            bar.update(step, f"loss {1 / step:.3f}")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended by close()
    frames = [f.strip() for f in text.split("\r") if f.strip()]
    assert len(frames) == 1 + 10  # the empty bar, then each tenth (close adds no repeat)
    assert frames[0].startswith("stage 2") and "0/20 steps" in frames[0]
    assert "[" + "#" * console.Bar.WIDTH + "]" in frames[-1] and "20/20 steps" in frames[-1]
    assert "loss 0.050" in frames[-1]


def test_bar_with_an_unknown_total_takes_it_from_the_first_progress_call(console):
    out = io.StringIO()
    bar = console.Bar("rendering", None, "videos", stream=out)
    assert out.getvalue() == ""  # nothing drawn before the total is known
    with pytest.raises(ValueError, match="total is known"):
        bar.update(1)
    for done in range(1, 5):
        bar.progress(done, 4)  # the library hook: progress(done, total)
    bar.close()
    assert "4/4 videos" in out.getvalue().split("\r")[-1]
    with pytest.raises(ValueError, match=r"total >= 1 \(or None\), got 0"):
        console.Bar("empty", 0)


def test_driver_logging_keeps_the_terminal_for_timeexpert_and_errors(console, tmp_path,
                                                                    monkeypatch, capsys):
    noisy = logging.getLogger("ray.data.test_console")  # like Ray Data: its own terminal handler
    noisy.propagate = False
    noisy.addHandler(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    every = [root] + [lg for lg in logging.Logger.manager.loggerDict.values()
                      if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in every]  # for the later tests
    try:
        console.driver_logging(str(tmp_path / "demo.log"))
        # ray.init restyles the `ray` logger's handlers: no terminal handler is left among them
        # (file and null handlers, such as pytest's own in a full run, may stay)
        assert not [h for h in logging.getLogger("ray").handlers if console._to_terminal(h)]
        noisy.info("Starting execution of Dataset")
        logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state")
        logging.getLogger("timeexpert.tracking").warning("MLflow logging failed")
        logging.getLogger("timeexpert.train.stages").info("== stage 2: 40 steps")
        logging.getLogger("timeexpert.train.stages").debug("a detail")
        logging.getLogger("ray.serve").error("replica crashed")
        with warnings.catch_warnings():  # (pytest.ini ignores DeprecationWarning)
            warnings.simplefilter("always")
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
        for handler in root.handlers:
            handler.flush()
        shown = capsys.readouterr().err
        logged = (tmp_path / "demo.log").read_text()
        assert "WARNING timeexpert.tracking: MLflow logging failed" in shown
        assert "ERROR ray.serve: replica crashed" in shown
        assert "\n== stage 2: 40 steps\n" in "\n" + shown and "a detail" not in shown
        for chatter in ("Starting execution", "Ray Train Controller", "old API"):
            assert chatter not in shown and chatter in logged, chatter
    finally:
        logging.captureWarnings(False)
        noisy.handlers.clear()
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def test_the_driver_prints_our_workers_lines_and_none_of_rays(monkeypatch):
    """The deduplicator settings of jobs/_common.py, on Ray's own LogDeduplicator: our Train
    workers' lines (as worker_logging formats them) pass; Ray's actors' output and the raylet's
    messages do not."""
    from ray._private.ray_logging import LogDeduplicator

    from timeexpert.train.telemetry import _WorkerFormatter

    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import _common

    def worker_line(message: str, name: str = "timeexpert.train.loop", level: int = logging.INFO):
        record = logging.LogRecord(name, level, __file__, 1, message, None, None)
        return _WorkerFormatter().format(record)

    ours = [
        worker_line("[stage 1: timeexpert task-modules] 2 workers, EP=1"),
        worker_line("[stage 3] step 5/5 loss 10.6335 (time 2.582 score 2.382)"),
        worker_line("[rank 1] resumed from checkpoint at step 4"),
        worker_line("[fpo] step 2/20 loss 0.6931", "timeexpert.train.fpo"),
        worker_line("storage unreachable; retrying in 2.0 s", "timeexpert.storage", logging.WARNING),
    ]
    assert ours[-1] == "WARNING timeexpert.storage: storage unreachable; retrying in 2.0 s"
    rays = [
        "Exception in thread PlacementGroupCleanerMonitor:",
        "Traceback (most recent call last):",
        "[2026-12-07 21:35:46,997 E 22836 22881] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: 'e4ab' has constructor arguments in the object store",
        "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
        "Failed to convert column 'prediction' into pyarrow array (ArrowConversionError)",
        "INFO 2026-12-07 21:36:01,123 grounding_Model abc replica.py:1234 - Started initializing",
        "",
    ]
    raylet = ["Task ServeController.graceful_shutdown failed. There are infinite retries remaining",
              "WARNING: 14 PYTHON worker processes have been started on node: 7de9 with address: "
              "192.0.2.2. This could be a result of using a large number of actors"]
    dedup = LogDeduplicator(5, _common.WORKER_LINE, ".*")
    printed = [line for batch in dedup.deduplicate({"ip": "n", "pid": 7, "lines": ours + rays})
               + dedup.deduplicate({"ip": "n", "pid": "raylet", "lines": raylet})
               for line in batch["lines"]]
    assert printed == ours
    if not _common.VERBOSE:  # what Ray reads when it is imported after jobs/_common.py
        assert os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] == _common.WORKER_LINE
        assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == ".*"


def test_native_stderr_goes_to_a_file_and_python_keeps_the_terminal(tmp_path):
    """_console.native_stderr_to, in a process of its own (it takes file descriptor 2), after a
    driver_logging() without a file: a write to descriptor 2 (what Ray's C++ core does) lands in
    the file; bars, timeexpert's records and tracebacks still reach the terminal; the records
    held before the log file was named (those of `ray.init`) reach it."""
    script = f"""
import logging, os, sys
sys.path.insert(0, {str(ROOT / "jobs")!r})
import _console
_console.driver_logging()
logging.getLogger("ray").info("Started a local Ray instance.")
_console.driver_log_file({str(tmp_path / "driver.log")!r})
_console.native_stderr_to({str(tmp_path / "driver.err")!r})
os.write(2, b"[2026-12-07 21:32:32,490 E 1 1] core_worker.cc:2465: Actor with class name\\n")
logging.getLogger("timeexpert.train.stages").info("== stage 1: 2 steps")
logging.getLogger("ray.data").info("Starting execution of Dataset")
with _console.Bar("stage 1", 2, "steps") as bar:
    bar.update(2)
raise SystemExit("a traceback's last line")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "core_worker.cc" not in out.stderr and "Ray instance" not in out.stderr, out.stderr
    assert "Starting execution" not in out.stderr
    for shown in ("== stage 1: 2 steps", "2/2 steps", "a traceback's last line"):
        assert shown in out.stderr, out.stderr
    assert "core_worker.cc:2465" in (tmp_path / "driver.err").read_text()
    logged = (tmp_path / "driver.log").read_text()
    assert "Started a local Ray instance." in logged and "Starting execution" in logged
