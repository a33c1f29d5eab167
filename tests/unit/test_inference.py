"""The one-call grounding API: well-formed generation for MR / VHD / DVC, batching, the KV cache,
bad input, checkpoints (local and s3://), and a model overfit on examples reproducing them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timeexpert.events import (
    DIGIT_IDS,
    DOT_ID,
    SEP_ID,
    SYNC_ID,
    Event,
    Task,
    gqa_answer_events,
    saliency_events,
    saliency_from_events,
)
from timeexpert.inference import GroundingModel, Prediction, PredictRequest
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset

CAPTIONS = ["a person opens the door", "the cat jumps on the sofa"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    return GroundingTokenizer.train(CAPTIONS + ["the cat", "a door", "red ball"], vocab_size=400)


def tiny_model(tok, gating="dynamic", seed=0, **overrides) -> TimeExpertForGrounding:
    cfg = get_preset("tiny_cpu").model
    cfg.moe = {**cfg.moe, "gating": gating}
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return TimeExpertForGrounding(cfg.with_tokenizer(tok))


def emitting(model: TimeExpertForGrounding) -> TimeExpertForGrounding:
    """`model` with its text head zeroed, so that it writes events: a fresh model's text head
    prefers EOS and answers nothing, while with every text logit tied the grammar walks
    SWITCH -> times -> score -> caption up to the event cap (as the Serve tests' checkpoint)."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def video(num_frames=8, size=32, seed=0, fps=0.5):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    return frames, np.arange(num_frames) / fps  # one frame per 2 s


def check_well_formed(pred: Prediction, duration: float, cap: int) -> None:
    assert isinstance(pred, Prediction) and 1 <= len(pred.events) <= cap
    for e in pred.events:
        assert 0.0 <= e.start <= e.end <= duration
        assert e.score is not None and e.score >= 0 and math.isfinite(e.score)
    assert pred.num_tokens >= 1


@pytest.mark.parametrize("gating", ["topk", "dynamic"])
def test_every_event_generated_for_each_task_lies_in_the_video_with_a_score(tok, gating):
    # short caps: an untrained model babbles until a cap, and each step is a decoder pass
    model = emitting(tiny_model(tok, gating, max_caption_tokens=4, max_number_symbols=5)).train()
    gm = GroundingModel.from_model(model, tok)
    frames, ts = video()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    duration = 16.0
    for task, query in ((Task.MR, "the cat"), (Task.VHD, "a door"), (Task.DVC, "")):
        pred = gm.predict(frames, ts, task, query, duration=duration, max_events=3)
        check_well_formed(pred, duration, cap=3)
        if task == Task.VHD:
            assert pred.saliency is not None and len(pred.saliency) == 8  # 16 s / 2 s clips
            assert pred.saliency == saliency_from_events(pred.events, duration, 2.0)
        else:
            assert pred.saliency is None
        if task == Task.MR:
            scores = [e.score for e in pred.events]
            assert scores == sorted(scores, reverse=True)  # ranked
    none = gm.predict(frames, ts, Task.DVC, max_events=0)
    assert none.events == []
    # predicting neither changes routing statistics nor leaves a training model in eval mode
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_a_query_with_words_the_tokenizer_does_not_know_gets_a_warning(tok):
    gm = GroundingModel.from_model(tiny_model(tok, "topk", max_caption_tokens=4), tok)
    frames, ts = video()
    known = gm.predict(frames, ts, Task.MR, "the cat", duration=16.0)
    assert known.unknown_words == [] and known.warning is None
    unknown = gm.predict(frames, ts, Task.MR, "The Dog barks at the cat", duration=16.0)
    assert unknown.unknown_words == ["dog", "barks"]
    assert unknown.warning == ("the model's vocabulary lacks 'dog', 'barks': it never learnt "
                               "these words, so this answer is unreliable")
    asked = gm.predict(frames, ts, Task.GQA, "what jumps?", duration=16.0,
                       options=["the cat", "a zebra"])  # the options are read too
    assert asked.unknown_words == ["what", "zebra"]


class ConstantHead(torch.nn.Module):
    def __init__(self, logits_V: torch.Tensor) -> None:
        super().__init__()
        self.logits_V = logits_V

    def forward(self, h_ND: torch.Tensor) -> torch.Tensor:
        return self.logits_V.expand(*h_ND.shape[:-1], -1)


def test_grammar_masks_what_the_heads_prefer_but_the_grammar_forbids(tok):
    """Heads with fixed logits that rank forbidden tokens first: pad, <sep> on an empty number,
    a second '.', <sync> right after '.'. The state machine must still write well-formed events."""
    model = tiny_model(tok, "topk")
    text = torch.zeros(tok.text_vocab_size)
    text[tok.pad_id], text[tok.switch_id], text[tok.eos_id] = 10.0, 5.0, 1.0
    time = torch.zeros(13)
    time[SEP_ID], time[DOT_ID], time[SYNC_ID], time[DIGIT_IDS[7]] = 10.0, 9.0, 8.0, 1.0
    score = torch.zeros(13)
    score[SYNC_ID], score[DOT_ID], score[DIGIT_IDS[3]] = 10.0, 9.0, 1.0
    model.lm_head, model.time_head, model.score_head = (
        ConstantHead(text),
        ConstantHead(time),
        ConstantHead(score),
    )
    gm = GroundingModel.from_model(model, tok)
    frames, ts = video()
    pred = gm.predict(frames, ts, Task.DVC, duration=16.0, max_events=2)
    # start: '7' (no '.' or <sep> first), <sep>; end: '7' '.' '7' <sync>; score: '3' <sync>
    assert pred.events == [Event(7.0, 7.7, 3.0), Event(7.0, 7.7, 3.0)]
    assert pred.num_tokens == 2 * 9 + 1  # two events of 9 tokens, then EOS at the event cap
    # a text token preferred over SWITCH/EOS: captions stop at max_caption_tokens
    word = tok.encode_text("cat")[0]
    text[word] = 20.0
    pred = gm.predict(frames, ts, Task.DVC, duration=16.0, max_events=2)
    assert len(pred.events) == 2
    cap = model.config.max_caption_tokens
    assert all(len(tok.encode_text(e.caption)) == cap for e in pred.events)


def test_batched_prediction_equals_one_by_one(tok):
    gm = GroundingModel.from_model(
        emitting(tiny_model(tok, "topk", seed=3, max_caption_tokens=4, max_events=3)), tok
    )
    reqs = []
    for i, (task, query, n) in enumerate(
        [(Task.MR, "the cat", 8), (Task.DVC, "", 5), (Task.VHD, "red ball", 3)]
    ):
        frames, ts = video(num_frames=n, seed=i)
        reqs.append(
            PredictRequest(
                frames_THWC=frames, timestamps_T=ts, task=task, query=query, duration=2.0 * n
            )
        )
    batched = gm.predict_batch(reqs)
    single = [gm.predict_batch([r])[0] for r in reqs]
    assert all(p.events for p in single)
    assert batched == single
    assert gm.predict_batch([]) == []


def test_kv_cache_steps_equal_a_full_forward(tok):
    model = tiny_model(tok, "dynamic").eval()
    frames, ts = video(num_frames=4)
    pixels = model.preprocess_frames(frames)
    prompt = tok.encode_prompt(Task.DVC, "", ts.tolist(), tokens_per_frame=8)
    answer = tok.encode_answer([Event(0.0, 2.0, 1.0, CAPTIONS[0])])
    full = collate([type(prompt)(ids=prompt.ids + answer.ids, types=prompt.types + answer.types)])
    ref = model(full["input_ids"], full["token_types"], pixel_values=pixels)
    n = len(prompt)
    out = model(
        full["input_ids"][:, :n], full["token_types"][:, :n], pixel_values=pixels, use_cache=True
    )
    cache, mask = out.past_key_values, torch.ones(1, n, dtype=torch.long)
    for i in range(n, n + len(answer)):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        step = model(
            full["input_ids"][:, i : i + 1],
            full["token_types"][:, i : i + 1],
            attention_mask=mask,
            position_ids=torch.tensor([[i]]),
            past_key_values=cache,
            use_cache=True,
        )
        cache = step.past_key_values
        torch.testing.assert_close(
            step.hidden_states[0, 0], ref.hidden_states[0, i], atol=1e-5, rtol=1e-5
        )


def test_bad_input_is_a_value_error_naming_the_problem(tok):
    gm = GroundingModel.from_model(tiny_model(tok, "topk"), tok)
    frames, ts = video()
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        gm.predict(frames[..., 0], ts, "mr", "cat")
    with pytest.raises(ValueError, match="zero frames"):
        gm.predict(frames[:0], ts[:0], "mr", "cat")
    with pytest.raises(ValueError, match="8 frames but 7 timestamps"):
        gm.predict(frames, ts[:7], "mr", "cat")
    with pytest.raises(ValueError, match="unknown task 'captions'"):
        gm.predict(frames, ts, "captions", "cat")
    with pytest.raises(ValueError, match="exceeds the context of"):
        gm.predict(frames, ts, "mr", "the cat " * 300)
    with pytest.raises(ValueError, match="needs a non-empty query"):
        gm.predict(frames, ts, "vhd", "")
    with pytest.raises(ValueError, match="request 1: .*unknown task"):
        gm.predict_batch(
            [PredictRequest(frames, ts, "mr", "cat"), PredictRequest(frames, ts, "??", "cat")]
        )
    other = GroundingTokenizer.train(["completely different words"], vocab_size=300)
    with pytest.raises(ValueError, match="text_vocab_size: config .* vs tokenizer"):
        GroundingModel.from_model(gm.model, other)


def test_saliency_from_events_at_the_clip_length():
    events = [Event(0.0, 3.0, 2.0), Event(2.5, 4.0, 4.0), Event(9.0, 9.0, 1.0)]
    assert saliency_from_events(events, 10.0, 2.0) == [2.0, 4.0, 0.0, 0.0, 1.0]
    assert saliency_from_events([], 5.0, 2.0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="clip_len > 0"):
        saliency_from_events(events, 10.0, 0.0)


def test_saliency_events_invert_saliency_from_events():
    saliency = [0.0, 2.0, 4.0, 4.0, 1.0, 0.0, 2.0]  # 7 clips of 2 s, the last one cut at 13 s
    events = saliency_events(saliency, 2.0, 13.0)
    assert [(e.start, e.end, e.score) for e in events] == [
        (4.0, 8.0, 4.0), (2.0, 4.0, 2.0), (12.0, 13.0, 2.0), (8.0, 10.0, 1.0)
    ]  # highest first, then earlier
    assert saliency_from_events(events, 13.0, 2.0) == saliency
    top = saliency_events(saliency, 2.0, 13.0, max_events=2)
    assert [e.score for e in top] == [4.0, 2.0]
    assert saliency_events([0.0, 0.0], 2.0, 4.0) == [] and saliency_events([], 2.0, 4.0) == []


def test_vhd_answers_train_the_saliency_scores():
    """A VHD row with per-clip saliency is trained on its scored highlight windows; MR keeps its
    events."""
    import json

    from timeexpert.train.batches import answer_events

    batch = {
        "task": np.array(["vhd", "mr"]), "duration": np.array([9.0, 9.0]),
        "clip_len": np.array([2.0, 2.0]),
        "saliency": np.array([json.dumps([0.0, 3.0, 3.0, 1.0, 0.0]), "null"]),
        "events": np.array([json.dumps([Event(2.0, 6.0).to_dict()])] * 2),
    }
    rows = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    vhd = answer_events(rows[0], max_events=8)
    assert [(e.start, e.end, e.score) for e in vhd] == [(2.0, 6.0, 3.0), (6.0, 8.0, 1.0)]
    assert answer_events(rows[1], max_events=8) == [Event(2.0, 6.0)]


@pytest.mark.slow
def test_a_checkpoint_loaded_from_local_disk_or_s3_answers_as_the_saved_model(tok, tmp_path, s3_server):
    from timeexpert import storage

    gm = GroundingModel.from_model(
        emitting(tiny_model(tok, "dynamic", max_caption_tokens=4, max_events=2)), tok
    )
    frames, ts = video()
    expected = gm.predict(frames, ts, "dvc", duration=16.0)
    assert len(expected.events) == 2
    gm.save(str(tmp_path / "ckpt"))
    local = GroundingModel.load(str(tmp_path / "ckpt"))
    assert local.predict(frames, ts, "dvc", duration=16.0) == expected
    uri = f"{s3_server.root}/ckpts/tiny"
    storage.upload_dir(str(tmp_path / "ckpt"), uri)
    remote = GroundingModel.load(uri)
    assert remote.predict(frames, ts, "dvc", duration=16.0) == expected
    with pytest.raises(ValueError, match="does not exist"):
        GroundingModel.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        GroundingModel.load(f"{s3_server.root}/ckpts/nope")
    # a tokenizer that does not belong to the weights
    GroundingTokenizer.train(["other words entirely"], vocab_size=300).save_pretrained(
        tmp_path / "ckpt"
    )
    with pytest.raises(ValueError, match="do not match"):
        GroundingModel.load(str(tmp_path / "ckpt"))


@pytest.mark.slow
def test_model_overfit_on_examples_reproduces_their_events(tok):
    """One example per task; after overfitting, prediction returns exactly the target events
    (GQA: the evidence span, then the chosen option, read back as its index)."""
    torch.manual_seed(0)
    model = tiny_model(tok, "dynamic")
    cfg = model.config
    options = ["the cat", "a door", "red ball"]
    targets = {
        Task.MR: ("the cat", [Event(4.0, 9.5, 1.0)]),
        Task.VHD: ("red ball", [Event(2.0, 6.0, 3.5), Event(10.0, 14.0, 1.5)]),
        Task.DVC: ("", [Event(0.0, 6.0, 0.0, CAPTIONS[0]), Event(6.0, 16.0, 0.0, CAPTIONS[1])]),
        Task.GQA: ("what jumps on the sofa?",
                   gqa_answer_events([Event(8.0, 12.0, 0.0)], options, answer=0)),
    }
    asked = {task: options if task == Task.GQA else None for task in targets}
    videos = {task: video(seed=i) for i, task in enumerate(targets)}
    examples = [
        tok.encode_example(
            task, q, videos[task][1].tolist(), ev, tokens_per_frame=cfg.tokens_per_frame,
            options=asked[task],
        )
        for task, (q, ev) in targets.items()
    ]
    batch = collate(examples)
    pixels = torch.cat([model.preprocess_frames(videos[t][0]) for t in targets])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(300):
        out = model(**batch, pixel_values=pixels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if (out.loss_time + out.loss_score + out.loss_text).item() < 0.01:
            break
    gm = GroundingModel.from_model(model, tok)
    preds = gm.predict_batch(
        [
            PredictRequest(videos[t][0], videos[t][1], t, q, duration=16.0, options=asked[t])
            for t, (q, _) in targets.items()
        ]
    )
    for (task, (_, events)), pred in zip(targets.items(), preds):
        expected = sorted(events, key=lambda e: -e.score) if task in (Task.MR, Task.VHD) else events
        assert pred.events == expected, (task, pred.text)
    assert preds[1].saliency == [0.0, 3.5, 3.5, 0.0, 0.0, 1.5, 1.5, 0.0]
    assert preds[3].answer == 0 and preds[0].answer is None
    with pytest.raises(ValueError, match="task gqa needs two or more non-empty answer options"):
        gm.predict(*videos[Task.GQA], Task.GQA, "what jumps on the sofa?")


@pytest.mark.gpu
def test_events_predicted_on_cuda_match_the_cpu_ones(tok, tmp_path):
    gm = GroundingModel.from_model(
        emitting(tiny_model(tok, "topk", max_caption_tokens=4, max_events=2)), tok)
    gm.save(str(tmp_path / "ckpt"))
    frames, ts = video()
    cpu = GroundingModel.load(str(tmp_path / "ckpt")).predict(frames, ts, "vhd", "a door")
    assert len(cpu.events) == 2
    cuda = GroundingModel.load(str(tmp_path / "ckpt"), device="cuda")
    assert next(cuda.model.parameters()).is_cuda
    pred = cuda.predict(frames, ts, "vhd", "a door")
    assert len(pred.events) == len(cpu.events) and pred.num_tokens == cpu.num_tokens
    for a, b in zip(pred.events, cpu.events):
        assert (a.start, a.end, a.score) == pytest.approx((b.start, b.end, b.score), abs=0.11)
