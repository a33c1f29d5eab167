"""TrainConfig (the learning-rate schedule, its validation) and the recipes' stage specs."""

from __future__ import annotations

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
    assert sum(STAGE_SHARE.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("recipe", ["timeexpert", "groundvts"])
def test_a_random_vision_encoder_trains_where_the_projector_does(recipe):
    from timeexpert.train.loop import RECIPES, VISION, stage_spec

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

    from timeexpert.train.loop import data_config

    model = SimpleNamespace(num_frames=8, image_size=32)
    cfg = TrainConfig(frame_jitter=True)
    assert data_config(cfg, model, train=True).video.jitter
    assert not data_config(cfg, model).video.jitter  # evaluation: segment centres
    assert not data_config(TrainConfig(), model, train=True).video.jitter


def test_a_reused_run_name_is_announced_as_a_resume(tmp_path):
    from timeexpert.train.loop import resume_notice

    cfg = TrainConfig(name="exp", stage=2, storage_root=str(tmp_path))
    assert resume_notice(cfg) is None
    (tmp_path / "exp-stage2").mkdir()
    notice = resume_notice(cfg)
    assert notice is not None and "'exp-stage2'" in notice and "resumes" in notice
    assert resume_notice(cfg.replace(name="other")) is None
