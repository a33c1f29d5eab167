"""D2VLM evidence tokens: a planted interval is recovered from constructed hidden states, L_gnd and
L_cons equal hand-computed values, `<evi>` sites are found per stage, and the model trains and
generates with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from timeexpert.events import Event, Task, TokenType
from timeexpert.models.evidence import (
    EvidenceConfig,
    EvidenceHead,
    EvidenceSites,
    add_evidence_tokens,
    aggregate_frames,
    consistency_loss,
    encode_evidence_example,
    find_evidence,
    frame_targets,
    grounding_loss,
    interval_from_salient,
    interval_log_prob,
    pad_targets,
)
from timeexpert.models.generation import generate_answer
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset


def test_planted_interval_is_recovered_and_its_frames_pooled():
    torch.manual_seed(0)
    D, T = 16, 10
    head = EvidenceHead(EvidenceConfig(), D).eval()
    h_1D = torch.randn(1, D)
    with torch.no_grad():
        e_D = F.normalize(head.mlp(h_1D)[0], dim=0)
    noise = torch.randn(T, D)
    off_TD = noise - (noise @ e_D)[:, None] * e_D - 0.3 * e_D  # orthogonal, slightly opposed
    frames_TD = off_TD.clone()
    frames_TD[3:7] = 2.0 * e_D + 0.1 * torch.randn(4, D)  # the planted event: frames 3..6
    mask = torch.ones(1, T)
    with torch.no_grad():
        prob = head(h_1D, frames_TD[None], mask)
    salient = head.salient(prob, mask)
    assert salient[0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    ts = [float(t) for t in range(T)]
    assert interval_from_salient(salient[0], ts) == (3.0, 7.0)
    assert interval_from_salient(salient[0] & False, ts) is None
    torch.testing.assert_close(aggregate_frames(frames_TD[None], salient)[0], frames_TD[3:7].mean(0))
    # the ratio threshold is the configured one: at 1.0 only the peak frame is salient
    peak_only = EvidenceHead(EvidenceConfig(threshold_ratio=1.0), D)
    peak_only.load_state_dict(head.state_dict())
    assert peak_only.salient(prob, mask).sum() == 1


def test_grounding_and_consistency_losses_equal_hand_computed_values():
    prob = torch.tensor([[0.9, 0.2, 0.5], [0.6, 0.4, 0.7], [0.3, 0.3, 0.3]])
    target = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # last token: 2 frames

    def bce(p, t):
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    per_token = [
        (bce(0.9, 1) + bce(0.2, 0) + bce(0.5, 1)) / 3,
        (bce(0.6, 1) + bce(0.4, 0) + bce(0.7, 0)) / 3,
        (bce(0.3, 0) + bce(0.3, 1)) / 2,
    ]
    assert float(grounding_loss(prob, target, mask)) == pytest.approx(sum(per_token) / 3, rel=1e-5)

    # tokens 0 (stage 0, k=0) and 1 (stage 1, k=0) of row 0 match; token 2 (row 1) has no partner
    sites = EvidenceSites(row_E=torch.tensor([0, 0, 1]), pos_E=torch.tensor([5, 9, 5]),
                          stage_E=torch.tensor([0, 1, 0]), index_E=torch.tensor([0, 0, 0]))
    expected = (abs(0.9 - 0.6) + abs(0.2 - 0.4) + abs(0.5 - 0.7)) / 3
    assert float(consistency_loss(prob, sites, mask)) == pytest.approx(expected, rel=1e-5)

    # eq. 6-7: sum of log p inside the interval and log(1 - p) outside
    lp = interval_log_prob(prob, target, mask)
    assert float(lp[0]) == pytest.approx(math.log(0.9) + math.log(0.8) + math.log(0.5), rel=1e-5)
    assert float(lp[2]) == pytest.approx(math.log(0.7) + math.log(0.3), rel=1e-5)


def test_frame_targets_cover_the_overlapping_frames():
    t = frame_targets([(1.0, 2.5), (0.0, 0.4)], [0.0, 1.0, 2.0, 3.0])
    assert t.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert pad_targets([t, t[:1, :2]]).shape == (2, 2, 4)


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    t = GroundingTokenizer.train(["a person opens the door", "the cat jumps", "a red ball"], vocab_size=400)
    add_evidence_tokens(t)
    return t


def test_sites_by_stage_and_index(tok):
    evi, end = add_evidence_tokens(tok)
    assert add_evidence_tokens(tok) == (evi, end)  # idempotent
    ids = torch.tensor([[7, evi, evi, end, 5, evi, 6, evi, 0]])
    types = torch.full_like(ids, int(TokenType.TEXT))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, -1] = False
    s = find_evidence(ids, types, valid, evi, end)
    assert s.pos_E.tolist() == [1, 2, 5, 7]
    assert s.stage_E.tolist() == [0, 0, 1, 1] and s.index_E.tolist() == [0, 1, 0, 1]


def evidence_model(tok, **evidence):
    cfg = get_preset("tiny_cpu").model
    cfg.evidence = {"temperature": 0.2, **evidence}
    cfg = cfg.with_tokenizer(tok)
    assert cfg.evidence_token_id is not None and cfg.evidence_token_id not in cfg.forbidden_text_ids
    torch.manual_seed(0)
    return TimeExpertForGrounding(cfg), cfg


def evidence_batch(tok, cfg):
    ts = [0.0, 1.0, 2.0, 3.0]
    a, ta = encode_evidence_example(tok, Task.DVC, "", ts, [Event(0.0, 1.5, 0.5, "the cat jumps"), Event(2.0, 4.0, 0.9, "a red ball")],
                                    tokens_per_frame=cfg.tokens_per_frame, duration=4.0)
    b, tb = encode_evidence_example(tok, Task.MR, "the cat", ts[:3], [Event(1.0, 2.0, 1.0)],
                                    tokens_per_frame=cfg.tokens_per_frame, duration=3.0)
    batch = collate([a, b])
    batch["evidence_frames"] = pad_targets([ta, tb])
    frames = np.random.default_rng(0).integers(0, 256, size=(7, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    return batch, frames


def _prefer_evidence_tokens(model, cfg) -> None:
    """An LM head that always answers `<evi>` (logit 10), EOS next (5), everything else 0."""
    bias = torch.zeros(cfg.text_vocab_size)
    bias[cfg.evidence_token_id] = 10.0
    bias[cfg.answer_end_token_id] = 5.0
    model.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.text_vocab_size, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(bias)


@pytest.mark.slow
def test_model_trains_the_evidence_head_and_losses_enter_the_sft_loss(tok):
    model, cfg = evidence_model(tok)
    batch, frames = evidence_batch(tok, cfg)
    pixels = model.preprocess_frames(frames)
    out = model(**batch, pixel_values=pixels)
    # 2 + 2 <evi> in row 0 (grounding + answer), 1 + 1 in row 1
    assert out.evidence_probs.shape == (6, 4)
    base = out.loss_time + out.loss_score + out.loss_text + out.aux_loss + out.z_loss
    torch.testing.assert_close(out.loss, base + out.loss_grounding + out.loss_consistency)
    out.loss.backward()
    assert model.evidence_head.mlp[0].weight.grad.abs().sum() > 0
    # a few steps on the fixed batch bring L_gnd down
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(out.loss_grounding.detach())
    for _ in range(8):
        opt.zero_grad()
        out = model(**batch, pixel_values=pixels)
        out.loss.backward()
        opt.step()
    assert float(out.loss_grounding) < first
    # teacher forcing pools the ground-truth frames into the <evi> inputs
    model.eval()
    with torch.no_grad():
        x1 = model(**batch, pixel_values=pixels).text_logits
        no_targets = {k: v for k, v in batch.items() if k != "evidence_frames"}
        x2 = model(**no_targets, pixel_values=pixels).text_logits
    assert not torch.allclose(x1, x2)


def test_generation_with_evidence_tokens_grounds_each_evi(tok):
    model, cfg = evidence_model(tok)
    model.eval()
    prompt = collate([tok.encode_prompt(Task.MR, "the cat", [0.0, 1.0, 2.0], tokens_per_frame=cfg.tokens_per_frame)], padding_side="left")
    frames = np.random.default_rng(1).integers(0, 256, size=(3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    _prefer_evidence_tokens(model, cfg)
    answers, extras = generate_answer(model, prompt["input_ids"], prompt["token_types"], prompt["attention_mask"],
                                            pixel_values=model.preprocess_frames(frames), max_new_tokens=4,
                                            return_extras=True)
    ids, _ = answers[0]
    assert ids == [cfg.evidence_token_id] * 4  # caption cap not reached, EOS outscored
    assert len(extras["evidence"][0]) == 4 and all(len(p) == 3 for p in extras["evidence"][0])
    assert all(0.0 <= v <= 1.0 for p in extras["evidence"][0] for v in p)


def test_prediction_turns_each_evi_grounding_into_its_salient_interval(tok):
    from timeexpert.inference import GroundingModel

    model, cfg = evidence_model(tok)
    _prefer_evidence_tokens(model, cfg)
    frames = np.random.default_rng(2).integers(0, 256, size=(4, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    timestamps = np.array([0.0, 2.0, 4.0, 6.0])
    pred = GroundingModel.from_model(model, tok).predict(frames, timestamps, Task.MR, "the cat", duration=8.0)
    assert pred.evidence and len(pred.evidence_intervals) == len(pred.evidence)
    ratio = 0.6  # EvidenceConfig.threshold_ratio's default (D2VLM: 60% of the maximum)
    for probs, interval in zip(pred.evidence, pred.evidence_intervals):
        salient = [i for i, p in enumerate(probs) if p >= ratio * max(probs)]
        first, last = salient[0], salient[-1]
        assert interval == (timestamps[first], timestamps[last + 1] if last + 1 < 4 else 8.0)


def test_event_captions_drop_evi_markers_the_raw_answer_keeps_them(tok):
    evi_tok = tok
    cfg = evidence_model(evi_tok)[1]  # binds <evi> / </evi> into the tokenizer
    encoded = evi_tok.encode_answer([Event(1.0, 2.0, 1.0, "the cat jumps")])
    ids, types = list(encoded.ids), list(encoded.types)
    # splice "<evi> </evi>" into the caption run, as a D2VLM answer interleaves them
    at = types.index(int(TokenType.TEXT), 1 + types.index(int(TokenType.SCORE)))
    ids = ids[:at] + [cfg.evidence_token_id, cfg.evidence_end_token_id] + ids[at:]
    types = types[:at] + [int(TokenType.TEXT)] * 2 + types[at:]
    assert evi_tok.decode_answer(ids, types)[0].caption == "the cat jumps"
    raw = "".join(p for _, p in evi_tok.answer_pieces(ids, types))
    assert "<evi></evi>" in raw.replace(" ", "")
