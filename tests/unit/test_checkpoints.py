"""One checkpoint resolver: local paths and file:// in place, s3:// copied and removed, the
checkpoint folder found under a run's root, clear errors. (MLflow URIs: tests/integration/
test_serve.py::test_mlflow_checkpoint_uri, against a real tracking store.)"""

from __future__ import annotations

import os

import pytest
from timeexpert import storage
from timeexpert.checkpoints import find_checkpoint_dir, local_checkpoint, local_copy


def _checkpoint(folder) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return str(folder)


def test_local_paths_are_used_in_place_and_the_checkpoint_is_found_below(tmp_path):
    ckpt = _checkpoint(tmp_path / "run" / "checkpoint")
    for uri in (ckpt, f"file://{ckpt}"):
        with local_checkpoint(uri) as d:
            assert d == ckpt
    with local_checkpoint(str(tmp_path / "run")) as d:  # a run root with one checkpoint inside
        assert d == ckpt
    with local_copy(str(tmp_path / "run")) as d:  # a plain folder, as it is
        assert d == str(tmp_path / "run")
    assert os.path.isfile(os.path.join(ckpt, "config.json"))  # nothing removed in place


def test_ambiguous_missing_and_empty_checkpoints_are_clear_errors(tmp_path):
    _checkpoint(tmp_path / "two" / "a")
    _checkpoint(tmp_path / "two" / "b")
    with pytest.raises(ValueError, match="holds 2 TimeExpert checkpoint folders"):
        find_checkpoint_dir(str(tmp_path / "two"), "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no TimeExpert checkpoint folders"):
        with local_checkpoint(str(tmp_path / "empty")):
            pass
    with pytest.raises(ValueError, match="does not exist"):
        with local_copy(str(tmp_path / "nowhere")):
            pass


@pytest.mark.slow
def test_s3_checkpoints_are_copied_and_the_copy_is_removed(tmp_path, s3_server):
    storage.upload_dir(_checkpoint(tmp_path / "ckpt"), f"{s3_server.root}/runs/r1/checkpoint")
    with local_checkpoint(f"{s3_server.root}/runs/r1") as d:
        assert os.path.isfile(os.path.join(d, "config.json"))
        assert os.path.getsize(os.path.join(d, "model.safetensors")) == 8
    assert not os.path.exists(d)
    with pytest.raises(ValueError, match="does not exist"):
        with local_checkpoint(f"{s3_server.root}/runs/nope"):
            pass
    with pytest.raises(RuntimeError, match="inside"):  # removed on errors in the block too
        with local_copy(f"{s3_server.root}/runs/r1") as d:
            raise RuntimeError("inside")
    assert not os.path.exists(d)
