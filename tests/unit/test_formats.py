"""Public annotation formats and the manifest: parse files written in the exact public layout, and
round-trip every format (records -> file -> records) on synthetic annotations."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from timeexpert.data import formats, nextgqa, synth
from timeexpert.events import Event, Record, Task


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Canonical records of 12 sampled scenes (no rendering needed)."""
    spec = synth.SIZES["tiny"]
    out = []
    for i in range(12):
        scene = synth.sample_scene(spec, f"vid{i:02d}", "train", np.random.default_rng(i))
        out += synth.scene_records(scene, spec)
    return out


def _by_task(records, *tasks):
    return [r for r in records if r.task in tasks]


def _key(r: Record, *, id=True, saliency=True, events=True) -> dict:
    d = r.to_dict()
    if not id:
        d.pop("id")
    if not saliency:
        d.pop("saliency")
    if not events:
        d.pop("events")
    return d


def test_manifest_roundtrip(records, tmp_path):
    uri = str(tmp_path / "m" / "train.jsonl")
    formats.write_manifest(records, uri)
    assert [r.to_dict() for r in formats.read_manifest(uri)] == [r.to_dict() for r in records]


def test_manifest_bad_lines_raise_or_count():
    good = json.dumps(
        Record(id="a", video="v.mp4", duration=3, task="mr", query="q").to_dict()
    )
    text = "\n".join([good, "{not json", json.dumps({"id": "b"}), good.replace('"mr"', '"zz"')])
    with pytest.raises(ValueError, match="manifest line 2"):
        formats.parse_manifest(text)
    skipped = collections.Counter()
    assert len(formats.parse_manifest(text, skipped=skipped)) == 1
    assert skipped == {"bad_annotation": 3}


def test_charades_sta_exact_layout_and_roundtrip(records):
    text = "3MSZA 24.3 30.4##person turn a light on.\n3MSZA 0.0 6.1##a person is opening a door.\n"
    parsed = formats.parse_charades_sta(text, durations={"3MSZA": 31.0})
    assert [(r.id, r.video, r.query, r.events[0].start, r.events[0].end) for r in parsed] == [
        ("3MSZA_0", "videos/3MSZA.mp4", "person turn a light on.", 24.3, 30.4),
        ("3MSZA_1", "videos/3MSZA.mp4", "a person is opening a door.", 0.0, 6.1),
    ]
    assert formats.dump_charades_sta(parsed) == text
    mr = _by_task(records, Task.MR)
    durations = {formats.video_id(r): r.duration for r in mr}
    back = formats.parse_charades_sta(formats.dump_charades_sta(mr), durations=durations)
    assert [_key(r) for r in back] == [_key(r) for r in mr]  # ids follow the same {vid}_{k}
    with pytest.raises(ValueError, match="no duration"):
        formats.parse_charades_sta(text, durations={})
    with pytest.raises(ValueError, match="line 1"):
        formats.parse_charades_sta("3MSZA 24.3##q\n", durations={"3MSZA": 31.0})


def test_qvhighlights_exact_layout_and_roundtrip(records):
    line = {
        "qid": 2579, "query": "A girl and her mother cooked while talking.", "duration": 150,
        "vid": "NUsG9BgSes0_210.0_360.0", "relevant_windows": [[0, 4], [6, 8]],
        "relevant_clip_ids": [0, 1, 3], "saliency_scores": [[4, 3, 2], [1, 1, 1], [4, 4, 4]],
    }
    (r,) = formats.parse_qvhighlights(json.dumps(line) + "\n")
    assert r.id == "2579" and r.task == Task.VHD and r.duration == 150
    assert [(e.start, e.end) for e in r.events] == [(0, 4), (6, 8)]
    assert len(r.saliency) == 75 and r.saliency[:4] == [3.0, 1.0, 0.0, 4.0]
    vhd = _by_task(records, Task.VHD)
    back = formats.parse_qvhighlights(formats.dump_qvhighlights(vhd))
    assert [_key(r) for r in back] == [_key(r) for r in vhd]
    bad = dict(line, relevant_clip_ids=[0, 1])
    with pytest.raises(ValueError, match="QVHighlights line 1"):
        formats.parse_qvhighlights(json.dumps(bad))


def test_activitynet_and_youcook2_roundtrip(records):
    text = json.dumps(
        {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                           "sentences": ["A young woman is seen.", " She then dances."]}}
    )
    (r,) = formats.parse_activitynet(text)
    assert r.task == Task.DVC and [e.caption for e in r.events] == ["A young woman is seen.", "She then dances."]
    dvc = _by_task(records, Task.DVC)
    for name in ("activitynet", "youcook2"):
        parse, dump = formats.FORMATS[name]
        back = parse(dump(dvc))
        assert [_key(r) for r in back] == [_key(r) for r in dvc], name
    yc2 = json.loads(formats.dump_youcook2(dvc))
    first = next(iter(yc2["database"].values()))
    assert first["subset"] == "training" and set(first["annotations"][0]) == {"id", "segment", "sentence"}


def test_sharegpt_roundtrip(records):
    records = _by_task(records, Task.MR, Task.VHD, Task.DVC)
    text = formats.dump_sharegpt(records)
    items = json.loads(text)
    mr = next(i for i in items if i["task"] == "mr")
    assert mr["conversations"][0]["from"] == "human" and "<video>" in mr["conversations"][0]["value"]
    assert mr["conversations"][1]["value"].startswith("The moment happens from ")
    hl = next(i for i in items if i["task"] == "vhd")
    assert hl["conversations"][1]["value"].startswith("The highlights are: ")
    back = formats.parse_sharegpt(text)
    for a, b in zip(back, records, strict=True):
        if b.task == Task.VHD:  # the HD answer holds saliency, not the windows
            assert _key(a, events=False) == _key(b, events=False)
        else:
            assert _key(a) == _key(b)


def test_evidence_roundtrip(records):
    recs = _by_task(records, Task.MR, Task.DVC)
    text = formats.dump_evidence(recs)
    item = json.loads(text)[0]
    assert "time_gt" in item and "<evi>" in item["conversations"][1]["value"]
    assert [_key(r) for r in formats.parse_evidence(text)] == [_key(r) for r in recs]
    with pytest.raises(ValueError, match="not vhd"):
        formats.dump_evidence(_by_task(records, Task.VHD))
    item["time_gt"].append([1, 2])
    with pytest.raises(ValueError, match="time_gt"):
        formats.parse_evidence(json.dumps([item]))


def test_read_write_format_through_storage(records, tmp_path):
    uri = f"file://{tmp_path}/ann/qvh.jsonl"
    vhd = _by_task(records, Task.VHD)
    formats.write_format("qvhighlights", vhd, uri)
    assert [_key(r) for r in formats.read_format("qvhighlights", uri)] == [_key(r) for r in vhd]
    with pytest.raises(ValueError, match="unknown annotation format 'csv'"):
        formats.read_format("csv", uri)


def test_event_text_survives_json_escaping():
    r = Record(id="x", video="videos/x.mp4", duration=5, task="dvc", query="",
               events=[Event(start=0, end=1, caption='it\'s "quoted"')])
    back = formats.parse_activitynet(formats.dump_activitynet([r]))
    assert back[0].events[0].caption == 'it\'s "quoted"'


def test_sharegpt_refuses_gqa_records_by_name(records):
    gqa = _by_task(records, Task.GQA)
    with pytest.raises(ValueError, match="write GQA records with write_nextgqa"):
        formats.dump_sharegpt(gqa[:1])


def test_nextgqa_roundtrip_and_the_official_layout(records, tmp_path):
    gqa = _by_task(records, Task.GQA)
    assert len(gqa) >= 10  # nearly every synthetic video has a question
    qa_text, ground_text = nextgqa.dump_nextgqa(gqa)
    header = qa_text.splitlines()[0].split(",")
    assert header == ["video_id", "frame_count", "width", "height", "question", "answer", "qid",
                      "type", "a0", "a1", "a2", "a3", "a4"]
    ground = json.loads(ground_text)
    r = gqa[0]
    vid = formats.video_id(r)
    assert ground[vid]["location"]["qa"] == [[e.start, e.end] for e in r.events]
    nextgqa.write_nextgqa(gqa, str(tmp_path / "test.csv"), str(tmp_path / "gsub.json"))
    back = nextgqa.read_nextgqa(str(tmp_path / "test.csv"), str(tmp_path / "gsub.json"),
                                split="train")
    assert [_key(a) for a in back] == [_key(b) for b in gqa]


def test_nextgqa_reads_the_official_fixture_files(shared_fixtures):
    """The NExT-GQA fixture's csv + gsub (official layout): only grounded questions become
    records, with five options and the answer's index."""
    root = shared_fixtures / "nextgqa"
    recs = nextgqa.read_nextgqa(str(root / "gt_qa.csv"), str(root / "gt_gsub.json"))
    ground = json.loads((root / "gt_gsub.json").read_text())
    assert len(recs) == sum(len(v["location"]) for v in ground.values())
    first = next(r for r in recs if r.id == "2574374001_0")
    assert first.options[first.answer] == "to play with the dog" and len(first.options) == 5
    assert [(e.start, e.end) for e in first.events] == [(0.5, 12.6)]
    assert first.duration == 35 and first.video == "videos/2574374001.mp4"


def test_nextgqa_bad_input_says_what_is_wrong():
    good = "video_id,frame_count,width,height,question,answer,qid,type,a0,a1\nv,0,0,0,q?,x,0,DO,x,y\n"
    ground = json.dumps({"v": {"duration": 10, "location": {"0": [[1, 2]]}}})
    assert nextgqa.parse_nextgqa(good, ground)[0].answer == 0
    with pytest.raises(ValueError, match="answer 'z' is none of its options"):
        nextgqa.parse_nextgqa(good.replace("q?,x", "q?,z"), ground)
    with pytest.raises(ValueError, match="lacks columns"):
        nextgqa.parse_nextgqa("video_id,question\nv,q\n", ground)
    with pytest.raises(ValueError, match="v_0: .*start <= end"):
        nextgqa.parse_nextgqa(good, json.dumps({"v": {"duration": 10, "location": {"0": [[3, 2]]}}}))
