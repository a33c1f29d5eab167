"""TrainConfig (the learning-rate schedule, its validation) and the recipes' stage specs."""

from __future__ import annotations

import json
import math

import pytest

from timeexpert.train.config import TrainConfig as _TrainConfig


def TrainConfig(**fields) -> _TrainConfig:  # noqa: N802 - the config with a data root filled in
    return _TrainConfig(data_root="unused", **fields)


def test_warmup_then_constant():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, num_steps=10)
    assert [cfg.learning_rate(s) for s in (1, 2, 4)] == [2.5e-4, 5e-4, 1e-3]
    assert cfg.learning_rate(10) == 1e-3


def test_cosine_decays_from_the_peak_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, num_steps=12, lr_schedule="cosine",
                      min_lr_ratio=0.1)
    assert cfg.learning_rate(1) == pytest.approx(5e-4)
    assert cfg.learning_rate(2) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert cfg.learning_rate(7) == pytest.approx(1e-4 + 9e-4 * 0.5)  # half way
    assert cfg.learning_rate(12) == pytest.approx(1e-4)  # the last step: the floor
    rates = [cfg.learning_rate(s) for s in range(2, 13)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    no_warmup = TrainConfig(lr=1.0, num_steps=4, lr_schedule="cosine", min_lr_ratio=0.0)
    assert no_warmup.learning_rate(2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


@pytest.mark.parametrize("field, value, message", [
    ("lr_schedule", "linear", "lr_schedule must be one of"),
    ("min_lr_ratio", 1.5, "min_lr_ratio must be in"),
    ("lr", 0.0, "lr must be > 0"),
    ("val_every", 3, "val_every must be a multiple of log_every"),  # log_every 5
    ("val_records", 0, "val_records >= 1"),
])
def test_bad_schedule_settings_say_what_is_wrong(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_demo_splits_the_step_budget_over_the_stages():
    import sys

    sys.path.insert(0, "jobs")
    try:
        from demo import STAGE_SHARE, stage_steps
    finally:
        sys.path.remove("jobs")
    assert stage_steps(450) == {1: 45, 2: 180, 3: 225}
    assert stage_steps(6) == {1: 1, 2: 2, 3: 3}
    assert stage_steps(500, (3,)) == {3: 500}  # a preset that runs stage 3 alone
    assert stage_steps(90, (2, 3)) == {2: 40, 3: 50}
    assert sum(STAGE_SHARE.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("recipe", ["timeexpert", "groundvts"])
def test_a_random_vision_encoder_trains_where_the_projector_does(recipe):
    from timeexpert.train.recipes import RECIPES, VISION, stage_spec

    for stage, spec in RECIPES[recipe].items():
        pretrained = stage_spec(recipe, stage, vision_pretrained=True)
        random = stage_spec(recipe, stage, vision_pretrained=False)
        assert pretrained == spec and VISION not in spec.trainable  # frozen, as in the papers
        with_projector = "projector." in spec.trainable or "" in spec.trainable
        assert (VISION in random.trainable and VISION not in random.frozen) == with_projector
        assert random.losses == spec.losses and random.lora == spec.lora
    assert VISION in stage_spec(recipe, 3, vision_pretrained=True).frozen


def test_frame_jitter_reaches_training_data_only():
    from types import SimpleNamespace

    from timeexpert.train.batches import data_config

    model = SimpleNamespace(num_frames=8, image_size=32)
    cfg = TrainConfig(frame_jitter=True, decode_once=False)
    assert data_config(cfg, model, train=True).video.jitter  # streaming: jitter at decode
    # decode once: the centres of jitter_grid sub-segments per segment, the loop draws from them
    once = data_config(cfg.replace(decode_once=True, jitter_grid=4), model, train=True).video
    assert once.num_frames == 32 and not once.jitter
    for c in (cfg, cfg.replace(decode_once=True)):
        video = data_config(c, model).video  # evaluation: the segment centres
        assert not video.jitter and video.num_frames == 8
    video = data_config(TrainConfig(), model, train=True).video
    assert not video.jitter and video.num_frames == 8


def test_segment_draw_takes_one_frame_of_each_segment_and_varies():
    import numpy as np

    from timeexpert.data.pipeline import draw_segment_frames

    b, t, k = 3, 4, 5  # frames numbered by grid position, so a pick is readable
    grid = np.broadcast_to(np.arange(t * k)[None, :, None, None, None], (b, t * k, 2, 2, 3))
    batch = {"id": np.array(["a", "b", "c"]), "frames": grid.astype(np.uint8),
             "timestamps": np.tile(np.arange(t * k, dtype=np.float32), (b, 1)),
             "frame_mask": np.ones((b, t * k), bool)}
    rng = np.random.default_rng(0)
    draws = [draw_segment_frames(batch, t, rng) for _ in range(4)]
    for d in draws:
        assert d["frames"].shape == (b, t, 2, 2, 3) and d["frame_mask"].shape == (b, t)
        picked = d["timestamps"].astype(int)
        assert (picked // k == np.arange(t)).all()  # one frame inside each segment, in order
        assert (d["frames"][:, :, 0, 0, 0] == picked).all()  # frames follow their timestamps
        assert d["id"] is batch["id"]
    assert len({d["timestamps"].tobytes() for d in draws}) > 1  # a new draw each time
    with pytest.raises(ValueError, match="segments"):
        draw_segment_frames(batch, 3, rng)


def test_step_times_tile_the_loop_and_average_per_step(monkeypatch):
    import itertools

    from timeexpert.train import telemetry

    clock = itertools.count()
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: float(next(clock)))
    timer = telemetry.StepTimes()  # t = 0
    for _ in range(2):  # each step: data 1 s, forward 1 s, report 1 s
        timer.lap("data"), timer.lap("forward"), timer.lap("report")
        timer.step_done()
    window = timer.window()
    assert window["time/data"] == 1.0 and window["time/step"] == 3.0
    assert window["time/backward"] == 0.0 and set(window) == {f"time/{p}" for p in telemetry.PHASES} | {"time/step"}
    timer.skip()  # t = 6 -> 7 charged to nothing
    timer.lap("checkpoint")  # 7 -> 8
    assert timer.window()["time/checkpoint"] == 1.0  # no steps in the window: per report
    total = timer.summary()
    assert total["time_total/loop"] == 7.0 and total["time_total/steps"] == 2.0
    line = telemetry.time_line(TrainConfig(stage=3), total)
    assert line.startswith("[stage 3] 2 steps in 7.0 s, 3.500 s/step") and "data 1.000 (29%)" in line


def test_a_reused_run_name_is_announced_as_a_resume(tmp_path):
    from timeexpert.train.fit import resume_notice

    cfg = TrainConfig(name="exp", stage=2, storage_root=str(tmp_path))
    assert resume_notice(cfg) is None
    (tmp_path / "exp-stage2").mkdir()
    notice = resume_notice(cfg)
    assert notice is not None and "'exp-stage2'" in notice and "resumes" in notice
    assert resume_notice(cfg.replace(name="other")) is None


# --- the curriculum: easier datasets before the target data in stage 3 ------------------------


@pytest.mark.parametrize("fields, error, message", [
    ({"curriculum": "levels/l0"}, TypeError, "curriculum must be a list of dataset roots"),
    ({"curriculum": ["levels/l0", ""]}, TypeError, "curriculum must be a list"),
    ({"curriculum": ["levels/l0", "unused"], "curriculum_steps": 2}, ValueError, "lists data_root"),
    ({"curriculum": ["levels/l0"]}, ValueError, "curriculum_steps must be >= 1 with a curriculum"),
    ({"curriculum_steps": -1}, ValueError, "curriculum_steps must be"),
])
def test_bad_curriculum_settings_say_what_is_wrong(fields, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**fields)


def test_curriculum_steps_without_roots_warn_that_they_are_ignored():
    with pytest.warns(UserWarning, match="curriculum_steps 5 is ignored"):
        TrainConfig(curriculum_steps=5)


def test_the_curriculum_runs_first_in_stage_3_easiest_first():
    from timeexpert.train.stages import Phase, plan_phases

    cfg = TrainConfig(name="x", num_steps=7, curriculum=["l0", "l1"], curriculum_steps=3)
    assert plan_phases(cfg, (1, 2, 3), steps={2: 5}) == [
        Phase(stage=1, data_root="unused", num_steps=7, name="x"),
        Phase(stage=2, data_root="unused", num_steps=5, name="x"),
        Phase(stage=3, data_root="l0", num_steps=3, name="x-cur1", curriculum=1),
        Phase(stage=3, data_root="l1", num_steps=3, name="x-cur2", curriculum=2),
        Phase(stage=3, data_root="unused", num_steps=7, name="x"),
    ]
    assert [p.name for p in plan_phases(cfg.replace(curriculum=[], curriculum_steps=0), (3,))] == ["x"]
    with pytest.warns(UserWarning, match="the curriculum is ignored"):
        assert [p.curriculum for p in plan_phases(cfg, (1, 2))] == [0, 0]


def _roots(tmp_path, *names: str) -> list[str]:
    roots = []
    for name in names:
        (tmp_path / name / "manifests").mkdir(parents=True)
        for split in ("train", "val"):
            (tmp_path / name / "manifests" / f"{split}.jsonl").write_text("")
        roots.append(str(tmp_path / name))
    return roots


def test_each_phase_starts_from_the_previous_phases_checkpoint(tmp_path, monkeypatch):
    """run_pipeline with `fit` and the evaluation faked: the fits run in the plan's order, each on
    its data root from the checkpoint the previous fit left, and the results land apart."""
    from timeexpert.train import stages
    from timeexpert.train.fit import FitResult

    fits = []

    def fake_fit(cfg, *, tokenizer_uri, callbacks=None):
        fits.append(cfg)
        return FitResult(checkpoint_uri=f"ckpt/{cfg.run_name()}", metrics={"loss": 1.0}, path="")

    monkeypatch.setattr(stages, "fit", fake_fit)
    monkeypatch.setattr(stages, "_evaluate_and_plot",
                        lambda uri, cfg, run_id: {"mr/R1@0.5": float(len(fits)), "mr/num_records": 1.0})
    l0, l1, target = _roots(tmp_path, "l0", "l1", "target")
    cfg = TrainConfig().replace(data_root=target, name="x", curriculum=[l0, l1], curriculum_steps=3)
    result = stages.run_pipeline(cfg, stages=(2, 3), resume_from="ckpt/start")
    assert [(c.stage, c.data_root, c.num_steps, c.init_from) for c in fits] == [
        (2, target, 20, "ckpt/start"),
        (3, l0, 3, "ckpt/x-stage2"),
        (3, l1, 3, "ckpt/x-cur1-stage3"),
        (3, target, 20, "ckpt/x-cur2-stage3"),
    ]
    assert all(c.curriculum == [] and c.curriculum_steps == 0 for c in fits)  # phases are plain runs
    assert [s.data_root for s in result.curriculum] == [l0, l1]
    assert result.stages[3].data_root == target and result.checkpoint_uri == "ckpt/x-stage3"
    summary = result.summary()
    assert summary["curriculum1/eval/mr/R1@0.5"] == 2.0 and summary["stage3/eval/mr/R1@0.5"] == 4.0


def test_a_missing_curriculum_root_fails_before_any_training(tmp_path, monkeypatch):
    from timeexpert.train import stages

    monkeypatch.setattr(stages, "fit", lambda *a, **k: pytest.fail("trained"))
    (target,) = _roots(tmp_path, "target")
    cfg = TrainConfig().replace(data_root=target, curriculum=[str(tmp_path / "nope")],
                                curriculum_steps=3)
    with pytest.raises(ValueError, match=r"has no manifests/train.jsonl; render a ladder level"):
        stages.run_pipeline(cfg, stages=(3,), resume_from="ckpt/start")


def test_train_job_passes_the_curriculum_flags(tmp_path, monkeypatch):
    import sys

    from timeexpert.train import stages
    from timeexpert.train.stages import PipelineResult, StageResult

    seen = {}

    def fake_pipeline(cfg, **kwargs):
        seen["cfg"] = cfg
        return PipelineResult(stages={3: StageResult(stage=3, checkpoint_uri="c", train_metrics={},
                                                     eval_metrics={})})

    sys.path.insert(0, "jobs")
    try:
        import _common
        import train
    finally:
        sys.path.remove("jobs")
    monkeypatch.setattr(stages, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(train, "run_pipeline", fake_pipeline, raising=False)  # imported by name
    monkeypatch.setattr(_common, "connect_ray", lambda num_cpus: False)
    assert train.main(["--data-root", str(tmp_path), "--curriculum", "a,b",
                       "--curriculum-steps", "4"]) == 0
    assert seen["cfg"].curriculum == ["a", "b"] and seen["cfg"].curriculum_steps == 4
    # a sweep's best settings (`jobs/sweep.py --best-out`), before --set; a bad file is named
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"lr": 7e-4, "moe": {"gating": "dynamic", "alpha": 0.2}}))
    assert train.main(["--data-root", str(tmp_path), "--settings", str(best),
                       "--set", "lr=0.001"]) == 0
    assert seen["cfg"].lr == 0.001 and seen["cfg"].moe["alpha"] == 0.2
    best.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="best.json: expected a JSON object"):
        train.main(["--data-root", str(tmp_path), "--settings", str(best)])


def test_decode_once_ranks_get_equal_parts_of_at_least_a_batch():
    from timeexpert.train.batches import rank_rows

    assert rank_rows(list(range(7)), 2, 3) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="7 training records give each of the 3 workers 2, "
                                         "fewer than one batch of 3"):
        rank_rows(list(range(7)), 3, 3)


def test_stage_evaluation_metrics_are_named_by_the_sample_they_were_computed_on():
    """A stage scores a few records per task: its MLflow names say which and how many."""
    from timeexpert.train.stages import sample_names

    metrics = {"mr/R1@0.5": 25.0, "mr/num_records": 12.0, "mr/distinct_windows": 16.7,
               "gqa/Acc@QA": 50.0, "gqa/num_records": 10.0}
    assert sample_names(metrics, "val") == {
        "val12/mr/R1@0.5": 25.0, "val12/mr/num_records": 12.0, "val12/mr/distinct_windows": 16.7,
        "val10/gqa/Acc@QA": 50.0, "val10/gqa/num_records": 10.0}
