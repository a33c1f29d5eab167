"""Does the model ground? Variants trained on the same data and budget, scored on held-out videos.

    python -m benchmarks.grounding_quality [--json] [--data-root .cache/data/level0]
        [--variants scratch,scratch_query_first,scratch_relevance] [--steps 300] [--tasks mr]
        [--split val|test] [--checkpoints NAME=URI,...]

Each variant is a preset plus model overrides (`VARIANTS`). It trains in one process, through
the training path of `timeexpert.train` (`model_config`, `create_model`, `tokenize_batch`,
`stage_loss`, stage 3 trainables, the config's warm-up + cosine learning rate), on the training
split's records of `--tasks`, 8 samples a step, frames decoded once at the model's input size
(the same frames every epoch, no jitter). Every variant sees the same batches in the same order.
It then answers the `--split` records through `GroundingModel.predict_batch` (what evaluation
and Serve run). `--checkpoints` evaluates saved checkpoints instead of training.

Per variant it prints MR R1@0.5 of the model, of the best trivial baseline (the trivial
baselines of `eval.baselines`, on the same records) and their ratio, and `distinct_windows`: the
fraction of videos with two or more MR queries whose queries got different top-1 windows (a
model that learnt the answer prior gives every query of a video the same window), and on the
synthetic benchmarks `attributes`: how often the event the top window lands on has the query's
colour, shape, motion, all three (`attribute_agreement`). With VHD, DVC or GQA in `--tasks`,
their HIT@1 (VeryGood), F1 and answer accuracy (Acc@QA) likewise. Choose on `val`, report on `test`.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from benchmarks.common import emit, parse_args  # noqa: E402

# name -> (preset, TimeExpertConfig overrides, TrainConfig overrides)
_GENERATED = {"query_first": False, "frame_relevance": False}  # frames, then the query; the
# answer's times generated as tokens (the demo model before frame relevance)
_QUERY_FIRST = {"query_first": True, "frame_relevance": False}
_RELEVANCE = {"query_first": True, "frame_relevance": True}
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "scratch": ("small_cpu", _GENERATED, {}),
    "scratch_query_first": ("small_cpu", _QUERY_FIRST, {}),
    "scratch_relevance": ("small_cpu", _RELEVANCE, {}),
    # the measured recipe as a preset (bidirectional frames, 96x96, lr 5e-4, ...)
    "grounding": ("grounding_cpu", {}, {}),
    # + the query matched against each frame's patches, the caption contrast, GQA by its options
    "binding": ("binding_cpu", {}, {}),
    # + the caption contrast on every row (each row carries its video's captions), not the DVC
    # rows alone
    "binding_rows": ("binding_cpu", {"captions_every_row": True}, {}),
    "smollm": ("smollm_cpu", _GENERATED, {}),
    "smollm_query_first": ("smollm_cpu", _QUERY_FIRST, {}),
    "smollm_relevance": ("smollm_cpu", _RELEVANCE, {}),
}
METRICS = {"mr": ("R1@0.5", "MR R1@0.5"), "vhd": ("HL-min-VeryGood-Hit1", "VHD HIT@1 VeryGood"),
           "dvc": ("F1", "DVC F1"), "gqa": ("Acc@QA", "GQA Acc@QA")}


def _extra(parser) -> None:
    parser.add_argument("--data-root", default=".cache/data/level0")
    parser.add_argument("--variants", default="scratch,scratch_query_first,scratch_relevance")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.0, help="0: the preset's")
    parser.add_argument("--tasks", default="mr", help="comma-separated: mr,vhd,dvc,gqa")
    parser.add_argument("--split", default="val", choices=("val", "test", "train"),
                        help="train: score the training records (with --train-videos, the "
                             "overfit check: can the model fit a few videos?)")
    parser.add_argument("--train-videos", type=int, default=0,
                        help="N > 0: train on the records of the training split's first N "
                             "videos only (and score those with --split train)")
    parser.add_argument("--max-records", type=int, default=80, help="per task, evaluated")
    parser.add_argument("--checkpoints", default="", help="NAME=URI,...: evaluate, no training")
    parser.add_argument("--save", default="", help="folder to save each trained variant in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=JSON",
                        help="a TimeExpertConfig override for every variant, and the "
                        "inference-time keys of --checkpoints models (repeatable)")
    parser.add_argument("--curriculum", default="",
                        help="easier data roots trained first, each for --curriculum-steps")
    parser.add_argument("--curriculum-steps", type=int, default=0)
    parser.add_argument("--jitter", type=int, default=1,
                        help="K > 1: training frames decoded on a K x denser uniform grid, each "
                             "step drawing one of the K frames of every segment (TSN jitter)")
    parser.add_argument("--paired", action="store_true",
                        help="batches hold the records of a video together (both MR queries)")
    parser.add_argument("--caption-queries", action="store_true",
                        help="MR training records also from every captioned event of the DVC "
                             "records (`pipeline.caption_queries`)")
    parser.add_argument("--eval-root", default="",
                        help="data root of the held-out split (default --data-root), e.g. train "
                             "on medium and score on small")


def model_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-set takes KEY=JSON, got {item!r}")
        out[key] = json.loads(value)
    return out


def decode_all(root: str, records, num_frames: int, size: int) -> dict[str, tuple]:
    """video URI -> (frames THWC uint8, timestamps T), each video decoded once (`num_frames` on
    the uniform grid of segment centres)."""
    from timeexpert import storage
    from timeexpert.data.video import decode_frames

    out = {}
    for r in records:
        uri = storage.resolve_under_root(r.video, root)
        if uri not in out:
            d = decode_frames(storage.filesystem(uri)[1], num_frames=num_frames, size=(size, size))
            out[uri] = (d.frames, np.asarray(d.timestamps, np.float32))
        r.video = uri
    return out


def as_batch(records, frames: dict[str, tuple], num_frames: int | None = None,
             rng: np.random.Generator | None = None, captions: dict | None = None
             ) -> dict[str, np.ndarray]:
    """Records -> a batch in the pipeline's row format (what `tokenize_batch` reads), each row
    with its video's `captions` (`pipeline.video_captions`); with `rng`, each row's `num_frames`
    frames are drawn from its denser decoded grid, as decode-once training draws them
    (`pipeline.draw_segment_frames`)."""
    from timeexpert.data.pipeline import draw_segment_frames, record_row

    rows = [record_row(r, r.video, (captions or {}).get(r.video, ())) for r in records]
    batch = {k: np.array([row[k] for row in rows]) for k in rows[0]}
    batch["frames"] = np.stack([frames[r.video][0] for r in records])
    batch["timestamps"] = np.stack([frames[r.video][1] for r in records])
    batch["frame_mask"] = np.ones(batch["timestamps"].shape, bool)
    return batch if rng is None else draw_segment_frames(batch, num_frames, rng)


def load_split(root: str, split: str, tasks: list[str], limit: int | None = None,
               caption_queries: bool = False, videos: int = 0):
    """The `tasks`' records of a split, at most `limit` per task, of its first `videos` videos
    only when > 0 (`first_videos`)."""
    from timeexpert import storage
    from timeexpert.data import pipeline
    from timeexpert.data.formats import read_manifest

    records = read_manifest(storage.join_uri(root, "manifests", f"{split}.jsonl"))
    records = first_videos(records, videos)
    out = pipeline.caption_queries(records) if caption_queries and "mr" in tasks else []
    for task in tasks:
        chosen = [r for r in records if r.task.value == task]
        out += chosen[:limit] if limit else chosen
    return out


def first_videos(records, n: int) -> list:
    """The records of the first `n` distinct videos (in record order); all of them for n <= 0."""
    if n <= 0:
        return list(records)
    videos: dict[str, None] = {}
    for r in records:
        if len(videos) < n:
            videos.setdefault(r.video)
    return [r for r in records if r.video in videos]


def epoch_order(records, rng: np.random.Generator, paired: bool) -> list[int]:
    """One epoch of record indices, shuffled; `paired`: the records of a video next to each other
    (videos shuffled), so a batch holds both MR queries of its videos: the same frames with two
    targets, the contrast that only reading the query can fit."""
    if not paired:
        return rng.permutation(len(records)).tolist()
    by_video: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_video.setdefault(r.video, []).append(i)
    groups = list(by_video.values())
    return [i for g in rng.permutation(len(groups)) for i in groups[g]]


def train_variant(name: str, args, train_phases, seed: int):
    """Train one variant; returns (model, tokenizer, training seconds)."""
    import torch

    from timeexpert.models.timeexpert import create_model
    from timeexpert.data.pipeline import video_captions
    from timeexpert.presets import get_preset
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.batches import tokenize_batch
    from timeexpert.train.fit import train_tokenizer
    from timeexpert.train.loop import model_config
    from timeexpert.train.recipes import set_trainable, stage_loss

    preset, overrides, train_overrides = VARIANTS[name]
    overrides = {**overrides, **model_set(args.model_set)}
    defaults = get_preset(preset).train
    total = sum(steps for _, _, steps in train_phases)
    cfg = TrainConfig(data_root=args.data_root, preset=preset, model_overrides=overrides,
                      stage=3, num_steps=total, batch_size=args.batch_size, seed=seed,
                      lr=args.lr or defaults.get("lr", 1e-3),
                      warmup_steps=max(1, total // 20), lr_schedule="cosine",
                      weight_decay=defaults.get("weight_decay", 0.0), **train_overrides)
    all_train = [r for records, _, _ in train_phases for r in records]
    tokenizer = train_tokenizer(cfg, all_train)
    mconfig = model_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = create_model(mconfig)
    model.train()
    set_trainable(model, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    t0, step = time.perf_counter(), 0
    jitter_rng = np.random.default_rng(seed + 1) if args.jitter > 1 else None
    for records, frames, steps in train_phases:
        rng = np.random.default_rng(seed)
        captions = video_captions(records)
        order: list[int] = []
        for _ in range(steps):
            if len(order) < args.batch_size:
                order += epoch_order(records, rng, args.paired)
            chosen, order = order[: args.batch_size], order[args.batch_size:]
            step += 1
            batch = as_batch([records[i] for i in chosen], frames, mconfig.num_frames, jitter_rng,
                             captions)
            inputs = tokenize_batch(batch, tokenizer, mconfig, model, step)
            for g in optim.param_groups:
                g["lr"] = cfg.learning_rate(step)
            out = model(**inputs, return_logits=False)
            loss = stage_loss(out, 3, mconfig)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optim.step()
            if step % 50 == 0 or step == total:
                frames_loss = "".join(
                    f" {label} {float(value.detach()):.3f}"
                    for label, value in (("frames", out.loss_frames), ("captions", out.loss_captions))
                    if value is not None)
                print(f"  [{name}] step {step}/{total} loss {float(loss.detach()):.3f} time "
                      f"{float(out.loss_time.detach()):.3f}{frames_loss} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    seconds = time.perf_counter() - t0
    return model, tokenizer, seconds


def evaluate(model, tokenizer, records, frames, batch_size: int = 16) -> dict:
    """Scores of the model's answers on `records` (+ distinct_windows, answers by record id)."""
    from timeexpert.eval.evaluate import distinct_windows, evaluate_predictions
    from timeexpert.inference import GroundingModel, PredictRequest

    gm = GroundingModel.from_model(model, tokenizer)
    predictions = {}
    for i in range(0, len(records), batch_size):
        chunk = records[i: i + batch_size]
        requests = [PredictRequest(frames_THWC=frames[r.video][0], timestamps_T=frames[r.video][1],
                                   task=r.task, query=r.query, duration=r.duration,
                                   clip_len=r.clip_len, options=r.options) for r in chunk]
        for r, p in zip(chunk, gm.predict_batch(requests)):
            predictions[r.id] = p
    out = {}
    for task in sorted({r.task for r in records}, key=lambda t: t.value):
        out[task.value] = evaluate_predictions(records, predictions, task, captions=False)
    out["distinct_windows"] = distinct_windows(records, predictions)
    return out, predictions


ATTRIBUTES = ("colour", "shape", "motion")


def attribute_agreement(records, predictions, scenes) -> dict[str, float] | None:
    """Does the model read the query or only find events? On a synthetic split (`scenes`: vid ->
    its `synth.Scene`), for every MR query: the event its top window overlaps most (temporal IoU)
    against the queried event (the scene's event at the ground-truth interval); the % of queries
    where the two share the colour, the shape, the motion, and all three (the same event, or a
    twin). `predictions` None: chance, the expected agreement of an event of the video drawn
    uniformly (a model that finds events without reading the query). None without MR queries of
    those scenes."""
    from timeexpert.events import Task, temporal_iou

    agree = dict.fromkeys((*ATTRIBUTES, "all"), 0.0)
    count = 0
    for r in records:
        scene = scenes.get(os.path.splitext(os.path.basename(r.video))[0])
        if r.task != Task.MR or scene is None or not scene.events:
            continue
        count += 1
        truth = r.events[0]
        queried = min(scene.events, key=lambda o: abs(o.start - truth.start) + abs(o.end - truth.end))
        if predictions is None:  # chance: an event of the video drawn uniformly
            hits = scene.events
        elif predictions[r.id].events:
            window = (predictions[r.id].events[0].start, predictions[r.id].events[0].end)
            hits = [max(scene.events, key=lambda o: float(temporal_iou(window, (o.start, o.end))))]
        else:
            continue
        for hit in hits:
            same = {a: getattr(hit, a) == getattr(queried, a) for a in ATTRIBUTES}
            for a, ok in same.items():
                agree[a] += ok / len(hits)
            agree["all"] += all(same.values()) / len(hits)
    return {k: round(100.0 * v / count, 1) for k, v in agree.items()} if count else None


def scenes_by_video(root: str, split: str) -> dict:
    """vid -> `synth.Scene` of a synthetic dataset's split; {} for a dataset without scenes."""
    from timeexpert import storage
    from timeexpert.data.synth import read_scenes

    if not storage.exists(storage.join_uri(root, "scenes", f"{split}.jsonl")):
        return {}
    return {s.vid: s for s in read_scenes(root, split)}


def best_trivial(train, records) -> dict[str, float]:
    from timeexpert.eval.baselines import trivial_baselines

    base = trivial_baselines(train, records, captions=False)
    out = {}
    for task, (key, _) in METRICS.items():
        values = [m[key] for name, m in base.items() if name.startswith(task + "/") and key in m]
        if task == "vhd" and "vhd/uniform_saliency" in base:  # a random clip's expected HIT@1,
            values.append(base["vhd/uniform_saliency"]["HL-min-VeryGood-mAP"])  # as the demo
        if values:
            out[task] = max(values)
    return out


def main() -> None:
    import torch

    args = parse_args(__doc__.split("\n")[0], _extra)
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from timeexpert.inference import GroundingModel
    from timeexpert.presets import get_preset

    checkpoints = dict(item.split("=", 1) for item in args.checkpoints.split(",") if item)
    loaded = {name: GroundingModel.load(uri) for name, uri in checkpoints.items()}
    for name, grounding in loaded.items():  # inference-time keys (frame_threshold, answer)
        for key, value in model_set(args.model_set).items():
            setattr(grounding.model.config, key, value)
        loaded[name] = GroundingModel.from_model(grounding.model, grounding.tokenizer)
    if loaded:  # the frames the saved models were trained on
        probe = next(iter(loaded.values())).model.config
    else:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
        probe = get_preset(VARIANTS[variants[0]][0]).model
        for key, value in model_set(args.model_set).items():
            setattr(probe, key, value)
    num_frames, size = probe.num_frames, probe.image_size
    t0 = time.perf_counter()
    if args.jitter < 1:
        raise SystemExit(f"--jitter takes K >= 1, got {args.jitter}")
    eval_root = args.eval_root or args.data_root
    train = load_split(args.data_root, "train", tasks)
    if args.split == "train" and eval_root != args.data_root:
        raise SystemExit("--split train scores the training data: leave --eval-root out")
    held_out = load_split(eval_root, args.split, tasks, args.max_records,
                          videos=args.train_videos if args.split == "train" else 0)
    frames = decode_all(eval_root, held_out, num_frames, size)
    phases = []  # (training records, their decoded frames, steps), easiest first
    for root in [] if loaded else [r for r in args.curriculum.split(",") if r] + [args.data_root]:
        records = load_split(root, "train", tasks, caption_queries=args.caption_queries,
                             videos=args.train_videos if root == args.data_root else 0)
        steps = args.steps if root == args.data_root else args.curriculum_steps
        phases.append((records, decode_all(root, records, num_frames * args.jitter, size), steps))
    print(f"decoded {len(frames) + sum(len(f) for _, f, _ in phases)} videos in "
          f"{time.perf_counter() - t0:.0f} s; "
          f"{len(phases[-1][0]) if phases else len(train)} training records, "
          f"{len(held_out)} {args.split} records", flush=True)
    trivial = best_trivial(train, held_out)
    scenes = scenes_by_video(eval_root, args.split)
    chance = attribute_agreement(held_out, None, scenes)
    result: dict = {"data_root": args.data_root, "eval_root": eval_root, "split": args.split,
                    "steps": args.steps, "jitter": args.jitter, "tasks": tasks,
                    "best_trivial": trivial, "attributes_by_chance": chance, "variants": {}}
    for name in loaded or variants:
        if loaded:
            model, tokenizer, seconds = loaded[name].model, loaded[name].tokenizer, 0.0
        else:
            model, tokenizer, seconds = train_variant(name, args, phases, args.seed)
            if args.save:
                GroundingModel(model, tokenizer).save(os.path.join(args.save, name))
        metrics, predictions = evaluate(model, tokenizer, held_out, frames)
        row = {"train_seconds": round(seconds, 1), "distinct_windows": metrics["distinct_windows"],
               "attributes": attribute_agreement(held_out, predictions, scenes)}
        for task in tasks:
            key, label = METRICS[task]
            value = metrics[task][key]
            row[task] = {"model": round(value, 2), "best_trivial": round(trivial[task], 2),
                         "ratio": round(value / max(trivial[task], 1e-9), 3)}
        result["variants"][name] = row
        print(f"{name}: " + "; ".join(
            f"{METRICS[t][1]} {row[t]['model']:.1f} / {row[t]['best_trivial']:.1f} = "
            f"{row[t]['ratio']:.2f}x" for t in tasks)
            + f"; distinct windows {row['distinct_windows']}; top window's event shares the "
              f"query's {row['attributes']} % (an event by chance: {chance}); {seconds:.0f} s",
            flush=True)
    emit(result, as_json=args.json)


if __name__ == "__main__":
    main()
