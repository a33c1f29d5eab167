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


def test_attribute_agreement_compares_the_hit_event_with_the_queried_one():
    """Three events; the queries ask for the red circle that grows. A window on it agrees in
    everything, one on the red square that blinks in colour only, and a query answered with no
    window counts as agreeing in nothing; records without a scene are left out."""
    from benchmarks.grounding_quality import attribute_agreement
    from timeexpert.data.synth import Scene, SceneObject
    from timeexpert.inference import Prediction

    def obj(shape, colour, motion, start, end):
        return SceneObject(shape=shape, colour=colour, motion=motion, start=start, end=end,
                           lane=0, x0=0.0, x1=0.0, size=10)

    scene = Scene(vid="v0", split="val", duration=30.0, background=0, objects=[
        obj("square", "blue", "stays", 0.0, 30.0),  # a distractor: never an event
        obj("circle", "red", "grows", 2.0, 8.0),
        obj("square", "red", "blinks", 12.0, 18.0),
        obj("triangle", "green", "moves left", 20.0, 28.0)])
    query = dict(video="videos/v0.mp4", duration=30.0, task="mr", query="the red circle grows",
                 events=[Event(2.0, 8.0)])
    records = [Record(id=f"v0_{k}", **query) for k in range(3)]
    records.append(Record(id="w0_0", **{**query, "video": "videos/w0.mp4"}))  # no scene
    answers = [[Event(2.5, 8.0)], [Event(11.0, 17.0)], [], [Event(2.0, 8.0)]]
    predictions = {r.id: Prediction(events=e, saliency=None, text="", num_tokens=0) for r, e in
                   zip(records, answers)}
    agreement = attribute_agreement(records, predictions, {"v0": scene})
    assert agreement == {"colour": 66.7, "shape": 33.3, "motion": 33.3, "all": 33.3}
    assert attribute_agreement(records, predictions, {}) is None
    # chance: each query scores the mean over the three events (red circle grows, red square
    # blinks, green triangle moves left)
    chance = attribute_agreement(records, None, {"v0": scene})
    assert chance == {"colour": 66.7, "shape": 33.3, "motion": 33.3, "all": 33.3}


def test_first_videos_keep_every_record_of_the_first_n_videos():
    """`--train-videos N` (the overfit check) trains and scores the records of N videos."""
    from benchmarks.grounding_quality import first_videos

    records = [Record(id=f"v{v}_{task}", video=f"videos/v{v}.mp4", duration=10.0, task=task,
                      query="q", events=[Event(1.0, 2.0)]) for v in (3, 1, 2) for task in ("mr", "dvc")]
    assert [r.id for r in first_videos(records, 2)] == ["v3_mr", "v3_dvc", "v1_mr", "v1_dvc"]
    assert first_videos(records, 0) == records and first_videos(records, 9) == records
