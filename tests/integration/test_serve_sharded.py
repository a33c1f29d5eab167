"""Expert-sharded replicas answer exactly as the monolithic replica on the same checkpoint.

Two applications on one local Serve: `mono` (the model in the replica, checkpoint from a local
dir) and `sharded` (ep_size=2: the replica's placement group holds 1 + 2 bundles, two EP workers
each hold half of every layer's expert slots and run the forward together over gloo all-to-all;
checkpoint from s3:// on a loopback moto server).
"""

from __future__ import annotations

import asyncio

import pytest

from serve_support import (
    build_checkpoint,
    free_port,
    make_videos,
    random_frames,
    start_serve,
    stop_serve,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def apps(tmp_path_factory, s3_server):
    import httpx
    from ray import serve

    from serve_apps.grounding import app
    from timeexpert import storage
    from timeexpert.serve.settings import ServiceConfig

    tmp = tmp_path_factory.mktemp("serve_sharded")
    ckpt = build_checkpoint(str(tmp / "ckpt"), seed=1)
    s3_ckpt = f"{s3_server.root}/checkpoints/tiny"
    storage.upload_dir(ckpt, s3_ckpt)
    videos = make_videos(str(tmp / "videos"), num=1, seed=3)
    port = free_port()
    start_serve(port)  # after s3_server: Ray workers inherit its AWS_* settings
    try:
        model = dict(max_batch_size=4, num_cpus=0.1, health_check_period_s=1.0,
                     autoscaling={"min_replicas": 1, "max_replicas": 1})
        common = dict(video={"allowed_roots": [str(tmp / "videos")]}, decoder={"num_cpus": 0.1},
                      ingress={"num_cpus": 0.1})
        serve.run(app(ServiceConfig(model={"checkpoint": ckpt, **model}, **common)), name="mono",
                  route_prefix="/mono", blocking=False)
        sharded = {"checkpoint": s3_ckpt, "ep_size": 2, "ep_worker_num_cpus": 0.2, **model}
        serve.run(app(ServiceConfig(model=sharded, **common)),
                  name="sharded", route_prefix="/sharded", blocking=False)
        base = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return all(httpx.get(f"{base}/{name}/healthz", timeout=5).status_code == 200
                           for name in ("mono", "sharded"))
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=240, what="both apps answering")
        yield base, videos
    finally:
        stop_serve()


def test_sharded_replica_holds_expert_slices(apps):
    import httpx
    import ray

    base, _ = apps
    mono = httpx.get(f"{base}/mono/v1/models/timeexpert", timeout=60).json()
    sharded = httpx.get(f"{base}/sharded/v1/models/timeexpert", timeout=60).json()
    assert (mono["ep_size"], mono["experts_per_rank"]) == (1, 8)
    assert (sharded["ep_size"], sharded["experts_per_rank"]) == (2, 4)
    assert sharded["active_experts"] == mono["active_experts"]
    assert sharded["checkpoint"].startswith("s3://")
    # the sharded replica reserved its EP group: one bundle for itself, one per worker
    bundles = [len(pg["bundles"]) for pg in ray.util.placement_group_table().values()
               if pg["state"] == "CREATED"]
    assert 3 in bundles, bundles


def test_http_answers_agree(apps):
    import httpx

    base, videos = apps
    bodies = {
        "moments": {"video": {"uri": videos[0]}, "query": "a red circle", "max_windows": 2},
        "highlights": {"video": {"uri": videos[0]}, "query": "blue square", "num_frames": 6},
        "captions": {"video": {"uri": videos[0]}, "max_events": 2},
    }
    with httpx.Client(timeout=180) as c:
        for path, body in bodies.items():
            a = c.post(f"{base}/mono/v1/{path}", json=body)
            b = c.post(f"{base}/sharded/v1/{path}", json=body)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            a, b = a.json(), b.json()
            a.pop("request_id"), b.pop("request_id")
            assert a == b, path
            assert a.get("windows") or a.get("events"), a  # a non-trivial answer was compared


def test_batched_predictions_agree_exactly(apps):
    """The same concurrent requests (batched by @serve.batch) through each model deployment's
    handle: generated tokens, events and saliency are identical."""
    from ray import serve

    from timeexpert.data.video import DecodedVideo

    requests = []
    for i, task in enumerate(["mr", "vhd", "dvc", "mr"]):
        frames, ts = random_frames(num=8, seed=i)
        video = DecodedVideo(frames=frames, timestamps=ts, duration=float(ts[-1]) + 0.5, fps=8.0)
        requests.append((video, dict(task=task, query=f"query number {i}", max_events=2,
                                     clip_len=2.0)))

    async def run(app_name):
        handle = serve.get_deployment_handle("GroundingModel", app_name=app_name)
        return await asyncio.gather(*[handle.predict.remote(v, **kw) for v, kw in requests])

    async def both():
        return await run("mono"), await run("sharded")

    mono, sharded = asyncio.run(both())
    for a, b in zip(mono, sharded):
        assert type(a).__name__ == "Prediction", a
        assert a == b
    assert any(p.events for p in mono)


def _actors(prefix: str) -> dict[str, str]:
    """{name: namespace} of the live named actors whose name starts with `prefix`."""
    import ray

    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def test_lost_ep_worker_replaces_the_whole_group(apps):
    """Killing one EP worker fails the replica's health check; Serve replaces the replica with a
    new placement group and EP group, and the sharded app answers as before."""
    import httpx
    import ray

    base, videos = apps
    body = {"video": {"uri": videos[0]}, "query": "a red circle", "max_windows": 2}
    (replica,) = _actors("SERVE_REPLICA::sharded#GroundingModel#")
    workers = _actors("EP_WORKER::sharded#GroundingModel#")
    assert len(workers) == 2 and all(replica.rsplit("#", 1)[1] in w for w in workers), workers
    victim = sorted(workers)[1]
    ray.kill(ray.get_actor(victim, namespace=workers[victim]), no_restart=True)
    wait_until(lambda: replica not in _actors("SERVE_REPLICA::sharded#GroundingModel#"),
               timeout=120, what="the sharded replica replaced")
    with httpx.Client(timeout=180) as c:
        expected = c.post(f"{base}/mono/v1/moments", json=body).json()

        def answers():
            r = c.post(f"{base}/sharded/v1/moments", json=body)
            return r.status_code == 200 and r.json()["windows"] == expected["windows"]

        wait_until(answers, timeout=240, interval=2, what="the new EP group answering")
    new_workers = _actors("EP_WORKER::sharded#GroundingModel#")
    assert len(new_workers) == 2 and not set(new_workers) & set(workers)
