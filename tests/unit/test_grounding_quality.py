"""benchmarks.grounding_quality's batch order: an epoch covers every record once; `paired` keeps
the records of a video next to each other (both MR queries in one batch)."""

from __future__ import annotations

import numpy as np

from benchmarks.grounding_quality import epoch_order
from timeexpert.events import Event, Record


def test_paired_epochs_keep_a_videos_records_together():
    records = [Record(id=f"v{v}_{k}", video=f"videos/v{v}.mp4", duration=10.0, task="mr",
                      query="q", events=[Event(1.0, 2.0)]) for v in range(6) for k in range(2)]
    for paired in (False, True):
        order = epoch_order(records, np.random.default_rng(0), paired)
        assert sorted(order) == list(range(len(records)))
    order = epoch_order(records, np.random.default_rng(0), True)
    videos = [records[i].video for i in order]
    assert all(videos[2 * j] == videos[2 * j + 1] for j in range(6))
    assert order != sorted(order)  # the videos are shuffled
