"""The demo's console (jobs/_console.py): the progress bar and where the driver's log records go."""

from __future__ import annotations

import io
import logging
import pathlib
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
