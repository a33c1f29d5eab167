"""HTTP load on the grounding service: latency and throughput, batched vs unbatched, vs in-process.

    python -m benchmarks.serve_load [--json] [--rounds N] [--max-seconds S]

Builds the tiny_cpu model (random weights, generation capped so every answer has the same
length: the LM head is zeroed, so greedy decoding walks the grammar deterministically), renders
synthetic mp4s, and deploys two copies of the app on a local Serve (127.0.0.1 only), one after
the other (the idle replicas of one would share the 2 cores with the other): `batched`
(@serve.batch up to 16) and `unbatched` (batch size 1), one model replica each. Per app, path
and concurrency (1, 4, 16 clients) it sends a bounded number of MR requests (`--rounds` per
client, stopping early after `--max-seconds`) and reports p50 / p99 latency, requests/s, errors:

- `whole`: a different video per request (the decode cache never hits): HTTP + decode + model;
- `model`: the same video every time (the ingress's decode cache hits: its decoded frames go from
  the object store to the model replica): HTTP + the model deployment.

Overload (the batched app, model path): requests sent open-loop, on a fixed schedule whatever
the answers, at `--overload` (4) times the sustainable rate (its 16-client requests/s) for
`--overload-seconds`. The model deployment takes `max_ongoing_requests` (2 x batch = 32) at a
time and lets `MAX_QUEUED` more wait; the rest get 503 `overloaded` with Retry-After. Reported:
the accepted requests' p50 / p99 (bounded: about (32 + MAX_QUEUED) / the sustainable rate, not
growing with the overload), how many were shed and how fast (`overload_shed_p99_ms`).

The baseline is the same model called in-process (`GroundingModel.predict` on frames decoded
once, one thread like a replica), timed in alternation with single HTTP requests on the model
path so both see the same machine load. Targets: zero errors; `batching_speedup_16` (model path,
16 clients, batched rps / unbatched rps) >= 2; `p50_overhead_ms` (model path, 1 client, the
unbatched app: the HTTP + Serve hops alone, p50 minus the in-process p50) < 25 ms. The batched
app's figure, `p50_overhead_ms_batched`, adds the batch wait (up to batch_wait_timeout_s).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import emit, parse_args

CONCURRENCY = (1, 4, 16)
NUM_VIDEOS = 24  # distinct videos for the whole path; > cache entries + 16 in flight
CACHE_ENTRIES = 4
QUERY = "a red circle moves left"
MAX_QUEUED = 16  # the model deployment's max_queued_requests in both apps


def _args(parser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="requests per client per setting")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop issuing requests of one setting after this long")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    parser.add_argument("--overload", type=float, default=4.0,
                        help="open-loop rate of the overload phase, times the sustainable rate")
    parser.add_argument("--overload-seconds", type=float, default=15.0,
                        help="how long the overload phase sends requests")
    parser.add_argument("--pairs", type=int, default=40,
                        help="in-process / HTTP pairs for the overhead (the model's own run-to-run "
                             "spread is larger than the overhead: fewer pairs give noise)")


def build_checkpoint(path: str) -> str:
    import torch

    from timeexpert.inference import GroundingModel
    from timeexpert.models.timeexpert import create_model
    from timeexpert.models.tokenizer import GroundingTokenizer
    from timeexpert.presets import get_preset

    torch.manual_seed(0)
    tok = GroundingTokenizer.train([QUERY, "the blue square appears", "a green triangle"],
                                   vocab_size=400)
    cfg = get_preset("tiny_cpu").model.with_tokenizer(tok)
    cfg.max_events, cfg.max_caption_tokens, cfg.max_number_symbols = 2, 4, 4
    model = create_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    GroundingModel.from_model(model, tok).save(path)
    return path


def render_videos(root: str) -> list[str]:
    import glob

    from timeexpert.data.synth import SynthSpec, generate

    spec = SynthSpec(name="load", num_videos={"test": NUM_VIDEOS}, min_duration=8,
                     max_duration=10, max_event_len=4, min_events=2, max_events=2)
    generate(spec, root, seed=0, workers=1)
    return sorted(glob.glob(os.path.join(root, "**", "*.mp4"), recursive=True))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def in_process_model(ckpt: str, video: str):
    """A zero-argument call of `GroundingModel.predict` on frames decoded once, one thread (like a
    replica): the in-process baseline."""
    import torch

    from timeexpert.data.video import decode_frames
    from timeexpert.inference import GroundingModel

    torch.set_num_threads(1)
    gm = GroundingModel.load(ckpt)
    size = gm.model.config.image_size
    decoded = decode_frames(video, num_frames=gm.model.config.num_frames, size=(size, size))
    return lambda: gm.predict(decoded.frames, decoded.timestamps, "mr", QUERY,
                              duration=decoded.duration, max_events=2)


def paired_overhead(call, url: str, body: dict, repeats: int) -> dict:
    """Alternate one in-process call and one HTTP request (1 client), so both see the same
    machine load; the overhead is the difference of the two medians."""
    import httpx

    local, remote = [], []
    with httpx.Client(timeout=300) as http:
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            r = http.post(url, json=body)
            t2 = time.perf_counter()
            if r.status_code != 200:
                raise RuntimeError(f"paired request failed: {r.status_code} {r.text[:200]}")
            if i >= 2:  # warm-up pairs
                local.append(t1 - t0)
                remote.append(t2 - t1)
    local_ms, remote_ms = statistics.median(local) * 1e3, statistics.median(remote) * 1e3
    return {"inprocess_p50_ms": local_ms, "http_p50_ms": remote_ms,
            "overhead_ms": remote_ms - local_ms, "inprocess_rps": len(local) / sum(local)}


async def load(url: str, bodies, clients: int, total: int, max_seconds: float) -> dict:
    """`clients` concurrent loops sending `total` requests in all (bodies taken in turn)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + max_seconds

    async def client(http):
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            try:
                r = await http.post(url, json=bodies(i))
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as err:
                errors.append(repr(err))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return {
        "requests": len(latencies), "errors": len(errors), "error_samples": errors[:3],
        "rps": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
    }


async def overload(url: str, bodies, rate: float, seconds: float) -> dict:
    """Open loop: request i leaves at i / `rate` s, answered or not, for `seconds` (at most
    rate x seconds requests, each with a 300 s timeout). Accepted (200) and shed (503) latencies
    apart."""
    import httpx

    accepted: list[float] = []
    shed: list[float] = []
    errors: list[str] = []

    async def one(http, i):
        t0 = time.perf_counter()
        try:
            r = await http.post(url, json=bodies(i))
        except httpx.HTTPError as err:
            errors.append(repr(err))
            return
        seconds_taken = time.perf_counter() - t0
        if r.status_code == 200:
            accepted.append(seconds_taken)
        elif r.status_code == 503 and r.headers.get("retry-after"):
            shed.append(seconds_taken)
        else:
            errors.append(f"{r.status_code}: {r.text[:200]}")

    total = max(1, int(rate * seconds))
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, i)))
        await asyncio.gather(*tasks)
    return {
        "rate": rate, "sent": total, "accepted": len(accepted), "shed": len(shed),
        "errors": len(errors), "error_samples": errors[:3],
        "accepted_p50_ms": percentile(accepted, 50) * 1e3,
        "accepted_p99_ms": percentile(accepted, 99) * 1e3,
        "shed_p99_ms": percentile(shed, 99) * 1e3,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _args)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="serve-load-")
    ckpt = build_checkpoint(os.path.join(tmp, "ckpt"))
    videos = render_videos(os.path.join(tmp, "videos"))
    print(f"checkpoint {ckpt}; {len(videos)} videos", file=sys.stderr)

    call = in_process_model(ckpt, videos[0])

    import ray
    from ray import serve

    from serve_apps.grounding import app
    from timeexpert.serve.settings import ServiceConfig

    port = args.port or _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: dict[str, dict] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        paths = {
            "whole": lambda i: {"video": {"uri": videos[i % len(videos)]}, "query": QUERY,
                                "max_windows": 2},
            "model": lambda i: {"video": {"uri": videos[0]}, "query": QUERY, "max_windows": 2},
        }
        overhead, stats, batching, shedding = {}, {}, {}, {}
        # one app at a time: the idle replicas of another app would take their share of the two
        # cores from the one being measured
        for name, batch in (("batched", 16), ("unbatched", 1)):
            serve.run(app(ServiceConfig(
                model={"checkpoint": ckpt, "max_batch_size": batch, "num_cpus": 1.0,
                       "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                       "max_queued_requests": MAX_QUEUED},
                video={"allowed_roots": [os.path.join(tmp, "videos")],
                       "decode_cache_entries": CACHE_ENTRIES},
                decoder={"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                ingress={"num_cpus": 0.25},
            )), name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}/v1/moments"
            asyncio.run(load(url, paths["model"], 2, 4, 120))  # warm-up, fills the cache
            for path, bodies in paths.items():
                for clients in CONCURRENCY:
                    total = max(clients * args.rounds, 10)
                    r = asyncio.run(load(url, bodies, clients, total, args.max_seconds))
                    key = f"{name}/{path}/c{clients}"
                    results[key] = r
                    print(f"{key}: {r['requests']} ok, {r['errors']} errors, "
                          f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                          f"{r['rps']:.2f} req/s", file=sys.stderr)
                    for sample in r["error_samples"]:
                        print(f"  error: {sample}", file=sys.stderr)
            if name == "batched":
                sustainable = results["batched/model/c16"]["rps"]
                shedding = asyncio.run(overload(url, paths["model"], args.overload * sustainable,
                                                args.overload_seconds))
                print(f"overload at {args.overload:g}x {sustainable:.1f} req/s: "
                      f"{shedding['accepted']} accepted (p50 {shedding['accepted_p50_ms']:.0f} ms, "
                      f"p99 {shedding['accepted_p99_ms']:.0f} ms), {shedding['shed']} shed "
                      f"(p99 {shedding['shed_p99_ms']:.0f} ms), {shedding['errors']} errors",
                      file=sys.stderr)
            o = overhead[name] = paired_overhead(call, url, paths["model"](0), repeats=args.pairs)
            print(f"{name}: in-process p50 {o['inprocess_p50_ms']:.1f} ms, HTTP p50 "
                  f"{o['http_p50_ms']:.1f} ms (paired)", file=sys.stderr)
            stats[name] = {
                **serve.get_deployment_handle("GroundingIngress", app_name=name)
                .decode_cache_stats.remote().result(),
                **serve.get_deployment_handle("VideoDecoder", app_name=name)
                .stats.remote().result(),
            }
            batching[name] = (serve.get_deployment_handle("GroundingModel", app_name=name)
                              .batch_stats.remote().result())
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    rps = {k: round(v["rps"], 3) for k, v in results.items()}
    speedup = lambda path: (  # noqa: E731
        rps[f"batched/{path}/c16"] / rps[f"unbatched/{path}/c16"]
        if rps[f"unbatched/{path}/c16"] else float("nan")
    )
    emit({
        "errors": sum(v["errors"] for v in results.values()) + shedding["errors"],
        "rps": rps,
        "p50_ms": {k: round(v["p50_ms"], 1) for k, v in results.items()},
        "p99_ms": {k: round(v["p99_ms"], 1) for k, v in results.items()},
        "requests": {k: v["requests"] for k, v in results.items()},
        "batching_speedup_16": round(speedup("model"), 3),
        "batching_speedup_16_end_to_end": round(speedup("whole"), 3),
        "inprocess_p50_ms": round(overhead["unbatched"]["inprocess_p50_ms"], 1),
        "inprocess_rps": round(overhead["unbatched"]["inprocess_rps"], 3),
        # HTTP + Serve hops (proxy, ingress, decode-cache hit, model replica) at one client
        "p50_overhead_ms": round(overhead["unbatched"]["overhead_ms"], 1),
        # the same through the batched app: adds up to batch_wait_timeout_s by design
        "p50_overhead_ms_batched": round(overhead["batched"]["overhead_ms"], 1),
        # open-loop overload of the batched app's model path (MAX_QUEUED may wait)
        "overload": {k: (round(v, 1) if isinstance(v, float) else v)
                     for k, v in shedding.items() if k != "error_samples"},
        "overload_accepted_p99_ms": round(shedding["accepted_p99_ms"], 1),
        "overload_shed_p99_ms": round(shedding["shed_p99_ms"], 1),
        "decode_cache": stats,
        "model_batches": batching,
    }, as_json=args.json)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
