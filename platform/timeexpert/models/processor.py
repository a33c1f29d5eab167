"""The processor: frames + timestamps + task + query -> the model's inputs, and answers -> events.

Hugging Face's processor contract for a video LLM (one object that turns raw inputs into model
inputs and generated ids back into results, saved beside the weights, found by `AutoProcessor`):
the frame preprocessing (`FrameProcessor`) and the grounding tokenizer (`GroundingTokenizer`)
together, with the prompt layout of the model they belong to. It is a plain class, not a
`transformers.ProcessorMixin`: the mixin type-checks its tokenizer against `PreTrainedTokenizerBase`
and its call against images/text/videos, and ours wraps one and takes frames with timestamps.

    processor = AutoProcessor.from_pretrained(ckpt)   # once timeexpert.models.timeexpert is imported
    inputs = processor([frames_THWC], [timestamps_T], "mr", ["a person opens the door"])
    answers = generate_answer(model, **inputs)
    events = processor.decode(*answers[0])

Shape letters: B requests, N tokens, M frames of all requests, T frames of one, H/W pixels.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch

from timeexpert.events import Event, Task
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.models.vision import FrameProcessor

PROCESSOR_FILE = "processor_config.json"  # the file name `AutoProcessor` looks for


class TimeExpertProcessor:
    """Frames + prompt -> model inputs (`input_ids`, `token_types`, `attention_mask`,
    `pixel_values`), left-padded for generation; generated ids -> events."""

    def __init__(self, tokenizer: GroundingTokenizer, *, image_size: int,
                 image_mean: Sequence[float], image_std: Sequence[float], tokens_per_frame: int,
                 max_length: int, query_first: bool = False) -> None:
        if tokens_per_frame < 1 or max_length < 2:
            raise ValueError(f"need tokens_per_frame >= 1 and max_length >= 2, got "
                             f"{tokens_per_frame} and {max_length}")
        self.tokenizer = tokenizer
        self.frame_processor = FrameProcessor(image_size=image_size, mean=image_mean, std=image_std)
        self.tokens_per_frame = tokens_per_frame
        self.max_length = max_length  # the model's context: prompt + answer
        self.query_first = query_first

    @classmethod
    def from_config(cls, config, tokenizer: GroundingTokenizer) -> "TimeExpertProcessor":
        """The processor of a TimeExpertConfig (its frame size, normalisation, prompt layout)."""
        return cls(tokenizer, image_size=config.image_size, image_mean=config.image_mean,
                   image_std=config.image_std, tokens_per_frame=config.tokens_per_frame,
                   max_length=config.max_position_embeddings, query_first=config.query_first)

    def to_dict(self) -> dict:
        fp = self.frame_processor
        return {"processor_class": type(self).__name__, "image_size": fp.image_size,
                "image_mean": list(fp.mean), "image_std": list(fp.std),
                "tokens_per_frame": self.tokens_per_frame, "max_length": self.max_length,
                "query_first": self.query_first}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The tokenizer and `processor_config.json` into `path` (beside the model's weights)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(str(path), PROCESSOR_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "TimeExpertProcessor":
        """Load what `save_pretrained` wrote (`AutoProcessor.from_pretrained` calls this)."""
        file = os.path.join(str(path), PROCESSOR_FILE)
        if not os.path.isfile(file):
            raise ValueError(f"{str(path)!r} holds no {PROCESSOR_FILE}; save the processor with "
                             "TimeExpertProcessor.save_pretrained")
        with open(file) as f:
            fields = json.load(f)
        if fields.pop("processor_class", cls.__name__) != cls.__name__:
            raise ValueError(f"{file!r} is not a {cls.__name__} config")
        return cls(GroundingTokenizer.from_pretrained(path), **fields)

    def preprocess_frames(self, frames_THWC) -> torch.Tensor:
        """uint8 (T, H, W, 3) frames -> normalised pixels (T, 3, image_size, image_size)."""
        return self.frame_processor(frames_THWC)

    def encode_request(self, frames_THWC, timestamps_T, task: Task | str, query: str = "",
                       options: Sequence[str] | None = None):
        """One request -> (its prompt `Encoded`, its pixels (T, 3, H, W)); ValueError on bad
        frames, timestamps, query or (GQA) answer options."""
        task = Task.parse(task)
        pixels_TCHW = self.preprocess_frames(frames_THWC)
        ts = np.asarray(timestamps_T, dtype=np.float64).reshape(-1)
        if ts.shape[0] != pixels_TCHW.shape[0]:
            raise ValueError(f"got {pixels_TCHW.shape[0]} frames but {ts.shape[0]} timestamps")
        if not np.all(np.isfinite(ts)) or (ts < 0).any():
            raise ValueError("timestamps must be finite and >= 0")
        prompt = self.tokenizer.encode_prompt(
            task, query, ts.tolist(), tokens_per_frame=self.tokens_per_frame,
            max_length=self.max_length - 1,  # room for at least one answer token
            query_first=self.query_first, options=options)
        return prompt, pixels_TCHW

    def __call__(self, frames: Sequence, timestamps: Sequence, tasks: Sequence[Task | str] | Task | str,
                 queries: Sequence[str] | str = "",
                 options: Sequence[Sequence[str] | None] | None = None) -> dict[str, torch.Tensor]:
        """A batch of videos (each (T, H, W, 3) uint8 with its (T,) timestamps in seconds), one
        task and one query per video (or one for all), and for GQA each video's answer options
        -> the model's inputs, left-padded."""
        B = len(frames)
        tasks = [tasks] * B if isinstance(tasks, (str, Task)) else list(tasks)
        queries = [queries] * B if isinstance(queries, str) else list(queries)
        options = [None] * B if options is None else list(options)
        if not (B >= 1 and len(timestamps) == len(tasks) == len(queries) == len(options) == B):
            raise ValueError(f"need one or more videos with one timestamps array, task and query "
                             f"each: got {B} videos, {len(timestamps)} timestamps, {len(tasks)} "
                             f"tasks, {len(queries)} queries, {len(options)} option lists")
        prompts, pixels = zip(*(self.encode_request(*r)
                                for r in zip(frames, timestamps, tasks, queries, options)))
        batch = collate(prompts, padding_side="left")
        return {"input_ids": batch["input_ids"], "token_types": batch["token_types"],
                "attention_mask": batch["attention_mask"], "pixel_values": torch.cat(pixels)}

    def decode(self, ids: Sequence[int], types: Sequence[int], *, duration: float | None = None) -> list[Event]:
        """Generated (ids, types) -> events by THE parser; an end written before its start is
        swapped, and times past `duration` are clipped to it."""
        events = self.tokenizer.decode_answer(ids, types, order_times=True)
        if duration is not None:
            if not (math.isfinite(duration) and duration > 0):
                raise ValueError(f"duration must be > 0, got {duration}")
            for e in events:
                e.start, e.end = min(e.start, duration), min(e.end, duration)
        return events
