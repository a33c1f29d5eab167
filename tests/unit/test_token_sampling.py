"""GroundVTS visual token sampling: budget K and position ids for every variant, the
straight-through gradient, deterministic inference top-K, and the model integration (compaction
equals masking the dropped tokens at their original positions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from timeexpert.events import Event, Task, TokenType
from timeexpert.models.generation import generate_answer
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.token_sampling import MODES, TokenSamplingConfig, VisualTokenSampler
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset
from timeexpert.tracking import plot_token_density
from timeexpert.train.recipes import (
    GROUNDVTS_STAGES,
    apply_lora,
    set_stage_trainable,
    stage_loss,
    stage_spec,
)

S, D = 4, 16


def synthetic_sequence(frames=(4, 3), query=3, pad_left=False):
    """Rows of [ts x2, S visual] per frame, then `query` QUERY tokens, padded to one length."""
    rows = []
    for T in frames:
        types = []
        for _ in range(T):
            types += [TokenType.TIME] * 2 + [TokenType.VISUAL] * S
        types += [TokenType.QUERY] * query
        rows.append(types)
    n = max(len(r) for r in rows)
    types_BN = torch.full((len(rows), n), int(TokenType.TEXT))
    valid_BN = torch.zeros(len(rows), n, dtype=torch.bool)
    pos_BN = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(n - len(r), n) if pad_left else slice(0, len(r))
        types_BN[b, sl] = torch.tensor([int(t) for t in r])
        valid_BN[b, sl] = True
        pos_BN[b, sl] = torch.arange(len(r))
    torch.manual_seed(0)
    x_BND = torch.randn(len(rows), n, D)
    return x_BND, types_BN, valid_BN, pos_BN


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("keep_positions", [True, False])
@pytest.mark.parametrize("pad_left", [False, True])
def test_budget_and_position_ids_for_every_variant(mode, rho, keep_positions, pad_left):
    frames = (4, 3)
    x, types, valid, pos = synthetic_sequence(frames, pad_left=pad_left)
    sampler = VisualTokenSampler(
        TokenSamplingConfig(mode=mode, keep_ratio=rho, rank=8, keep_position_ids=keep_positions), D, S
    )
    for training in (True, False):
        sampler.train(training)
        out = sampler(x, types, valid, pos)
        for b, T in enumerate(frames):
            kept = int(out.keep_BN[b].sum())
            if mode == "frame":
                assert kept == math.ceil(rho * T) * S
                # whole frames: every frame is all kept or all dropped
                kept_per_frame = out.keep_BN[b][(types[b] == TokenType.VISUAL) & valid[b]].view(-1, S).sum(1)
                assert set(kept_per_frame.tolist()) <= {0, S}
            else:
                assert kept == math.ceil(rho * T * S)
            # the compacted row: exactly the kept visual tokens and every non-visual real token, in
            # the original order, at their original (or contiguous) position ids
            real_new = out.valid_BN[b]
            orig_cols = out.gather_BN[b][real_new]
            expected_cols = torch.nonzero(valid[b] & ((types[b] != TokenType.VISUAL) | out.keep_BN[b])).squeeze(1)
            assert orig_cols.tolist() == expected_cols.tolist()
            if keep_positions:
                assert out.position_ids_BN[b][real_new].tolist() == pos[b][expected_cols].tolist()
            else:
                assert out.position_ids_BN[b][real_new].tolist() == list(range(len(expected_cols)))
            torch.testing.assert_close(out.x_BND[b][real_new], x[b][expected_cols])  # zero-init MLP
            if pad_left:  # a left-padded prompt still ends on its last real token
                assert bool(out.valid_BN[b, -1])
        # the sequence is shorter by the drops every row shares
        assert out.x_BND.shape[1] == x.shape[1] - min(
            int(((types[b] == TokenType.VISUAL) & valid[b]).sum() - out.keep_BN[b].sum()) for b in range(len(frames))
        )
        assert out.density_M.shape == (sum(frames),)
        torch.testing.assert_close(out.density_M.sum() * S, out.keep_BN.sum().float())


def test_uniform_spacing_and_inference_top_k_is_the_relevance_top_k():
    x, types, valid, pos = synthetic_sequence((4,))
    uni = VisualTokenSampler(TokenSamplingConfig(mode="uniform", keep_ratio=0.25), D, S).eval()
    out = uni(x, types, valid, pos)
    vis = (types[0] == TokenType.VISUAL).nonzero().squeeze(1)
    assert out.keep_BN[0][vis].nonzero().squeeze(1).tolist() == [0, 4, 8, 12]  # every 4th of 16

    tok = VisualTokenSampler(TokenSamplingConfig(mode="token", keep_ratio=0.5, rank=8), D, S).eval()
    out1, out2 = tok(x, types, valid, pos), tok(x, types, valid, pos)
    assert torch.equal(out1.keep_BN, out2.keep_BN)  # deterministic at inference
    rel = out1.relevance_BN[0][vis]
    torch.testing.assert_close(rel.sum(), torch.tensor(1.0))
    top = set(vis[rel.topk(8).indices].tolist())
    assert set(out1.keep_BN[0].nonzero().squeeze(1).tolist()) == top


@pytest.mark.parametrize("mode", ["token", "frame"])
def test_gradient_reaches_the_scorer_through_the_straight_through_mask(mode):
    x, types, valid, pos = synthetic_sequence((4, 3))
    torch.manual_seed(1)
    sampler = VisualTokenSampler(TokenSamplingConfig(mode=mode, keep_ratio=0.5, rank=8), D, S).train()
    # the re-weighting MLP's last layer is zero at init, so the mask is the only path to the scorer
    assert sampler.reweight[2].weight.abs().sum() == 0
    out = sampler(x, types, valid, pos)
    target = torch.randn_like(out.x_BND)
    (out.x_BND * target).sum().backward()
    for p in (sampler.visual_proj.weight, sampler.query_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # without Gumbel/ST (inference) nothing flows to the scorer
    sampler.zero_grad()
    sampler.eval()
    out = sampler(x, types, valid, pos)
    (out.x_BND * target[:, : out.x_BND.shape[1]]).sum().backward()
    assert sampler.visual_proj.weight.grad is None or sampler.visual_proj.weight.grad.abs().sum() == 0


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenSamplingConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match="mode"):
        TokenSamplingConfig(mode="topk")
    with pytest.raises(ValueError, match="unknown token_sampling fields"):
        TokenSamplingConfig.from_dict({"rho": 0.5})


# --- inside the model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    return GroundingTokenizer.train(["a person opens the door", "the cat jumps", "a red ball"], vocab_size=400)


def model_batch(tok, cfg, seed=0):
    rng = np.random.default_rng(seed)
    ts = [0.0, 1.0, 2.0, 3.0]
    examples = [
        tok.encode_example(Task.MR, "the cat", ts, [Event(1.0, 2.5, 1.0)], tokens_per_frame=cfg.tokens_per_frame),
        tok.encode_example(Task.DVC, "", ts[:3], [Event(0.0, 2.0, 0.5, "a red ball")], tokens_per_frame=cfg.tokens_per_frame),
    ]
    frames = rng.integers(0, 256, size=(7, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    return collate(examples), frames


def configs(tok, **sampling):
    base = get_preset("tiny_cpu").model.with_tokenizer(tok)
    sampled = get_preset("tiny_cpu").model.with_tokenizer(tok)
    sampled.token_sampling = {"keep_ratio": 0.5, "rank": 8, **sampling}
    return base, sampled


def test_compacted_forward_equals_masking_the_dropped_tokens_at_their_positions(tok):
    base_cfg, cfg = configs(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    base = TimeExpertForGrounding(base_cfg).eval()
    missing = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("token_sampler.") for k in missing.unexpected_keys)
    batch, frames = model_batch(tok, cfg)
    pixels = model.preprocess_frames(frames)
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels)
        # which tokens were kept: rerun the sampler on the embedded sequence
        x = model.embed_tokens(batch["input_ids"], batch["token_types"], model.encode_frames(pixels))
        s = model.token_sampler(x, batch["token_types"], batch["attention_mask"].bool(), batch["position_ids"])
        visual = batch["token_types"] == TokenType.VISUAL
        mask = batch["attention_mask"] * (~visual | s.keep_BN).long()
        ref = base(**{**batch, "attention_mask": mask}, pixel_values=pixels)
    assert out.attention_mask.shape[1] < batch["input_ids"].shape[1]
    for b in range(2):
        real = out.attention_mask[b].bool()
        cols = s.gather_BN[b][real]
        torch.testing.assert_close(out.text_logits[b][real], ref.text_logits[b][cols], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss_text, ref.loss_text, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss_time, ref.loss_time, atol=1e-4, rtol=1e-4)
    assert out.token_density.shape == (7,)


def test_training_step_and_generation_with_sampling(tok, tmp_path):
    _, cfg = configs(tok, mode="token")
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).train()
    batch, frames = model_batch(tok, cfg)
    out = model(**batch, pixel_values=model.preprocess_frames(frames))
    out.loss.backward()
    assert model.token_sampler.visual_proj.weight.grad.abs().sum() > 0
    assert model.token_sampler.reweight[2].weight.grad.abs().sum() > 0

    model.eval()
    prompt = [tok.encode_prompt(Task.MR, "the cat", [0.0, 1.0, 2.0, 3.0], tokens_per_frame=cfg.tokens_per_frame),
              tok.encode_prompt(Task.MR, "a door", [0.0, 1.0], tokens_per_frame=cfg.tokens_per_frame)]
    p = collate(prompt, padding_side="left")
    pixels = model.preprocess_frames(frames[:6])
    answers, extras = generate_answer(
        model,
        p["input_ids"], p["token_types"], p["attention_mask"], pixel_values=pixels,
        max_new_tokens=12, return_extras=True,
    )
    density = extras["token_density"]
    assert len(answers) == 2 and density.shape == (6,)
    assert float(density[:4].mean()) == pytest.approx(0.5) and float(density[4:].mean()) == pytest.approx(0.5)
    # a sampled checkpoint reloads with its sampler
    model.save_pretrained(tmp_path)
    again = TimeExpertForGrounding.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = model(**batch, pixel_values=model.preprocess_frames(frames)).text_logits
        b = again(**batch, pixel_values=again.preprocess_frames(frames)).text_logits
    torch.testing.assert_close(a, b)
    path = plot_token_density(density[:4].tolist(), [0, 1, 2, 3], str(tmp_path / "density.png"), intervals=[(1, 2.5)])
    assert (tmp_path / "density.png").stat().st_size > 0 and path.endswith(".png")


def test_progressive_recipe_stages_train_the_right_modules(tok):
    _, cfg = configs(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).train()
    assert stage_spec("groundvts", 1).trainable == ("token_sampler.",)
    names = set_stage_trainable(model, GROUNDVTS_STAGES[1])
    assert names and all(n.startswith("token_sampler.") for n in names)
    apply_lora(model, rank=4)
    names = set_stage_trainable(model, GROUNDVTS_STAGES[2])
    attn = [n for n in names if ".attn." in n]
    assert attn and all("lora_" in n for n in attn)  # LoRA on attention, base weights frozen
    assert any(n.startswith("layers.0.ffn.") for n in names)  # grouped experts train in full
    assert any(n.startswith("projector.") for n in names) and not any(n.startswith("lm_head") for n in names)
    batch, frames = model_batch(tok, cfg)
    out = model(**batch, pixel_values=model.preprocess_frames(frames))
    stage_loss(out, 2, cfg, "groundvts").backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    names = set_stage_trainable(model, GROUNDVTS_STAGES[3])
    assert not any(n.startswith("frame_encoder.") for n in names) and any(n.startswith("lm_head") for n in names)
    with pytest.raises(ValueError, match="stage"):
        stage_spec("groundvts", 4)


def test_predictions_carry_the_per_frame_token_density(tok):
    from timeexpert.inference import GroundingModel

    _, cfg = configs(tok)
    cfg.max_position_embeddings = 160
    torch.manual_seed(0)
    gm = GroundingModel.from_model(TimeExpertForGrounding(cfg), tok)
    frames = np.random.default_rng(0).integers(0, 256, size=(5, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    pred = gm.predict(frames, np.arange(5.0), Task.MR, "the cat")
    assert len(pred.token_density) == 5
    assert sum(pred.token_density) * cfg.tokens_per_frame == math.ceil(0.5 * 5 * cfg.tokens_per_frame)
    assert pred.evidence is None
