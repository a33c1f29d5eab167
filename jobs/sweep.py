r"""Ray Tune sweep with ASHA over training hyperparameters; every trial is a Ray Train run.

    python jobs/sweep.py --preset tiny_cpu --data-root .cache/data/tiny --synthetic tiny \
        --num-samples 8 --stage 2 [--gating topk] [--tracking-uri http://127.0.0.1:5000]

Searched: lr (log-uniform), alpha, tau_min, lambda_1, lambda_2 (dynamic gating) or k (topk).
Each trial reports the Train metrics to Tune (ASHA stops the weak ones early on `loss`) and logs
a nested MLflow run under the sweep's parent run.
"""

from __future__ import annotations

import argparse
import json
import os

import _common  # (sys.path and environment defaults, before the imports below)
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from timeexpert import storage, tracking
from timeexpert.data import formats
from timeexpert.train.checkpoint import storage_root
from timeexpert.train.config import TrainConfig
from timeexpert.train.fit import fit, prepare_tokenizer


def search_space(gating: str) -> dict:
    space = {"lr": tune.loguniform(3e-4, 3e-3), "lambda_1": tune.choice([0.0, 0.01, 0.05]),
             "lambda_2": tune.choice([0.0, 0.001])}
    if gating == "topk":
        space["num_experts_per_token"] = tune.choice([1, 2])
    elif gating == "dynamic":
        space.update(alpha=tune.uniform(0.0, 0.3), tau_min=tune.choice([0.0, 0.01, 0.05]))
    return space


def trial(config: dict) -> None:
    """One Tune trial: a Train run of the base config with the sampled hyperparameters. (Tune
    sends it to the trial actor by value; the names it uses are importable modules' there.)"""
    base = TrainConfig.from_dict(config["base"])
    hp = {k: v for k, v in config.items() if k not in ("base", "tokenizer_uri", "parent_run_id")}
    moe = dict(base.moe)
    moe.update({k: v for k, v in hp.items() if k != "lr"})
    trial_name = tune.get_context().get_trial_name()
    cfg = base.replace(lr=hp["lr"], moe=moe, name=f"{base.name}-{trial_name}")
    if cfg.tracking_uri:
        run_id = tracking.create_run(cfg.tracking_uri, cfg.experiment, trial_name,
                                     parent_id=config["parent_run_id"], tags={**cfg.tags, "sweep": base.name})
        tracking.log_params(cfg.tracking_uri, run_id, hp)
        cfg = cfg.replace(mlflow_run_id=run_id)
    result = fit(cfg, tokenizer_uri=config["tokenizer_uri"], callbacks=[TuneReportCallback()])
    if cfg.tracking_uri:
        tracking.log_metrics(cfg.tracking_uri, cfg.mlflow_run_id, {"final_loss": result.metrics["loss"]})
        tracking.end_run(cfg.tracking_uri, cfg.mlflow_run_id)


def run_sweep(base, *, num_samples: int, max_concurrent: int = 1, seed: int = 0):
    """Run the sweep on the connected Ray cluster; returns (best hyperparameters, tune ResultGrid)."""
    gating = base.moe.get("gating") or "dynamic"
    train = formats.read_manifest(storage.join_uri(base.data_root, "manifests", "train.jsonl"))
    tokenizer_uri = prepare_tokenizer(base, train)
    parent = ""
    if base.tracking_uri:
        parent = tracking.create_run(base.tracking_uri, base.experiment, base.name,
                                     tags={**base.tags, "kind": "sweep"})
    space = dict(search_space(gating), base=base.to_dict(), tokenizer_uri=tokenizer_uri,
                 parent_run_id=parent)
    reports = max(1, base.num_steps // base.log_every)
    tuner = tune.Tuner(
        # A sliver of a CPU for the trial driver (Tune refuses an empty request); the trial's
        # Train workers reserve the real CPUs.
        tune.with_resources(trial, {"CPU": 0.01}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="loss", mode="min", num_samples=num_samples,
            # max_t one past the last report: a trial that reaches its last step ends on its own
            # (and finishes its MLflow run); ASHA only stops the weak ones at its rungs.
            scheduler=ASHAScheduler(max_t=reports + 1, grace_period=1, reduction_factor=2),
            # Tune ignores max_concurrent_trials beside an explicit BasicVariantGenerator.
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent),
        ),
        run_config=tune.RunConfig(name=base.name, storage_path=os.path.join(storage_root(base), "tune")
                                  if not base.storage_root.startswith("s3://") else
                                  storage.join_uri(base.storage_root, "tune")),
    )
    grid = tuner.fit()
    if parent:
        _close_stopped_trial_runs(base.tracking_uri, base.experiment, parent)
    best = grid.get_best_result()
    best_hp = {k: v for k, v in best.config.items() if k not in ("base", "tokenizer_uri", "parent_run_id")}
    if parent:
        tracking.log_params(base.tracking_uri, parent, {f"best.{k}": v for k, v in best_hp.items()})
        tracking.log_metrics(base.tracking_uri, parent, {"best_loss": best.metrics["loss"]})
        tracking.end_run(base.tracking_uri, parent)
    return best_hp, grid


def _close_stopped_trial_runs(tracking_uri: str, experiment: str, parent: str) -> None:
    """ASHA stops a trial mid-run, before it ends its MLflow run: mark those runs KILLED."""
    c = tracking.client(tracking_uri)
    runs = c.search_runs([tracking.experiment_id(tracking_uri, experiment)],
                         filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    for run in runs:
        if run.info.status == "RUNNING":
            tracking.end_run(tracking_uri, run.info.run_id, "KILLED")


def trial_summaries(grid) -> list[dict]:
    """One entry per trial: its hyperparameters, last reported step and loss, error if any."""
    out = []
    for r in grid:
        hp = {k: v for k, v in r.config.items() if k not in ("base", "tokenizer_uri", "parent_run_id")}
        out.append({"hp": hp, "step": (r.metrics or {}).get("step"), "loss": (r.metrics or {}).get("loss"),
                    "error": None if r.error is None else repr(r.error)[:500]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_train_flags(p)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--gating", choices=["dense", "topk", "dynamic"], default=None)
    args = p.parse_args(argv)
    cfg = _common.train_config(args, stage=args.stage, eval_max_records=0)
    if args.gating:
        cfg = cfg.replace(moe={**cfg.moe, "gating": args.gating})
    _common.prepare_data(args)
    _common.connect_ray(args.num_cpus)
    best, grid = run_sweep(cfg, num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    trials = trial_summaries(grid)
    for t in trials:
        loss = float("nan") if t["loss"] is None else t["loss"]
        print(f"trial loss {loss:.4f} at step {t['step']} {json.dumps(t['hp'])}"
              + (f" ERROR {t['error']}" if t["error"] else ""))
    print("TRIALS " + json.dumps(trials), flush=True)
    print("BEST " + json.dumps(best), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
