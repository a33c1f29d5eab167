"""Query-conditioned frame relevance: labels, windows and clip saliency read off frames (hand-made
cases), the query-first prompt, the head's causal dependence on the query, an overfit of one
batch, and answers read off the frames at inference."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from timeexpert.events import Event, Task, TokenType
from timeexpert.inference import GroundingModel, PredictRequest
from timeexpert.models.frame_relevance import (
    PatchQueryScore,
    caption_contrast_loss,
    clip_saliency,
    dense_events_from_relevance,
    frame_labels,
    segment_edges,
    windows_from_relevance,
)
from timeexpert.models.configuration_timeexpert import TimeExpertConfig
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TS = [1.0, 3.0, 5.0, 7.0]  # centres of four 2 s segments of an 8 s video


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    return GroundingTokenizer.train(["the red circle grows", "the blue square blinks"] * 3,
                                    vocab_size=400)


def relevance_config(tok, **overrides) -> TimeExpertConfig:
    cfg = get_preset("tiny_cpu").model
    cfg.query_first, cfg.frame_relevance = True, True
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg.with_tokenizer(tok)


def test_segment_edges_are_midpoints_with_the_video_ends():
    np.testing.assert_allclose(segment_edges(TS, 8.0), [0.0, 2.0, 4.0, 6.0, 8.0])
    with pytest.raises(ValueError, match="at least one"):
        segment_edges([], 8.0)


def test_frame_labels_mark_timestamps_inside_windows():
    np.testing.assert_array_equal(frame_labels([(2.5, 5.0)], TS), [0, 1, 0, 0])  # end exclusive
    np.testing.assert_array_equal(frame_labels([(0.0, 1.5), (6.0, 8.0)], TS), [1, 0, 0, 1])
    # weighted windows (VHD saliency / 4): the highest weight over overlapping windows
    np.testing.assert_allclose(frame_labels([(0, 4), (2, 8)], TS, weights=[0.25, 0.75]),
                               [0.25, 0.75, 0.75, 0.75])


def test_windows_from_relevance_runs_relative_to_the_peak():
    p = [0.9, 0.7, 0.1, 0.6]
    windows = windows_from_relevance(p, TS, 8.0, threshold_ratio=0.6)  # salient >= 0.54
    # two runs: frames 0-1 -> [0, 4] (peak 0.9), frame 3 -> [6, 8] (0.6); best first
    assert [(w.start, w.end) for w in windows] == [(0.0, 4.0), (6.0, 8.0)]
    assert windows[0].score == pytest.approx(0.9) and windows[1].score == pytest.approx(0.6)
    # a long run of fairly relevant frames does not outrank the run of the peak
    longer = windows_from_relevance([0.8, 0.8, 0.8, 0.1, 0.9, 0.55], TS + [9.0, 11.0], 12.0, 0.6)
    assert [(w.start, w.end) for w in longer] == [(8.0, 12.0), (0.0, 6.0)]  # mean 0.725 < 0.8
    # an unsure model (peak 0.3) still answers around its peak: salient >= 0.18
    unsure = windows_from_relevance([0.1, 0.3, 0.2, 0.0], TS, 8.0, threshold_ratio=0.6)
    assert [(w.start, w.end) for w in unsure] == [(2.0, 6.0)]
    assert unsure[0].score == pytest.approx(0.3)


def test_dense_events_are_the_runs_of_relevant_frames_with_the_overlapping_captions():
    generated = [Event(0.5, 1.5, 0.9, "the red circle grows"), Event(5.5, 8.0, 0.9, "the blue"),
                 Event(2.0, 3.0, 0.9, "")]  # an uncaptioned event gives no caption
    p = [0.9, 0.7, 0.1, 0.6]  # runs at 0.5: frames 0-1 -> [0, 4], frame 3 -> [6, 8]
    events = dense_events_from_relevance(p, TS, 8.0, generated, max_events=5,
                                         threshold_ratio=0.6)
    assert [(e.start, e.end, e.caption) for e in events] == [
        (0.0, 4.0, "the red circle grows"), (6.0, 8.0, "the blue")]
    assert [e.score for e in events] == pytest.approx([0.9, 0.6])
    # past max_events the most relevant runs stay, in time order
    assert [(e.start, e.end) for e in dense_events_from_relevance(
        [0.6, 0.1, 0.9, 0.1], TS, 8.0, [], max_events=1, threshold_ratio=0.6)] == [(4.0, 6.0)]
    # no overlap: the nearest generated event's caption; nothing generated: no caption
    far = dense_events_from_relevance([0.1, 0.1, 0.1, 0.8], TS, 8.0,
                                      [Event(0.0, 1.0, 1.0, "a"), Event(4.0, 5.0, 1.0, "b")], 3,
                                      threshold_ratio=0.6)
    assert [(e.start, e.end, e.caption) for e in far] == [(6.0, 8.0, "b")]
    # no frame at 0.5: the best run around the peak (at threshold_ratio of it), as MR answers
    unsure = dense_events_from_relevance([0.1, 0.3, 0.2, 0.0], TS, 8.0, [], max_events=3,
                                         threshold_ratio=0.6)
    assert [(e.start, e.end, e.caption) for e in unsure] == [(2.0, 6.0, "")]
    assert [(e.start, e.end) for e in dense_events_from_relevance(
        [0.1, 0.3, 0.2, 0.0], TS, 8.0, [], max_events=3, threshold_ratio=0.9)] == [(2.0, 4.0)]


def test_clip_saliency_weights_frames_by_overlap():
    # clips of 3 s over 8 s: [0,3) overlaps segments 0 (2 s) and 1 (1 s); [3,6) 1 (1 s) and 2
    # (2 s); [6,8) segment 3 alone
    sal = clip_saliency([1.0, 0.0, 0.5, 0.25], TS, 8.0, clip_len=3.0)
    assert sal == pytest.approx([4 * 2 / 3, 4 * (0 + 2 * 0.5) / 3, 4 * 0.25])


def test_query_first_prompt_puts_the_instruction_before_the_frames(tok):
    last = tok.encode_prompt(Task.MR, "the red circle", [0.0, 1.0], tokens_per_frame=2)
    first = tok.encode_prompt(Task.MR, "the red circle", [0.0, 1.0], tokens_per_frame=2,
                              query_first=True)
    n_query = last.types.count(int(TokenType.QUERY))
    assert first.types[:n_query] == [int(TokenType.QUERY)] * n_query
    assert last.types[-n_query:] == [int(TokenType.QUERY)] * n_query
    assert first.ids == last.ids[-n_query:] + last.ids[:-n_query]


def test_frame_relevance_needs_query_first_and_no_token_sampling():
    with pytest.raises(ValueError, match="query_first"):
        TimeExpertConfig(frame_relevance=True)
    with pytest.raises(ValueError, match="token_sampling"):
        TimeExpertConfig(frame_relevance=True, query_first=True,
                         token_sampling={"mode": "token", "keep_ratio": 0.5})


def _prompts(tok, cfg, queries, query_first=True):
    return collate([tok.encode_prompt(Task.MR, q, TS, tokens_per_frame=cfg.tokens_per_frame,
                                      query_first=query_first) for q in queries])


def test_frame_logits_depend_on_the_query_only_when_it_comes_first(tok):
    cfg = relevance_config(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    pixels = model.preprocess_frames(frames)
    queries = ["the red circle grows", "the blue square blinks"]
    batch = _prompts(tok, cfg, queries)
    out = model(**batch, pixel_values=torch.cat([pixels, pixels]))
    assert out.frame_logits.shape == (2, 4) and bool(out.frame_mask.all())
    assert not torch.allclose(out.frame_logits[0], out.frame_logits[1])
    # the same weights with the query after the frames: the causal decoder's frame tokens
    # cannot see it, so both queries give the same frame states
    model.config.query_first = False
    batch = _prompts(tok, cfg, queries, query_first=False)
    h = model(**batch, pixel_values=torch.cat([pixels, pixels])).hidden_states
    visual = batch["token_types"][0] == TokenType.VISUAL
    torch.testing.assert_close(h[0, visual], h[1, visual])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_bidirectional_frames_let_a_frame_see_the_frames_after_it(tok, bidirectional):
    """Prefix-LM attention over the video: with `bidirectional_frames` the first frame's logit
    moves when only the last frame changes; in the causal decoder it cannot. The query tokens
    stay causal either way (they come first and see no frame)."""
    cfg = relevance_config(tok, bidirectional_frames=bidirectional)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    changed = frames.copy()
    changed[-1] = 255 - changed[-1]
    pixels = torch.cat([model.preprocess_frames(frames), model.preprocess_frames(changed)])
    batch = _prompts(tok, cfg, ["the red circle grows"] * 2)
    out = model(**batch, pixel_values=pixels)
    first_moved = not torch.allclose(out.frame_logits[0, 0], out.frame_logits[1, 0], atol=1e-6)
    assert first_moved == bidirectional
    assert not torch.allclose(out.frame_logits[0, -1], out.frame_logits[1, -1], atol=1e-6)
    query = batch["token_types"][0] == TokenType.QUERY
    torch.testing.assert_close(out.hidden_states[0, query], out.hidden_states[1, query])


def test_frame_loss_joins_the_loss_and_a_batch_is_overfit(tok):
    """Two queries over the same frames, each relevant on other frames: the model must read the
    query to fit both (the answer prior cannot)."""
    cfg = relevance_config(tok, loss_weight_frames=2.0)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg)
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    examples = [
        tok.encode_example(Task.MR, q, TS, [Event(a, b, 1.0)], tokens_per_frame=cfg.tokens_per_frame,
                           query_first=True)
        for q, (a, b) in (("the red circle grows", (0.0, 4.0)), ("the blue square blinks", (4.0, 8.0)))
    ]
    batch = collate(examples)
    labels = torch.from_numpy(np.stack([frame_labels([(0.0, 4.0)], TS), frame_labels([(4.0, 8.0)], TS)]))
    pixels = model.preprocess_frames(np.concatenate([frames, frames]))
    out = model(**batch, pixel_values=pixels, frame_labels=labels)
    expected = (out.loss_time + out.loss_score + out.loss_text + out.aux_loss + out.z_loss
                + 2.0 * out.loss_frames)
    torch.testing.assert_close(out.loss, expected)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(**batch, pixel_values=pixels, frame_labels=labels)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    assert float(out.loss_frames.detach()) < 0.1
    prob = torch.sigmoid(out.frame_logits.detach())
    assert bool(((prob > 0.5).float() == labels).all())


def test_inference_reads_windows_off_the_frames(tok):
    cfg = relevance_config(tok, frame_threshold=0.5)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    gm = GroundingModel(model, tok)
    frames = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    requests = [PredictRequest(frames, np.array(TS), task, "the red circle grows" if task != Task.DVC
                               else "", duration=8.0, max_events=2)
                for task in (Task.MR, Task.VHD, Task.DVC)]
    mr, vhd, dvc = gm.predict_batch(requests)
    for p in (mr, vhd):
        assert len(p.frame_relevance) == 4
        expected = windows_from_relevance(p.frame_relevance, TS, 8.0, 0.5)
        assert [(e.start, e.end) for e in p.events] == [(e.start, e.end) for e in expected][
            : len(p.events)]
        assert p.events and all(e.start in (0, 2, 4, 6) and e.end in (2, 4, 6, 8) for e in p.events)
    assert vhd.saliency == pytest.approx(clip_saliency(vhd.frame_relevance, TS, 8.0, 2.0))


def test_inference_reads_dense_events_off_the_frames(tok):
    cfg = relevance_config(tok, answer={"dvc": "frames"})
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    with torch.no_grad():  # every frame's logit is the bias
        for p in model.frame_head.parameters():
            p.zero_()
        model.frame_head.norm.weight.fill_(1.0)
        model.frame_head.proj.bias.fill_(10.0)
    gm = GroundingModel(model, tok)
    frames = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    dvc = gm.predict_batch([PredictRequest(frames, np.array(TS), Task.DVC, "", duration=8.0,
                                           max_events=2)])[0]
    assert dvc.frame_relevance == pytest.approx([1.0] * 4, abs=1e-4)
    assert [(e.start, e.end) for e in dvc.events] == [(0.0, 8.0)]  # one run of every frame
    model.frame_head.proj.bias.data.fill_(-10.0)  # none relevant: the run around the peak
    dvc = gm.predict_batch([PredictRequest(frames, np.array(TS), Task.DVC, "", duration=8.0,
                                           max_events=2)])[0]
    expected = windows_from_relevance(dvc.frame_relevance, TS, 8.0, cfg.frame_threshold)[:1]
    assert [(e.start, e.end) for e in dvc.events] == [(e.start, e.end) for e in expected]


def test_training_rows_get_relevance_labels_per_task():
    """MR: 1 inside the queried window; DVC: 1 inside any event; VHD: the clip's saliency / 4,
    no target without saliency."""
    import json

    from timeexpert.train.batches import relevance_labels

    events = json.dumps([{"start": 2.5, "end": 6.0}])
    mr = relevance_labels({"task": "mr", "events": events}, TS)
    np.testing.assert_array_equal(mr, [0, 1, 1, 0])
    vhd = relevance_labels({"task": "vhd", "events": events, "clip_len": 4.0,
                            "saliency": json.dumps([4.0, 2.0])}, TS)
    np.testing.assert_allclose(vhd, [1.0, 1.0, 0.5, 0.5])
    two = json.dumps([{"start": 0.0, "end": 2.0}, {"start": 6.5, "end": 8.0}])
    dvc = relevance_labels({"task": "dvc", "events": two}, TS)
    np.testing.assert_array_equal(dvc, [1, 0, 0, 1])
    bare = relevance_labels({"task": "vhd", "events": events}, TS)
    np.testing.assert_array_equal(bare, [-1, -1, -1, -1])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_frame_logits_of_a_padded_batch_equal_each_row_alone(tok, bidirectional):
    """Rows of 4 and 2 frames, left-padded as in generation: each row's frame logits equal those
    of the row run alone (with bidirectional frames too: padding is never attended)."""
    cfg = relevance_config(tok, bidirectional_frames=bidirectional)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    frames = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    pixels = model.preprocess_frames(frames)
    prompts = [tok.encode_prompt(Task.MR, "the red circle grows", TS,
                                 tokens_per_frame=cfg.tokens_per_frame, query_first=True),
               tok.encode_prompt(Task.MR, "the blue square blinks", TS[:2],
                                 tokens_per_frame=cfg.tokens_per_frame, query_first=True)]
    batch = collate(prompts, padding_side="left")
    out = model(**batch, pixel_values=pixels)
    assert out.frame_mask.tolist() == [[True] * 4, [True, True, False, False]]
    for b, (prompt, px) in enumerate(zip(prompts, (pixels[:4], pixels[4:]))):
        alone = model(**collate([prompt]), pixel_values=px)
        n = int(out.frame_mask[b].sum())
        torch.testing.assert_close(out.frame_logits[b, :n], alone.frame_logits[0], atol=1e-5,
                                   rtol=1e-4)


def test_frame_labels_need_the_head_and_old_configs_still_match(tok):
    cfg = get_preset("tiny_cpu").model.with_tokenizer(tok)
    model = TimeExpertForGrounding(cfg)
    batch = _prompts(tok, cfg, ["the red circle grows"], query_first=False)
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="no frame relevance head"):
        model(**batch, pixel_values=model.preprocess_frames(frames),
              frame_labels=torch.zeros(1, 4))
    # a config.json written before these fields existed reads as their defaults
    saved = cfg.to_dict()
    for key in ("query_first", "frame_relevance"):
        saved.pop(key)
    assert cfg.architecture_diff(saved) == {}
    assert relevance_config(tok).architecture_diff(saved).keys() == {"query_first", "frame_relevance"}



def _dvc_pair(tok, cfg, seed: int):
    """A fresh model of `cfg` and a batch of two DVC rows (one captioned event) over two
    different random 4-frame videos: (model, batch, pixels)."""
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg)
    frames = np.random.default_rng(seed).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    example = tok.encode_example(Task.DVC, "", TS, [Event(0.0, 4.0, None, "the red circle grows")],
                                 tokens_per_frame=cfg.tokens_per_frame, query_first=True)
    return model, collate([example, example]), model.preprocess_frames(frames)


def test_caption_contrast_counts_only_the_frames_where_captions_disagree():
    """Per frame, a softmax over the video's captions with the positives pooled; frames every
    caption (or none) covers and padding captions are left out; a per-frame shift of all
    captions' scores (a query-independent "something happens here") changes nothing."""
    scores_BKT = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    targets_BKT = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [-1.0] * 4]])
    # frame 0: A only; frame 1: both (left out); frame 2: B only; frame 3: none (left out)
    expected = (torch.logsumexp(torch.tensor([2.0, 0.0]), 0) - 2.0
                + torch.logsumexp(torch.tensor([-1.0, 1.0]), 0) - 1.0) / 2
    torch.testing.assert_close(caption_contrast_loss(scores_BKT, targets_BKT), expected)
    shifted = scores_BKT + torch.tensor([5.0, -3.0, 7.0, 1.0])
    torch.testing.assert_close(caption_contrast_loss(shifted, targets_BKT), expected)
    agree = torch.ones(1, 2, 4)
    zero = caption_contrast_loss(scores_BKT[:, :2].requires_grad_(), agree)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_patch_score_takes_the_best_patch_and_the_pooled_words():
    """A frame's score is its best patch's match with the query: changing another patch of the
    frame below the best leaves it; padding words do not enter the query."""
    torch.manual_seed(0)
    score = PatchQueryScore(text_dim=8, vision_dim=6, rank=4)
    words_BLD = torch.randn(2, 3, 8)
    mask_BL = torch.tensor([[True, True, False], [True, False, False]])
    q_BR = score.embed_text(words_BLD, mask_BL)
    moved = words_BLD.clone()
    moved[0, 2], moved[1, 1:] = 100.0, -100.0  # padding words
    torch.testing.assert_close(score.embed_text(moved, mask_BL), q_BR)
    assert not torch.equal(q_BR[0], q_BR[1])
    patches_BTPV = torch.randn(2, 3, 5, 6)
    s_BT = score(q_BR, patches_BTPV)
    keys_BTPR = score.patch_proj(score.patch_norm(patches_BTPV))
    per_patch_BTP = torch.einsum("btpr,br->btp", keys_BTPR, q_BR) / 2.0
    torch.testing.assert_close(s_BT, per_patch_BTP.amax(-1))
    torch.testing.assert_close(score.captions(q_BR[:, None], patches_BTPV)[:, 0], s_BT)


def test_patch_relevance_adds_the_patch_score_and_trains_the_caption_contrast(tok):
    """`patch_relevance`: the frame logits are the head's plus the query's best patch match; a
    DVC row's captions (`row_captions`, `pad_captions`) give the caption contrast, which joins
    the loss and falls when one batch is fit; the model wants pixels, and the captions need the
    option on."""
    import json

    from timeexpert.train.batches import pad_captions, row_captions
    from timeexpert.train.recipes import stage_loss

    with pytest.raises(ValueError, match="patch_relevance needs frame_relevance"):
        TimeExpertConfig(patch_relevance=True)
    events = json.dumps([{"start": 0.0, "end": 4.0, "caption": "the red circle grows"},
                         {"start": 2.0, "end": 8.0, "caption": "the blue square blinks"}])
    ids, covers_KT = row_captions({"task": "dvc", "events": events}, TS, tok)
    assert ids == [tok.encode_text("the red circle grows"), tok.encode_text("the blue square blinks")]
    np.testing.assert_array_equal(covers_KT, [[1, 1, 0, 0], [0, 1, 1, 1]])
    assert row_captions({"task": "mr", "events": events}, TS, tok) is None
    # `captions_every_row`: any row of the video carries its captions (the pipeline's column)
    mr_row = {"task": "mr", "events": "[]", "video_captions": events}
    every_ids, every_KT = row_captions(mr_row, TS, tok, every_row=True)
    assert every_ids == ids and (every_KT == covers_KT).all()
    assert row_captions(mr_row, TS, tok) is None
    assert row_captions({**mr_row, "video_captions": "[]"}, TS, tok, every_row=True) is None
    captions = pad_captions([(ids, covers_KT), None])
    assert captions["caption_ids"].shape[:2] == (2, 2) and (captions["caption_ids"][1] == -1).all()
    assert (captions["caption_frames"][1] == -1).all()
    assert pad_captions([None, None]) is None

    cfg = relevance_config(tok, patch_relevance=True, loss_weight_captions=0.5)
    model, batch, pixels = _dvc_pair(tok, cfg, seed=4)
    out = model(**batch, pixel_values=pixels, **captions)
    expected = (out.loss_time + out.loss_score + out.loss_text + out.aux_loss + out.z_loss
                + 0.5 * out.loss_captions)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(stage_loss(out, 3, cfg), out.loss)
    with torch.no_grad():  # the head silenced: the logits are the patch score alone
        for p in model.frame_head.parameters():
            p.zero_()
        model.frame_head.norm.weight.fill_(1.0)
        out = model(**batch, pixel_values=pixels)
        query = _prompts(tok, cfg, ["the red circle grows"])
        alone = model(**query, pixel_values=pixels[:4]).frame_logits
    assert float(out.frame_logits.abs().max()) > 0
    is_query = (query["token_types"] == TokenType.QUERY)
    q_BR = model.patch_score.embed_text(model.text_embed(query["input_ids"]), is_query)
    patches = model.encode_patches(pixels[:4])[None]
    torch.testing.assert_close(alone, model.patch_score(q_BR, patches))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(**batch, pixel_values=pixels, **captions)
        first = float(out.loss_captions.detach()) if first is None else first
        optim.zero_grad()
        out.loss_captions.backward()
        optim.step()
    assert float(out.loss_captions.detach()) < 0.1 * first
    with pytest.raises(ValueError, match="pass pixel_values, not visual_embeds"):
        model(**batch, visual_embeds=model.encode_frames(pixels))
    plain = TimeExpertForGrounding(relevance_config(tok))
    with pytest.raises(ValueError, match="no patch score"):
        plain(**batch, pixel_values=pixels, **captions)


def test_gqa_answers_the_option_whose_hypothesis_is_most_relevant(tok, monkeypatch):
    """Answer choice `gqa: options`: each option is asked with the question as one MR query; the
    answer is the option with the most relevant frame, the evidence its best window, nothing is
    generated; a question none of whose hypotheses could be asked gets the `gqa: frames` answer
    (its fallback: the generated option)."""
    cfg = relevance_config(tok, answer={"gqa": "options"})
    torch.manual_seed(0)
    gm = GroundingModel(TimeExpertForGrounding(cfg).eval(), tok)
    question, options = "what colour is the circle that grows?", ["red", "blue", "green"]
    relevance = {"red": [0.1, 0.2, 0.1, 0.1], "blue": [0.1, 0.3, 0.9, 0.8],
                 "green": [0.5, 0.4, 0.1, 0.1]}
    asked = []

    def ask_frames(asks):
        asked.extend(text for _, _, text in asks)
        return [np.asarray(relevance[text.rsplit(" ", 1)[1]]) for _, _, text in asks]

    monkeypatch.setattr(gm, "ask_frames", ask_frames)
    frames = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    request = PredictRequest(frames, np.array(TS), Task.GQA, question, duration=8.0,
                             options=options)
    prediction = gm.predict_batch([request])[0]
    assert asked == [f"{question} {o}" for o in options]
    assert prediction.answer == 1 and prediction.num_tokens == 0
    assert [(e.start, e.end, e.caption) for e in prediction.events] == [(4.0, 8.0, "blue")]
    assert prediction.frame_relevance == relevance["blue"]
    monkeypatch.setattr(gm, "ask_frames", lambda asks: [None] * len(asks))
    unasked = gm.predict_batch([request])[0]
    gm.model.config.answer = {"gqa": "frames"}  # the generated option, the question's frames
    generated = GroundingModel(gm.model, tok).predict_batch([request])[0]
    assert unasked.num_tokens > 0 and unasked.answer == generated.answer
    assert [(e.start, e.end) for e in unasked.events] == [(e.start, e.end)
                                                          for e in generated.events]


def test_dvc_grounds_the_training_captions_that_match_the_frames(tok, monkeypatch):
    """Answer choice `dvc: captions`: the tokenizer's captions are ranked by their patch match
    (`caption_scores`), the top `dvc_candidates` asked as MR queries; the distinct windows of the
    most relevant ones, up to the cap, are the events in time order with their captions; a video
    none of whose candidates could be asked gets the generated answer (its fallback)."""
    captions = ["the red circle grows", "the blue square blinks", "the red square grows"]
    bank_tok = GroundingTokenizer(tok.text, captions=captions)
    cfg = relevance_config(tok, patch_relevance=True, answer={"dvc": "captions"},
                           dvc_candidates=2)
    torch.manual_seed(0)
    gm = GroundingModel(TimeExpertForGrounding(cfg).eval(), bank_tok)
    frames = np.random.default_rng(6).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    pixels = gm.model.preprocess_frames(frames)
    # the patch scores of the real model: (K, T), a caption scores alike alone or in the bank
    patches = gm.model.encode_patches(pixels)
    scores_KT = gm.model.caption_scores(patches, gm.caption_ids)
    assert scores_KT.shape == (3, 4)
    torch.testing.assert_close(gm.model.caption_scores(patches, gm.caption_ids[1:2, :4])[0],
                               scores_KT[1])
    with pytest.raises(ValueError, match="it needs patch_relevance=True"):
        TimeExpertConfig(query_first=True, frame_relevance=True, answer={"dvc": "captions"})
    with pytest.raises(ValueError, match="its tokenizer holds no captions"):
        GroundingModel(gm.model, tok)

    # candidates: "blue square" and "red square" match the patches best, "red circle" least
    monkeypatch.setattr(gm.model, "caption_scores",
                        lambda px, ids: torch.tensor([[0.0] * 4, [1.0] * 4, [2.0] * 4]))
    relevance = {"the blue square blinks": [0.1, 0.2, 0.9, 0.8],   # window [4, 8), peak 0.9
                 "the red square grows": [0.7, 0.95, 0.1, 0.1],    # window [0, 4), peak 0.95
                 "the red circle grows": [0.99, 0.1, 0.1, 0.1]}    # never a candidate
    asked = []

    def ask_frames(asks):
        asked.extend(text for _, _, text in asks)
        return [np.asarray(relevance[text]) for _, _, text in asks]

    monkeypatch.setattr(gm, "ask_frames", ask_frames)
    request = PredictRequest(frames, np.array(TS), Task.DVC, duration=8.0)
    events = gm.predict_batch([request])[0].events
    assert asked == ["the red square grows", "the blue square blinks"]
    assert [(e.start, e.end, e.caption) for e in events] == [
        (0.0, 4.0, "the red square grows"), (4.0, 8.0, "the blue square blinks")]
    # a cap of one keeps the most relevant; the same window twice is one event
    capped = gm.predict_batch([PredictRequest(frames, np.array(TS), Task.DVC, duration=8.0,
                                              max_events=1)])[0].events
    assert [(e.start, e.end, e.caption) for e in capped] == [(0.0, 4.0, "the red square grows")]
    relevance["the blue square blinks"] = [0.6, 0.9, 0.1, 0.1]
    same = gm.predict_batch([request])[0].events
    assert [(e.start, e.end, e.caption) for e in same] == [(0.0, 4.0, "the red square grows")]
    monkeypatch.setattr(gm, "ask_frames", lambda asks: [None] * len(asks))
    unasked = gm.predict_batch([request])[0]
    gm.model.config.answer = {"dvc": "generated"}
    generated = GroundingModel(gm.model, bank_tok).predict_batch([request])[0]
    assert unasked.num_tokens == generated.num_tokens > 0
    assert [(e.start, e.end) for e in unasked.events] == [(e.start, e.end)
                                                          for e in generated.events]


def test_gqa_rows_train_the_hypotheses_that_grounding_the_options_asks(tok):
    """With the answer choice `gqa: options` a GQA row trains as the hypothesis inference asks: the question
    with one option as an MR query, the evidence frames relevant when the option is the answer
    and none when it is not; the right option about half the time; the draw is fixed by the step
    and the row (a rerun sees the same batches) and moves with the step."""
    import json

    from timeexpert.events import gqa_hypothesis
    from timeexpert.train.batches import hypothesis_row, tokenize_batch

    question, options = "what colour is the circle that grows?", ["red", "blue", "green"]
    row = {"id": "v_qa", "task": "gqa", "query": question, "options": json.dumps(options),
           "answer": 1, "events": json.dumps([{"start": 2.5, "end": 6.0}])}
    drawn = [hypothesis_row(row, np.random.default_rng(s)) for s in range(200)]
    assert all(h["task"] == "mr" and h["options"] == "null" for h in drawn)
    right = [h for h in drawn if h["query"] == gqa_hypothesis(question, "blue")]
    assert all(h["events"] == row["events"] for h in right) and 70 <= len(right) <= 130
    wrong = {h["query"]: h["events"] for h in drawn if h not in right}
    assert wrong == {gqa_hypothesis(question, "red"): "[]", gqa_hypothesis(question, "green"): "[]"}

    cfg = relevance_config(tok, answer={"gqa": "options"})
    model = TimeExpertForGrounding(cfg)
    frames = np.random.default_rng(7).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)
    batch = {k: np.array([v]) for k, v in row.items()} | {
        "timestamps": np.array([TS]), "frames": frames, "frame_mask": np.ones((1, 4), bool)}
    labels = {}
    for step in range(12):
        inputs = tokenize_batch(batch, tok, cfg, model, step)
        again = tokenize_batch(batch, tok, cfg, model, step)
        assert torch.equal(inputs["input_ids"], again["input_ids"])
        hypothesis = hypothesis_row(row, np.random.default_rng([step, zlib.crc32(b"v_qa")]))
        expected = tok.encode_example(Task.MR, hypothesis["query"], TS, [],
                                      tokens_per_frame=cfg.tokens_per_frame, query_first=True)
        assert inputs["input_ids"][0, : len(expected.ids) - 1].tolist() == expected.ids[:-1]
        labels[hypothesis["query"]] = inputs["frame_labels"][0].tolist()
    assert labels[gqa_hypothesis(question, "blue")] == [0, 1, 1, 0]
    assert len(labels) > 1 and all(v == [0, 0, 0, 0] for q, v in labels.items()
                                   if q != gqa_hypothesis(question, "blue"))


def test_dvc_by_grounding_captions_runs_through_the_real_model(tok):
    """`dvc: captions` end to end on a fresh model (no stand-ins): the events are distinct
    windows on the frames' segment grid, in time order, at most the cap, each captioned with one
    of the `dvc_candidates` captions whose patch match is the best."""
    captions = ["the red circle grows", "the blue square blinks", "the red square grows",
                "the blue circle blinks"]
    cfg = relevance_config(tok, patch_relevance=True, answer={"dvc": "captions"},
                           dvc_candidates=3)
    torch.manual_seed(0)
    gm = GroundingModel(TimeExpertForGrounding(cfg).eval(), GroundingTokenizer(tok.text,
                                                                               captions=captions))
    frames = np.random.default_rng(8).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        best_K = gm.model.caption_scores(
            gm.model.encode_patches(gm.model.preprocess_frames(frames)), gm.caption_ids)
    candidates = {captions[k] for k in best_K.amax(-1).topk(3).indices.tolist()}
    passes = []  # the vision tower: once for all the captions, nothing generated
    hook = gm.model.frame_encoder.register_forward_hook(lambda m, i, o: passes.append(len(o)))
    try:
        gm.predict_batch([PredictRequest(frames, np.array(TS), Task.DVC, duration=8.0)])
    finally:
        hook.remove()
    assert passes == [4]
    for cap in (8, 1):
        events = gm.predict_batch([PredictRequest(frames, np.array(TS), Task.DVC, duration=8.0,
                                                  max_events=cap)])[0].events
        spans = [(e.start, e.end) for e in events]
        assert 1 <= len(events) <= min(cap, 3) and len(set(spans)) == len(spans)
        assert spans == sorted(spans) and {e.caption for e in events} <= candidates
        assert all(a in (0.0, 2.0, 4.0, 6.0) and b in (2.0, 4.0, 6.0, 8.0) for a, b in spans)


def test_asked_texts_share_one_vision_tower_pass_per_request(tok):
    """`ask_frames` runs the vision tower once per request however many texts it asks, and each
    text's frame probabilities equal those of its own pass over the pixels; `forward` takes the
    patches in place of the pixels, and refuses two sources or patches of another width."""
    cfg = relevance_config(tok, patch_relevance=True)
    torch.manual_seed(0)
    gm = GroundingModel(TimeExpertForGrounding(cfg).eval(), tok)
    rng = np.random.default_rng(9)
    videos = [gm.model.preprocess_frames(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
              for _ in range(2)]
    texts = ["the red circle grows", "the blue square blinks", "red"]
    asks = [(PredictRequest(np.zeros((4, 32, 32, 3), np.uint8), np.array(TS), Task.MR,
                            duration=8.0), px, text) for px in videos for text in texts]
    passes = []
    hook = gm.model.frame_encoder.register_forward_hook(lambda m, i, o: passes.append(len(o)))
    try:
        probs = gm.ask_frames(asks)
    finally:
        hook.remove()
    assert passes == [4, 4]  # one pass of each request's 4 frames
    with torch.inference_mode():  # frames given as their patches are not encoded again
        patches = [gm.model.encode_patches(px) for px in videos]
    passes.clear()
    hook = gm.model.frame_encoder.register_forward_hook(lambda m, i, o: passes.append(len(o)))
    try:
        again = gm.ask_frames([(r, patches[k // len(texts)], text)
                               for k, (r, _, text) in enumerate(asks)])
    finally:
        hook.remove()
    assert passes == [] and all(np.array_equal(a, b) for a, b in zip(again, probs))
    with torch.inference_mode():
        for (_, px, text), p_T in zip(asks, probs):
            alone = gm.model(**_prompts(tok, cfg, [text]), pixel_values=px).frame_logits[0]
            np.testing.assert_allclose(p_T, torch.sigmoid(alone).numpy(), atol=1e-5)
        query = _prompts(tok, cfg, [texts[0]])
        with pytest.raises(ValueError, match="one of pixel_values, patches or visual_embeds"):
            gm.model(**query, pixel_values=videos[0],
                     patches=gm.model.encode_patches(videos[0]))
        with pytest.raises(ValueError, match="patches must be"):
            gm.model(**query, patches=torch.zeros(4, 16, cfg.vision_width + 1))
