"""Training-step throughput: dense vs top-k vs dynamic decoders at the same active size, and
expert parallelism EP=1 vs EP=2 on 2 gloo workers.

    python -m benchmarks.train_throughput [--json] [--preset tiny_cpu] [--steps 6]

Each measurement runs 2 worker processes (gloo, like Ray Train's workers on CPU) through the
training step of `timeexpert.train` (forward, stage-3 loss, backward, explicit gradient sync,
AdamW step) on the same fixed batch of synthetic frames and answers; tokens/s = real tokens of
both workers / median step time. Same active size: the dense FFN has width F, every expert F/2,
top-k uses k = 2 (2 x F/2 = F active); dynamic gating activates what it learns (printed).
The `--json` last line: tokens_per_s {"<gating>_ep<P>": ...}, ep2_vs_ep1 (per gating, and the
`min` over gatings), mean_active_experts (per gating).

Then the cost of Ray Train itself (`--ray-steps`, 0 skips it): `ray_train_vs_plain_loop` =
samples/s of a stage-3 `fit` of `--ray-preset` (small_cpu) under Ray Train, 2 workers x batch 4 /
samples/s of a plain single-process loop of the same model, `stage_loss`, `Optimizers` (AdamW) and
token-adaptive updates, batch 8, 2 torch threads, one after the other in this run on the same mp4s
(the `tiny` synthetic benchmark rendered into a temp dir, or `--data-root`). Each side's time is
its own data loading (decoding every training video once: each Ray Train worker its half, in its
own process, partly while its model is built / decord in the plain process) plus its training
loop (rank 0's loop for Ray Train: steps, reports, the final checkpoint; rank 0's wait for its
decode is counted once, in the decode); process start-up and model construction are left out of
both (`ray_train_wall_s` is the whole `fit`, start-up included). `samples_per_s` gives both
sides, `ray_train_breakdown` rank 0's seconds per step by phase.

Then the levers on a `binding_cpu` step (`--binding-steps`, 0 skips it): one Ray Train worker's
step (batch 4, 1 torch thread, as each of the demo's two workers runs it: forward, stage-3 loss,
backward, AdamW) on the same batches of `--data-root` (default: `small` rendered into a temp
dir), each lever in its own process: `fp32` eager (the baseline), `bf16` autocast (fp32 master
weights and router, `TrainConfig.precision`) and `compile_vision` (`torch.compile` of the vision
tower, its compile time counted apart). `binding_step_s` gives each lever's median seconds a
step, `binding_step_speedup` the best lever's fp32 seconds over its own (>= 1.0 only when a
lever pays).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import emit, parse_args  # noqa: E402
from timeexpert.presets import get_preset  # noqa: E402


def _batch(preset: str, batch_size: int, seed: int, moe: dict, width: int):
    import numpy as np

    from timeexpert.events import Event, Task
    from timeexpert.models.tokenizer import GroundingTokenizer, collate
    from timeexpert.presets import get_preset

    p = get_preset(preset)
    words = ["the", "red", "blue", "circle", "square", "moves", "left", "right", "grows", "appears"]
    tok = GroundingTokenizer.train([" ".join(words)] * 4, vocab_size=p.tokenizer_vocab_size)
    config = p.model.with_tokenizer(tok)
    config.intermediate_size = width
    config.moe = {**(config.moe or {}), **moe}
    rng = np.random.default_rng(seed)
    encoded, frames = [], []
    for b in range(batch_size):
        task = [Task.MR, Task.VHD, Task.DVC][b % 3]
        ts = np.linspace(0, 20, config.num_frames).tolist()
        events = [Event(start=2.0 + i * 5, end=4.5 + i * 5, score=3.0, caption="the red circle moves left")
                  for i in range(3 if task == Task.DVC else 1)]
        encoded.append(tok.encode_example(task, "the blue square grows", ts, events,
                                          tokens_per_frame=config.tokens_per_frame))
        frames.append(rng.integers(0, 255, (config.num_frames, config.image_size, config.image_size, 3), dtype=np.uint8))
    inputs = collate(encoded)
    return config, inputs, frames


def _worker(rank: int, world: int, store_path: str, args: dict, out_q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        from timeexpert.models.timeexpert import TimeExpertForGrounding
        from timeexpert.train import parallel
        from timeexpert.train.recipes import set_trainable, stage_loss

        config, inputs, frames = _batch(args["preset"], args["batch_size"], args["seed"] + rank,
                                        args["moe"], args["width"])
        groups = parallel.init_groups(args["ep"])
        torch.manual_seed(0)
        full = TimeExpertForGrounding(config).state_dict()
        model = parallel.build_sharded_model(TimeExpertForGrounding, config, groups, full)
        model.train()
        set_trainable(model, 3)
        optim = parallel.Optimizers(model, groups, lr=1e-3, weight_decay=0.0, grad_clip=1.0,
                                    zero_stage=0, batch_size=args["batch_size"])
        inputs["pixel_values"] = torch.cat([model.preprocess_frames(f) for f in frames])
        tokens = int(inputs["attention_mask"].sum())

        def step():
            out = model(**inputs)
            loss = stage_loss(out, 3, config)
            optim.backward(loss)
            optim.step()
            parallel.sync_routing_rates(model, groups)

        times = []
        for i in range(args["warmup"] + args["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dist.barrier()
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t0)
        tel = model.routing_telemetry()
        mean_active = statistics.mean(t.get("mean_active_experts", 1.0) for t in tel)
        t = torch.tensor([float(tokens), mean_active], dtype=torch.float64)
        dist.all_reduce(t)
        if rank == 0:
            out_q.put({"tokens_per_s": float(t[0]) / statistics.median(times),
                       "mean_active_experts": float(t[1]) / world})
    finally:
        dist.destroy_process_group()


def measure(gating: str, ep: int, *, preset: str, steps: int, batch_size: int, width: int) -> dict:
    import torch.multiprocessing as mp

    moe = {"gating": gating}
    F = width
    if gating != "dense":
        moe["num_experts_per_token"] = 2
        F = width // 2
    args = dict(preset=preset, batch_size=batch_size, seed=0, moe=moe, width=F, ep=ep,
                steps=steps, warmup=2)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, 2, os.path.join(d, "store"), args, q)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"benchmark worker failed for {gating} EP={ep}")
    return q.get(timeout=10)


def _train_config(data_root: str, preset: str, steps: int, storage_root: str):
    """A stage-3 run of `preset` with its training settings, 2 workers x batch 4 (8 per step)."""
    from timeexpert.presets import get_preset
    from timeexpert.train.config import TrainConfig

    fields = dict(get_preset(preset).train)
    fields.update(data_root=data_root, preset=preset, storage_root=storage_root, name="bench",
                  stage=3, num_steps=steps, batch_size=4, num_workers=2, eval_max_records=0,
                  checkpoint_every=steps)
    return TrainConfig(**fields)


def _plain_loop(cfg_dict: dict, out_q) -> None:
    """The same stage in one process, no Ray: decode the training videos once (the pipeline's
    own decode function), then steps of 8 samples, epoch after epoch in a seeded order."""
    import numpy as np
    import torch

    from timeexpert import storage
    from timeexpert.data import formats
    from timeexpert.data.pipeline import decode_rows, record_row
    from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model
    from timeexpert.train import parallel
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.batches import data_config, tokenize_batch
    from timeexpert.train.fit import train_tokenizer
    from timeexpert.train.loop import model_config
    from timeexpert.train.recipes import set_trainable, stage_loss

    torch.set_num_threads(2)
    cfg = TrainConfig.from_dict(cfg_dict)
    batch_size = cfg.batch_size * cfg.num_workers
    records = formats.read_manifest(storage.join_uri(cfg.data_root, "manifests", "train.jsonl"))
    tokenizer = train_tokenizer(cfg, records)
    mconfig = model_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    groups = parallel.init_groups(1)
    model = parallel.build_sharded_model(TimeExpertForGrounding, mconfig, groups,
                                         create_model(mconfig).state_dict())
    model.train()
    set_trainable(model, cfg.stage, cfg.recipe)
    optim = parallel.Optimizers(model, groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                grad_clip=cfg.grad_clip, zero_stage=0, batch_size=batch_size)

    t0 = time.perf_counter()
    rows = [record_row(r, storage.resolve_under_root(r.video, cfg.data_root)) for r in records]
    data = decode_rows(rows, data_config(cfg, mconfig, train=True))
    decode_s = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    t0 = time.perf_counter()
    for step in range(1, cfg.num_steps + 1):
        while len(order) < batch_size:  # a new epoch: a fresh permutation, partial batch dropped
            order = list(rng.permutation(len(data["id"])))
        take, order = order[:batch_size], order[batch_size:]
        inputs = tokenize_batch({k: v[take] for k, v in data.items()}, tokenizer, mconfig, model)
        optim.set_lr(cfg.learning_rate(step))
        out = model(**inputs, return_logits=False)
        optim.backward(stage_loss(out, cfg.stage, mconfig, cfg.recipe))
        optim.step()
        if cfg.expert_update_every and step % cfg.expert_update_every == 0:
            parallel.update_experts(model, groups, optim.local)
    loop_s = time.perf_counter() - t0
    out_q.put({"samples": cfg.num_steps * batch_size, "decode_s": decode_s, "loop_s": loop_s})


def ray_train_vs_plain_loop(*, preset: str, steps: int, data_root: str = "") -> dict:
    """The plain loop (a spawned process), then the same stage under Ray Train (a local Ray of 4
    logical CPUs, as `jobs/` start it); both on `data_root`, else the tiny synthetic benchmark."""
    import multiprocessing as mp

    import ray

    from timeexpert import storage
    from timeexpert.data import formats, synth
    from timeexpert.train.fit import fit, prepare_tokenizer
    from timeexpert.train.telemetry import PHASES

    with tempfile.TemporaryDirectory(prefix="te-bench-") as d:
        if not data_root:
            data_root = os.path.join(d, "data")
            synth.generate("tiny", data_root, seed=0)
        cfg = _train_config(data_root, preset, steps, os.path.join(d, "runs"))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_plain_loop, args=(cfg.to_dict(), q))
        proc.start()
        plain = q.get(timeout=3600)
        proc.join()
        print(f"plain loop: {plain['samples']} samples, decode {plain['decode_s']:.1f} s + "
              f"loop {plain['loop_s']:.1f} s", flush=True)

        ray.init(num_cpus=4, include_dashboard=False)
        try:
            records = formats.read_manifest(storage.join_uri(data_root, "manifests", "train.jsonl"))
            tokenizer_uri = prepare_tokenizer(cfg, records)
            t0 = time.perf_counter()
            m = fit(cfg, tokenizer_uri=tokenizer_uri).metrics
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
    ray_s = m["data/decode_s"] + m["time_total/loop"]
    print(f"Ray Train: {m['samples']:.0f} samples, decode {m['data/decode_s']:.1f} s + loop "
          f"{m['time_total/loop']:.1f} s (fit {wall:.1f} s with start-up)", flush=True)
    rates = {"ray_train": m["samples"] / ray_s,
             "plain_loop": plain["samples"] / (plain["decode_s"] + plain["loop_s"])}
    steps_done = max(m["time_total/steps"], 1.0)
    return {
        "ray_train_vs_plain_loop": round(rates["ray_train"] / rates["plain_loop"], 3),
        "samples_per_s": {k: round(v, 2) for k, v in rates.items()},
        "ray_train_wall_s": round(wall, 1),
        "ray_train_breakdown": {k: round(m[f"time_total/{k}"] / steps_done, 4) for k in PHASES},
    }


BINDING_LEVERS = ("fp32", "bf16", "compile_vision")


def _binding_lever(lever: str, data_root: str, steps: int, out_q) -> None:
    """`steps` timed steps of a binding_cpu worker under `lever` (after 2 warm-up steps, which
    hold any compile), on the first rows of `data_root`'s train split in order."""
    import numpy as np
    import torch

    from timeexpert import devices, storage
    from timeexpert.data import formats
    from timeexpert.data.pipeline import decode_rows, record_row, video_captions
    from timeexpert.models.timeexpert import create_model
    from timeexpert.train import parallel
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.batches import data_config, tokenize_batch
    from timeexpert.train.fit import train_tokenizer
    from timeexpert.train.loop import model_config
    from timeexpert.train.recipes import set_trainable, stage_loss

    torch.set_num_threads(1)
    fields = dict(get_preset("binding_cpu").train)
    fields.update(data_root=data_root, preset="binding_cpu", stage=3, batch_size=4, num_workers=1)
    cfg = TrainConfig(**fields)
    records = formats.read_manifest(storage.join_uri(data_root, "manifests", "train.jsonl"))
    tokenizer = train_tokenizer(cfg, records)
    mconfig = model_config(cfg, tokenizer)
    torch.manual_seed(0)
    model = create_model(mconfig)
    model.train()
    set_trainable(model, 3, cfg.recipe)
    optim = parallel.Optimizers(model, parallel.init_groups(1), lr=cfg.lr,
                                weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                                zero_stage=0, batch_size=cfg.batch_size)
    n = (steps + 2) * cfg.batch_size
    captions = video_captions(records)
    rows = [record_row(r, storage.resolve_under_root(r.video, data_root), captions.get(r.video, ()))
            for r in records[:n]]
    data = decode_rows(rows, data_config(cfg, mconfig, train=True))
    batches = [{k: v[i: i + cfg.batch_size] for k, v in data.items()}
               for i in range(0, n, cfg.batch_size)]
    precision = "bf16" if lever == "bf16" else "fp32"
    if lever == "compile_vision":
        model.frame_encoder = torch.compile(model.frame_encoder)

    def step(i: int) -> None:
        inputs = tokenize_batch(batches[i], tokenizer, mconfig, model, i)
        with devices.autocast(torch.device("cpu"), precision):
            out = model(**inputs, return_logits=False)
            loss = stage_loss(out, 3, mconfig, cfg.recipe)
        optim.backward(loss)
        optim.step()

    t0 = time.perf_counter()
    for i in range(2):
        step(i)
    warmup = time.perf_counter() - t0
    times = []
    for i in range(2, steps + 2):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    out_q.put({"step_s": float(np.median(times)), "warmup_s": warmup})


def binding_step_levers(*, steps: int, data_root: str = "") -> dict:
    """Each lever's median step in its own spawned process, one after the other."""
    import multiprocessing as mp

    from timeexpert.data import synth

    with tempfile.TemporaryDirectory(prefix="te-bench-") as d:
        if not data_root:
            data_root = os.path.join(d, "data")
            synth.generate("small", data_root, seed=0)
        ctx = mp.get_context("spawn")
        measured = {}
        for lever in BINDING_LEVERS:
            q = ctx.Queue()
            proc = ctx.Process(target=_binding_lever, args=(lever, data_root, steps, q))
            proc.start()
            measured[lever] = q.get(timeout=3600)
            proc.join()
            print(f"binding_cpu step, {lever:15s}: {measured[lever]['step_s']:.3f} s "
                  f"(2 warm-up steps {measured[lever]['warmup_s']:.1f} s)", flush=True)
    base = measured["fp32"]["step_s"]
    ratios = {k: round(base / v["step_s"], 3) for k, v in measured.items()}
    return {"binding_step_s": {k: round(v["step_s"], 4) for k, v in measured.items()},
            "binding_warmup_s": {k: round(v["warmup_s"], 1) for k, v in measured.items()},
            "binding_step_vs_fp32": ratios,
            "binding_step_speedup": max(v for k, v in ratios.items() if k != "fp32")}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--preset", default="tiny_cpu"),
        p.add_argument("--steps", type=int, default=6),
        p.add_argument("--batch-size", type=int, default=4),
        p.add_argument("--width", type=int, default=256, help="dense FFN width F"),
        p.add_argument("--ray-steps", type=int, default=50,
                       help="steps of each side of ray_train_vs_plain_loop (0 = skip it)"),
        p.add_argument("--ray-preset", default="small_cpu"),
        p.add_argument("--data-root", default="",
                       help="dataset for ray_train_vs_plain_loop (default: render tiny)"),
        p.add_argument("--binding-steps", type=int, default=8,
                       help="timed binding_cpu steps per lever (0 = skip them)"),
        p.add_argument("--binding-data-root", default="",
                       help="dataset of the binding_cpu levers (default: render small)"),
        p.add_argument("--only-binding", action="store_true",
                       help="measure the binding_cpu levers alone"),
    ))
    if args.only_binding:
        emit(binding_step_levers(steps=args.binding_steps, data_root=args.binding_data_root),
             as_json=args.json)
        return
    tps, active, ratio = {}, {}, {}
    for gating in ("dense", "topk", "dynamic"):
        for ep in ((1,) if gating == "dense" else (1, 2)):
            r = measure(gating, ep, preset=args.preset, steps=args.steps,
                        batch_size=args.batch_size, width=args.width)
            tps[f"{gating}_ep{ep}"] = round(r["tokens_per_s"], 1)
            if ep == 1:
                active[gating] = round(r["mean_active_experts"], 3)
            print(f"{gating:8s} EP={ep}: {r['tokens_per_s']:8.1f} tokens/s, "
                  f"{r['mean_active_experts']:.2f} experts/token", flush=True)
        if gating != "dense":
            ratio[gating] = round(tps[f"{gating}_ep2"] / tps[f"{gating}_ep1"], 3)
    ratio["min"] = min(v for k, v in ratio.items())
    result = {"tokens_per_s": tps, "ep2_vs_ep1": ratio, "mean_active_experts": active,
              "preset": args.preset, "workers": 2}
    if args.ray_steps:
        result.update(ray_train_vs_plain_loop(preset=args.ray_preset, steps=args.ray_steps,
                                              data_root=args.data_root))
    if args.binding_steps:
        result.update(binding_step_levers(steps=args.binding_steps,
                                          data_root=args.binding_data_root))
    emit(result, as_json=args.json)


if __name__ == "__main__":
    main()
