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
import threading

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


def _check_run(result, cfg, *, cut_short_ok: bool = False) -> tuple[dict, set[str]]:
    """The run's counts and its checkpoints on S3: every folder complete, the ones Ray Train's
    run state names among them; none removed as cut short unless `cut_short_ok` (a node that
    left while its rank was writing). Returns the last checkpoint's state and the folders not
    named."""
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
    if not cut_short_ok:
        assert not result.removed_incomplete
    assert not set(result.removed_incomplete) & {storage.join_uri(run_dir, d) for d in kept}
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


def test_a_node_that_leaves_is_replaced_and_the_run_resumes(nodes, tiny_s3_data, s3_server,
                                                           tmp_path):
    """When the first checkpoint is registered, node b leaves (its processes killed, its TMPDIR
    deleted) and node c joins: the group restarts on a and c from the last complete checkpoint,
    ends with every step and sample counted, and its MLflow run (a tracking server on loopback)
    shows the restart."""
    from mlflow.tracking import MlflowClient

    from benchmarks.faults import when_writing
    from benchmarks.local_servers import MlflowServer
    from timeexpert import storage, tracking
    from timeexpert.train.fit import fit

    mlflow = MlflowServer(tmp_path)
    mlflow.start()
    cfg = _config(tiny_s3_data, f"{s3_server.root}/runs", name="lost", num_steps=6,
                  max_failures=2, tracking_uri=mlflow.uri, experiment="nodes")
    cfg = cfg.replace(mlflow_run_id=tracking.create_run(mlflow.uri, cfg.experiment, cfg.name))
    tok = _tokenizer(cfg)
    _no_local_path(cfg, tok)
    before = nodes.node_ids()
    replaced = threading.Event()

    def replace() -> None:
        nodes.remove("b")
        nodes.add("c")
        replaced.set()

    stop = threading.Event()
    watcher = when_writing(storage.join_uri(cfg.storage_root, cfg.run_name()), replace, stop,
                           new_checkpoint=False)
    try:
        result = fit(cfg, tokenizer_uri=tok)
        tracking.end_run(mlflow.uri, cfg.mlflow_run_id)  # the workers sent their metrics on ending
        restores = MlflowClient(mlflow.uri).get_metric_history(cfg.mlflow_run_id, "restores")
    finally:
        stop.set()
        watcher.join(timeout=120)
        mlflow.stop()
    assert replaced.is_set()
    # a checkpoint both ranks stored but whose registration the loss cut short stays, complete
    # (Ray Train's run state does not name it, so `fit` does not remove it)
    state, _ = _check_run(result, cfg, cut_short_ok=True)
    assert state["restores"] >= 1 and state["resumed_at"][0] in (2, 4), state
    assert max(m.value for m in restores) == state["restores"], restores  # the restart, in MLflow
    after = nodes.node_ids()
    ran_on = {m["node"] for m in _markers(result.checkpoint_uri).values()}
    assert ran_on == {after["a"], after["c"]}, (ran_on, before, after)
    assert before["b"] not in ran_on


def test_an_expert_sharded_replica_spans_two_nodes_and_survives_losing_one(nodes, s3_server,
                                                                           tmp_path):
    """The model replica's two EP workers sit on two nodes (STRICT_SPREAD over its 1 + 2
    bundles; checkpoint and video on S3). The node of EP rank 1 leaves and another joins:
    requests fail only while Serve replaces the replica, and none fail after."""
    import httpx
    import ray
    from ray import serve

    from serve_apps.grounding import app
    from serve_support import build_checkpoint, free_port, make_videos, wait_until
    from timeexpert import storage
    from timeexpert.serve.settings import ServiceConfig

    nodes.add("d")  # three worker nodes: one per bundle
    ckpt, videos = f"{s3_server.root}/checkpoints/multinode", f"{s3_server.root}/serve-videos"
    storage.upload_dir(build_checkpoint(str(tmp_path / "ckpt")), ckpt)
    (video,) = make_videos(str(tmp_path / "videos"), num=1)
    storage.put_file(video, f"{videos}/v.mp4")
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    body = {"video": {"uri": f"{videos}/v.mp4"}, "query": "a red circle", "max_windows": 2}
    try:
        model = dict(checkpoint=ckpt, ep_size=2, ep_placement="STRICT_SPREAD", num_cpus=0.5,
                     ep_worker_num_cpus=0.5, max_batch_size=2, health_check_period_s=1.0,
                     ep_timeout_s=20, autoscaling={"min_replicas": 1, "max_replicas": 1})
        config = ServiceConfig(model=model, video={"allowed_roots": [videos]},
                               decoder={"num_cpus": 0.1}, ingress={"num_cpus": 0.1})
        # not serve.run: it waits for ever for an application whose replicas cannot be placed
        serve.run_many([serve.RunTarget(app(config), name="grounding", route_prefix="/")],
                       wait_for_applications_running=False)

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, timeout=300, interval=2, what="the sharded replica ready")
        except TimeoutError as e:
            raise AssertionError(f"{e}: {serve.status()}; nodes {nodes.node_ids()}; free "
                                 f"{ray.available_resources()}") from None
        with httpx.Client(base_url=base, timeout=120) as c:
            assert c.post("/v1/moments", json=body).status_code == 200
            before = _ep_nodes()
            names = {node_id: name for name, node_id in nodes.node_ids().items()}
            assert len(set(before.values())) == 2 and set(before.values()) <= set(names), before
            lost = names[before[1]]
            nodes.remove(lost)
            nodes.add("e")
            statuses = []

            def answers() -> bool:
                try:
                    statuses.append(c.post("/v1/moments", json=body).status_code)
                except httpx.HTTPError as e:
                    statuses.append(type(e).__name__)
                return statuses[-1] == 200

            wait_until(answers, timeout=300, interval=2, what="answers again without " + lost)
            after = [c.post("/v1/moments", json=body).status_code for _ in range(5)]
        assert after == [200] * 5, (statuses, after)
        assert all(s in (500, 502, 503, 504, 200) or isinstance(s, str) for s in statuses)
        now = _ep_nodes()
        assert len(set(now.values())) == 2 and before[1] not in now.values(), (before, now)
    finally:
        serve.shutdown()


def _ep_nodes() -> dict[int, str]:
    """{EP rank: Ray node id} of the model replica's live EP workers."""
    import ray

    found = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("EP_WORKER::"):
            rank = int(actor["name"].rsplit("#rank", 1)[1])
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                found[rank] = ray.get(handle.node_id.remote(), timeout=30)
            except (ray.exceptions.RayError, ValueError):
                continue  # a worker of the replica going away
    return found
