"""Where a checkpoint URI points: one resolver for every reader (inference, Serve, training).

A URI names a folder: a local path or `file://` (used in place), `s3://` (copied through
`timeexpert.storage`), or an MLflow URI — `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
`runs:/RUN_ID/PATH`, `mlflow-artifacts:/...` — downloaded with `mlflow.artifacts` from the
tracking server of MLFLOW_TRACKING_URI. Copies live in a temporary folder that is removed when
the `with` block ends, so a reader loads what it needs inside the block.

`local_copy(uri)` yields that folder as it is (a tokenizer, a training checkpoint);
`local_checkpoint(uri)` yields the TimeExpert checkpoint in it: the folder itself when it holds
config.json, else its one sub-folder (at most three levels down) that does, so a run's artifact
root with one `checkpoint/` inside can be served as is. `read_config(uri)` reads only its
config.json (in place where the storage allows).

A training checkpoint is committed part by part (`persist_checkpoint`): each rank stores its files
(objects appear whole: `storage.put_file`), `train_state.json` last, then its commit marker
`commit/rank_{r:05d}.json` naming every part it stored with its size, the world size and the
Ray node the rank ran on (Ray Train's writes). A checkpoint is complete when every rank's marker
is there and every part it names has that size (`check_checkpoint`); a reader refuses a marked
checkpoint that is not (`local_copy`), a resume takes the newest complete one (`resumable`), and
`clean_incomplete` reports and removes the leftovers of a write that was cut short. A folder
without markers (written before they existed, an exported model) is read as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

from timeexpert import storage

log = logging.getLogger(__name__)

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
CONFIG = "config.json"  # the file that marks a TimeExpert checkpoint folder
TRAIN_STATE = "train_state.json"  # a training checkpoint's step and data position (rank 0)
COMMIT = "commit"  # the folder of a training checkpoint's commit markers, one per rank
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders under a run's folder


def commit_marker(rank: int) -> str:
    return f"{COMMIT}/rank_{rank:05d}.json"


# --- committing a checkpoint ------------------------------------------------------------------


def persist_checkpoint(local_dir: str, uri: str, *, rank: int, world_size: int, budget_s: float,
                       after_part: Callable[[str], None] | None = None,
                       node: str | None = None) -> float:
    """Store rank `rank`'s part of a checkpoint: every file under `local_dir` to the folder `uri`
    (`train_state.json` last), then its commit marker (with `node`, the Ray node id of the
    writer, when given). Unreachable storage is waited for (`storage.retrying`, `budget_s`
    seconds in all). `after_part(name)` is called after each stored file (fault injection).
    Returns the seconds waited."""
    parts = {}
    for folder, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(folder, name)
            parts[os.path.relpath(path, local_dir).replace(os.sep, "/")] = path
    waited = 0.0
    for name in sorted(parts, key=lambda n: (n == TRAIN_STATE, n)):
        _, w = storage.retrying(lambda: storage.put_file(parts[name], storage.join_uri(uri, name),
                                                         **storage.FAIL_FAST),
                                what=f"store {name} of checkpoint {uri}",
                                budget_s=max(budget_s - waited, 0.0))
        waited += w
        if after_part is not None:
            after_part(name)
    marker = {"rank": rank, "world_size": world_size,
              "parts": {name: os.path.getsize(path) for name, path in parts.items()}}
    if node is not None:
        marker["node"] = node
    marker = json.dumps(marker)
    _, w = storage.retrying(lambda: storage.write_text(storage.join_uri(uri, commit_marker(rank)),
                                                       marker, **storage.FAIL_FAST),
                            what=f"commit rank {rank}'s part of checkpoint {uri}",
                            budget_s=max(budget_s - waited, 0.0))
    return waited + w


@dataclass
class CheckpointCheck:
    """What `check_checkpoint` found in a checkpoint folder."""

    uri: str
    marked: bool  # it holds commit markers (else: written before them, or cut before the first)
    problems: list[str] = field(default_factory=list)  # what keeps a marked one from complete
    has_train_state: bool = False
    num_files: int = 0

    @property
    def complete(self) -> bool:
        return self.marked and not self.problems


def check_checkpoint(uri: str) -> CheckpointCheck:
    """Whether the checkpoint folder `uri` is complete: the markers of ranks 0..W-1 of one world
    size W, and every part they name stored at the size they name."""
    sizes = storage.file_sizes(uri)
    markers = [json.loads(storage.read_text(storage.join_uri(uri, name)))
               for name in sorted(sizes) if name.startswith(COMMIT + "/")]
    check = CheckpointCheck(uri=uri, marked=bool(markers), has_train_state=TRAIN_STATE in sizes,
                            num_files=len(sizes))
    if not markers:
        return check
    worlds = {m["world_size"] for m in markers}
    if len(worlds) > 1:
        check.problems.append(f"commit markers of different world sizes {sorted(worlds)}")
    missing = sorted(set(range(max(worlds))) - {m["rank"] for m in markers})
    if missing:
        check.problems.append(f"no commit marker of rank(s) {missing} (of {max(worlds)})")
    for m in markers:
        for name, size in sorted(m["parts"].items()):
            if name not in sizes:
                check.problems.append(f"{name} (rank {m['rank']}) is missing")
            elif sizes[name] != size:
                check.problems.append(f"{name} (rank {m['rank']}) has {sizes[name]} bytes, "
                                      f"its marker says {size}")
    return check


def refuse_incomplete(folder: str, uri: str) -> None:
    """Raise ValueError, saying what is missing, when `folder` (the copy or the place of the
    checkpoint `uri`) holds commit markers but is not complete (a write cut short); a folder
    without markers passes."""
    check = check_checkpoint(folder)
    if check.marked and check.problems:
        raise ValueError(f"checkpoint {uri!r} is incomplete (its write was cut short): "
                         + "; ".join(check.problems[:5])
                         + ("" if len(check.problems) <= 5 else
                            f"; and {len(check.problems) - 5} more")
                         + ". Use an earlier checkpoint of the run")


def resumable(uri: str) -> str:
    """The checkpoint a resume reads when Ray Train hands it `uri`: `uri` when complete (or
    unmarked but with its train state: written before markers), else the newest complete
    checkpoint beside it (Ray Train's folder names sort by time), with a warning."""
    check = check_checkpoint(uri)
    if check.complete or (not check.marked and check.has_train_state):
        return uri
    run, name = uri.rstrip("/").rsplit("/", 1)
    for other in sorted(storage.list_dirs(run), reverse=True):
        if other.startswith(CHECKPOINT_PREFIX) and other < name:
            if check_checkpoint(storage.join_uri(run, other)).complete:
                log.warning("checkpoint %s is incomplete (%s); resuming from the previous "
                            "complete one, %s", uri, "; ".join(check.problems) or "no markers",
                            other)
                return storage.join_uri(run, other)
    why = "; ".join(check.problems) or "no commit markers"
    raise ValueError(f"checkpoint {uri!r} is incomplete ({why}) and no complete checkpoint of "
                     "the run precedes it; start the run afresh under another name")


def clean_incomplete(run_uri: str, keep: Collection[str] = ()) -> list[str]:
    """Remove the checkpoint folders under the run folder `run_uri` whose write was cut short:
    marked but not complete, or unmarked without a train state (every complete checkpoint has
    one). Folders named in `keep` (those Ray Train's run state references) are reported, not
    removed. Returns the removed folders' URIs; each is logged with what it lacked. Empty
    folders are removed without a word."""
    removed = []
    for name in storage.list_dirs(run_uri):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        uri = storage.join_uri(run_uri, name)
        check = check_checkpoint(uri)
        if check.complete or (not check.marked and check.has_train_state):
            continue
        if not check.num_files and name not in keep:  # an empty folder (an object store's
            storage.remove_dir(uri)                     # folder marker left by a deletion)
            continue
        why = "; ".join(check.problems) or f"no commit marker and no {TRAIN_STATE}"
        if name in keep:
            log.warning("checkpoint %s is incomplete (%s) but Ray Train's run state names it: "
                        "kept; a resume skips it", uri, why)
            continue
        log.warning("removing incomplete checkpoint %s (a write cut short: %s)", uri, why)
        storage.remove_dir(uri)
        removed.append(uri)
    return removed


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder holding what `uri` names, removed on exit when it is a copy."""
    if uri.startswith(MLFLOW_PREFIXES):
        with tempfile.TemporaryDirectory(prefix="timeexpert-ckpt-") as dst:
            folder = _download_mlflow(uri, dst)
            refuse_incomplete(folder, uri)
            yield folder
        return
    scheme, rest = storage.split_scheme(uri)
    if scheme in ("", "file"):
        path = os.path.expanduser(rest)
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint directory {uri!r} does not exist")
        refuse_incomplete(path, uri)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="timeexpert-ckpt-") as dst:
        try:
            storage.download_dir(uri, dst)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {uri!r} does not exist") from None
        refuse_incomplete(dst, uri)
        yield dst


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[str]:
    """The local folder of the TimeExpert checkpoint (config.json) at `uri`; see the module."""
    with local_copy(uri) as root:
        found = find_checkpoint_dir(root, uri)
        if found != root:
            refuse_incomplete(found, uri)
        yield found


def read_config(uri: str) -> dict:
    """The config.json of the checkpoint at `uri`, as a dict: read in place from local or s3://
    storage when the folder holds it, else from a copy (MLflow URIs, a checkpoint deeper down)."""
    if not uri.startswith(MLFLOW_PREFIXES):
        try:
            return json.loads(storage.read_text(storage.join_uri(uri, CONFIG)))
        except FileNotFoundError:
            pass  # a folder holding the checkpoint further down
    with local_checkpoint(uri) as d, open(os.path.join(d, CONFIG)) as f:
        return json.load(f)


def find_checkpoint_dir(root: str, uri: str) -> str:
    """`root` when it holds config.json, else its one sub-folder (3 levels at most) that does."""
    if os.path.isfile(os.path.join(root, CONFIG)):
        return root
    base = root.rstrip(os.sep).count(os.sep)
    found = sorted(folder for folder, _, files in os.walk(root)
                   if CONFIG in files and folder.count(os.sep) - base <= 3)
    if len(found) != 1:
        raise ValueError(
            f"{uri!r} holds {'no' if not found else len(found)} TimeExpert checkpoint folders "
            f"(a folder with {CONFIG}){': ' + ', '.join(found) if found else ''}; point at one"
        )
    return found[0]


def _download_mlflow(uri: str, dst: str) -> str:
    import mlflow  # deferred on purpose: heavy, and only MLflow URIs need it

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except Exception as err:  # mlflow raises its own MlflowException / OSError kinds
        raise ValueError(f"cannot download MLflow checkpoint {uri!r}: {err}") from err
