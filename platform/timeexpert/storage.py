"""The one URI opener: local paths, `file://` and `s3://` (s3fs), through fsspec.

Everything that reads or writes a dataset, a manifest, a video or a checkpoint goes through here.
S3 endpoint and credentials come from the standard AWS settings (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...) or from explicit storage options
(s3fs keyword arguments, e.g. `{"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ...}`).

`resolve_under_root` is the one containment check: a manifest entry or a Serve request may only
name a URI under the configured storage root.

`retrying` is the one wait for an endpoint that stopped answering (an object store restarting, a
network partition): it retries with a bounded exponential backoff and says how long it waited.
`ray_storage` gives Ray Train and Tune a filesystem that waits too, for the writes they make
themselves (a run's snapshot after each checkpoint).
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from typing import IO, Any, Callable, TypeVar

import botocore.exceptions
import fsspec
import pyarrow.fs

log = logging.getLogger(__name__)

T = TypeVar("T")

# s3fs options of a call made inside `retrying`: botocore gives up after one attempt instead of
# retrying for ~8 s on its own, so that the wait happens, and is counted, in `retrying`
FAIL_FAST: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}

# Attempts of pyarrow's standard AWS retry strategy (`ray_storage`): it waits random(0, 1) x 2^n
# s, at most 20 s, between attempts, so 20 attempts wait about 5 minutes, as `retrying` does for
# a checkpoint's parts (`TrainConfig.storage_wait_s`)
ARROW_S3_ATTEMPTS = 20

LOCAL_SCHEMES = ("", "file", "local")
SUPPORTED_SCHEMES = ("", "file", "s3")


def split_scheme(uri: str) -> tuple[str, str]:
    """`s3://b/k` -> ("s3", "b/k"); `file:///a` -> ("file", "/a"); `/a` or `a` -> ("", uri)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"a URI must be a non-empty string, got {uri!r}")
    if "\x00" in uri:
        raise ValueError(f"URI contains a NUL byte: {uri!r}")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(
                f"unsupported URI scheme {scheme!r} in {uri!r}; expected a local path, "
                "file:// or s3://"
            )
        return scheme, rest
    return "", uri


def _s3_options(storage_options: dict[str, Any]) -> dict[str, Any]:
    """Fill in the endpoint from AWS_ENDPOINT_URL(_S3) when the caller gave none."""
    options = dict(storage_options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = options.pop("endpoint_url", None) or client_kwargs.get("endpoint_url")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `uri` and the path inside it (`bucket/key` for S3)."""
    scheme, rest = split_scheme(uri)
    if scheme == "s3":
        if not rest or rest.startswith("/"):
            raise ValueError(f"an s3 URI needs a bucket: s3://BUCKET/KEY, got {uri!r}")
        return fsspec.filesystem("s3", **_s3_options(storage_options)), rest
    path = rest if scheme == "" else "/" + rest.lstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3 filesystem with standard AWS retries (`ARROW_S3_ATTEMPTS`) that keeps them
    when pickled: pyarrow's own pickling drops `retry_strategy`, and Ray hands the filesystem
    to its Train controller and workers pickled."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        retry = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=ARROW_S3_ATTEMPTS)
        super().__init__(retry_strategy=retry, **options)

    def __reduce__(self):
        return _retrying_s3, (self._options,)


def _retrying_s3(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def ray_storage(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's and Tune's (`storage_path`, `storage_filesystem`) for a storage root: for
    s3:// a `RetryingS3FileSystem` on the endpoint and region Ray would pick (AWS settings),
    whose calls wait out an endpoint that stops answering instead of failing the run at once;
    a local root as an absolute path and Ray's own filesystem."""
    scheme, rest = split_scheme(uri)
    if scheme != "s3":
        return os.path.abspath(os.path.expanduser(rest)), None
    default, path = pyarrow.fs.FileSystem.from_uri(uri)  # region and credentials as Ray's
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return path, RetryingS3FileSystem(region=default.region, endpoint_override=endpoint)


def open_uri(uri: str, mode: str = "rb", **storage_options: Any) -> IO:
    """Open `uri` like `open()`; parent folders are created when writing a local file."""
    fs, path = filesystem(uri, **storage_options)
    if any(m in mode for m in "wa") and not _is_s3(uri):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def _is_s3(uri: str) -> bool:
    return split_scheme(uri)[0] == "s3"


def join_uri(root: str, *parts: str) -> str:
    """Join path parts onto a URI root with `/`, keeping the root's scheme."""
    out = root.rstrip("/") if root not in ("/", "") else root
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def _listing(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """`filesystem(uri)` with its cached listings under `uri` dropped: what other processes and
    nodes wrote since (a checkpoint's parts, its commit markers) is seen, not an old listing."""
    fs, path = filesystem(uri, **storage_options)
    fs.invalidate_cache(path)
    return fs, path


def exists(uri: str, **storage_options: Any) -> bool:
    fs, path = _listing(uri, **storage_options)
    return fs.exists(path)


def read_bytes(uri: str, **storage_options: Any) -> bytes:
    """The whole object; FileNotFoundError when it is missing."""
    fs, path = filesystem(uri, **storage_options)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, **storage_options: Any) -> None:
    with open_uri(uri, "wb", **storage_options) as f:
        f.write(data)


def read_text(uri: str, **storage_options: Any) -> str:
    return read_bytes(uri, **storage_options).decode("utf-8")


def write_text(uri: str, text: str, **storage_options: Any) -> None:
    write_bytes(uri, text.encode("utf-8"), **storage_options)


def put_file(local_path: str, uri: str, **storage_options: Any) -> None:
    """Copy one local file to `uri`. An object appears whole or not at all: an S3 PUT is atomic,
    and a local copy is written beside its name and renamed into place."""
    fs, path = filesystem(uri, **storage_options)
    if _is_s3(uri):
        fs.put_file(local_path, path)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    fs.put_file(local_path, partial)
    os.replace(partial, path)


def file_sizes(uri: str, **storage_options: Any) -> dict[str, int]:
    """Every file under the folder `uri` as {path relative to it, with "/": size in bytes}; {}
    when nothing is there."""
    fs, root = _listing(uri, **storage_options)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {path[len(root):].lstrip("/"): int(info["size"]) for path, info in found.items()
            if path.startswith(root + "/")}


def remove_dir(uri: str, **storage_options: Any) -> None:
    """Remove the folder `uri` and everything under it (nothing when it does not exist)."""
    fs, path = filesystem(uri, **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_dirs(uri: str, **storage_options: Any) -> list[str]:
    """The names of the folders directly under `uri`, sorted ([] when it does not exist)."""
    fs, root = _listing(uri, **storage_options)
    try:
        entries = fs.ls(root.rstrip("/"), detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e["type"] == "directory")


def is_unreachable(err: BaseException) -> bool:
    """Whether `err` says the storage endpoint did not answer (refused or reset connections,
    timeouts, a 5xx such as S3's 503 SlowDown), as opposed to a request it refused."""
    if isinstance(err, (botocore.exceptions.ConnectionError, botocore.exceptions.ReadTimeoutError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(err, botocore.exceptions.ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and is_unreachable(cause)


def retrying(fn: Callable[[], T], *, what: str, budget_s: float,
             first_wait_s: float = 0.5, max_wait_s: float = 8.0) -> tuple[T, float]:
    """`fn()`, retried while the storage endpoint does not answer (`is_unreachable`): waits
    `first_wait_s`, doubling up to `max_wait_s` each, until it succeeds or `budget_s` seconds of
    waiting are spent (then the last error is raised). Returns (its result, seconds waited:
    the sleeps and the failed attempts). Any other error is raised at once."""
    waited, wait = 0.0, first_wait_s
    while True:
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - sorted by is_unreachable, else raised
            if not is_unreachable(err):
                raise
            waited += time.perf_counter() - t0
            if waited >= budget_s:
                raise TimeoutError(f"storage did not answer for {waited:.0f} s while trying to "
                                   f"{what} (budget {budget_s:.0f} s): {err}") from err
            log.warning("storage unreachable while trying to %s (%s); retrying in %.1f s, "
                        "%.0f s waited so far", what, type(err).__name__, wait, waited)
            time.sleep(min(wait, budget_s - waited))
            waited += min(wait, budget_s - waited)
            wait = min(wait * 2, max_wait_s)
            continue
        if waited:
            log.warning("storage answered again: %s after waiting %.1f s", what, waited)
        return result, waited


def upload_dir(local_dir: str, uri: str, **storage_options: Any) -> None:
    """Copy every file under `local_dir` to `uri` (a local folder or an s3 prefix)."""
    if not os.path.isdir(local_dir):
        raise ValueError(f"upload_dir needs an existing local folder, got {local_dir!r}")
    fs, root = filesystem(uri, **storage_options)
    for folder, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(folder, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            dst = posixpath.join(root, rel)
            if not _is_s3(uri):
                fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.put_file(src, dst)


def download_dir(uri: str, local_dir: str, **storage_options: Any) -> None:
    """Copy every object under `uri` into `local_dir` (created), keeping relative paths."""
    fs, root = filesystem(uri, **storage_options)
    root = root.rstrip("/")
    paths = fs.find(root)
    if not paths:
        raise FileNotFoundError(f"nothing to download under {uri!r}")
    for path in paths:
        rel = path[len(root) :].lstrip("/") if path.startswith(root) else posixpath.basename(path)
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(path, dst)


def list_files(uri: str, **storage_options: Any) -> list[str]:
    """Every file under `uri`, as URIs of the same scheme, sorted."""
    fs, root = _listing(uri, **storage_options)
    paths = sorted(fs.find(root))
    return [("s3://" + p) if _is_s3(uri) else p for p in paths]


def _normalized(uri: str) -> tuple[str, str]:
    """(kind, absolute normalised path): kind is "s3:BUCKET" or "local"."""
    scheme, rest = split_scheme(uri)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"an s3 URI needs a bucket: s3://BUCKET/KEY, got {uri!r}")
        key = posixpath.normpath("/" + key) if key else "/"
        return f"s3:{bucket}", key
    path = rest if scheme == "" else "/" + rest.lstrip("/")
    return "local", os.path.realpath(os.path.expanduser(path))


def resolve_under_root(uri: str, root: str) -> str:
    """`uri` resolved against `root`, refused with ValueError unless it lies under `root`.

    A relative `uri` (no scheme, not absolute) is taken relative to the root. `..` segments,
    symlinks (local), another bucket and another scheme cannot escape. The result keeps the root's
    form: an `s3://bucket/key` URI, or an absolute local path for a local or `file://` root.
    """
    root_scheme, _ = split_scheme(root)
    scheme, rest = split_scheme(uri)
    if scheme == "" and not rest.startswith("/") and not rest.startswith("~"):
        uri = join_uri(root, rest)
        scheme = root_scheme
    if (scheme == "s3") != (root_scheme == "s3"):
        raise ValueError(f"{uri!r} is outside the storage root {root!r} (another scheme)")
    kind, path = _normalized(uri)
    root_kind, root_path = _normalized(root)
    if kind != root_kind:
        raise ValueError(f"{uri!r} is outside the storage root {root!r} (another bucket)")
    if not (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
        raise ValueError(f"{uri!r} is outside the storage root {root!r}")
    if kind.startswith("s3:"):
        return f"s3://{kind[3:]}{path}" if path != "/" else f"s3://{kind[3:]}"
    return path
