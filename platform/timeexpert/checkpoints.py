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
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator

from timeexpert import storage

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
CONFIG = "config.json"  # the file that marks a TimeExpert checkpoint folder


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder holding what `uri` names, removed on exit when it is a copy."""
    if uri.startswith(MLFLOW_PREFIXES):
        with tempfile.TemporaryDirectory(prefix="timeexpert-ckpt-") as dst:
            yield _download_mlflow(uri, dst)
        return
    scheme, rest = storage.split_scheme(uri)
    if scheme in ("", "file"):
        path = os.path.expanduser(rest)
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint directory {uri!r} does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="timeexpert-ckpt-") as dst:
        try:
            storage.download_dir(uri, dst)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {uri!r} does not exist") from None
        yield dst


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[str]:
    """The local folder of the TimeExpert checkpoint (config.json) at `uri`; see the module."""
    with local_copy(uri) as root:
        yield find_checkpoint_dir(root, uri)


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
