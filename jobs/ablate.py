r"""The TimeExpert ablation grid on the synthetic benchmark -> one markdown table + MLflow runs.

    python jobs/ablate.py --preset tiny_cpu --synthetic tiny --data-root .cache/data/tiny \
        [--stages 2,3] [--only dense,full] [--out ablation.md]

Variants: dense decoder, vanilla top-k (k = 2, 4), dynamic gating without adaptive routing,
dynamic without the aux loss, and the full method (dynamic + adaptive routing + aux loss). Each
runs the same pipeline with the same seed and data; its MLflow parent run is tagged
`ablation=<variant>` so the runs compare side by side.
"""

from __future__ import annotations

import argparse

import _common  # (sys.path and environment defaults, before the imports below)

from timeexpert.train.stages import run_pipeline

VARIANTS: dict[str, dict] = {
    "dense": {"moe": {"gating": "dense"}},
    "topk_k2": {"moe": {"gating": "topk", "num_experts_per_token": 2}},
    "topk_k4": {"moe": {"gating": "topk", "num_experts_per_token": 4}},
    "dynamic_no_adaptive": {"moe": {"gating": "dynamic"}, "expert_update_every": 0},
    "dynamic_no_aux": {"moe": {"gating": "dynamic", "lambda_1": 0.0, "lambda_2": 0.0}},
    "full": {"moe": {"gating": "dynamic"}},
}
COLUMNS = [  # (header, metric key in PipelineResult.summary() of the last stage)
    ("MR R1@0.5", "eval/mr/R1@0.5"), ("MR mIoU", "eval/mr/mIoU"),
    ("VHD HIT@1 VG", "eval/vhd/HL-min-VeryGood-Hit1"), ("VHD mAP VG", "eval/vhd/HL-min-VeryGood-mAP"),
    ("DVC F1", "eval/dvc/F1"), ("loss", "train/loss"),
    ("experts/token", "train/experts/mean_active"),
    ("time", "train/experts/mean_active/time"), ("score", "train/experts/mean_active/score"),
    ("text", "train/experts/mean_active/text"), ("visual", "train/experts/mean_active/visual"),
    ("query", "train/experts/mean_active/query"), ("active experts", "train/experts/num_active"),
]


def variant_config(base, name: str):
    spec = VARIANTS[name]
    moe = {**base.moe, **spec["moe"]}
    extra = {k: v for k, v in spec.items() if k != "moe"}
    return base.replace(moe=moe, name=f"{base.name}-{name}", tags={**base.tags, "ablation": name},
                        **extra)


def markdown_table(rows: dict[str, dict[str, float]], last_stage: int) -> str:
    head = "| variant | " + " | ".join(h for h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, summary in rows.items():
        cells = []
        for _, key in COLUMNS:
            v = summary.get(f"stage{last_stage}/{key}")
            cells.append("-" if v is None else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablation(base, *, stages, variants) -> tuple[str, dict]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; choose from {list(VARIANTS)}")
    rows, results = {}, {}
    last = max(stages)
    for name in variants:
        print(f"=== ablation {name}", flush=True)
        cfg = variant_config(base, name)
        result = run_pipeline(cfg, stages=stages)
        summary = result.summary()
        if cfg.moe.get("gating") == "dense":
            # The dense decoder reports no per-task routing: every token of every task goes
            # through its one FFN, so each task's mean is the overall one (1 expert).
            overall = summary.get(f"stage{last}/train/experts/mean_active")
            for _, key in COLUMNS:
                if key.startswith("train/experts/mean_active/") and overall is not None:
                    summary.setdefault(f"stage{last}/{key}", overall)
        rows[name] = summary
        results[name] = result
    return markdown_table(rows, last), results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_train_flags(p)
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--out", default="", help="also write the markdown table here")
    args = p.parse_args(argv)
    variants = [v for v in args.only.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    cfg = _common.train_config(args)
    if args.experiment == "timeexpert":
        cfg = cfg.replace(experiment="timeexpert-ablation")
    _common.prepare_data(args)
    _common.connect_ray(args.num_cpus)
    table, _ = run_ablation(cfg, stages=[int(s) for s in args.stages.split(",")], variants=variants)
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
