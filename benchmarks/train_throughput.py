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
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import emit, parse_args  # noqa: E402


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
        from timeexpert.train.loop import set_trainable, stage_loss

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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--preset", default="tiny_cpu"),
        p.add_argument("--steps", type=int, default=6),
        p.add_argument("--batch-size", type=int, default=4),
        p.add_argument("--width", type=int, default=256, help="dense FFN width F"),
    ))
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
    emit({"tokens_per_s": tps, "ep2_vs_ep1": ratio, "mean_active_experts": active,
          "preset": args.preset, "workers": 2}, as_json=args.json)


if __name__ == "__main__":
    main()
