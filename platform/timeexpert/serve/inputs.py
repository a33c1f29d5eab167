"""Request checks that need the service config: where a video may come from and how big it may be.

Pure functions, no Serve: the ingress calls them and turns a `RequestError` into a JSON 4xx.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from dataclasses import dataclass

from timeexpert import storage


class RequestError(Exception):
    """A client mistake: HTTP `status`, machine-readable `kind`, and a message saying what was
    wrong and what is accepted."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Rejection:
    """A `RequestError` found inside another deployment, returned (not raised) across the handle."""

    status: int
    kind: str
    message: str


@dataclass(frozen=True)
class VideoSource:
    """A checked video: a URI under an allowed root, or the uploaded bytes."""

    uri: str | None = None  # resolved (absolute path or s3://bucket/key)
    data: bytes | None = None


# what the video picker lists: the containers decord reads and browsers commonly play
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv")

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
    re.IGNORECASE,
)


def resolve_video_uri(uri: str, allowed_roots: list[str]) -> str:
    """`uri` resolved under the first allowed root that contains it, else RequestError.

    A relative path is taken relative to the first root. Any `..` segment is refused outright
    (even one that would resolve inside a root), as are http(s) and other schemes.
    """
    if uri.lower().startswith("data:"):
        raise RequestError(
            400, "invalid_video_uri", "a data: URL goes in video.data_url, not video.uri"
        )
    if "://" in uri and uri.split("://", 1)[0].lower() not in ("file", "s3"):
        raise RequestError(
            400, "unsupported_uri_scheme",
            f"video URI scheme {uri.split('://', 1)[0]!r} is not served (no http(s) fetching); "
            "give a local path, file:// or s3:// URI under an allowed root, or upload the video "
            "as a data URL",
        )
    if ".." in re.split(r"[/\\]", uri):
        raise RequestError(403, "forbidden_uri", f"video URI {uri!r} contains a '..' segment")
    if not allowed_roots:
        raise RequestError(
            403, "forbidden_uri", "this server accepts no video URIs (no allowed roots); upload "
            "the video as a data URL"
        )
    relative = "://" not in uri and not uri.startswith(("/", "~"))
    for root in allowed_roots[:1] if relative else allowed_roots:
        try:
            return storage.resolve_under_root(uri, root)
        except ValueError:
            continue
    raise RequestError(
        403, "forbidden_uri", f"video URI {uri!r} is outside the allowed roots {allowed_roots}"
    )


def list_videos(allowed_roots: list[str], limit: int) -> tuple[list[tuple[str, str]], bool]:
    """The video files under the allowed roots as (uri, name), sorted per root, at most `limit`;
    and whether there were more. `uri` is what a request's `video.uri` takes (the resolved path or
    s3:// URI), `name` the path under its root. A file that resolves outside its root (a symlink
    out) is left out: `resolve_video_uri` would refuse it."""
    found: list[tuple[str, str]] = []
    for root in allowed_roots:
        fs, base = storage.filesystem(root)
        prefix = f"s3://{base}" if storage.split_scheme(root)[0] == "s3" else base
        if not fs.isdir(base):
            continue  # a root not there (yet) has no videos to list
        for uri in storage.list_files(root):
            if not uri.lower().endswith(VIDEO_SUFFIXES):
                continue
            try:
                resolved = storage.resolve_under_root(uri, root)
            except ValueError:
                continue
            if len(found) == limit:
                return found, True
            found.append((resolved, posixpath.relpath(uri, prefix)))
    return found, False


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """`data:video/...;base64,...` -> the bytes, refusing another media type, plain (non-base64)
    data, bad base64 (400/415) and a payload over `max_bytes` (413, checked before decoding)."""
    m = _DATA_URL.match(url)
    if m is None:
        raise RequestError(
            400, "invalid_data_url", "a data URL must look like data:video/mp4;base64,..."
        )
    mime = (m.group("mime") or "text/plain").lower()
    if not mime.startswith("video/"):
        raise RequestError(
            415, "unsupported_media_type", f"data URL media type {mime!r} is not a video (video/*)"
        )
    if not m.group("b64"):
        raise RequestError(400, "invalid_data_url", "the data URL must be base64 (;base64,)")
    payload = url[m.end():]
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise RequestError(
            413, "upload_too_large",
            f"uploaded video is about {len(payload) // 4 * 3} bytes; the limit is {max_bytes}",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            400, "invalid_data_url", "the data URL payload is not valid base64"
        ) from None
    if len(data) > max_bytes:
        raise RequestError(
            413, "upload_too_large",
            f"uploaded video is {len(data)} bytes; the limit is {max_bytes}",
        )
    if not data:
        raise RequestError(422, "invalid_video", "the uploaded video is empty")
    return data


def video_source(
    uri: str | None, data_url: str | None, allowed_roots: list[str], max_bytes: int
) -> VideoSource:
    """The request's video (exactly one of `uri`, `data_url`) checked against the limits."""
    if uri is not None:
        return VideoSource(uri=resolve_video_uri(uri, allowed_roots))
    assert data_url is not None  # the request schema guarantees one of the two
    return VideoSource(data=decode_data_url(data_url, max_bytes))


def check_sampling(num_frames: int | None, fps: float | None, default_frames: int,
                   max_frames: int, max_fps: float) -> tuple[int | None, float | None]:
    """The request's sampling within the server limits: (num_frames, fps), exactly one set."""
    if num_frames is not None and num_frames > max_frames:
        raise RequestError(
            422, "invalid_request", f"num_frames={num_frames} is over the server limit {max_frames}"
        )
    if fps is not None:
        if fps > max_fps:
            raise RequestError(
                422, "invalid_request", f"fps={fps} is over the server limit {max_fps}"
            )
        return None, fps
    return (num_frames or default_frames), None


def check_query(query: str, max_chars: int) -> str:
    if len(query) > max_chars:
        raise RequestError(
            422, "query_too_long", f"query has {len(query)} characters; the limit is {max_chars}"
        )
    return query
