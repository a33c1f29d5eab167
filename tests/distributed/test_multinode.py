"""Ray Train on a multi-node cluster (`benchmarks.local_servers.LocalNodes`): a head without CPUs
and two worker nodes of 2 CPUs on this machine, each with its own TMPDIR. The stage's two
workers (tiny_cpu, EP=2) are placed one per node (STRICT_SPREAD) and read and write only through
S3. Each rank's commit marker names the node it ran on.

Local disk: what the driver hands the workers (the run's config, the tokenizer's URI) holds no
local path, every node's TMPDIR is its own, and the node that leaves takes its TMPDIR with it,
so a worker that read a file another node wrote locally would fail the run (the resumed
worker's node never had it)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

STEPS, BATCH = 4, 2


@pytest.fixture(scope="module")
def nodes(s3_server, tmp_path_factory):  # s3 env first: the raylets and their workers inherit it
    import ray

    from benchmarks.local_servers import LocalNodes

    cluster = LocalNodes(tmp_path_factory.mktemp("nodes"))
    try:
        cluster.connect(log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _config(data_root: str, storage_root: str, **kw):
    from timeexpert.train.config import TrainConfig

    base = dict(preset="tiny_cpu", data_root=data_root, storage_root=storage_root, stage=2,
                num_workers=2, ep_size=2, placement_strategy="STRICT_SPREAD",
                cpus_per_worker=1.0, num_steps=STEPS, batch_size=BATCH, checkpoint_every=2,
                log_every=2, expert_update_every=2, eval_max_records=0)
    base.update(kw)
    return TrainConfig(**base)


def _tokenizer(cfg) -> str:
    from timeexpert.data import formats
    from timeexpert.train.fit import prepare_tokenizer

    return prepare_tokenizer(cfg, formats.read_manifest(f"{cfg.data_root}/manifests/train.jsonl"))


def _no_local_path(cfg, tokenizer: str) -> None:
    """What crosses from the driver to the workers names S3 objects only."""
    values = [v for v in cfg.to_dict().values() if isinstance(v, str)] + [tokenizer]
    local = [v for v in values if v.startswith(("/", "./", "file:", ".cache"))]
    assert not local, local
    assert tokenizer.startswith("s3://") and cfg.storage_root.startswith("s3://")


def _markers(uri: str) -> dict[int, dict]:
    from timeexpert import storage
    from timeexpert.checkpoints import COMMIT

    return {m["rank"]: m for m in (json.loads(storage.read_text(f))
                                   for f in storage.list_files(storage.join_uri(uri, COMMIT)))}


def _check_run(result, cfg) -> tuple[dict, set[str]]:
    """The run's counts and its checkpoints on S3: every folder complete, the ones Ray Train's
    run state names among them. Returns the last checkpoint's state and the folders not named."""
    from timeexpert import storage
    from timeexpert.checkpoints import check_checkpoint
    from timeexpert.train.fit import _registered

    assert result.checkpoint_uri.startswith("s3://"), result.checkpoint_uri
    assert result.metrics["step"] == cfg.num_steps
    assert result.metrics["samples"] == cfg.num_steps * cfg.batch_size * cfg.num_workers
    state = json.loads(storage.read_text(f"{result.checkpoint_uri}/train_state.json"))["state"]
    assert state["step"] == cfg.num_steps and state["samples"] == cfg.num_steps * cfg.batch_size
    run_dir = storage.join_uri(cfg.storage_root, cfg.run_name())
    kept = {d for d in storage.list_dirs(run_dir) if d.startswith("checkpoint_")}
    registered = _registered(run_dir)
    assert len(registered) == cfg.num_checkpoints_kept and registered <= kept, (registered, kept)
    for d in kept:
        check = check_checkpoint(storage.join_uri(run_dir, d))
        assert check.complete, check.problems
    assert not result.removed_incomplete
    return state, kept - registered


def test_two_workers_on_two_nodes_train_through_s3(nodes, tiny_s3_data, s3_server):
    from timeexpert.train.fit import fit

    cfg = _config(tiny_s3_data, f"{s3_server.root}/runs", name="spread")
    tok = _tokenizer(cfg)
    _no_local_path(cfg, tok)
    result = fit(cfg, tokenizer_uri=tok)
    state, unregistered = _check_run(result, cfg)
    assert "restores" not in state and not unregistered
    markers = _markers(result.checkpoint_uri)
    assert sorted(markers) == [0, 1]
    ran_on = {markers[r]["node"] for r in markers}
    assert ran_on == set(nodes.node_ids().values()), (ran_on, nodes.node_ids())  # one per node
