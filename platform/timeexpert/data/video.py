"""Decode only the frames a sample needs, resized at decode (decord), and write mp4s (PyAV).

Bad videos never crash a caller: every failure (missing, empty, truncated, garbage, moov-less,
corrupt mid-stream) is a `VideoDecodeError` whose `reason` names it, so the pipeline can count
skips by reason. decord raises `RuntimeError` or its `DECORDError` at open or at decode; both are
caught at both points (see ../shared/STACK_NOTES.md).
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import numpy as np

# Reasons a video is skipped; the pipeline reports counts under these names.
SKIP_REASONS = ("missing", "empty", "truncated", "garbage", "moov_less", "corrupt")

# ISO-BMFF top-level box types we accept as "looks like an mp4/mov" when sniffing a failure.
_BOX_TYPES = {
    b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"pdin", b"moof", b"mfra",
    b"meta", b"styp", b"sidx", b"pnot",
}


class VideoDecodeError(ValueError):
    """A video that cannot be decoded; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 (T, H, W, 3), RGB
    timestamps: np.ndarray  # float32 (T,), seconds: presentation time of each frame
    duration: float  # seconds, of the whole video
    fps: float  # the video's average frame rate


def frame_indices(
    num_total: int,
    avg_fps: float,
    *,
    num_frames: int | None,
    fps: float | None,
    max_frames: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Which frames to decode: `num_frames` uniform (segment centres), or every 1/`fps` seconds
    capped at `max_frames` (uniformly thinned beyond the cap). Exactly one of the two is set.
    With `rng` (training augmentation, `num_frames` only) each of the equal segments gives a
    random frame instead of its centre (TSN's segment sampling)."""
    if (num_frames is None) == (fps is None):
        raise ValueError(
            f"set exactly one of num_frames and fps, got num_frames={num_frames} fps={fps}"
        )
    if num_total <= 0:
        raise ValueError(f"video has no frames (num_total={num_total})")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        offset = 0.5 if rng is None else rng.uniform(0.0, 1.0, num_frames)
        idx = ((np.arange(num_frames) + offset) * num_total / num_frames).astype(np.int64)
    else:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        step = max(avg_fps / fps, 1.0)
        idx = np.arange(0, num_total, step).astype(np.int64)
        if len(idx) > max_frames:
            idx = idx[((np.arange(max_frames) + 0.5) * len(idx) / max_frames).astype(np.int64)]
    return np.clip(idx, 0, num_total - 1)


def _sniff(head: bytes, size: int) -> str:
    """Why a file that decord refused at open is bad, from its bytes: walk the top-level boxes."""
    if size == 0:
        return "empty"
    pos, seen = 0, set()
    while pos + 8 <= len(head):
        box_size, box_type = struct.unpack(">I4s", head[pos : pos + 8])
        if box_type not in _BOX_TYPES:
            return "garbage" if pos == 0 else "corrupt"
        if box_size == 1 and pos + 16 <= len(head):
            box_size = struct.unpack(">Q", head[pos + 8 : pos + 16])[0]
        elif box_size == 0:  # box extends to the end of the file
            box_size = size - pos
        if box_size < 8:
            return "corrupt"
        seen.add(box_type)
        if pos + box_size > size:
            return "truncated"
        pos += box_size
    if pos == 0:
        return "garbage"
    return "moov_less" if b"moov" not in seen else "corrupt"


def _read_all(src: str | bytes | BinaryIO) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read()
    pos = src.tell()
    src.seek(0)
    data = src.read()
    src.seek(pos)
    return data


_SIZE_BUG = "The size must exactly match"


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image  # deferred: only the rare wrong-size decode needs it

    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames]
    )


def _decord():
    """decord, imported on first use (deferred on purpose: a native library with FFmpeg inside,
    not needed to import the package) with FFmpeg's log noise off (a bad video is reported as a
    VideoDecodeError, not as hundreds of stderr lines)."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    return decord


def decode_frames(
    src: str | bytes | BinaryIO,
    *,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int = 128,
    size: tuple[int, int] = (224, 224),
    rng: np.random.Generator | None = None,
) -> DecodedVideo:
    """Decode the needed frames of one video, resized at decode to `size` = (height, width).

    `src` is a local path, the file's bytes, or a binary file object (e.g. from
    `timeexpert.storage.open_uri`). Pass `fps` (and `num_frames=None`) to sample at a target rate
    capped at `max_frames`; `rng` jitters the uniform frames (`frame_indices`). Only the chosen
    frames are decoded (`get_batch`), not the whole video.
    Raises VideoDecodeError (a ValueError) with a `reason` for any unreadable video.
    """
    decord = _decord()
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be (height, width) >= 1, got {size}")
    if isinstance(src, str):
        if not os.path.isfile(src):
            raise VideoDecodeError("missing", f"no file at {src!r}")
        if os.path.getsize(src) == 0:
            raise VideoDecodeError("empty", f"{src!r} has 0 bytes")
        name = src
        reader_src: object = src
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise VideoDecodeError("empty", "0 bytes")
            reader_src = io.BytesIO(bytes(src))
        else:
            reader_src = src
        name = "<bytes>"
    try:
        vr = decord.VideoReader(reader_src, width=width, height=height, num_threads=1)
        num_total = len(vr)
        avg_fps = float(vr.get_avg_fps())
    except (RuntimeError, decord.DECORDError) as e:
        data = _read_all(src)
        reason = _sniff(data[: 1 << 20], len(data))
        raise VideoDecodeError(reason, f"cannot open {name}: {str(e).splitlines()[0]}") from None
    if num_total <= 0 or not avg_fps > 0:
        raise VideoDecodeError("corrupt", f"{name} has {num_total} frames at {avg_fps} fps")
    idx = frame_indices(num_total, avg_fps, num_frames=num_frames, fps=fps, max_frames=max_frames,
                        rng=rng)
    try:
        try:
            frames = vr.get_batch(list(idx)).asnumpy()
        except decord.DECORDError as e:
            if _SIZE_BUG not in str(e):
                raise
            # decord 0.6 mis-sizes some output widths (8, 12, 16, 24, 48, 72 ... seen): decode
            # these frames at the native size and resize them with Pillow instead.
            if not isinstance(src, (str, bytes, bytearray, memoryview)):
                src.seek(0)
            native = decord.VideoReader(
                io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src,
                num_threads=1,
            )
            frames = _resize(native.get_batch(list(idx)).asnumpy(), height, width)
        timestamps = vr.get_frame_timestamp(list(idx))[:, 0].astype(np.float32)
    except (RuntimeError, decord.DECORDError) as e:
        raise VideoDecodeError("corrupt", f"cannot decode {name}: {str(e).splitlines()[0]}") from None
    if frames.shape != (len(idx), height, width, 3):
        raise VideoDecodeError("corrupt", f"{name} decoded to shape {frames.shape}")
    return DecodedVideo(
        frames=frames, timestamps=timestamps, duration=num_total / avg_fps, fps=avg_fps
    )


def write_mp4(
    frames: Iterable[np.ndarray],
    path: str,
    *,
    fps: int,
    gop_seconds: float = 1.0,
    codec: str = "libx264",
) -> None:
    """Encode RGB uint8 frames (H, W, 3) as an mp4 at a local `path`, with a short GOP (cheap
    sparse reads) and the moov box first (faststart needs a real file: it rewrites it at close)."""
    import av  # heavy; imported on first use

    container = av.open(path, mode="w", format="mp4", options={"movflags": "faststart"})
    try:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv420p"
                gop = max(1, int(round(gop_seconds * fps)))
                stream.codec_context.gop_size = gop
                if codec == "libx264":
                    stream.options = {
                        "preset": "ultrafast",
                        "crf": "30",
                        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
                    }
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("write_mp4 got no frames")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
