"""The two worker deployments of the grounding service: video decoding and the model.

They scale separately: decoding is CPU-bound per request and cacheable by content, the model is
batched (`@serve.batch`) and heavy to start (the checkpoint loads once per replica, in the
constructor, never per request). Expected client mistakes found here (an undecodable video, a
request the model refuses) come back as a `Rejection` value, not an exception, so the ingress can
answer a 4xx and the replica stays up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from ray import serve
from ray.exceptions import ObjectLostError

from timeexpert import storage
from timeexpert.data.video import DecodedVideo, VideoDecodeError, decode_frames
from timeexpert.inference import Prediction, PredictRequest
from timeexpert.serve.inputs import Rejection, RequestError, VideoSource, resolve_video_uri
from timeexpert.serve.replica import LocalModel, ModelInfo
from timeexpert.serve.settings import ModelServerConfig, VideoLimits
from timeexpert.serve.sharded import ShardedModel

logger = logging.getLogger("ray.serve")


# --- video decoding -----------------------------------------------------------------------------


@serve.deployment(name="VideoDecoder", max_ongoing_requests=32)
class VideoDecoder:
    """Reads a video (allowed URI or uploaded bytes) and decodes the sampled frames at the model's
    size. Stateless: the ingress keeps decoded videos (as object-store references) for repeats."""

    def __init__(self, limits: VideoLimits) -> None:
        self.limits = limits
        self.decoded = 0

    async def decode(
        self, source: VideoSource, *, num_frames: int | None, fps: float | None,
        size: tuple[int, int],
    ) -> DecodedVideo | Rejection:
        try:
            data = source.data
            if data is None:
                # the ingress checked the allow-list; checked again here, where the bytes are read
                uri = resolve_video_uri(source.uri, self.limits.allowed_roots)
                data = await asyncio.to_thread(read_video, uri, self.limits.max_upload_bytes)
        except RequestError as err:
            return Rejection(err.status, err.kind, err.message)
        self.decoded += 1
        return await asyncio.to_thread(self._decode, data, num_frames, fps, size)

    def _decode(self, data: bytes, num_frames, fps, size) -> DecodedVideo | Rejection:
        try:
            return decode_frames(
                data, num_frames=num_frames, fps=fps, max_frames=self.limits.max_frames, size=size
            )
        except VideoDecodeError as err:
            return Rejection(422, "invalid_video", f"not a decodable video ({err.reason}): {err}")
        except ValueError as err:
            return Rejection(422, "invalid_request", f"cannot sample the video: {err}")

    def stats(self) -> dict:
        return {"decoded": self.decoded}


def video_version(source: VideoSource) -> tuple:
    """What identifies the content of a checked video source, cheaply: for a URI its size and
    modification stamp (local mtime, S3 ETag; one stat / HEAD), for an upload its SHA-256.
    A video replaced under the same URI gets a new version, so a cached decode is never stale."""
    if source.data is not None:
        return ("sha256", hashlib.sha256(source.data).hexdigest())
    try:
        fs, path = storage.filesystem(source.uri)
        info = fs.info(path)
    except FileNotFoundError:
        raise RequestError(404, "video_not_found", f"no video at {source.uri!r}") from None
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return ("uri", source.uri, info.get("size"), str(stamp))


class DecodedCache:
    """LRU of decoded videos by (content version, sampling) -> (the decoder's response, duration,
    frames).

    The frames stay in Ray's object store, referenced by the response kept here: a repeated video goes from the
    ingress straight to the model replica (one hop, no decode, no copy through the ingress).
    `entries == 0` turns it off."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple, tuple] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: tuple, item: tuple) -> None:
        if self.entries == 0:
            return
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)

    async def run(self, key: tuple, *, decode, use):
        """`await use(ref)` on the decoded video of `key`: the cached one, else `await decode()`
        -> (ref, ...) stored under `key`. Returns (use's result, the entry). A cached object lost
        since (its node died, ...) is decoded again once."""
        entry = self.get(key)
        if entry is not None:
            try:
                return await use(entry[0]), entry
            except ObjectLostError:
                self._items.pop(key, None)
        entry = await decode()
        self.put(key, entry)
        return await use(entry[0]), entry

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._items)}


def read_video(uri: str, max_bytes: int) -> bytes:
    """The bytes of a checked video URI; 404 when missing, 413 over `max_bytes` (its size is
    asked first, so a too-large video is not read)."""
    try:
        fs, path = storage.filesystem(uri)
        size = fs.size(path)
    except FileNotFoundError:
        raise RequestError(404, "video_not_found", f"no video at {uri!r}") from None
    if size is not None and size > max_bytes:
        raise RequestError(
            413, "video_too_large", f"video {uri!r} is {size} bytes; the limit is {max_bytes}"
        )
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise RequestError(404, "video_not_found", f"no video at {uri!r}") from None


# --- the model ----------------------------------------------------------------------------------


@serve.deployment(name="GroundingModel", max_ongoing_requests=32)
class GroundingModelServer:
    """One model replica: the checkpoint loaded once, requests dynamically batched.

    `ep_size == 1`: the model lives in this replica. `ep_size > 1`: the replica drives an EP
    group of `ep_size` worker actors in its placement group (`timeexpert.serve.sharded`), each
    holding a slice of the experts; rank 0's answer is returned.
    """

    def __init__(self, config: ModelServerConfig) -> None:
        self.config = config
        if config.ep_size > 1:
            self.backend = ShardedModel(config)
        else:
            self.backend = LocalModel(config)
        self._info = self.backend.info()
        self._batched.set_max_batch_size(config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batches = self.batched_requests = self.largest_batch = 0
        logger.info("model %s loaded: %s", config.checkpoint, self._info)

    def info(self) -> ModelInfo:
        return self._info

    async def predict(
        self, video: DecodedVideo, *, task, query: str, max_events: int | None, clip_len: float,
        options: list[str] | None = None,
    ) -> Prediction | Rejection:
        """One request on decoded frames (the ingress passes the decoder's object ref; Ray
        resolves it here, so the frames never travel through the ingress twice)."""
        return await self._batched(PredictRequest(
            frames_THWC=video.frames, timestamps_T=video.timestamps, task=task, query=query,
            duration=video.duration, max_events=max_events, clip_len=clip_len, options=options,
        ))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # set from the config in __init__
    async def _batched(self, requests: list[PredictRequest]) -> list:
        self.batches += 1
        self.batched_requests += len(requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        return await self.backend.predict_batch(requests)

    def batch_stats(self) -> dict:
        """How many model calls served how many requests: the batches `@serve.batch` formed."""
        mean = self.batched_requests / self.batches if self.batches else 0.0
        return {"batches": self.batches, "requests": self.batched_requests,
                "mean_batch_size": round(mean, 2), "largest_batch": self.largest_batch}

    async def check_health(self) -> None:
        await self.backend.check_health()
