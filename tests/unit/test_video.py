"""Decoding: only the needed frames, resized at decode, from a path, bytes or a file object; every
kind of bad file raises VideoDecodeError with its reason."""

from __future__ import annotations

import io

import numpy as np
import pytest

from timeexpert import storage
from timeexpert.data import synth
from timeexpert.data.video import (
    SKIP_REASONS,
    VideoDecodeError,
    decode_frames,
    frame_indices,
    write_mp4,
)


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory) -> str:
    """10 s at 10 fps, 96x128; frame k is flat grey level 2k (frame number readable from pixels)."""
    path = str(tmp_path_factory.mktemp("video") / "ramp.mp4")
    write_mp4((np.full((96, 128, 3), 2 * k, np.uint8) for k in range(100)), path, fps=10)
    return path


def test_uniform_frames_resized_with_timestamps(ramp_video):
    d = decode_frames(ramp_video, num_frames=8, size=(64, 80))
    assert d.frames.shape == (8, 64, 80, 3) and d.frames.dtype == np.uint8
    idx = frame_indices(100, 10.0, num_frames=8, fps=None, max_frames=128)
    np.testing.assert_allclose(d.timestamps, idx / 10.0, atol=1e-3)
    # the decoded frame is the one at that index (grey level 2k, within codec error)
    np.testing.assert_allclose(d.frames.mean(axis=(1, 2, 3)), 2 * idx, atol=3)
    assert d.duration == pytest.approx(10.0) and d.fps == pytest.approx(10.0)


def test_jittered_frames_stay_in_their_segments(ramp_video):
    """TSN sampling: one random frame per segment, a new draw per call, timestamps to match."""
    rng = np.random.default_rng(0)
    draws = [frame_indices(100, 10.0, num_frames=8, fps=None, max_frames=128, rng=rng)
             for _ in range(20)]
    segment = np.arange(8) * 100 // 8
    for idx in draws:
        assert np.all(idx >= segment) and np.all(idx < segment + 100 // 8 + 1)
        assert np.all(np.diff(idx) > 0)
    assert len({tuple(d) for d in draws}) > 10  # not the centres every time
    d = decode_frames(ramp_video, num_frames=8, size=(32, 32), rng=np.random.default_rng(1))
    idx = frame_indices(100, 10.0, num_frames=8, fps=None, max_frames=128,
                        rng=np.random.default_rng(1))
    np.testing.assert_allclose(d.timestamps, idx / 10.0, atol=1e-3)
    np.testing.assert_allclose(d.frames.mean(axis=(1, 2, 3)), 2 * idx, atol=3)


def test_fps_sampling_with_cap(ramp_video):
    d = decode_frames(ramp_video, num_frames=None, fps=2.0, size=(32, 32))
    np.testing.assert_allclose(d.timestamps, np.arange(0, 10, 0.5), atol=1e-3)
    capped = decode_frames(ramp_video, num_frames=None, fps=5.0, max_frames=16, size=(32, 32))
    assert len(capped.timestamps) == 16 and np.all(np.diff(capped.timestamps) > 0)
    assert capped.timestamps[0] < 0.5 and capped.timestamps[-1] > 9.0


def test_path_bytes_and_file_object_agree(ramp_video, tmp_path):
    a = decode_frames(ramp_video, num_frames=4, size=(48, 48))
    with open(ramp_video, "rb") as f:
        data = f.read()
    b = decode_frames(data, num_frames=4, size=(48, 48))
    with storage.open_uri(ramp_video) as f:
        c = decode_frames(f, num_frames=4, size=(48, 48))
    c2 = decode_frames(io.BytesIO(data), num_frames=4, size=(48, 48))
    for other in (b, c, c2):
        np.testing.assert_array_equal(a.frames, other.frames)
        np.testing.assert_array_equal(a.timestamps, other.timestamps)


def test_frame_indices_validation():
    with pytest.raises(ValueError, match="exactly one"):
        frame_indices(10, 10, num_frames=4, fps=1.0, max_frames=8)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        frame_indices(10, 10, num_frames=0, fps=None, max_frames=8)
    # more frames asked than the video has: indices repeat, never run past the end
    assert frame_indices(3, 10, num_frames=6, fps=None, max_frames=8).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("kind", synth.CORRUPTIONS)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_each_corruption_has_its_reason(ramp_video, tmp_path, kind, as_bytes):
    with open(ramp_video, "rb") as f:
        bad = synth.corrupt_video(f.read(), kind)
    path = tmp_path / f"{kind}.mp4"
    path.write_bytes(bad)
    with pytest.raises(VideoDecodeError) as info:
        decode_frames(bad if as_bytes else str(path), num_frames=8, size=(32, 32))
    assert info.value.reason == kind
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(VideoDecodeError) as info:
        decode_frames(str(tmp_path / "nope.mp4"))
    assert info.value.reason == "missing" and "missing" in SKIP_REASONS
