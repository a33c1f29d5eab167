r"""Evaluate a checkpoint on a dataset split: predictions, metrics, trivial baselines, report.

    python jobs/evaluate.py --checkpoint CKPT_URI --manifest ROOT/manifests/test.jsonl --out eval/ \
        [--train-manifest ROOT/manifests/train.jsonl] [--root ROOT] [--task mr] [--tracking-uri URI]

after `make demo` (the model it registered, the data it rendered):

    python jobs/evaluate.py --checkpoint models:/timeexpert-demo/latest \
        --tracking-uri sqlite:///.cache/demo/mlflow.db \
        --manifest .cache/demo/data/small/manifests/test.jsonl --out eval/

Writes under --out: predictions in the official formats (`{task}_predictions.jsonl` for MR/VHD,
QVHighlights submission rows; `dvc_predictions.json`, ActivityNet challenge json; GQA's NExT-GQA
spans `gqa_predictions.json` and answers `gqa_predictions_qa.json`), `metrics.json`
(model and baselines per task, decode skips) and `report.md`. Logs params, metrics and those
files to MLflow when a tracking URI is given (or MLFLOW_TRACKING_URI is set).
Videos are decoded by the Ray Data pipeline and answered by an actor pool of `--replicas` model
replicas (`timeexpert.eval.evaluate.predict_records`, as at the end of a training stage; one GPU
each with `--gpu`), on the cluster of RAY_ADDRESS or a local Ray.
Video URIs are resolved under --root, by default the dataset root of the manifest (the folder
above its `manifests/`, what `jobs/prepare_data.py` writes). A video that is not there stops the
job before anything runs (exit 2, naming it and the root), unless --allow-missing scores its
records as misses; a video that cannot be decoded is skipped, counted by reason, and scored as a
miss.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also when imported
from _common import connect_ray  # noqa: E402  (sys.path and environment defaults)

import mlflow  # noqa: E402
import ray  # noqa: E402

from timeexpert.checkpoints import read_config  # noqa: E402
from timeexpert.config import DataConfig, VideoConfig  # noqa: E402
from timeexpert.data.formats import dataset_root, read_manifest  # noqa: E402
from timeexpert.eval.baselines import trivial_baselines  # noqa: E402
from timeexpert.eval.evaluate import (  # noqa: E402
    MissingVideosError,
    check_videos,
    evaluate_predictions,
    predict_records,
    write_predictions,
)
from timeexpert.events import Task  # noqa: E402
from timeexpert.tracking import metric_key  # noqa: E402

HEADLINE = {
    Task.MR: ["R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP"],
    Task.VHD: ["HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1", "HL-min-Fair-mAP"],
    Task.DVC: ["F1", "SODA_c", "METEOR", "CIDEr"],
    Task.GQA: ["Acc@QA", "Acc@GQA", "mIoP", "IoP@0.5", "mIoU", "IoU@0.5"],
}


def markdown_report(checkpoint: str, results: dict, skipped: dict) -> str:
    lines = [f"# Evaluation of `{checkpoint}`", ""]
    for task_name, res in results.items():
        task = Task.parse(task_name)
        keys = [k for k in HEADLINE[task] if k in res["model"]] + ["no_answer_rate", "parse_failure_rate"]
        lines += [f"## {task.value.upper()} ({res['model']['num_records']} records)", "",
                  "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, metrics in [("model", res["model"]), *res["baselines"].items()]:
            lines.append(f"| {name} | " + " | ".join(f"{metrics.get(k, float('nan')):.2f}" for k in keys) + " |")
        lines.append("")
    if skipped:
        lines.append("Videos skipped (scored as misses): " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint dir, file://, s3://, runs:/ or models:/ URI (MLflow: with --tracking-uri)")
    parser.add_argument("--manifest", required=True, help="canonical manifest of the eval split")
    parser.add_argument("--train-manifest", help="train split manifest, for the baselines' priors")
    parser.add_argument("--split", help="keep only records of this split")
    parser.add_argument("--task", choices=[t.value for t in Task], help="default: every task present")
    parser.add_argument("--root", help="dataset root the manifest's video URIs are relative to "
                        "(default: the folder above the manifest's manifests/ folder)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score the records of videos that are not there as misses, instead "
                             "of stopping")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-frames", type=int, help="frames per video (default: the model's)")
    parser.add_argument("--size", type=int, help="frame height = width (default: the model's)")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas answering in parallel")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica (bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0, help="random baseline seed")
    parser.add_argument("--no-captions", action="store_true", help="skip METEOR/CIDEr/SODA_c (java)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)

    records = read_manifest(args.manifest)
    if args.split:
        records = [r for r in records if r.split == args.split]
    if args.task:
        records = [r for r in records if r.task == Task.parse(args.task)]
    records = records[: args.limit] if args.limit else records
    if not records:
        print(f"error: no records in {args.manifest} for split={args.split} task={args.task}", file=sys.stderr)
        return 2
    train = read_manifest(args.train_manifest) if args.train_manifest else []
    root = args.root or dataset_root(args.manifest)
    if not args.allow_missing:
        try:
            check_videos(records, root)
        except MissingVideosError as err:
            print(f"error: {len(err.missing)} of {err.num_videos} videos of {args.manifest} are not "
                  f"under the root {root!r} ({'--root' if args.root else 'the default of --root'}); "
                  f"the first: {err.missing[0]}\n"
                  "Their records would score as misses. Pass --root DATASET_ROOT (the folder "
                  "holding the manifest's videos), or --allow-missing to score them as misses.",
                  file=sys.stderr)
            return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.tracking_uri:  # models:/ and runs:/ checkpoints resolve there, in the replicas too
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    t0 = time.perf_counter()
    try:
        config = read_config(args.checkpoint)
    except (OSError, ValueError) as err:
        print(f"error: cannot read the checkpoint {args.checkpoint!r}: {err}", file=sys.stderr)
        return 2
    # Decode as the model was trained: its frame count and image size unless overridden.
    size = args.size or config["image_size"]
    video = VideoConfig(num_frames=args.num_frames or config["num_frames"], height=size, width=size)
    started = connect_ray(num_cpus=2)
    try:
        predictions, _, skipped = predict_records(
            args.checkpoint, records, DataConfig(root=root, video=video, decode_num_cpus=0.25),
            replicas=args.replicas, num_cpus=args.cpus_per_replica,
            num_gpus=1.0 if args.gpu else 0.0, batch_size=args.batch_size,
            allow_missing=True,  # checked above, unless --allow-missing
        )
    finally:
        if started:
            ray.shutdown()
    results = {}
    for task in sorted({r.task for r in records}, key=lambda t: t.value):
        task_records = [r for r in records if r.task == task]
        suffix = "json" if task in (Task.DVC, Task.GQA) else "jsonl"
        write_predictions(task_records, predictions, task, out / f"{task.value}_predictions.{suffix}")
        results[task.value] = {
            "model": evaluate_predictions(task_records, predictions, task, captions=not args.no_captions),
            "baselines": trivial_baselines(train, task_records, seed=args.seed, captions=not args.no_captions),
        }
    summary = {"checkpoint": args.checkpoint, "manifest": args.manifest, "num_records": len(records),
               "skipped_videos": dict(skipped), "seconds": time.perf_counter() - t0, "results": results}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    report = markdown_report(args.checkpoint, results, dict(skipped))
    (out / "report.md").write_text(report)
    print(report)

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
        with mlflow.start_run(run_name="evaluate"):
            mlflow.log_params({"checkpoint": args.checkpoint, "manifest": args.manifest,
                               "split": args.split or "", "num_records": len(records)})
            for task_name, res in results.items():
                for who, metrics in [("model", res["model"]), *res["baselines"].items()]:
                    mlflow.log_metrics({
                        metric_key(f"{task_name}/{who}/{k}"): float(v)
                        for k, v in metrics.items() if isinstance(v, (int, float))
                    })
            mlflow.log_artifacts(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
