"""FPO (D2VLM): the loss equals its DPO form by hand, log pi includes the <evi> interval term,
a few steps on a toy pair make the policy prefer the clean response over the reference, and the
output URI of the Ray Train run is split into its storage path, run name and folder."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from timeexpert.data.preference import shift_event
from timeexpert.events import Event, Task
from timeexpert.models.evidence import add_evidence_tokens, encode_evidence_example, pad_targets
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset
from timeexpert.train.config import TrainConfig
from timeexpert.train.fpo import (FPOConfig, fpo_loss, fpo_step, policy_log_prob, run_location,
                                  train_fpo)


def test_fpo_loss_is_the_dpo_form():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.5])
    beta = 0.5
    margins = [(-3.0 + 3.5) - (-4.0 + 3.5), (-5.0 + 5.0) - (-4.0 + 4.5)]
    expected = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    assert float(fpo_loss(pc, pr, rc, rr, beta)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        FPOConfig(beta=0.0)


@pytest.fixture(scope="module")
def setup():
    tok = GroundingTokenizer.train(["a man opens the door", "the red ball rolls"], vocab_size=400)
    add_evidence_tokens(tok)
    cfg = get_preset("tiny_cpu").model
    cfg.evidence = {"temperature": 0.2}
    cfg.moe = {**cfg.moe, "gating": "dense"}
    cfg = cfg.with_tokenizer(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg)
    ts = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    clean = [Event(1.0, 3.0, 1.0, "a man opens the door")]
    pair = shift_event(clean, 0, 2.0, 6.0)

    def encode(events):
        enc, targets = encode_evidence_example(tok, Task.DVC, "", ts, events, tokens_per_frame=cfg.tokens_per_frame, duration=6.0)
        batch = collate([enc])
        batch["evidence_frames"] = pad_targets([targets])
        return batch

    frames = np.random.default_rng(0).integers(0, 256, size=(6, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    return model, encode(pair.chosen), encode(pair.rejected), model.preprocess_frames(frames)


def test_log_pi_adds_the_interval_log_probability(setup):
    model, chosen, rejected, pixels = setup
    with torch.no_grad():
        with_g = policy_log_prob(model, chosen, pixels, FPOConfig(grounding_weight=1.0))
        without = policy_log_prob(model, chosen, pixels, FPOConfig(grounding_weight=0.0))
        out = model(**{k: v for k, v in chosen.items() if k != "labels"}, pixel_values=pixels)
    # the chosen answer has 2 <evi> (grounding + answer stage), both over frames 1-2 of 6
    p = out.evidence_probs.clamp(1e-6, 1 - 1e-6)
    inside = torch.tensor([0, 1, 1, 0, 0, 0], dtype=torch.bool)
    by_hand = (p[:, inside].log().sum() + (1 - p[:, ~inside]).log().sum())
    torch.testing.assert_close(with_g - without, by_hand[None], atol=1e-4, rtol=1e-5)
    # the token term equals the SFT cross-entropy sums
    assert float(without) < 0


@pytest.mark.slow
def test_a_few_fpo_steps_prefer_the_clean_response(setup):
    model, chosen, rejected, pixels = setup
    policy = copy.deepcopy(model).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    fpo = FPOConfig(beta=0.5)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss, metrics = fpo_step(policy, ref, chosen, rejected, pixels, fpo)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    with torch.no_grad():
        loss, metrics = fpo_step(policy, ref, chosen, rejected, pixels, fpo)
    assert float(loss) < math.log(2) - 0.05
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] == 1.0
    with torch.no_grad():
        pc = policy_log_prob(policy, chosen, pixels, fpo)
        pr = policy_log_prob(policy, rejected, pixels, fpo)
    assert float(pc - pr) > 0  # the clean response is now the more likely one


def test_run_location_splits_an_output_uri_into_storage_path_run_and_folder(tmp_path):
    """Where train_fpo's Ray Train run writes: the storage path, the run name and the checkpoint
    folder of its output URI (that the run persists its checkpoint there is checked end to end
    by tests/distributed/test_recipes.py::test_d2vlm_stage_then_fpo_raises_the_margin)."""
    root = str(tmp_path / "runs")
    assert run_location(f"{root}/d2vlm-fpo/checkpoint/") == (root, "d2vlm-fpo", "checkpoint")
    assert run_location("s3://bucket/runs/d2vlm-fpo/checkpoint") == (
        "s3://bucket/runs", "d2vlm-fpo", "checkpoint")
    assert run_location("s3://bucket/d2vlm-fpo/checkpoint") == (
        "s3://bucket", "d2vlm-fpo", "checkpoint")
    with pytest.raises(ValueError, match="<storage path>/<run name>/<folder>"):
        run_location("s3://bucket/checkpoint")


def test_fpo_warns_that_it_ignores_expert_parallelism(tmp_path):
    cfg = TrainConfig(preset="tiny_cpu", data_root=str(tmp_path / "data"), num_workers=2, ep_size=2,
                      fpo_steps=1)
    output_uri = str(tmp_path / "runs" / "x-fpo" / "checkpoint")
    with pytest.warns(UserWarning, match="ignores ep_size=2"):
        with pytest.raises(ValueError, match="does not exist"):  # past the warning: no checkpoint
            train_fpo(str(tmp_path / "missing"), cfg, output_uri=output_uri)
