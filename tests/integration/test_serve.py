"""The grounding service on a real local Serve, over real HTTP on 127.0.0.1.

One application for the module (built through the typed builder `serve_apps.grounding:app`):
every endpoint on a synthetic mp4 (by allowed URI and by data URL), every bad input's 4xx with
the replica staying up, bearer auth, a killed model replica replaced, and the autoscaler adding a
replica under load (short upscale delay). The checkpoint it serves is a
`models:/NAME/VERSION` registered on a real MLflow server. The YAML config and the input checks
are tested without a cluster.
"""

from __future__ import annotations

import base64
import math
import os
import pathlib
import threading
import time

import pytest
import yaml

from mlflow_support import running_mlflow_server
from serve_support import (
    build_checkpoint,
    free_port,
    make_videos,
    start_serve,
    stop_serve,
    wait_until,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
MAX_UPLOAD_MB = 0.5


# --- without a cluster --------------------------------------------------------------------------


def test_config_yaml_is_a_valid_service_config():
    """serve_apps/config.yaml is a valid Serve deploy config whose `args` ARE a ServiceConfig
    (validated into it as `serve run` does), which builds; autoscaling lives in `args` only."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from timeexpert.serve.settings import ServiceConfig

    raw = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app_schema,) = schema.applications
    assert not app_schema.deployments, "Serve options belong in args (ServiceConfig), not here"
    assert schema.logging_config.enable_access_log is False
    config = ServiceConfig.model_validate(app_schema.args)
    # every key of the YAML is a field (extra="forbid"), and the YAML spells out the model's own
    # defaults: a default changed in one place and not the other fails here
    assert config.model_dump(exclude={"auth_token"}) == ServiceConfig.model_validate(
        {"model": {"checkpoint": config.model.checkpoint, "tracking_uri": config.model.tracking_uri},
         "video": {"allowed_roots": config.video.allowed_roots}}
    ).model_dump(exclude={"auth_token"})
    # its default checkpoint is the one `make demo` registers (jobs/demo.py REGISTERED_MODEL)
    assert config.model.checkpoint == "models:/timeexpert-demo/latest"
    # relative paths: from where `serve run` starts (the repository root, as make demo runs)
    assert config.model.tracking_uri == f"sqlite:///{os.path.abspath('.cache/demo/mlflow.db')}"
    assert config.video.allowed_roots == [os.path.abspath(".cache/demo/data/small")]
    builder = import_attr(app_schema.import_path)
    application = call_user_app_builder_with_args_if_necessary(builder, app_schema.args)
    assert type(application).__name__ == "Application"


def test_service_config_from_cli_words():
    """`serve run serve_apps.grounding:app key=value ...` passes strings, dotted for a nested
    field; bad values fail naming the field and the accepted range."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_apps.grounding import app
    from timeexpert.serve.settings import ServiceConfig

    words = {"model.checkpoint": "runs/ckpt", "video.allowed_roots": "/a, s3://b/v",
             "model.max_batch_size": "4", "model.ep_size": "2",
             "model.autoscaling.max_replicas": "3", "decoder.num_cpus": "0.25"}
    cfg = ServiceConfig.model_validate(words)
    assert cfg.model.checkpoint == os.path.abspath("runs/ckpt")  # made absolute where built
    assert cfg.video.allowed_roots == ["/a", "s3://b/v"] and cfg.model.max_batch_size == 4
    assert cfg.model.autoscaling.max_replicas == 3 and cfg.decoder.num_cpus == 0.25
    options = cfg.model.deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    call_user_app_builder_with_args_if_necessary(app, words)
    uri = ServiceConfig.model_validate(
        {"model": {"checkpoint": "models:/m/1", "tracking_uri": "sqlite:///x/mlflow.db"}}).model
    assert uri.checkpoint == "models:/m/1"
    assert uri.tracking_uri == f"sqlite:///{os.path.abspath('x/mlflow.db')}"
    assert uri.deployment_options()["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"MLFLOW_TRACKING_URI": uri.tracking_uri}}
    for bad, match in [
        ({"model.checkpoint": "c", "unknown_field": "1"}, "unknown_field"),
        ({"model.checkpoint": "c", "model.autoscaling.min_replicas": "3"},
         r"max_replicas \(2\) must be >= min_replicas \(3\)"),
        ({"model.checkpoint": "c", "model.max_batch_size": "0"}, "max_batch_size"),
        ({"video.max_frames": "8"}, "model"),  # the checkpoint is required
    ]:
        with pytest.raises(ValueError, match=match):
            ServiceConfig.model_validate(bad)


def test_video_uri_allow_list(tmp_path):
    from timeexpert.serve.inputs import RequestError, decode_data_url, resolve_video_uri

    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_bytes(b"x")
    roots = [str(root), "s3://bucket/videos"]
    assert resolve_video_uri("sub/a.mp4", roots) == str(root / "sub" / "a.mp4")
    assert resolve_video_uri(f"file://{root}/sub/a.mp4", roots) == str(root / "sub" / "a.mp4")
    assert resolve_video_uri("s3://bucket/videos/x.mp4", roots) == "s3://bucket/videos/x.mp4"
    os.symlink("/etc", root / "link")
    for uri, status in [
        ("/etc/passwd", 403), ("sub/../../x.mp4", 403), (f"{root}/sub/../a.mp4", 403),
        ("link/passwd", 403), ("s3://other/videos/x.mp4", 403), ("s3://bucket/videos2/x", 403),
        ("http://example.com/v.mp4", 400), ("https://x/v.mp4", 400), ("ftp://x/v", 400),
        ("data:video/mp4;base64,AAAA", 400),
    ]:
        with pytest.raises(RequestError) as info:
            resolve_video_uri(uri, roots)
        assert info.value.status == status, uri
    assert decode_data_url("data:video/mp4;base64," + base64.b64encode(b"abc").decode(), 10) == b"abc"
    for url, status in [
        ("data:text/plain;base64,YWJj", 415), ("data:video/mp4,abc", 400),
        ("data:video/mp4;base64,!!!", 400), ("nodata", 400),
        ("data:video/mp4;base64," + base64.b64encode(b"x" * 100).decode(), 413),
    ]:
        with pytest.raises(RequestError) as info:
            decode_data_url(url, 50)
        assert info.value.status == status, url


def test_video_list_stays_inside_the_allowed_roots(tmp_path):
    """The page's picker lists the video files under the roots, by path, as the URIs a request
    takes; a symlink out of a root and a missing root list nothing; `limit` truncates."""
    from timeexpert.serve.inputs import list_videos, resolve_video_uri

    root, other, outside = tmp_path / "videos", tmp_path / "more", tmp_path / "outside"
    for folder in (root / "sub", other, outside):
        folder.mkdir(parents=True)
    for path in (root / "b.mp4", root / "sub" / "a.MOV", root / "notes.txt", other / "c.webm",
                 outside / "x.mp4"):
        path.write_bytes(b"x")
    os.symlink(outside / "x.mp4", root / "link.mp4")
    os.symlink(outside, root / "linked")
    roots = [str(root), str(other), str(tmp_path / "missing")]
    found, truncated = list_videos(roots, limit=10)
    assert found == [(str(root / "b.mp4"), "b.mp4"), (str(root / "sub" / "a.MOV"), "sub/a.MOV"),
                     (str(other / "c.webm"), "c.webm")] and not truncated
    assert all(resolve_video_uri(uri, roots) == uri for uri, _ in found)
    assert list_videos(roots, limit=2) == (found[:2], True)


def test_decode_cache_is_keyed_by_content_version(tmp_path):
    """A replaced video under the same URI gets a new key; uploads are keyed by their bytes; the
    LRU keeps the newest entries; a missing file is a 404."""
    from timeexpert.serve.deployments import DecodedCache, video_version
    from timeexpert.serve.inputs import RequestError, VideoSource

    video = tmp_path / "v.mp4"
    video.write_bytes(b"first")
    first = video_version(VideoSource(uri=str(video)))
    assert video_version(VideoSource(uri=str(video))) == first
    video.write_bytes(b"second, longer")
    assert video_version(VideoSource(uri=str(video))) != first
    assert video_version(VideoSource(data=b"abc")) == video_version(VideoSource(data=b"abc"))
    assert video_version(VideoSource(data=b"abc")) != video_version(VideoSource(data=b"abd"))
    with pytest.raises(RequestError) as err:
        video_version(VideoSource(uri=str(tmp_path / "missing.mp4")))
    assert err.value.status == 404

    cache = DecodedCache(2)
    for key in ("a", "b"):
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # a is now the newest
    cache.put("c", "C")  # evicts b
    assert cache.get("b") is None and cache.get("c") == "C"
    assert cache.stats() == {"hits": 2, "misses": 1, "entries": 2}
    off = DecodedCache(0)
    off.put("a", "A")
    assert off.get("a") is None


def test_decode_cache_decodes_again_when_the_cached_frames_are_lost():
    """A cached object lost since (its node died) is decoded again once; a fresh decode's loss is
    an error. (Fakes: losing an object-store entry takes a second node, which this machine has
    not; the real path is exercised by test_repeated_video_skips_the_decoder_until_it_changes.)"""
    import asyncio

    from ray.exceptions import ObjectLostError

    from timeexpert.serve.deployments import DecodedCache

    lost = {"old-ref"}
    calls = []

    async def decode():
        calls.append("decode")
        return ("new-ref", 9.0, 8)

    async def use(ref):
        calls.append(f"use {ref}")
        if ref in lost:
            raise ObjectLostError("ab" * 14, "", "")
        return f"answer from {ref}"

    cache = DecodedCache(4)
    cache.put("k", ("old-ref", 9.0, 8))
    answer, entry = asyncio.run(cache.run("k", decode=decode, use=use))
    assert answer == "answer from new-ref" and entry == ("new-ref", 9.0, 8)
    assert calls == ["use old-ref", "decode", "use new-ref"]
    assert cache.get("k") == ("new-ref", 9.0, 8)
    lost.add("new-ref")
    with pytest.raises(ObjectLostError):
        asyncio.run(DecodedCache(4).run("x", decode=decode, use=use))


@pytest.mark.slow
def test_mlflow_checkpoint_uri(tmp_path, monkeypatch):
    """A checkpoint registered in MLflow (`tracking.register_checkpoint`, SQLite store) is found
    through runs:/, models:/NAME/VERSION and models:/NAME/latest; the copies are removed."""
    import mlflow

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # an earlier test of the same process may have called mlflow.set_tracking_uri, which wins
    # over the environment (a Serve replica is a fresh process: there the environment decides)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        _resolve_registered_checkpoints(tmp_path, uri)
    finally:
        mlflow.set_tracking_uri(previous)


def _resolve_registered_checkpoints(tmp_path, uri: str) -> None:
    import mlflow

    from timeexpert import tracking
    from timeexpert.checkpoints import local_checkpoint

    ckpt = tmp_path / "ckpt"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    assert tracking.register_checkpoint(uri, run_id, str(ckpt), "timeexpert-tiny") == "1"
    assert tracking.register_checkpoint(uri, run_id, str(ckpt), "timeexpert-tiny") == "2"
    for source in (f"runs:/{run_id}/checkpoint", "models:/timeexpert-tiny/1",
                   "models:/timeexpert-tiny/latest"):
        with local_checkpoint(source) as local:
            assert os.path.isfile(os.path.join(local, "config.json")), source
        assert not os.path.exists(local)  # the downloaded copy is removed
    with pytest.raises(ValueError, match="cannot download MLflow checkpoint"):
        with local_checkpoint("runs:/0123456789abcdef/none"):
            pass
    with pytest.raises(ValueError, match="does not exist"):
        tracking.register_checkpoint(uri, run_id, str(tmp_path / "missing"), "timeexpert-tiny")


# --- the application ----------------------------------------------------------------------------


REGISTERED = "timeexpert-tiny"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The app on a local Serve, serving `models:/timeexpert-tiny/1` registered on a real MLflow
    server: yields (base_url, videos, outside_video, allowed_root)."""
    import httpx
    import mlflow
    from ray import serve

    from serve_apps.grounding import app
    from timeexpert import tracking
    from timeexpert.serve.settings import ServiceConfig

    tmp = tmp_path_factory.mktemp("serve")
    ckpt = build_checkpoint(str(tmp / "ckpt"))
    videos = make_videos(str(tmp / "videos"))
    outside = tmp / "outside"
    outside.mkdir()
    outside_video = outside / "x.mp4"
    outside_video.write_bytes(pathlib.Path(videos[0]).read_bytes())
    (tmp / "mlflow").mkdir()
    port = free_port()
    with running_mlflow_server(tmp / "mlflow") as tracking_uri:
        run_id = mlflow.MlflowClient(tracking_uri).create_run(
            tracking.experiment_id(tracking_uri, "serve-test")).info.run_id
        version = tracking.register_checkpoint(tracking_uri, run_id, ckpt, REGISTERED)
        start_serve(port)
        try:
            config = ServiceConfig(
                model={"checkpoint": f"models:/{REGISTERED}/{version}",
                       "tracking_uri": tracking_uri, "max_batch_size": 4, "num_cpus": 0.1,
                       "autoscaling": {"min_replicas": 1, "max_replicas": 2,
                                       "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                                       "downscale_delay_s": 600, "look_back_period_s": 2,
                                       "metrics_interval_s": 0.5}},
                video={"allowed_roots": [str(tmp / "videos")], "max_upload_mb": MAX_UPLOAD_MB,
                       "max_frames": 16, "max_fps": 2.0, "max_query_chars": 64},
                decoder={"num_cpus": 0.1}, ingress={"num_cpus": 0.1}, auth_token=TOKEN,
            )
            serve.run(app(config), name="grounding", route_prefix="/", blocking=False)
            base = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: _get_ok(httpx, f"{base}/healthz"), timeout=180, what="the app answering"
            )
            yield base, videos, str(outside_video), str(tmp / "videos")
        finally:
            stop_serve()


def _get_ok(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _client(base: str, token: str | None = TOKEN):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base, headers=headers, timeout=120)


def _data_url(path: str) -> str:
    return "data:video/mp4;base64," + base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def _check_windows(windows, duration, *, ranked=True):
    for w in windows:
        assert 0 <= w["start"] <= w["end"] <= duration + 1e-6
    scores = [w["score"] for w in windows]
    if ranked:
        assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_endpoints_answer_a_synthetic_video(service):
    base, videos, _, root = service
    with _client(base) as c:
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"} and r.headers["x-request-id"]
        spec = c.get("/openapi.json").json()
        for path in ("/v1/moments", "/v1/highlights", "/v1/captions", "/v1/answers",
                     "/v1/chat/completions", "/v1/models/{name}", "/healthz"):
            assert path in spec["paths"], path
        info = c.get("/v1/models/timeexpert").json()
        assert info["checkpoint"] == f"models:/{REGISTERED}/1"  # from the MLflow server
        assert info["gating"] == "dynamic" and info["num_layers"] == 2 and info["ep_size"] == 1
        assert info["active_experts"] == [[0, 1, 2, 3]] * 2 and info["num_frames"] == 8
        assert c.get("/v1/models").json()["data"][0]["id"] == "timeexpert"

        video = {"uri": videos[0]}
        r = c.post("/v1/moments", json={"video": video, "query": "a red circle", "max_windows": 2})
        assert r.status_code == 200, r.text
        mr = r.json()
        assert mr["task"] == "mr" and mr["num_frames"] == 8 and 8 <= mr["duration"] <= 10.5
        assert 1 <= len(mr["windows"]) <= 2 and mr["request_id"] == r.headers["x-request-id"]
        _check_windows(mr["windows"], mr["duration"])
        assert mr["warning"] is None  # every word of the query is in the model's vocabulary
        r = c.post("/v1/moments", json={"video": video, "query": "a person opens a door"})
        assert r.status_code == 200 and r.json()["windows"], r.text
        assert r.json()["warning"] == ("the model's vocabulary lacks 'person', 'opens', 'door': it "
                                       "never learnt these words, so this answer is unreliable")

        r = c.post("/v1/highlights", json={
            "video": {"data_url": _data_url(videos[1])}, "query": "blue square", "clip_len": 2.0,
            "num_frames": 6,
        })
        assert r.status_code == 200, r.text
        hl = r.json()
        assert hl["num_frames"] == 6
        assert len(hl["saliency"]) == math.ceil(hl["duration"] / 2.0 - 1e-9)
        _check_windows(hl["windows"], hl["duration"])

        r = c.post("/v1/captions", json={"video": video, "fps": 1.0, "max_events": 2})
        assert r.status_code == 200, r.text
        dvc = r.json()
        assert abs(dvc["num_frames"] - dvc["duration"]) <= 1  # 1 fps
        assert dvc["events"] and all(isinstance(e["caption"], str) for e in dvc["events"])
        _check_windows(dvc["events"], dvc["duration"], ranked=False)

        options = ["red", "blue", "green", "cyan"]
        r = c.post("/v1/answers", json={"video": video, "question": "what colour is the circle "
                                        "that grows?", "options": options})
        assert r.status_code == 200, r.text
        qa = r.json()  # an untrained model: any option or none, but the answer's shape holds
        assert qa["task"] == "gqa" and qa["num_frames"] == 8
        assert qa["answer_index"] is None or qa["answer"] == options[qa["answer_index"]]
        if qa["evidence"] is not None:
            _check_windows([qa["evidence"]], qa["duration"])
        assert "gqa" in info["tasks"]

        r = c.post("/v1/chat/completions", json={
            "model": "timeexpert",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "When does the red circle appear?"},
                {"type": "video_url", "video_url": {"url": _data_url(videos[0])}},
            ]}],
        })
        assert r.status_code == 200, r.text
        chat = r.json()
        assert chat["object"] == "chat.completion" and chat["task"] == "mr"
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["choices"][0]["message"]["content"]
        assert chat["usage"]["completion_tokens"] > 0 and chat["events"]
        # the same video by a URI relative to the allowed root gives the same answer
        r2 = c.post("/v1/chat/completions", json={
            "model": "timeexpert", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "When does the red circle appear?"},
                {"type": "video_url", "video_url": {"url": os.path.relpath(videos[0], root)}},
            ]}],
        })
        assert r2.status_code == 200 and r2.json()["events"] == chat["events"]
        r3 = c.post("/v1/chat/completions", json={
            "model": "timeexpert", "task": "gqa", "options": options,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what colour is the circle that grows?"},
                {"type": "video_url", "video_url": {"url": videos[0]}},
            ]}],
        })
        assert r3.status_code == 200, r3.text
        assert r3.json()["task"] == "gqa"
        assert r3.json()["choices"][0]["message"]["content"].startswith("Evidence: ")


@pytest.mark.slow
def test_repeated_video_skips_the_decoder_until_it_changes(service):
    """The second request for a video is answered from the ingress's decoded-frames cache (the
    decoder is not called) with the same answer; a file replaced under the same URI is decoded
    again."""
    from ray import serve

    base, videos, _, root = service
    ingress = serve.get_deployment_handle("GroundingIngress", app_name="grounding")
    copy = pathlib.Path(root) / "repeat.mp4"
    copy.write_bytes(pathlib.Path(videos[1]).read_bytes())
    body = {"video": {"uri": str(copy)}, "query": "a red circle", "max_windows": 2}
    with _client(base) as c:
        first = c.post("/v1/moments", json=body)
        assert first.status_code == 200, first.text
        hits = ingress.decode_cache_stats.remote().result()["hits"]
        second = c.post("/v1/moments", json=body)
        assert second.status_code == 200, second.text
        assert second.json()["windows"] == first.json()["windows"]
        assert ingress.decode_cache_stats.remote().result()["hits"] == hits + 1
        copy.write_bytes(pathlib.Path(videos[0]).read_bytes())  # new content, same URI
        misses = ingress.decode_cache_stats.remote().result()["misses"]
        third = c.post("/v1/moments", json=body)
        assert third.status_code == 200, third.text
        assert ingress.decode_cache_stats.remote().result()["misses"] == misses + 1
        direct = c.post("/v1/moments", json={**body, "video": {"uri": videos[0]}}).json()
        assert (third.json()["duration"], third.json()["windows"]) == (
            direct["duration"], direct["windows"]
        )


def _bad_inputs(videos, outside):
    good = {"uri": videos[0]}
    corrupt = pathlib.Path(videos[0]).read_bytes()
    truncated = corrupt[: len(corrupt) // 3]
    big = b"\0" * int(MAX_UPLOAD_MB * 1.2 * (1 << 20))
    b64 = lambda data, mime="video/mp4": f"data:{mime};base64," + base64.b64encode(data).decode()  # noqa: E731
    mr = "/v1/moments"
    return [
        # (name, path, json, status, error type)
        ("missing query", mr, {"video": good}, 422, "invalid_request"),
        ("missing video", mr, {"query": "q"}, 422, "invalid_request"),
        ("wrong type", mr, {"video": good, "query": 5}, 422, "invalid_request"),
        ("wrong type frames", mr, {"video": good, "query": "q", "num_frames": "many"}, 422, "invalid_request"),
        ("unknown field", mr, {"video": good, "query": "q", "frames": 3}, 422, "invalid_request"),
        ("both video sources", mr, {"video": {**good, "data_url": b64(b"x")}, "query": "q"}, 422, "invalid_request"),
        ("negative time", mr, {"video": good, "query": "q", "window": {"start": -1, "end": 2}}, 422, "invalid_request"),
        ("reversed times", mr, {"video": good, "query": "q", "window": {"start": 5, "end": 2}}, 422, "invalid_request"),
        ("negative clip_len", "/v1/highlights", {"video": good, "query": "q", "clip_len": -2}, 422, "invalid_request"),
        ("zero frames", mr, {"video": good, "query": "q", "num_frames": 0}, 422, "invalid_request"),
        ("frames over limit", mr, {"video": good, "query": "q", "num_frames": 500}, 422, "invalid_request"),
        ("fps over limit", mr, {"video": good, "query": "q", "fps": 30}, 422, "invalid_request"),
        ("unsupported task", "/v1/chat/completions", {
            "model": "timeexpert", "task": "summarize",
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[0]}}]}],
        }, 422, "invalid_request"),
        ("chat without video", "/v1/chat/completions", {
            "model": "timeexpert", "messages": [{"role": "user", "content": "hi"}]}, 422, "invalid_request"),
        ("query too long", mr, {"video": good, "query": "q" * 65}, 422, "query_too_long"),
        ("non-video upload", mr, {"video": {"data_url": b64(b"hello", "text/plain")}, "query": "q"}, 415, "unsupported_media_type"),
        ("garbage as video", mr, {"video": {"data_url": b64(b"hello world, not a video" * 50)}, "query": "q"}, 422, "invalid_video"),
        ("corrupt upload", mr, {"video": {"data_url": b64(truncated)}, "query": "q"}, 422, "invalid_video"),
        ("upload over limit", mr, {"video": {"data_url": b64(big)}, "query": "q"}, 413, "upload_too_large"),
        ("outside allow-list", mr, {"video": {"uri": outside}, "query": "q"}, 403, "forbidden_uri"),
        ("traversal", mr, {"video": {"uri": os.path.join(os.path.dirname(videos[0]), "..", "..", "..", "outside", "x.mp4")}, "query": "q"}, 403, "forbidden_uri"),
        ("relative traversal", mr, {"video": {"uri": "../outside/x.mp4"}, "query": "q"}, 403, "forbidden_uri"),
        ("http fetch", mr, {"video": {"uri": "http://127.0.0.1:1/v.mp4"}, "query": "q"}, 400, "unsupported_uri_scheme"),
        ("missing file", mr, {"video": {"uri": videos[0] + ".nope"}, "query": "q"}, 404, "video_not_found"),
        ("unknown model", mr, {"model": "gpt-4o", "video": good, "query": "q"}, 404, "model_not_found"),
        ("one option", "/v1/answers", {"video": good, "question": "which?", "options": ["red"]}, 422, "invalid_request"),
        ("equal options", "/v1/answers", {"video": good, "question": "which?", "options": ["red", "Red"]}, 422, "invalid_request"),
        ("gqa chat without options", "/v1/chat/completions", {
            "model": "timeexpert", "task": "gqa", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "which?"}, {"type": "video_url", "video_url": {"url": videos[0]}}]}],
        }, 422, "invalid_request"),
        ("unknown chat model", "/v1/chat/completions", {
            "model": "other", "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[0]}}]}],
        }, 404, "model_not_found"),
    ]


@pytest.mark.slow
def test_bad_inputs_get_a_4xx_and_the_replica_stays_up(service):
    base, videos, outside, _ = service
    failures = []
    with _client(base) as c:
        for name, path, body, status, kind in _bad_inputs(videos, outside):
            r = c.post(path, json=body)
            ok = r.status_code == status and r.headers["content-type"].startswith("application/json")
            if ok:
                err = r.json()
                ok = err["error"]["type"] == kind and err["error"]["message"] and err["request_id"]
            if not ok:
                failures.append(f"{name}: {r.status_code} {r.text[:300]}")
        r = c.post("/v1/moments", content=b"{not json", headers={"content-type": "application/json"})
        if r.status_code != 422:
            failures.append(f"malformed json: {r.status_code} {r.text[:200]}")
        r = c.get("/v1/models/other")
        if r.status_code != 404 or r.json()["error"]["type"] != "model_not_found":
            failures.append(f"unknown model info: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        # still serving
        r = c.post("/v1/moments", json={"video": {"uri": videos[1]}, "query": "q", "max_windows": 1})
        assert r.status_code == 200, r.text


@pytest.mark.slow
def test_bearer_auth(service):
    base, videos, _, root = service
    body = {"video": {"uri": videos[0]}, "query": "q"}
    for token in (None, "wrong"):
        with _client(base, token) as c:
            r = c.post("/v1/moments", json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    with _client(base, None) as c:  # liveness and docs stay open
        assert c.get("/healthz").status_code == 200
        assert c.get("/openapi.json").status_code == 200


def _model_replicas() -> list[str]:
    """Names of the live model replica actors of the app (from this cluster's GCS)."""
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve"
        and a["name"].startswith("SERVE_REPLICA::grounding#GroundingModel#")
    )


@pytest.mark.slow
def test_killed_replica_is_replaced(service):
    import ray

    base, videos, _, root = service
    body = {"video": {"uri": videos[0]}, "query": "a red circle", "max_windows": 2}
    (victim,) = _model_replicas()
    in_flight = {}

    def request():
        with _client(base) as c:
            in_flight["response"] = c.post("/v1/moments", json=body)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    thread.join(timeout=180)
    r = in_flight["response"]
    # lost mid-request (5xx with the request id) or served before / retried after the kill
    assert r.status_code in (200, 500, 503), r.text
    if r.status_code >= 500:
        err = r.json()
        assert err["request_id"] == r.headers["x-request-id"] and err["request_id"] in err["error"]["message"]

    def replaced():
        names = _model_replicas()
        return names and victim not in names

    wait_until(replaced, timeout=180, what="a new model replica")
    with _client(base) as c:
        def serves():
            r = c.post("/v1/moments", json=body)
            return r.status_code == 200

        wait_until(serves, timeout=180, interval=2, what="requests succeeding again")


@pytest.mark.slow
def test_autoscaler_adds_a_replica_under_load(service):
    """target_ongoing_requests=1, upscale_delay_s=0.5: six concurrent clients ask for a second
    replica (max_replicas=2)."""
    base, videos, _, root = service
    assert len(_model_replicas()) == 1
    stop = threading.Event()
    statuses: list[int] = []

    def client(i: int):
        with _client(base) as c:
            while not stop.is_set():
                r = c.post("/v1/moments", json={
                    "video": {"uri": videos[i % 2]}, "query": f"query {i}", "max_windows": 2,
                })
                statuses.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(_model_replicas()) >= 2, timeout=150, interval=1,
                   what="a second model replica")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    assert statuses and set(statuses) == {200}, statuses


def _side_app(name: str, checkpoint: str, root: str, **model):
    """Another application of the service on the module's Serve, at /{name}, not waited for."""
    from ray import serve

    from serve_apps.grounding import app
    from timeexpert.serve.settings import ServiceConfig

    config = ServiceConfig(
        model={"checkpoint": checkpoint, "num_cpus": 0.1,
               "autoscaling": {"min_replicas": 1, "max_replicas": 1}, **model},
        video={"allowed_roots": [root], "max_frames": 16}, decoder={"num_cpus": 0.1},
        ingress={"num_cpus": 0.1}, auth_token=TOKEN,
    )
    serve.run_many([serve.RunTarget(app(config), name=name, route_prefix=f"/{name}")],
                   wait_for_applications_running=False)


@pytest.mark.slow
def test_readiness_tells_whether_a_model_replica_can_answer(service):
    """/readyz is 200 with running replicas; an app whose checkpoint was cut short in its write
    stays alive (/healthz 200) and not ready (/readyz 503 saying why, with Retry-After)."""
    from ray import serve

    from timeexpert.checkpoints import persist_checkpoint

    base, _, _, root = service
    with _client(base, None) as c:
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["replicas"]["GroundingModel"] >= 1 and r.json()["replicas"]["VideoDecoder"] >= 1
    # rank 1 of 2 committed its part; rank 0 never did
    good = str(pathlib.Path(root).parent / "ckpt")
    bad = str(pathlib.Path(root).parent / "cut")
    persist_checkpoint(good, bad, rank=1, world_size=2, budget_s=0)
    _side_app("bad", bad, root)
    try:
        with _client(base, None) as c:
            def refused_with_the_reason():
                r = c.get("/bad/readyz")
                assert r.status_code in (404, 503), r.text  # 404: the app's route not yet up
                return r.status_code == 503 and "incomplete" in r.json()["error"]["message"]

            wait_until(refused_with_the_reason, timeout=120, interval=1,
                       what="/bad/readyz naming the incomplete checkpoint")
            r = c.get("/bad/readyz")
            assert r.json()["error"]["type"] == "not_ready" and r.headers["retry-after"] == "1"
            assert "GroundingModel" in r.json()["error"]["message"]
            assert c.get("/bad/healthz").status_code == 200  # alive: liveness stays separate
    finally:
        serve.delete("bad")


@pytest.mark.slow
def test_requests_beyond_the_queue_get_a_fast_503_with_retry_after(service):
    """A replica takes 8 requests at a time (max_ongoing_requests) and 2 more may wait; of 40
    sent at once the rest are refused at once, and the service stays ready."""
    import asyncio

    import httpx
    from ray import serve

    base, videos, _, root = service
    _side_app("shed", str(pathlib.Path(root).parent / "ckpt"), root, max_batch_size=1,
              max_queued_requests=2)
    body = {"video": {"uri": videos[0]}, "query": "a red circle", "max_windows": 2}
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def one(client):
        t0 = time.perf_counter()
        r = await client.post(f"{base}/shed/v1/moments", json=body, headers=headers)
        return r, time.perf_counter() - t0

    async def burst(n):
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*[one(client) for _ in range(n)])

    try:
        with _client(base) as c:
            wait_until(lambda: c.post("/shed/v1/moments", json=body).status_code == 200,
                       timeout=180, interval=1, what="the shed app answering")  # decode cached
        results = asyncio.run(burst(40))
        served = [t for r, t in results if r.status_code == 200]
        shed = [(r, t) for r, t in results if r.status_code == 503]
        assert len(served) + len(shed) == 40, [r.status_code for r, _ in results]
        assert served and len(shed) >= 40 - 8 - 2 - 8, (len(served), len(shed))  # some slack:
        # requests finished during the burst free their places
        for r, _ in shed:
            assert r.json()["error"]["type"] == "overloaded" and r.headers["retry-after"] == "1"
        # refused without waiting for a replica: faster than the answers, whatever the machine
        # (40 connections at once through one proxy and one ingress on 2 cores take ~0.8 s;
        # benchmarks.serve_load times the refusals of an open-loop overload)
        seconds = sorted(t for _, t in shed)
        assert seconds[-1] < 3.0, seconds
        assert seconds[len(seconds) // 2] < sorted(served)[len(served) // 2], (seconds, served)
        with _client(base, None) as c:
            assert c.get("/shed/readyz").status_code == 200
    finally:
        serve.delete("shed")
