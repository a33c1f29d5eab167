r"""Ray Tune sweep with ASHA over training hyperparameters; every trial is a Ray Train run.

    python jobs/sweep.py --preset tiny_cpu --data-root .cache/data/tiny --synthetic tiny \
        --num-samples 8 --stage 2 [--gating topk] [--only lr] [--best-out best.json]
    python jobs/train.py --preset tiny_cpu ... --settings best.json     # train with the winner

Searched: lr (log-uniform), alpha, tau_min, lambda_1, lambda_2 (dynamic gating) or k (topk);
`--only lr` searches the learning rate alone. Each trial scores grounding as it trains: MR R1@0.5
of the model on a fixed subset of the validation split (`--val-records` queries, every
`--val-every` steps: `TrainConfig.val_every`, `train.validation`), and ASHA stops the trials
that ground worst at its rungs; the training loss, which does not rank what grounds
(docs/experiments.md), is only logged. The best trial's settings go to `--best-out`, a JSON of
TrainConfig fields that `jobs/train.py --settings` takes. Each trial logs a nested MLflow run
under the sweep's parent run.
"""

from __future__ import annotations

import argparse
import json

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
from timeexpert.train.telemetry import VAL_METRIC


def search_space(gating: str, only_lr: bool = False) -> dict:
    space = {"lr": tune.loguniform(1e-4, 3e-3)}
    if only_lr:
        return space
    space.update(lambda_1=tune.choice([0.0, 0.01, 0.05]), lambda_2=tune.choice([0.0, 0.001]))
    if gating == "topk":
        space["num_experts_per_token"] = tune.choice([1, 2])
    elif gating == "dynamic":
        space.update(alpha=tune.uniform(0.0, 0.3), tau_min=tune.choice([0.0, 0.01, 0.05]))
    return space


def settings(base: TrainConfig, hp: dict) -> dict:
    """A trial's hyperparameters as the TrainConfig fields they set (what `--settings` takes)."""
    moe = {**base.moe, **{k: v for k, v in hp.items() if k != "lr"}}
    return {"lr": hp["lr"], "moe": moe} if moe != base.moe else {"lr": hp["lr"]}


def trial(config: dict) -> None:
    """One Tune trial: a Train run of the base config with the sampled hyperparameters. (Tune
    sends it to the trial actor by value; the names it uses are importable modules' there.)"""
    base = TrainConfig.from_dict(config["base"])
    hp = {k: v for k, v in config.items() if k not in ("base", "tokenizer_uri", "parent_run_id")}
    trial_name = tune.get_context().get_trial_name()
    cfg = base.replace(**settings(base, hp), name=f"{base.name}-{trial_name}")
    if cfg.tracking_uri:
        run_id = tracking.create_run(cfg.tracking_uri, cfg.experiment, trial_name,
                                     parent_id=config["parent_run_id"], tags={**cfg.tags, "sweep": base.name})
        tracking.log_params(cfg.tracking_uri, run_id, hp)
        cfg = cfg.replace(mlflow_run_id=run_id)
    result = fit(cfg, tokenizer_uri=config["tokenizer_uri"], callbacks=[TuneReportCallback()])
    if cfg.tracking_uri:
        tracking.log_metrics(cfg.tracking_uri, cfg.mlflow_run_id,
                             {"final_loss": result.metrics["loss"],
                              f"final_{VAL_METRIC}": result.metrics[VAL_METRIC]})
        tracking.end_run(cfg.tracking_uri, cfg.mlflow_run_id)



def run_sweep(base, *, num_samples: int, max_concurrent: int = 1, seed: int = 0,
              only_lr: bool = False):
    """Run the sweep on the connected Ray cluster (`base.val_every` set: the trials report the
    validation score ASHA ranks them by); returns (best hyperparameters, tune ResultGrid)."""
    if not base.val_every:
        raise ValueError("a sweep ranks its trials by their validation score: set val_every")
    gating = base.moe.get("gating") or "dynamic"
    train = formats.read_manifest(storage.join_uri(base.data_root, "manifests", "train.jsonl"))
    tokenizer_uri = prepare_tokenizer(base, train)
    parent = ""
    if base.tracking_uri:
        parent = tracking.create_run(base.tracking_uri, base.experiment, base.name,
                                     tags={**base.tags, "kind": "sweep"})
    space = dict(search_space(gating, only_lr), base=base.to_dict(), tokenizer_uri=tokenizer_uri,
                 parent_run_id=parent)
    reports = max(1, base.num_steps // base.log_every)
    tune_path, tune_filesystem = storage.ray_storage(storage.join_uri(storage_root(base), "tune"))
    tuner = tune.Tuner(
        # A sliver of a CPU for the trial driver (Tune refuses an empty request); the trial's
        # Train workers reserve the real CPUs.
        tune.with_resources(trial, {"CPU": 0.01}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=num_samples,
            # max_t one past the last report: a trial that reaches its last step ends on its own
            # (and finishes its MLflow run); ASHA only stops the weak ones at its rungs.
            scheduler=ASHAScheduler(max_t=reports + 1, grace_period=1, reduction_factor=2),
            # Tune ignores max_concurrent_trials beside an explicit BasicVariantGenerator.
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent),
        ),
        run_config=tune.RunConfig(name=base.name, storage_path=tune_path,
                                  storage_filesystem=tune_filesystem),
    )
    grid = tuner.fit()
    if parent:
        _close_stopped_trial_runs(base.tracking_uri, base.experiment, parent)
    best = grid.get_best_result()
    best_hp = {k: v for k, v in best.config.items() if k not in ("base", "tokenizer_uri", "parent_run_id")}
    if parent:
        tracking.log_params(base.tracking_uri, parent, {f"best.{k}": v for k, v in best_hp.items()})
        tracking.log_metrics(base.tracking_uri, parent, {f"best_{VAL_METRIC}": best.metrics[VAL_METRIC],
                                                         "best_loss": best.metrics["loss"]})
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
    """One entry per trial: its hyperparameters, last reported step, validation score and loss,
    error if any."""
    out = []
    for r in grid:
        hp = {k: v for k, v in r.config.items() if k not in ("base", "tokenizer_uri", "parent_run_id")}
        m = r.metrics or {}
        out.append({"hp": hp, "step": m.get("step"), "val": m.get(VAL_METRIC), "loss": m.get("loss"),
                    "error": None if r.error is None else repr(r.error)[:500]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_train_flags(p)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--gating", choices=["dense", "topk", "dynamic"], default=None)
    p.add_argument("--only", choices=["lr"], default=None, help="search the learning rate alone")
    p.add_argument("--val-every", type=int, default=0,
                   help="steps between the trials' validation scores (default: every report)")
    p.add_argument("--val-records", type=int, default=16,
                   help="MR queries of the validation split each score answers")
    p.add_argument("--best-out", default="",
                   help="write the best trial's settings here, a local path or s3:// (JSON; "
                        "default: STORAGE_ROOT/sweeps/NAME.json)")
    args = p.parse_args(argv)
    cfg = _common.train_config(args, stage=args.stage, eval_max_records=0)
    cfg = cfg.replace(val_every=args.val_every or cfg.log_every, val_records=args.val_records)
    if args.gating:
        cfg = cfg.replace(moe={**cfg.moe, "gating": args.gating})
    _common.prepare_data(args)
    _common.connect_ray(args.num_cpus)
    best, grid = run_sweep(cfg, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                           only_lr=args.only == "lr")
    trials = trial_summaries(grid)
    for t in trials:
        val, loss = (float("nan") if t[k] is None else t[k] for k in ("val", "loss"))
        print(f"trial val MR R1@0.5 {val:.2f}, loss {loss:.4f} at step {t['step']} "
              f"{json.dumps(t['hp'])}" + (f" ERROR {t['error']}" if t["error"] else ""))
    out = args.best_out or storage.join_uri(cfg.storage_root, "sweeps", f"{cfg.name}.json")
    storage.write_text(out, json.dumps(settings(cfg, best), indent=1) + "\n")
    print(f"the best trial's settings: {out} (jobs/train.py --settings {out})")
    print("TRIALS " + json.dumps(trials), flush=True)
    print("BEST " + json.dumps(best), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
