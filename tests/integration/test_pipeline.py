"""The Ray Data pipeline end to end: local and S3 roots give identical batches, every kind of bad
file is skipped and counted exactly, a manifest pointing outside the root is refused, hooks and
task mixing apply. One Ray instance for the module."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from timeexpert import storage
from timeexpert.config import DataConfig, VideoConfig
from timeexpert.data import formats, synth
from timeexpert.data.collate import torch_collate
from timeexpert.data.pipeline import (
    build_dataset,
    caption_queries,
    decode_rows,
    mix_tasks,
    record_from_row,
)
from timeexpert.events import Event, Record, Task

pytestmark = pytest.mark.slow

MINI = dataclasses.replace(synth.SIZES["tiny"], name="pipe", num_videos={"train": 5})
VIDEO = VideoConfig(num_frames=4, height=48, width=64)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):  # s3_server first: the workers inherit its AWS_* env vars
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("pipe") / "data")
    synth.generate(MINI, root, seed=1, workers=1)
    return root


def _collect(vds) -> dict[str, dict]:
    rows = {}
    for batch in vds.dataset.iter_batches(batch_size=7, batch_format="numpy"):
        for i, rid in enumerate(batch["id"]):
            assert rid not in rows, f"row {rid} twice"
            rows[rid] = {k: v[i] for k, v in batch.items()}
    return rows


def test_local_and_s3_roots_give_identical_batches(ray_cluster, local_root, s3_server):
    s3_root = f"{s3_server.root}/pipe-data"
    storage.upload_dir(local_root, s3_root)
    local_ds = build_dataset(DataConfig(root=local_root, video=VIDEO), preserve_order=True)
    remote_cfg = DataConfig(root=s3_root, video=VIDEO, storage_options=s3_server.storage_options)
    remote_ds = build_dataset(remote_cfg, preserve_order=True)
    # batch by batch, in order: the same ids, frames, timestamps and annotations
    batches = [list(vds.dataset.iter_batches(batch_size=7, batch_format="numpy"))
               for vds in (local_ds, remote_ds)]
    assert len(batches[0]) == len(batches[1]) > 1
    for a, b in zip(*batches):
        assert a.keys() == b.keys()
        for key in a:
            if key != "video":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    local, remote = _collect(local_ds), _collect(remote_ds)
    records = formats.read_manifest(f"{local_root}/manifests/train.jsonl")
    assert set(local) == set(remote) == {r.id for r in records}
    for rid, row in local.items():
        other = remote[rid]
        assert other["video"].startswith("s3://") and row["video"].startswith("/")
        for key in row:
            if key != "video":
                np.testing.assert_array_equal(row[key], other[key], err_msg=f"{rid}.{key}")
        assert row["frames"].shape == (4, 48, 64, 3) and row["frames"].dtype == np.uint8
        assert row["frame_mask"].all()
    # the rows carry the records
    by_id = {r.id: r for r in records}
    for rid, row in local.items():
        back = record_from_row(row)
        assert dataclasses.replace(back, video=by_id[rid].video).to_dict() == by_id[rid].to_dict()


def test_each_bad_file_is_skipped_and_counted(ray_cluster, local_root, tmp_path):
    """Two good videos, one of each corruption, one missing file, two unusable annotations:
    the dataset completes, twice (two epochs), with exact counts by reason."""
    root = str(tmp_path / "bad")
    good = formats.read_manifest(f"{local_root}/manifests/train.jsonl")
    good = [r for r in good if r.task == Task.DVC][:2]
    records = []
    for r in good:
        storage.write_bytes(f"{root}/{r.video}", storage.read_bytes(f"{local_root}/{r.video}"))
        records.append(r)
    data = storage.read_bytes(f"{local_root}/{good[0].video}")
    for kind in synth.CORRUPTIONS:
        storage.write_bytes(f"{root}/videos/{kind}.mp4", synth.corrupt_video(data, kind))
        records.append(dataclasses.replace(good[0], id=f"bad_{kind}", video=f"videos/{kind}.mp4"))
    records.append(dataclasses.replace(good[0], id="bad_missing", video="videos/missing.mp4"))
    records.append(dataclasses.replace(good[0], id="bad_late_event", events=[Event(start=1, end=99)]))
    text = formats.dump_manifest(records) + "{this line is not json\n"
    storage.write_text(f"{root}/manifests/train.jsonl", text)

    vds = build_dataset(DataConfig(root=root, video=VIDEO, decode_batch_size=3))
    for _ in range(2):
        rows = _collect(vds)
        assert set(rows) == {r.id for r in good}
    expected = {kind: 1 for kind in synth.CORRUPTIONS} | {"missing": 1, "bad_annotation": 2}
    assert vds.skip_summary() == expected
    assert vds.skipped_ids() == {f"bad_{k}": k for k in (*synth.CORRUPTIONS, "missing")}
    metrics = vds.metrics()
    assert metrics["data/skipped/moov_less"] == 1.0 and metrics["data/skipped_total"] == 8.0
    # decoded once (a training worker): a bad video decoded once skips each of its records
    from timeexpert.data.pipeline import _skip_counter_class

    counter = _skip_counter_class().remote()
    missing = next(row for row in vds.rows if row["id"] == "bad_missing")
    rows = decode_rows([*vds.rows, {**missing, "id": "bad_missing_2"}],
                       DataConfig(root=root, video=VIDEO), counter)
    assert sorted(rows["id"]) == sorted(r.id for r in good)
    assert ray_cluster.get(counter.summary.remote()) == (
        {kind: 1 for kind in synth.CORRUPTIONS} | {"missing": 2})


def test_a_decode_once_worker_decodes_its_rows_once_and_each_epoch_is_a_seeded_permutation(
        ray_cluster, local_root, tmp_path, monkeypatch):
    """A decode-once training worker decodes its rows in its own process, once, each video once
    for all its records (the frames the Ray Data pipeline gives; later epochs need no video);
    every epoch is a permutation of them seeded by (seed, rank, epoch), so a resumed position
    yields the same batches."""
    from timeexpert.data import pipeline
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.batches import worker_batches

    root = str(tmp_path / "once")
    shutil.copytree(local_root, root)
    config = DataConfig(root=root, video=VIDEO)
    vds = build_dataset(config, preserve_order=True)
    decodes = []

    def decode():
        decodes.append(1)
        return decode_rows(vds.rows, config, vds.counter)

    decoded_videos = []
    decode_frames = pipeline.decode_frames

    def counting(src, **kwargs):
        decoded_videos.append(src)
        return decode_frames(src, **kwargs)

    monkeypatch.setattr(pipeline, "decode_frames", counting)
    rows = decode_rows(vds.rows, config)
    monkeypatch.undo()
    videos = {row["video"] for row in vds.rows}
    assert len(decoded_videos) == len(videos) < len(vds.rows)
    piped = _collect(vds)
    assert sorted(rows["id"]) == sorted(piped)
    for i, rid in enumerate(rows["id"]):
        np.testing.assert_array_equal(rows["frames"][i], piped[rid]["frames"])
    cfg = TrainConfig(data_root=root, batch_size=3, decode_once=True, seed=5)
    per_epoch = len(rows["id"]) // 3
    stream = worker_batches(decode, cfg, epoch=0, skip=0, rank=0)
    seen = [next(stream)]
    shutil.rmtree(f"{root}/videos")
    seen += [next(stream) for _ in range(3 * per_epoch - 1)]
    assert len(decodes) == 1 and vds.skip_summary() == {}
    epochs = [[list(b["id"]) for b, e, _ in seen if e == k] for k in range(3)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert len(batches) == per_epoch and len(set(flat)) == len(flat) == 3 * per_epoch
        assert set(flat) <= set(rows["id"])
    assert all(b["frames"].shape == (3, 4, 48, 64, 3) for b, _, _ in seen)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    batch, epoch, index = next(worker_batches(lambda: rows, cfg, epoch=1, skip=2, rank=0))
    assert (epoch, index) == (1, 3) and list(batch["id"]) == epochs[1][2]
    assert list(next(worker_batches(lambda: rows, cfg, epoch=0, skip=0, rank=1))[0]["id"]) != epochs[0][0]
    in_order = cfg.replace(shuffle_buffer=0)
    assert list(next(worker_batches(lambda: rows, in_order, epoch=0, skip=0, rank=0))[0]["id"]) == \
        list(rows["id"][:3])


@pytest.mark.parametrize(
    "video", ["../outside.mp4", "/etc/passwd", "s3://other-bucket/v.mp4", "videos/../../x.mp4"]
)
def test_manifest_outside_the_root_is_refused(ray_cluster, local_root, tmp_path, video):
    root = str(tmp_path / "r")
    rec = Record(id="evil", video=video, duration=5, task="mr", query="q",
                 events=[Event(start=0, end=1)])
    formats.write_manifest([rec], f"{root}/manifests/train.jsonl")
    with pytest.raises(ValueError, match="manifest refused: record 'evil'.*outside"):
        build_dataset(DataConfig(root=root, video=VIDEO))
    with pytest.raises(ValueError, match="outside"):  # the manifest URI itself, too
        build_dataset(DataConfig(root=local_root, manifest="../{split}.jsonl", video=VIDEO))


def test_hooks_fps_sampling_and_torch_batches(ray_cluster, local_root):
    def preprocess(batch):
        batch["pixels"] = batch["frames"].astype(np.float32) / 255.0
        return batch

    def tokenize(batch):
        batch["query_len"] = np.array([len(q.split()) for q in batch["query"]], np.int64)
        return batch

    cfg = DataConfig(
        root=local_root, video=VideoConfig(num_frames=None, fps=1.0, max_frames=12, height=32, width=32),
        task_weights={"mr": 1.0},
    )
    vds = build_dataset(cfg, preprocess=preprocess, tokenize=tokenize)
    assert {r.task for r in vds.records} == {Task.MR}
    n = 0
    for b in vds.dataset.iter_torch_batches(batch_size=4, collate_fn=torch_collate()):
        assert b["frames"].shape[1:] == (12, 32, 32, 3) and b["pixels"].dtype.is_floating_point
        assert isinstance(b["query"], list) and b["query_len"].tolist() == [len(q.split()) for q in b["query"]]
        # the DVC records were mixed out, yet each row carries its video's captioned events (an
        # MR query of the synthetic set is one of them)
        for query, captions in zip(b["query"], b["video_captions"]):
            assert query in [e["caption"] for e in json.loads(captions)]
        for mask, ts, dur in zip(b["frame_mask"], b["timestamps"], b["duration"]):
            valid = ts[mask].numpy()
            # 1 fps over an 8-20 s video, capped at 12: evenly spread, increasing, inside the video
            assert 8 <= len(valid) <= 12 and np.all(np.diff(valid) > 0) and valid[-1] < dur
            assert (ts[~mask] == 0).all()
        n += len(b["id"])
    assert n == len(vds.records)


def test_mix_tasks_follows_weights():
    recs = [Record(id=f"{t}{i}", video="v.mp4", duration=10, task=t, query="")
            for t, k in (("mr", 60), ("vhd", 30), ("dvc", 10)) for i in range(k)]
    mixed = mix_tasks(recs, {"mr": 1, "vhd": 1, "dvc": 2}, seed=0)
    counts = {t: sum(r.task == t for r in mixed) for t in Task}
    assert counts == {Task.MR: 25, Task.VHD: 25, Task.DVC: 50, Task.GQA: 0}
    assert len({r.id for r in mixed if r.task == Task.DVC}) == 10  # upsampled with replacement
    assert mix_tasks(recs, {}, seed=0) == recs
    with pytest.raises(ValueError, match="no such records"):
        mix_tasks(recs[:5], {"dvc": 1}, seed=0)


def test_caption_queries_ask_every_captioned_event_not_yet_asked():
    events = [Event(1, 3, caption="the red circle grows"), Event(4, 6, caption="a blue square"),
              Event(7, 9, caption="")]
    recs = [Record(id="v", video="v.mp4", duration=10, task="dvc", query="", events=events),
            Record(id="v_0", video="v.mp4", duration=10, task="mr", query="The red circle grows",
                   events=[Event(1, 3)]),
            Record(id="w", video="w.mp4", duration=10, task="dvc", query="", events=events[:1])]
    made = caption_queries(recs)
    assert [(r.id, r.video, r.query, r.events[0].start, r.events[0].end, r.task) for r in made] == [
        ("v_cap1", "v.mp4", "a blue square", 4, 6, Task.MR),
        ("w_cap0", "w.mp4", "the red circle grows", 1, 3, Task.MR)]


def test_task_weights_take_every_task_and_refuse_others():
    assert DataConfig(task_weights={"gqa": 1, "mr": 2}).task_weights == {"gqa": 1, "mr": 2}
    for bad in ({"qa": 1}, {"mr": -1}):
        with pytest.raises(ValueError, match="task_weights must map tasks of"):
            DataConfig(task_weights=bad)
