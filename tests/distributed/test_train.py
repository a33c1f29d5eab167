"""Ray Train runs of the tiny model on tiny synthetic data: EP=2 + ZeRO-2 from and to S3 equals
EP=1, a killed worker resumes from the last checkpoint, a run resumes at another world size and
EP degree, and Ray Data streams frames from S3 into the workers when the run does not decode
once."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(s3_server):  # s3 env first: Ray workers inherit it
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def _config(**kw):
    from timeexpert.train.config import TrainConfig

    base = dict(preset="tiny_cpu", num_workers=2, stage=2, num_steps=4, batch_size=2,
                checkpoint_every=2, log_every=2, expert_update_every=2, eval_max_records=0,
                moe={"add_threshold": 0.05, "tau_min": 0.02})
    base.update(kw)
    return TrainConfig(**base)


def test_ep2_zero2_on_s3_matches_ep1(ray_cluster, tiny_s3_data, s3_server):
    from timeexpert import storage
    from timeexpert.data import formats
    from timeexpert.inference import GroundingModel
    from timeexpert.train.fit import fit, prepare_tokenizer

    # and both score grounding on the validation queries as they train (`val_every`): the
    # EP=2 ranks answer them in step
    cfg = _config(data_root=tiny_s3_data, storage_root=f"{s3_server.root}/runs", zero_stage=2,
                  val_every=2, val_records=3)
    tok = prepare_tokenizer(cfg, formats.read_manifest(f"{tiny_s3_data}/manifests/train.jsonl"))
    ep1 = fit(cfg.replace(name="ep1", ep_size=1), tokenizer_uri=tok)
    ep2 = fit(cfg.replace(name="ep2", ep_size=2), tokenizer_uri=tok)

    for r in (ep1, ep2):
        assert r.checkpoint_uri.startswith("s3://"), r.checkpoint_uri
        assert r.metrics["step"] == 4
    assert ep2.metrics["loss"] == pytest.approx(ep1.metrics["loss"], rel=2e-3)
    for key in ("loss_time", "loss_text", "aux_loss"):
        assert ep2.metrics[key] == pytest.approx(ep1.metrics[key], rel=5e-3, abs=1e-4), key
    assert ep2.metrics["experts/num_active"] == ep1.metrics["experts/num_active"]
    # each EP=2 rank held half of the expert weights through the run (built and read sharded)
    assert ep2.metrics["experts/params_on_rank"] * 2 == ep1.metrics["experts/params_on_rank"] > 0
    # each EP rank wrote its own expert slice (nobody gathered them); the rest is rank 0's
    files = storage.list_files(ep2.checkpoint_uri)
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert {"model.safetensors", "config.json", "train_state.json", "routing.json",
            "rank_00000.pt", "rank_00001.pt", "ep_00000-of-00002.safetensors",
            "ep_00001-of-00002.safetensors"} <= names, names
    assert "ep_00000-of-00001.safetensors" not in {f.rsplit("/", 1)[-1] for f in
                                                    storage.list_files(ep1.checkpoint_uri)}
    gm = GroundingModel.load(ep2.checkpoint_uri)  # the slices read whole
    assert gm.model.layers[0].ffn.w1_LFD.shape[0] == gm.model.config.moe["max_experts"]
    # the same weights as the EP=1 run's (the routing rates A_t differ a little by design: EP
    # pools the batch's tokens, data parallelism averages each rank's rate)
    ref = dict(GroundingModel.load(ep1.checkpoint_uri).model.named_parameters())
    for name, value in gm.model.named_parameters():
        torch.testing.assert_close(value, ref[name], rtol=1e-2, atol=1e-4, msg=name)
    state = json.loads(storage.read_text(f"{ep2.checkpoint_uri}/train_state.json"))["state"]
    assert state["step"] == 4 and state["samples"] == 4 * 2
    # the last report's validation score is the saved model's on the same queries
    from timeexpert.train.batches import data_config
    from timeexpert.train.validation import ValidationProbe

    probe = ValidationProbe.build(data_config(cfg, gm.model.config), "val", 3)
    assert len(probe.records) == 3
    for r in (ep1, ep2):
        saved = GroundingModel.load(r.checkpoint_uri)
        assert r.metrics["val/mr/R1@0.5"] == probe.score(saved.model, saved.tokenizer)


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tiny_s3_data, tmp_path):
    from timeexpert.data import formats
    from timeexpert.train.checkpoint import read_train_state
    from timeexpert.train.fit import fit, prepare_tokenizer

    cfg = _config(data_root=tiny_s3_data, storage_root=str(tmp_path), name="ft", num_steps=5,
                  ep_size=2, max_failures=1, fail_at_step=3)
    tok = prepare_tokenizer(cfg, formats.read_manifest(f"{tiny_s3_data}/manifests/train.jsonl"))
    result = fit(cfg, tokenizer_uri=tok)
    assert result.metrics["step"] == 5
    state = read_train_state(result.checkpoint_uri)["state"]
    # rank 1 died after step 3; the group restarted from the step-2 checkpoint, not from zero
    assert state["restores"] == 1
    assert state["step"] == 5 and state["samples"] == 5 * 2


def test_a_crash_in_the_middle_of_a_checkpoint_resumes_from_the_previous_one(
        ray_cluster, tiny_s3_data, s3_server):
    """Rank 0 dies in step 4's checkpoint write, once it has stored the model (rank 1 has stored
    and committed its part): Ray Train restarts the group from step 2's checkpoint, the half
    written one is never read, and the run reports and removes it at the end."""
    from timeexpert import storage
    from timeexpert.checkpoints import check_checkpoint
    from timeexpert.data import formats
    from timeexpert.train.fit import fit, prepare_tokenizer

    cfg = _config(data_root=tiny_s3_data, storage_root=f"{s3_server.root}/runs", name="cut",
                  num_steps=6, ep_size=2, max_failures=1, fail_at_step=4, fail_rank=0,
                  fail_after_part="model.safetensors")
    tok = prepare_tokenizer(cfg, formats.read_manifest(f"{tiny_s3_data}/manifests/train.jsonl"))
    result = fit(cfg, tokenizer_uri=tok)
    state = json.loads(storage.read_text(f"{result.checkpoint_uri}/train_state.json"))["state"]
    assert state["resumed_at"] == [2] and state["restores"] == 1
    assert state["step"] == 6 and state["samples"] == 6 * 2
    assert len(result.removed_incomplete) == 1, result.removed_incomplete
    assert not storage.exists(result.removed_incomplete[0])
    run_dir = storage.join_uri(cfg.storage_root, cfg.run_name())
    kept = [d for d in storage.list_dirs(run_dir) if d.startswith("checkpoint_")]
    assert len(kept) == cfg.num_checkpoints_kept
    assert all(check_checkpoint(storage.join_uri(run_dir, d)).complete for d in kept)


def test_a_run_resumes_at_another_world_size(ray_cluster, tiny_s3_data, tmp_path):
    """Two workers at EP=2 with ZeRO-2 write step 4; the same run resumed on one worker at EP=1
    goes on to step 6 with the optimizer state carried over: the experts' moments resharded by
    name, the dense ones (ZeRO partitions) gathered at the write and re-split at the read."""
    from timeexpert.data import formats
    from timeexpert.train.checkpoint import ZERO_DENSE, optim_file, read_train_state
    from timeexpert.train.fit import fit, prepare_tokenizer

    cfg = _config(data_root=tiny_s3_data, storage_root=str(tmp_path), name="ws", ep_size=2,
                  zero_stage=2)
    tok = prepare_tokenizer(cfg, formats.read_manifest(f"{tiny_s3_data}/manifests/train.jsonl"))
    first = fit(cfg, tokenizer_uri=tok)
    assert read_train_state(first.checkpoint_uri)["layout"] == {
        "world_size": 2, "ep_size": 2, "zero_stage": 2}
    second = fit(cfg.replace(num_workers=1, ep_size=1, num_steps=6), tokenizer_uri=tok)
    written = read_train_state(second.checkpoint_uri)
    assert written["layout"] == {"world_size": 1, "ep_size": 1, "zero_stage": 2}
    state = written["state"]
    assert state["step"] == 6 and state["restores"] == 1
    assert state["samples"] == 4 * 2 * 2 + 2 * 2  # the run's total: 2 ranks x 4 steps, then 1 x 2
    # the routed parameters' AdamW went on counting from step 4 (a fresh one would be at <= 2)
    saved = torch.load(os.path.join(second.checkpoint_uri, optim_file(0)), weights_only=False)
    steps = [float(v["step"]) for v in saved["local"]["state"].values()]
    assert steps and max(steps) == 6 and min(steps) > 2, steps
    # and the dense parameters' ZeRO moments, gathered by name, re-split onto one rank
    dense = torch.load(os.path.join(second.checkpoint_uri, ZERO_DENSE), weights_only=False)
    assert dense["step"] == 6 and dense["state"]


def test_streamed_frames_from_s3_train_the_workers(ray_cluster, tiny_s3_data, tmp_path):
    """decode_once=False: no worker decodes; Ray Data's decode tasks read the mp4s through s3fs
    every epoch and stream them into the workers' dataset shards (the steps run past one epoch of
    each rank's records, so a second streaming pass feeds it)."""
    from timeexpert.data import formats
    from timeexpert.train.fit import fit, prepare_tokenizer

    records = formats.read_manifest(f"{tiny_s3_data}/manifests/train.jsonl")
    cfg = _config(data_root=tiny_s3_data, storage_root=str(tmp_path), name="stream",
                  decode_once=False, num_steps=2 * len(records) // 4 + 2)
    result = fit(cfg, tokenizer_uri=prepare_tokenizer(cfg, records))
    assert result.metrics["step"] == cfg.num_steps and result.metrics["epoch"] >= 1
    assert result.metrics["data/decode_s"] == 0.0  # no decode-once in the workers
    assert result.metrics["data/skipped_total"] == 0
    assert math.isfinite(result.metrics["loss"])
