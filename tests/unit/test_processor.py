"""The HF contract: a checkpoint saved with its processor loads through `AutoModel` and
`AutoProcessor` (once timeexpert's model module is imported) and answers a query."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from timeexpert.events import Event, Task
from timeexpert.inference import GroundingModel
from timeexpert.models.generation import generate_answer
from timeexpert.models.processor import PROCESSOR_FILE, TimeExpertProcessor
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset
from transformers import AutoModel, AutoProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a person opens the door", "the cat jumps on the sofa"]


TARGET = [Event(4.0, 8.5, 1.0)]  # what the model learns to answer to "the cat"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model overfit on one MR example, saved with its processor."""
    tok = GroundingTokenizer.train(CAPTIONS + ["the cat", "a door"], vocab_size=400)
    cfg = get_preset("tiny_cpu").model.with_tokenizer(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).train()
    frames, ts = video()
    batch = collate([tok.encode_example(Task.MR, "the cat", ts.tolist(), TARGET,
                                        tokens_per_frame=cfg.tokens_per_frame)])
    pixels = model.preprocess_frames(frames)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = model(**batch, pixel_values=pixels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if (out.loss_time + out.loss_score + out.loss_text).item() < 0.01:
            break
    path = tmp_path_factory.mktemp("ckpt")
    GroundingModel.from_model(model.eval(), tok).save(str(path))
    return path, model, tok


def video(num_frames=6, seed=0):
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, 40, 40, 3), dtype=np.uint8)
    return frames, np.arange(num_frames) * 2.0


def test_auto_model_and_auto_processor_answer_a_query(saved):
    path, model, tok = saved
    auto_model = AutoModel.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(auto_model, TimeExpertForGrounding)
    assert isinstance(processor, TimeExpertProcessor)
    frames, ts = video()
    inputs = processor([frames], [ts], Task.MR, "the cat")
    assert inputs["pixel_values"].shape == (6, 3, 32, 32)  # resized to the model's image_size
    answers = generate_answer(auto_model, **inputs)
    assert processor.decode(*answers[0], duration=12.0) == TARGET
    # the same answer as the in-memory model through the serving API
    expected = GroundingModel.from_model(model, tok).predict(frames, ts, Task.MR, "the cat",
                                                             duration=12.0)
    assert expected.events == TARGET


def test_processor_inputs_are_the_prompt_layout_left_padded(saved):
    path, model, tok = saved
    processor = AutoProcessor.from_pretrained(path)
    cfg = model.config
    (f1, t1), (f2, t2) = video(6), video(3, seed=1)
    inputs = processor([f1, f2], [t1, t2], ["mr", "dvc"], ["the cat", ""])
    prompts = [tok.encode_prompt(Task.MR, "the cat", t1.tolist(), tokens_per_frame=cfg.tokens_per_frame),
               tok.encode_prompt(Task.DVC, "", t2.tolist(), tokens_per_frame=cfg.tokens_per_frame)]
    batch = collate(prompts, padding_side="left")
    for key in ("input_ids", "token_types", "attention_mask"):
        assert torch.equal(inputs[key], batch[key]), key
    pixels = torch.cat([model.preprocess_frames(f1), model.preprocess_frames(f2)])
    assert torch.equal(inputs["pixel_values"], pixels)
    saved_fields = json.loads((path / PROCESSOR_FILE).read_text())
    assert saved_fields["processor_class"] == "TimeExpertProcessor"
    assert saved_fields["tokens_per_frame"] == cfg.tokens_per_frame
    assert saved_fields["max_length"] == cfg.max_position_embeddings


def test_bad_processor_input_is_a_value_error(saved, tmp_path):
    path, _, _ = saved
    processor = TimeExpertProcessor.from_pretrained(path)
    frames, ts = video()
    with pytest.raises(ValueError, match="got 1 videos, 2 timestamps"):
        processor([frames], [ts, ts], "mr", "the cat")
    with pytest.raises(ValueError, match="got 6 frames but 5 timestamps"):
        processor([frames], [ts[:5]], "mr", "the cat")
    with pytest.raises(ValueError, match="unknown task"):
        processor([frames], [ts], "qa", "the cat")
    with pytest.raises(ValueError, match="needs a non-empty query"):
        processor([frames], [ts], "mr", "")
    with pytest.raises(ValueError, match="holds no processor_config.json"):
        TimeExpertProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokens_per_frame >= 1"):
        TimeExpertProcessor(processor.tokenizer, image_size=32, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3, tokens_per_frame=0, max_length=64)
