r"""An ablation grid with seeds: every variant trained once per seed, scored on whole splits.

    python jobs/ablate.py --preset binding_cpu --grid timeexpert --seeds 3 \
        --data-root .cache/data/ablation --synthetic ablation [--only full,dense] [--json]

Grids (`timeexpert.ablation.GRIDS`): `timeexpert` (full / w/o token-adaptive routing / w/o the
task-dependent loss / vanilla top-k k = 2, 4, 6 / dense FFN) and `frames` (8 / 16 / 32 frames).
Seed s sets the model's initialisation and the data order, so the variants of a seed train on
the same batches. Each run trains the preset's stages, then the evaluation actor pool scores
the whole --val-split (to choose) and --test-split (to report). The table gives, per variant,
each metric's mean ± std over the seeds, the paired difference to the grid's reference with its
95% Student-t interval over the seeds, and a verdict on MR R1@0.5 against the paper's direction.
`--json` prints one JSON object last: {"grid", "variants": {NAME: {METRIC: {"mean", "std",
"n"}}}, "differences", "verdicts", "chosen_on_val", ...} (test split).
MLflow (--tracking-uri): experiment `ablation-<grid>`, a parent run per variant (the means),
a child run per seed (its val/ and test/ metrics; its stages nested under it), and a `summary`
run holding the table, the JSON and a comparison plot (means with std error bars).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import _common  # (sys.path and environment defaults, before the imports below)

from timeexpert import storage, tracking
from timeexpert.ablation import (METRICS, PRIMARY, GridResult, comparison_plot, get_grid,
                                 markdown_table, record_scores, variant_config)
from timeexpert.data import formats
from timeexpert.presets import get_preset
from timeexpert.train.stages import evaluate_checkpoint, run_pipeline

ALL_RECORDS = 10**9  # evaluate_checkpoint's per-task cap: whole splits
PAPER_SIZED = 200  # videos a split needs for paper-sized (1-3 point) differences to show


def split_videos(data_root: str, split: str) -> int:
    records = formats.read_manifest(storage.join_uri(data_root, "manifests", f"{split}.jsonl"))
    return len({r.video for r in records})


def run_metrics(cfg, stages, splits: list[str], parent_run_id: str) -> tuple[dict, dict]:
    """Train one (variant, seed), score every split whole: (split -> metric -> value, split ->
    record id -> (video, MR R1@0.5 of that record) for the bootstrap over videos)."""
    result = run_pipeline(cfg, stages=stages, parent_run_id=parent_run_id)
    last = result.stages[max(result.stages)]
    train = last.train_metrics
    own = {"train/experts_per_token": float(train.get("experts/mean_active", 1.0)),
           "train/seconds_per_step": train["time_total/loop"] / max(train["time_total/steps"], 1.0)}
    out, scores = {}, {}
    for split in splits:
        kept: dict = {}
        metrics = evaluate_checkpoint(result.checkpoint_uri, cfg, split=split,
                                      max_records=ALL_RECORDS, keep=kept)
        out[split] = {**metrics, **own}
        per_record = record_scores(kept["records"], kept["predictions"])
        mean = sum(v for _, v in per_record.values()) / max(len(per_record), 1)
        if per_record and abs(mean - metrics.get(PRIMARY, math.nan)) < 1e-6:
            scores[split] = per_record
        else:  # not a per-record mean on this split: no bootstrap rather than a wrong one
            print(f"    {split}: per-record {PRIMARY} averages {mean:.4f}, the split's is "
                  f"{metrics.get(PRIMARY)}: no bootstrap interval", flush=True)
    return out, scores


def run_grid(base, grid, variants: list[str], seeds: list[int], stages, splits: list[str],
             partial: str = "") -> GridResult:
    """Seed by seed, every variant: a grid cut short still holds complete seeds (each run's
    metrics are appended to `partial`, a JSON-lines file, as it finishes)."""
    uri, experiment = base.tracking_uri, f"ablation-{grid.name}"
    result = GridResult(grid=grid, runs={v: {} for v in variants},
                        split_videos={s: split_videos(base.data_root, s) for s in splits})
    tags = {v: {"grid": grid.name, "variant": v, "preset": base.preset} for v in variants}
    parents = {v: tracking.create_run(uri, experiment, v, tags=tags[v]) if uri else ""
               for v in variants}
    status = "FAILED"
    try:
        for seed in seeds:
            for variant in variants:
                cfg = variant_config(base, grid, variant, seed).replace(experiment=experiment)
                print(f"=== {grid.name}: {variant}, seed {seed}", flush=True)
                t0 = time.perf_counter()
                child = (tracking.create_run(uri, experiment, f"{variant}-seed{seed}",
                                             parent_id=parents[variant],
                                             tags={**tags[variant], "seed": str(seed)})
                         if uri else "")
                try:
                    metrics, scores = run_metrics(cfg, stages, splits, child)
                except BaseException:
                    if uri:
                        tracking.end_run(uri, child, "FAILED")
                    raise
                result.runs[variant][seed] = metrics
                result.scores.setdefault(variant, {})[seed] = scores
                if uri:
                    tracking.log_metrics(uri, child, {f"{split}/{k}": v
                                                      for split, m in metrics.items()
                                                      for k, v in m.items()})
                    tracking.end_run(uri, child)
                if partial:
                    with open(partial, "a") as f:
                        f.write(json.dumps({"variant": variant, "seed": seed,
                                            "metrics": metrics, "scores": scores}) + "\n")
                print(f"    {time.perf_counter() - t0:.0f} s: " + ", ".join(
                    f"{split} {label} {metrics[split][key]:.2f}" for split in splits
                    for label, key in METRICS[:1] if key in metrics[split]), flush=True)
        status = "FINISHED"
    finally:
        if uri:
            for variant, parent in parents.items():
                if result.runs[variant]:
                    tracking.log_metrics(uri, parent, {
                        f"{split}/{key}/{stat}": value for split in splits
                        for key, stats in result.summary(split)[variant].items()
                        for stat, value in stats.items()})
                tracking.end_run(uri, parent, status)
    return result


def read_partial(path: str, grid, data_root: str, splits: list[str]) -> GridResult:
    """The GridResult of the runs `run_grid` appended to `path`."""
    result = GridResult(grid=grid, runs={},
                        split_videos={s: split_videos(data_root, s) for s in splits})
    with open(path) as f:
        for line in f:
            run = json.loads(line)
            result.runs.setdefault(run["variant"], {})[run["seed"]] = run["metrics"]
            result.scores.setdefault(run["variant"], {})[run["seed"]] = {
                split: {rid: tuple(vs) for rid, vs in by_id.items()}
                for split, by_id in run["scores"].items()}
    return result


def report(result: GridResult, splits: list[str], header: str) -> str:
    lines = [header, ""]
    for split in splits:
        videos = result.split_videos.get(split, 0)
        small = (f" (fewer than {PAPER_SIZED} videos: only large differences can show)"
                 if videos < PAPER_SIZED else "")
        lines += [f"### {split} ({videos} videos){small}", "", markdown_table(result, split), ""]
    if "val" in splits:
        chosen = result.chosen("val")
        lines.append(f"Chosen on val by MR R1@0.5: **{chosen}**.")
    return "\n".join(lines)


def log_summary(result: GridResult, table: str, payload: dict, uri: str, split: str) -> None:
    """The grid's `summary` run: the table, the JSON and the comparison plot as artifacts."""
    run = tracking.create_run(uri, f"ablation-{result.grid.name}", "summary",
                              tags={"grid": result.grid.name, "role": "summary"})
    with tempfile.TemporaryDirectory(prefix="te-ablation-") as d:
        for name, text in (("table.md", table), ("result.json", json.dumps(payload, indent=1))):
            with open(os.path.join(d, name), "w") as f:
                f.write(text + "\n")
            tracking.log_artifact_file(uri, run, os.path.join(d, name))
        tracking.log_artifact_file(uri, run, comparison_plot(result, split,
                                                             os.path.join(d, "comparison.png")))
    tracking.end_run(uri, run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_train_flags(p)
    p.add_argument("--grid", default="timeexpert", help="timeexpert or frames")
    p.add_argument("--seeds", type=int, default=3, help="N seeds per variant")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds FIRST .. FIRST+N-1 (another machine's or a later run's share)")
    p.add_argument("--only", default="", help="comma-separated variants (default: the grid's)")
    p.add_argument("--stages", default="", help="comma-separated stages (default: the preset's)")
    p.add_argument("--val-split", default="val", help="split that chooses ('' = none)")
    p.add_argument("--test-split", default="test", help="split that reports")
    p.add_argument("--out", default="", help="also write the markdown report here")
    p.add_argument("--partial", default="", help="append each run's metrics here as it ends "
                                                 "(JSON lines)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the report of the runs recorded in --partial")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    try:
        grid = get_grid(args.grid)
        variants = [v for v in args.only.split(",") if v] or [v.name for v in grid.variants]
        for v in variants:
            grid.variant(v)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.seeds < 1 or args.first_seed < 0:
        raise SystemExit(f"--seeds must be >= 1 and --first-seed >= 0, got {args.seeds} and "
                         f"{args.first_seed}")
    stages = ([int(s) for s in args.stages.split(",")] if args.stages
              else list(get_preset(args.preset).stages))
    splits = [s for s in (args.val_split, args.test_split) if s]
    # no stage's own sample evaluation: every run is scored on whole splits afterwards
    base = _common.train_config(args, eval_max_records=0)
    t0 = time.perf_counter()
    if args.report_only:
        if not args.partial:
            raise SystemExit("--report-only reads the runs of --partial FILE")
        result = read_partial(args.partial, grid, base.data_root, splits)
    else:
        _common.prepare_data(args)
        _common.connect_ray(args.num_cpus)
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        result = run_grid(base, grid, variants, seeds, stages, splits, args.partial)
    minutes = (time.perf_counter() - t0) / 60
    seeds = max((len(runs) for runs in result.runs.values()), default=0)  # the runs it holds
    header = (f"## Grid `{grid.name}` on `{args.preset}` ({grid.source}), {seeds} seeds, "
              f"stages {stages}, {base.num_steps} steps"
              + ("" if args.report_only else f", {minutes:.0f} min"))
    table = report(result, splits, header)
    payload = {**result.to_json(args.test_split), "minutes": round(minutes, 1),
               "preset": args.preset, "seeds": seeds}
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if base.tracking_uri:
        log_summary(result, table, payload, base.tracking_uri, args.test_split)
    if args.json:
        print(json.dumps(payload), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
