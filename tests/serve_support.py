"""Shared pieces of the Serve tests: a tiny test checkpoint, synthetic mp4s, a local Serve.

(Beside tests/conftest.py, so the integration and distributed tests both import it.)
"""

from __future__ import annotations

import glob
import os
import socket
import time

import numpy as np


# The demo model's way of answering (presets.binding_cpu): windows, DVC events and the GQA answer
# read off the frames' relevance, not off generated times
READ_OFF_FRAMES = {"query_first": True, "frame_relevance": True, "bidirectional_frames": True,
                   "patch_relevance": True, "answer": {"dvc": "captions", "gqa": "options"}}
CAPTIONS = ["a red circle moves left", "the blue square appears", "a green triangle blinks"]


def build_checkpoint(path: str, *, seed: int = 0, read_off_frames: bool = False) -> str:
    """The tiny_cpu model with random weights, saved with save_pretrained (+ tokenizer).

    The LM head is zeroed so greedy decoding is cheap and always yields events (all text logits
    tie; the grammar then walks switch -> numbers), and the generation caps are small: the tests
    check plumbing and shapes, not accuracy. `read_off_frames`: the demo model's switches
    (`READ_OFF_FRAMES`), with the frame-relevance read scaled up so that its random frame
    probabilities differ enough to give windows shorter than the video.
    """
    import torch

    from timeexpert.inference import GroundingModel
    from timeexpert.models.timeexpert import create_model
    from timeexpert.models.tokenizer import GroundingTokenizer
    from timeexpert.presets import get_preset

    torch.manual_seed(seed)
    tok = GroundingTokenizer.train(CAPTIONS, vocab_size=400,
                                   captions=CAPTIONS if read_off_frames else ())
    cfg = get_preset("tiny_cpu").model.with_tokenizer(tok)
    cfg.max_events, cfg.max_caption_tokens, cfg.max_number_symbols = 2, 2, 3
    for key, value in READ_OFF_FRAMES.items() if read_off_frames else ():
        setattr(cfg, key, value)
    model = create_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        if read_off_frames:  # frame probabilities far apart: runs of frames, not the whole video
            model.frame_head.proj.weight.mul_(10.0)
    GroundingModel.from_model(model, tok).save(path)
    return path


def make_videos(root: str, *, num: int = 2, seed: int = 0) -> list[str]:
    """`num` synthetic mp4s (8-10 s, 160x120) rendered by the data generator under `root`."""
    from timeexpert.data.synth import SynthSpec, generate

    spec = SynthSpec(
        name="serve", num_videos={"test": num}, min_duration=8, max_duration=10, max_event_len=4,
        min_events=2, max_events=2,
    )
    generate(spec, root, seed=seed, workers=1)
    videos = sorted(glob.glob(os.path.join(root, "**", "*.mp4"), recursive=True))
    assert len(videos) == num, videos
    return videos


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(port: int) -> None:
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def stop_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_until(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def random_frames(num: int = 8, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num, size, size, 3), dtype=np.uint8)
    return frames, np.arange(num, dtype=np.float32) + 0.5
