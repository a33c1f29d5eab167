"""The ablation grids' statistics: paired differences with a t interval, verdicts, tables."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from timeexpert.ablation import (GRIDS, NOISE, REPRODUCED, REVERSED, GridResult, bootstrap_difference,
                                 get_grid,
                                 markdown_table, paired_difference, variant_config, verdict)
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.train.config import TrainConfig
from timeexpert.train.loop import model_config


def test_paired_difference_is_a_t_interval_over_the_shared_seeds():
    ref = {0: 50.0, 1: 60.0, 2: 55.0}
    var = {0: 48.0, 1: 57.0, 2: 54.0, 3: 99.0}  # seed 3 has no reference run: not paired
    d = paired_difference(var, ref)
    assert d["n"] == 3 and d["diff"] == pytest.approx(-2.0)
    # diffs -2, -3, -1: sd 1, half width t(0.975, 2) * 1 / sqrt(3)
    half = 4.303 / math.sqrt(3)
    assert (d["low"], d["high"]) == pytest.approx((-2.0 - half, -2.0 + half))
    one = paired_difference({0: 1.0}, {0: 3.0})
    assert one["diff"] == -2.0 and math.isnan(one["low"])


@pytest.mark.parametrize("low, high, sign, expected", [
    (-3.0, -1.0, -1, REPRODUCED), (1.0, 2.0, -1, REVERSED), (-1.0, 2.0, -1, NOISE),
    (1.0, 2.0, +1, REPRODUCED), (math.nan, math.nan, -1, NOISE), (-3.0, -1.0, 0, "-"),
])
def test_verdict_reads_the_interval_against_the_paper_direction(low, high, sign, expected):
    assert verdict({"diff": (low + high) / 2, "low": low, "high": high}, sign) == expected


def test_variant_config_merges_the_delta_and_sets_the_seed():
    base = TrainConfig(data_root="x", preset="tiny_cpu", moe={"alpha": 0.2}, name="g")
    grid = get_grid("timeexpert")
    cfg = variant_config(base, grid, "topk_k4", seed=2)
    assert cfg.moe == {"alpha": 0.2, "gating": "topk", "num_experts_per_token": 4}
    assert (cfg.seed, cfg.name, cfg.tags["variant"], cfg.tags["seed"]) == (2, "g-topk_k4-s2",
                                                                          "topk_k4", "2")
    assert variant_config(base, grid, "no_adaptive", 0).expert_update_every == 0
    frames = variant_config(base, get_grid("frames"), "f8", 0)
    assert model_config(frames, GroundingTokenizer.train(["a red circle"], vocab_size=400)).num_frames == 8
    with pytest.raises(ValueError, match="no variant 'nope'"):
        variant_config(base, grid, "nope", 0)
    with pytest.raises(ValueError, match="unknown grid"):
        get_grid("nope")


def test_every_grid_has_its_reference_and_one_claimless_variant():
    for grid in GRIDS.values():
        assert grid.variant(grid.reference).paper_sign == 0
        assert len({v.name for v in grid.variants}) == len(grid.variants)


def test_table_shows_mean_std_and_the_paired_interval():
    runs = {"full": {0: {"test": {"mr/R1@0.5": 50.0}}, 1: {"test": {"mr/R1@0.5": 60.0}}},
            "dense": {0: {"test": {"mr/R1@0.5": 40.0}}, 1: {"test": {"mr/R1@0.5": 49.0}}}}
    result = GridResult(grid=get_grid("timeexpert"), runs=runs)
    assert result.summary("test")["dense"]["mr/R1@0.5"] == {"mean": 44.5, "std": pytest.approx(
        6.364, abs=1e-3), "n": 2}
    d = result.differences("test")["dense"]["mr/R1@0.5"]  # diffs -10, -11
    assert d["diff"] == -10.5 and d["high"] < 0
    assert result.verdicts("test") == {"dense": REPRODUCED}
    table = markdown_table(result, "test")
    assert "| dense | 2 | 44.50 ± 6.36 (-10.50 [" in table and "| reproduced |" in table
    assert result.chosen("test") == "full"


def test_bootstrap_difference_resamples_videos_paired_across_runs():
    # 40 videos of 2 records; the variant misses one record of each of the first 20 videos
    ref = {f"r{v}-{k}": (f"v{v}", 100.0) for v in range(40) for k in range(2)}
    var = {rid: (video, 0.0 if int(video[1:]) < 20 and rid.endswith("-0") else 100.0)
           for rid, (video, _) in ref.items()}
    b = bootstrap_difference({0: var}, {0: ref}, samples=500)
    assert b["diff"] == pytest.approx(-25.0) and b["n"] == 40
    assert b["low"] < -25.0 < b["high"] < 0
    same = bootstrap_difference({0: ref, 1: ref}, {0: ref, 1: ref}, samples=100)
    assert (same["diff"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert math.isnan(bootstrap_difference({1: var}, {0: ref})["diff"])


def test_a_grid_cut_short_is_reported_from_its_partial_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2] / "jobs"))
    import ablate

    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "test.jsonl").write_text("")
    lines = []
    for seed, (full, dense) in enumerate([(60.0, 50.0), (70.0, 55.0)]):
        for variant, value in (("full", full), ("dense", dense)):
            scores = {"test": {f"r{i}": [f"v{i}", value] for i in range(3)}}
            lines.append(json.dumps({"variant": variant, "seed": seed, "scores": scores,
                                     "metrics": {"test": {"mr/R1@0.5": value}}}))
    (tmp_path / "partial.jsonl").write_text("\n".join(lines) + "\n")
    result = ablate.read_partial(str(tmp_path / "partial.jsonl"), get_grid("timeexpert"),
                                 str(tmp_path), ["test"])
    assert result.summary("test")["dense"]["mr/R1@0.5"]["mean"] == 52.5
    assert result.bootstrap("test")["dense"]["diff"] == pytest.approx(-12.5)
    assert "| dense | 2 | 52.50 ± 3.54 (-12.50 [" in ablate.report(result, ["test"], "## grid")
