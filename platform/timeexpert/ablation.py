"""Ablation grids: named sets of variants, seeds, paired intervals and verdicts.

A grid is a reference variant and its ablations, each a delta of the training config
(`TrainConfig` fields; `moe` and `model_overrides` are merged into the preset's). Every variant
trains once per seed; a seed sets the model's initialisation and the data order
(`TrainConfig.seed`), so the variants of one seed see the same batches and their differences can
be paired. Each run is scored on whole splits (validation to choose, test to report); a
variant's difference to the reference is the mean of its per-seed differences with a 95%
Student-t interval over the seeds; beside it, the difference on MR R1@0.5 with a bootstrap
interval over the test videos (the split's sampling noise). The verdict compares the seed
interval with the paper's direction.

    grid = get_grid("timeexpert")
    cfg = variant_config(base_cfg, grid, "dense", seed=1)
    stats = summarize({"full": {0: {...}, 1: {...}}, "dense": {...}})
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

from timeexpert.eval.evaluate import evaluate_predictions
from timeexpert.train.config import TrainConfig

REPRODUCED, REVERSED, NOISE, NO_CLAIM = "reproduced", "reversed", "within noise", "-"

# (column label, metric key): the evaluation's "{task}/{metric}" keys, and the run's own
# `train/...` figures (experts per token of the last report window, seconds per step).
METRICS: tuple[tuple[str, str], ...] = (
    ("MR R1@0.5", "mr/R1@0.5"),
    ("MR mIoU", "mr/mIoU"),
    ("VHD HIT@1", "vhd/HL-min-VeryGood-Hit1"),
    ("VHD mAP", "vhd/HL-min-VeryGood-mAP"),
    ("DVC F1", "dvc/F1"),
    ("DVC SODA_c", "dvc/SODA_c"),
    ("DVC CIDEr", "dvc/CIDEr"),
    ("GQA Acc@QA", "gqa/Acc@QA"),
    ("GQA Acc@GQA", "gqa/Acc@GQA"),
    ("distinct %", "mr/distinct_windows"),
    ("experts/token", "train/experts_per_token"),
    ("s/step", "train/seconds_per_step"),
)
# The metrics a verdict reads (quality, not cost), and the one that chooses on validation.
QUALITY = tuple(key for _, key in METRICS if not key.startswith("train/"))
PRIMARY = "mr/R1@0.5"


@dataclass(frozen=True)
class Variant:
    name: str
    delta: Mapping[str, Any]  # TrainConfig fields; `moe` / `model_overrides` merge
    # the paper's claim for (this variant - the reference): -1 worse, +1 better, 0 no claim
    paper_sign: int = -1
    claim: str = ""  # the paper's figure behind `paper_sign`, for the table


@dataclass(frozen=True)
class Grid:
    name: str
    reference: str  # the variant every other one is compared with
    variants: tuple[Variant, ...]
    source: str  # where the paper's claims come from
    notes: tuple[str, ...] = field(default_factory=tuple)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"grid {self.name!r} has no variant {name!r}; choose from "
                         f"{[v.name for v in self.variants]}")


_DYNAMIC = {"gating": "dynamic"}
GRIDS: dict[str, Grid] = {
    "timeexpert": Grid(
        name="timeexpert",
        reference="full",
        source="TimeExpert (Yang et al., ICCV 2025) Table 5",
        variants=(
            Variant("full", {"moe": _DYNAMIC}, 0,
                    "dynamic gating + token-adaptive routing + task-dependent aux loss"),
            Variant("no_adaptive", {"moe": _DYNAMIC, "expert_update_every": 0}, -1,
                    "w/o token-adaptive routing: -0.4 to -2.6 on every task"),
            Variant("no_task_loss", {"moe": {**_DYNAMIC, "lambda_1": 0.0, "lambda_2": 0.0}}, -1,
                    "w/o task-dependent aux loss: -0.1 to -1.7"),
            Variant("topk_k2", {"moe": {"gating": "topk", "num_experts_per_token": 2}}, -1,
                    "vanilla top-k, k=2: below full"),
            Variant("topk_k4", {"moe": {"gating": "topk", "num_experts_per_token": 4}}, -1,
                    "vanilla top-k, k=4: above k=2, below full"),
            Variant("topk_k6", {"moe": {"gating": "topk", "num_experts_per_token": 6}}, -1,
                    "vanilla top-k, k=6: saturates, below full"),
            Variant("dense", {"moe": {"gating": "dense"}}, -1, "a dense FFN: below every MoE"),
        ),
    ),
    "frames": Grid(
        name="frames",
        reference="f16",
        source="TimeExpert (Yang et al., ICCV 2025) Table 5, frames 8 < 64 < 128",
        variants=(
            Variant("f8", {"model_overrides": {"num_frames": 8}}, -1, "fewer frames: worse"),
            Variant("f16", {"model_overrides": {"num_frames": 16}}, 0, "the preset's frames"),
            Variant("f32", {"model_overrides": {"num_frames": 32}}, +1, "more frames: better"),
        ),
    ),
}


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose from {sorted(GRIDS)}")
    return GRIDS[name]


def variant_config(base: TrainConfig, grid: Grid, variant: str, seed: int) -> TrainConfig:
    """`base` with the variant's delta and the seed: run name `{base.name}-{variant}-s{seed}`,
    tags grid / variant / seed."""
    delta = dict(grid.variant(variant).delta)
    moe = {**base.moe, **delta.pop("moe", {})}
    overrides = {**base.model_overrides, **delta.pop("model_overrides", {})}
    unknown = [k for k in delta if not hasattr(base, k)]
    if unknown:
        raise ValueError(f"variant {variant!r} sets unknown TrainConfig fields {unknown}")
    tags = {**base.tags, "grid": grid.name, "variant": variant, "seed": str(seed)}
    return base.replace(moe=moe, model_overrides=overrides, seed=seed, tags=tags,
                        name=f"{base.name}-{variant}-s{seed}", **delta)


# --- statistics --------------------------------------------------------------------------------

# two-sided 95% Student-t quantiles t_{0.975, df}; beyond the table the normal's 1.96 is close
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The two-sided 95% t quantile; between the table's rows the next lower df's (wider)."""
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1, got {df}")
    return 1.96 if df > 30 else _T975[max(k for k in _T975 if k <= df)]


def describe(values: list[float]) -> dict[str, float]:
    """{"mean", "std" (sample, 0 for one value), "n"}."""
    n = len(values)
    return {"mean": statistics.fmean(values) if n else math.nan,
            "std": statistics.stdev(values) if n > 1 else 0.0, "n": n}


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]
                      ) -> dict[str, float]:
    """Mean over the shared seeds of (variant - reference), with its 95% t interval (nan with
    fewer than two seeds)."""
    seeds = sorted(set(values) & set(reference))
    diffs = [values[s] - reference[s] for s in seeds]
    out = {"diff": statistics.fmean(diffs) if diffs else math.nan, "low": math.nan,
           "high": math.nan, "n": len(diffs)}
    if len(diffs) > 1:
        half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        out.update(low=out["diff"] - half, high=out["diff"] + half)
    return out


def verdict(difference: Mapping[str, float], paper_sign: int) -> str:
    """The paper's direction reproduced (the interval excludes 0 on its side), reversed (on the
    other side) or within noise (the interval holds 0, or there is none)."""
    if paper_sign == 0:
        return NO_CLAIM
    low, high = difference["low"], difference["high"]
    if math.isnan(low) or low <= 0.0 <= high:
        return NOISE
    return REPRODUCED if (low > 0) == (paper_sign > 0) else REVERSED


def record_scores(records, predictions, key: str = PRIMARY) -> dict[str, tuple[str, float]]:
    """Per record of the metric's task: (its video, the metric on that record alone), scored by
    the official scorer one record at a time. For a per-query mean such as MR R1@0.5 their mean
    over the records is the split's figure (`bootstrap_difference` checks it)."""
    task, metric = key.split("/", 1)
    chosen = [r for r in records if r.task.value == task]
    return {r.id: (r.video, float(evaluate_predictions([r], predictions, r.task)[metric]))
            for r in chosen}


def bootstrap_difference(variant: Mapping[int, Mapping[str, tuple[str, float]]],
                         reference: Mapping[int, Mapping[str, tuple[str, float]]],
                         *, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """(variant - reference) on the metric's mean over the test videos, averaged over the shared
    seeds, with a 95% percentile interval from resampling the test videos (paired: both runs of a
    seed scored on the same resampled videos). It holds the test split's sampling noise, not the
    seeds': with few seeds, read it beside the seed interval."""
    import numpy as np

    seeds = sorted(set(variant) & set(reference))
    if not seeds:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    ids = sorted(set.intersection(*(set(variant[s]) & set(reference[s]) for s in seeds)))
    videos = sorted({reference[seeds[0]][i][0] for i in ids})
    index = {v: k for k, v in enumerate(videos)}
    # per seed, per video: the sum of (variant - reference) over its records, and its records
    diff_SV = np.zeros((len(seeds), len(videos)))
    count_V = np.zeros(len(videos))
    for i in ids:
        count_V[index[reference[seeds[0]][i][0]]] += 1
        for k, s in enumerate(seeds):
            diff_SV[k, index[variant[s][i][0]]] += variant[s][i][1] - reference[s][i][1]
    rng = np.random.default_rng(seed)
    draws_BV = rng.integers(0, len(videos), size=(samples, len(videos)))
    # a replicate's difference: sum over drawn videos / records drawn, mean over seeds
    means_B = diff_SV.sum(0)[draws_BV].sum(1) / len(seeds) / count_V[draws_BV].sum(1)
    low, high = np.percentile(means_B, [2.5, 97.5])
    return {"diff": float(diff_SV.sum() / len(seeds) / count_V.sum()), "low": float(low),
            "high": float(high), "n": len(videos)}


@dataclass
class GridResult:
    """Per variant, per seed, per split: the metrics of each run; and what the tables say."""

    grid: Grid
    runs: dict[str, dict[int, dict[str, dict[str, float]]]]  # variant -> seed -> split -> metrics
    split_videos: dict[str, int] = field(default_factory=dict)  # split -> videos scored
    # variant -> seed -> split -> record id -> (video, PRIMARY on that record): the bootstrap's
    scores: dict[str, dict[int, dict[str, dict[str, tuple[str, float]]]]] = field(
        default_factory=dict)

    def bootstrap(self, split: str) -> dict[str, dict[str, float]]:
        """Per variant: `bootstrap_difference` of PRIMARY to the reference on `split`."""
        ref = self.grid.reference
        by_seed = {v: {s: d[split] for s, d in seeds.items() if split in d}
                   for v, seeds in self.scores.items()}
        if not by_seed.get(ref):
            return {}
        return {v: bootstrap_difference(scores, by_seed[ref])
                for v, scores in by_seed.items() if v != ref and scores}

    def values(self, variant: str, split: str, key: str) -> dict[int, float]:
        return {seed: by_split[split][key] for seed, by_split in self.runs[variant].items()
                if key in by_split.get(split, {})}

    def summary(self, split: str) -> dict[str, dict[str, dict[str, float]]]:
        """variant -> metric -> {"mean", "std", "n"} (the `--json` line's `variants`)."""
        return {v: {key: describe(list(self.values(v, split, key).values()))
                    for _, key in METRICS if self.values(v, split, key)}
                for v in self.runs}

    def differences(self, split: str) -> dict[str, dict[str, dict[str, float]]]:
        ref = self.grid.reference
        return {v: {key: paired_difference(self.values(v, split, key), self.values(ref, split, key))
                    for _, key in METRICS if self.values(v, split, key) and self.values(ref, split, key)}
                for v in self.runs if v != ref and ref in self.runs}

    def verdicts(self, split: str) -> dict[str, str]:
        """Per variant: its verdict on the primary metric (MR R1@0.5)."""
        return {v: verdict(d[PRIMARY], self.grid.variant(v).paper_sign)
                for v, d in self.differences(split).items() if PRIMARY in d}

    def chosen(self, split: str = "val") -> str:
        """The variant with the best mean of the primary metric on `split` (validation)."""
        means = {v: s[PRIMARY]["mean"] for v, s in self.summary(split).items() if PRIMARY in s}
        if not means:
            raise ValueError(f"no run has {PRIMARY} on split {split!r}")
        return max(means, key=means.get)

    def to_json(self, split: str = "test") -> dict[str, Any]:
        return {"grid": self.grid.name, "split": split, "reference": self.grid.reference,
                "videos": self.split_videos, "variants": self.summary(split),
                "differences": self.differences(split), "verdicts": self.verdicts(split),
                "bootstrap": self.bootstrap(split),
                "chosen_on_val": self.chosen("val") if self._has("val") else None}

    def _has(self, split: str) -> bool:
        return any(split in by_split for seeds in self.runs.values() for by_split in seeds.values())


def _cell(stats: Mapping[str, float], diff: Mapping[str, float] | None) -> str:
    text = f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    if diff is not None:
        interval = ("" if math.isnan(diff["low"])
                    else f" [{diff['low']:+.2f}, {diff['high']:+.2f}]")
        text += f" ({diff['diff']:+.2f}{interval})"
    return text


def markdown_table(result: GridResult, split: str) -> str:
    """One row per variant: mean ± std over seeds of each metric, with the paired difference to
    the reference and its 95% interval in brackets, the verdict on MR R1@0.5 and the paper's
    claim."""
    summary, diffs, verdicts = (result.summary(split), result.differences(split),
                                result.verdicts(split))
    boot = result.bootstrap(split)
    columns = [(label, key) for label, key in METRICS
               if any(key in s for s in summary.values())]
    lines = ["| variant | seeds | " + " | ".join(label for label, _ in columns)
             + " | MR R1@0.5 diff, bootstrap over videos | verdict (MR R1@0.5) | paper |",
             "|---" * (len(columns) + 5) + "|"]
    for variant in result.runs:
        stats = summary[variant]
        cells = [_cell(stats[key], diffs.get(variant, {}).get(key)) if key in stats else "-"
                 for _, key in columns]
        seeds = max((s["n"] for s in stats.values()), default=0)
        b = boot.get(variant)
        b_cell = "-" if b is None else f"{b['diff']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}]"
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {b_cell} | "
                     f"{verdicts.get(variant, NO_CLAIM)} | {result.grid.variant(variant).claim} |")
    return "\n".join(lines)


def comparison_plot(result: GridResult, split: str, path: str) -> str:
    """Each quality metric's mean per variant with its std over seeds as error bars (PNG)."""
    from timeexpert.tracking import _pyplot

    plt = _pyplot()
    summary = result.summary(split)
    keys = [key for key in QUALITY if any(key in s for s in summary.values())]
    cols = min(4, max(len(keys), 1))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    names = list(summary)
    for ax, key in zip(axes.flat, keys):
        means = [summary[v].get(key, {}).get("mean", math.nan) for v in names]
        stds = [summary[v].get(key, {}).get("std", 0.0) for v in names]
        colors = ["tab:orange" if v == result.grid.reference else "tab:blue" for v in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(key, fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"grid {result.grid.name} on {split}: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
