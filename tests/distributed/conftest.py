"""Fixtures of the distributed tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_s3_data(s3_server):
    from timeexpert.data import synth

    spec = synth.SynthSpec(name="mini", num_videos={"train": 4, "val": 2, "test": 1},
                           min_duration=8, max_duration=12, max_event_len=5)
    root = f"{s3_server.root}/data/mini"
    synth.generate(spec, root, seed=0, workers=1)
    return root
