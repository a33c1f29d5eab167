"""One checkpoint resolver: local paths and file:// in place, s3:// copied and removed, the
checkpoint folder found under a run's root, clear errors. (MLflow URIs: tests/integration/
test_serve.py::test_mlflow_checkpoint_uri, against a real tracking store.) Commits: a checkpoint
cut short in its write is refused, skipped by a resume and cleaned; a write waits out storage
that stops answering."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time

import pyarrow.fs
import pytest
from timeexpert import storage
from timeexpert.checkpoints import (
    check_checkpoint,
    clean_incomplete,
    commit_marker,
    find_checkpoint_dir,
    local_checkpoint,
    local_copy,
    persist_checkpoint,
    resumable,
)


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


class Crash(Exception):
    """A worker dying in the middle of a checkpoint write (the training loop exits the process)."""


def _rank_parts(folder, rank: int, step: int) -> str:
    """What rank `rank` of a 2-rank EP run writes into its local checkpoint folder."""
    (folder / "experts").mkdir(parents=True)
    (folder / "optim").mkdir()
    (folder / "experts" / f"ep_{rank:05d}-of-00002.safetensors").write_bytes(b"e" * (100 + rank))
    (folder / "optim" / f"rank_{rank:05d}.pt").write_bytes(b"o" * 50)
    if rank == 0:
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"m" * 200)
        (folder / "train_state.json").write_text(json.dumps({"state": {"step": step}}))
    return str(folder)


def _commit(tmp_path, dest: str, step: int, crash_after: str = "") -> None:
    """Both ranks store their parts into `dest`; rank 0 dies after `crash_after` when given."""
    def after_part(name: str) -> None:
        if name == crash_after:
            raise Crash(name)

    persist_checkpoint(_rank_parts(tmp_path / f"s{step}r1", 1, step), dest, rank=1,
                       world_size=2, budget_s=5)
    try:
        persist_checkpoint(_rank_parts(tmp_path / f"s{step}r0", 0, step), dest, rank=0,
                           world_size=2, budget_s=5, after_part=after_part)
    except Crash:
        pass


def test_a_checkpoint_cut_short_is_refused_skipped_by_a_resume_and_cleaned(tmp_path):
    run = str(tmp_path / "run")
    older = storage.join_uri(run, "checkpoint_2026-12-07_10-00-00.000000")
    newer = storage.join_uri(run, "checkpoint_2026-12-07_10-00-05.000000")
    unmarked = storage.join_uri(run, "checkpoint_2026-12-07_09-00-00.000000")  # before markers
    _commit(tmp_path, older, step=2)
    _commit(tmp_path, newer, step=4, crash_after="model.safetensors")
    storage.upload_dir(_rank_parts(tmp_path / "legacy", 0, 1), unmarked)

    assert check_checkpoint(older).complete
    check = check_checkpoint(newer)
    assert check.marked and not check.complete
    assert check.problems == ["no commit marker of rank(s) [0] (of 2)"]
    assert os.path.isfile(os.path.join(newer, "model.safetensors"))  # the part it did store
    assert not os.path.exists(os.path.join(newer, "train_state.json"))  # stored last: not yet
    with pytest.raises(ValueError, match=r"incomplete \(its write was cut short\): no commit "
                                         r"marker of rank\(s\) \[0\]"):
        with local_copy(newer):
            pass
    with local_checkpoint(older) as d:  # a complete one reads as before
        assert d == older
    assert resumable(newer) == older  # the half-written one is never read
    assert resumable(older) == older and resumable(unmarked) == unmarked

    os.makedirs(os.path.join(run, "checkpoint_2026-12-07_08-00-00.000000"))  # empty: not a write
    assert clean_incomplete(run, keep={"checkpoint_2026-12-07_10-00-05.000000"}) == []
    assert clean_incomplete(run) == [newer]
    assert sorted(storage.list_dirs(run)) == [os.path.basename(unmarked), os.path.basename(older)]


def test_a_part_of_the_wrong_size_or_missing_is_named(tmp_path):
    dest = str(tmp_path / "run" / "checkpoint_1")
    _commit(tmp_path, dest, step=2)
    with open(os.path.join(dest, "experts", "ep_00001-of-00002.safetensors"), "wb") as f:
        f.write(b"short")
    os.remove(os.path.join(dest, "optim", "rank_00000.pt"))
    assert check_checkpoint(dest).problems == [
        "optim/rank_00000.pt (rank 0) is missing",
        "experts/ep_00001-of-00002.safetensors (rank 1) has 5 bytes, its marker says 101",
    ]
    with pytest.raises(ValueError, match="no complete checkpoint of the run precedes it"):
        resumable(dest)
    marker = json.loads(storage.read_text(os.path.join(dest, commit_marker(1))))
    assert marker["world_size"] == 2 and marker["parts"]["optim/rank_00001.pt"] == 50


@pytest.fixture
def moto_endpoint(monkeypatch):
    """A moto server of this test's own on 127.0.0.1 (the session's `s3_server` cannot be
    stopped), the AWS settings pointing at it; yields (server, restart_after) where
    `restart_after(seconds)` starts it again on the same port that much later."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    restarted = []

    def restart_after(seconds: float) -> None:
        def restart():
            time.sleep(seconds)
            restarted.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            restarted[0].start()
        threading.Thread(target=restart, daemon=True).start()

    yield server, restart_after
    for s in restarted or [server]:
        s.stop()


@pytest.mark.slow
def test_a_write_waits_for_s3_that_stops_answering_and_loses_nothing(tmp_path, moto_endpoint):
    """The endpoint goes away for 4 s in the middle of a write; the write waits with backoff,
    says how long, and every part arrives whole."""
    server, restart_after = moto_endpoint
    storage.filesystem("s3://outage-test")[0].mkdir("outage-test")
    dest = "s3://outage-test/run/checkpoint_1"

    def outage(name: str) -> None:
        if name == "config.json":  # stop the endpoint after the first part, 4 s
            server.stop()
            restart_after(4)

    local = _rank_parts(tmp_path / "r0", 0, step=2)
    t0 = time.perf_counter()
    waited = persist_checkpoint(local, dest, rank=0, world_size=1, budget_s=60,
                                after_part=outage)
    assert 2.0 < waited <= time.perf_counter() - t0
    check = check_checkpoint(dest)
    assert check.complete, check.problems
    assert storage.file_sizes(dest)["model.safetensors"] == 200


@pytest.mark.slow
def test_ray_trains_own_writes_wait_for_s3_that_stops_answering(tmp_path, moto_endpoint):
    """What Ray Train writes itself (its run snapshot after each checkpoint) goes through
    `storage.ray_storage`'s filesystem: a write begun while the endpoint is away for 4 s lands
    when it returns, where pyarrow's default filesystem fails it at once."""
    assert storage.ray_storage(str(tmp_path / "runs")) == (str(tmp_path / "runs"), None)
    server, restart_after = moto_endpoint
    storage.filesystem("s3://snapshot-test")[0].mkdir("snapshot-test")
    path, fs = storage.ray_storage("s3://snapshot-test/runs")
    assert path == "snapshot-test/runs"
    fs = pickle.loads(pickle.dumps(fs))  # as Ray hands it to its controller
    default = pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                                      region="us-east-1")
    server.stop()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        with default.open_output_stream(f"{path}/default.json") as f:
            f.write(b"{}")
    restart_after(4)
    t0 = time.perf_counter()
    with fs.open_output_stream(f"{path}/snapshot.json") as f:
        f.write(b'{"step": 2}')
    assert time.perf_counter() - t0 > 2.0
    assert storage.read_text("s3://snapshot-test/runs/snapshot.json") == '{"step": 2}'
