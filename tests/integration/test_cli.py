"""`timeexpert ground` / `timeexpert presets` as a user runs them: the console script, a real
mp4 rendered by the data generator and a saved checkpoint."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from serve_support import build_checkpoint, make_videos

from timeexpert.data.video import decode_frames
from timeexpert.inference import GroundingModel
from timeexpert.presets import list_presets

CLI = str(pathlib.Path(sys.executable).parent / "timeexpert")  # the console script beside python


@pytest.fixture(scope="module")
def ckpt_and_video(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return build_checkpoint(str(d / "ckpt")), make_videos(str(d / "videos"), num=1)[0]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


def test_ground_prints_the_python_api_answer_as_json(ckpt_and_video):
    ckpt, video = ckpt_and_video
    out = _run("ground", video, "--query", "a red circle moves left", "--checkpoint", ckpt)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    gm = GroundingModel.load(ckpt)
    frames = decode_frames(video, num_frames=gm.model.config.num_frames,
                           size=(gm.model.config.image_size,) * 2)
    expected = gm.predict(frames.frames, frames.timestamps, "mr", "a red circle moves left",
                          duration=frames.duration)
    assert answer["task"] == "mr" and answer["num_frames"] == gm.model.config.num_frames
    assert answer["events"] and answer["events"] == [e.to_dict() for e in expected.events]
    assert "warning" not in answer  # every word of the query is in the tokenizer's vocabulary


def test_ground_warns_of_words_the_model_cannot_know(ckpt_and_video):
    ckpt, video = ckpt_and_video
    out = _run("ground", video, "--query", "a person opens the refrigerator", "--checkpoint", ckpt)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert "refrigerator" in answer["unknown_words"] and "refrigerator" in answer["warning"]


def test_ground_answers_gqa_with_the_chosen_option(ckpt_and_video):
    ckpt, video = ckpt_and_video
    out = _run("ground", video, "--task", "gqa", "--query", "what moves?", "--options",
               "a red circle", "a blue square", "--checkpoint", ckpt)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["answer"] in (None, "a red circle", "a blue square")
    assert (answer["answer"] is None) == (answer["answer_index"] is None)


@pytest.mark.parametrize("args, message", [
    (["ground", "/nonexistent.mp4", "--query", "x", "--checkpoint", "CKPT"], "no video file"),
    (["ground", "VIDEO", "--checkpoint", "CKPT"], "needs --query"),
    (["ground", "VIDEO", "--query", "x", "--checkpoint", "/nonexistent-ckpt"],
     "cannot load the checkpoint"),
    (["ground", "VIDEO", "--query", "x", "--task", "gqa", "--checkpoint", "CKPT"],
     "needs them"),
])
def test_ground_refuses_bad_input_in_one_line(ckpt_and_video, args, message):
    ckpt, video = ckpt_and_video
    args = [{"CKPT": ckpt, "VIDEO": video}.get(a, a) for a in args]
    out = _run(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_presets_lists_every_preset():
    out = _run("presets")
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines()] == list_presets()
