"""Synthetic VTG benchmark: real mp4 files of shapes that act at known times, with MR / VHD / DVC / GQA
annotations in the public formats and our canonical manifest, deterministic by seed.

What makes it hard enough that a model must read both the query and the frames:
- each video holds 2-6 events "the {colour} {shape} {motion}s" (appears, moves left/right,
  grows, shrinks, blinks) of 2-30 s; events of one video often share the colour or the shape of
  another (near misses), and overlap in time;
- static distractor objects (any colour and shape, sometimes the queried ones) stay on screen the
  whole video: only the *motion* in a time window makes an event;
- background noise changing every frame and a random background level per video.
So "which colour appears when" is not enough, and the query decides which of several active
objects is meant. `LADDER` names levels from trivially easy to that: level0 is one large object
acting once on a clean background, each level adds difficulty, and level3 is `small`'s settings.
Saliency per 2 s clip grades the match 0-4: the queried event scores by its coverage of the clip,
a near miss (same colour and shape, other motion) half, one shared attribute a quarter.

Layout written under `out_root` (a local folder or an `s3://` prefix)::

    videos/{vid}.mp4                      H.264, short GOP (1 s), moov first
    manifests/{split}.jsonl               canonical records (all tasks), video URIs relative
    annotations/{split}/charades_sta.txt  MR     (+ durations.json: Charades-STA has none)
    annotations/{split}/qvhighlights.jsonl VHD
    annotations/{split}/activitynet.json  DVC    (+ youcook2.json, the same in YouCook2 layout)
    annotations/{split}/sharegpt.json     Grounding-FT instructions (MR, HD, DVC)
    annotations/{split}/evidence.json     D2VLM evidence format (MR, DVC)
    annotations/{split}/nextgqa.csv       GQA    (+ gsub.json, the evidence spans: NExT-GQA)
    scenes/{split}.jsonl                  what was drawn: every object, its lane and interval
    info.json                             the spec, the seed and the counts
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from timeexpert import storage
from timeexpert.data import formats, nextgqa
from timeexpert.data.video import write_mp4
from timeexpert.events import Event, Record, Task

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 210, 220),
}
MOTIONS = ("appears", "moves left", "moves right", "grows", "shrinks", "blinks")
STATIC = "stays"  # the motion of a distractor: on screen the whole video, never an event
LANE_HEIGHT = 20  # pixels (SynthSpec.lane_height's default); objects on screen together never
# share a lane
BLINK_PERIOD = 1.0  # seconds: visible the first half of each period


@dataclass(kw_only=True)
class SynthSpec:
    """How big and how hard a synthetic benchmark is."""

    name: str  # size name, used in video ids
    num_videos: dict[str, int]  # videos per split
    min_duration: float  # seconds
    max_duration: float  # seconds
    fps: int = 10  # frame rate of the mp4s
    width: int = 160  # pixels
    height: int = 120  # pixels; lanes of lane_height pixels
    lane_height: int = LANE_HEIGHT  # pixels per lane: height // lane_height lanes
    object_size: tuple[int, int] = (10, LANE_HEIGHT - 4)  # full object size in pixels, inclusive
    min_events: int = 2  # events per video
    max_events: int = 6
    min_event_len: float = 2.0  # seconds
    max_event_len: float = 30.0  # seconds; also at most half the video
    num_distractors: tuple[int, int] = (1, 2)  # static distractors per video, inclusive range
    noise: int = 12  # amplitude of the background noise (0-255 scale, 4x4-pixel blocks)
    near_miss_prob: float = 0.6  # chance an event shares colour or shape with an earlier one
    mr_queries_per_video: int = 2  # MR records per video (distinct events)
    clip_len: float = 2.0  # seconds per saliency clip (QVHighlights)
    gop_seconds: float = 1.0  # keyframe interval: sparse reads decode at most this much

    def __post_init__(self) -> None:
        if not 0 < self.min_duration <= self.max_duration:
            raise ValueError(
                f"need 0 < min_duration <= max_duration, got {self.min_duration}, {self.max_duration}"
            )
        if not 1 <= self.min_events <= self.max_events:
            raise ValueError(f"need 1 <= min_events <= max_events, got {self.min_events}, {self.max_events}")
        if not 3 <= self.object_size[0] <= self.object_size[1] <= self.lane_height:
            raise ValueError(
                f"need 3 <= object_size[0] <= object_size[1] <= lane_height ({self.lane_height}), "
                f"got object_size {self.object_size}"
            )
        if self.object_size[1] + 8 >= self.width:
            raise ValueError(f"object_size {self.object_size} leaves no room to move in width {self.width}")
        if self.height // self.lane_height < self.num_distractors[1] + 1:
            raise ValueError(
                f"height {self.height} gives {self.height // self.lane_height} lanes of "
                f"{self.lane_height} px; need more than num_distractors {self.num_distractors[1]}"
            )


SIZES: dict[str, SynthSpec] = {
    "tiny": SynthSpec(
        name="tiny", num_videos={"train": 24, "val": 6, "test": 6}, min_duration=8, max_duration=20,
        max_event_len=8,
    ),
    "small": SynthSpec(
        name="small", num_videos={"train": 240, "val": 40, "test": 40}, min_duration=20,
        max_duration=60, fps=5,
    ),
    # the small videos, five times the training videos (about one pass of the demo's budget)
    "medium": SynthSpec(
        name="medium", num_videos={"train": 1200, "val": 60, "test": 60}, min_duration=20,
        max_duration=60, fps=5,
    ),
    # small's videos with splits large enough for paper-sized (1-3 point) differences to show:
    # the ablation grids choose on its 200 val videos and report on its 200 test videos
    "ablation": SynthSpec(
        name="ablation", num_videos={"train": 1200, "val": 200, "test": 200}, min_duration=20,
        max_duration=60, fps=5,
    ),
    "large": SynthSpec(
        name="large", num_videos={"train": 2400, "val": 300, "test": 300}, min_duration=20,
        max_duration=120, fps=5,
    ),
}
# The difficulty ladder, easiest first: where along it does a model stop learning? The levels
# keep small's videos (counts, durations, fps: each renders in about 20 s on 2 cores) and change
# only what makes it hard. level0: one large object acts once on a clean background; level1 adds
# a static distractor and light noise; level2 two events that often share colour or shape (near
# misses), medium objects; level3: small's settings (2-6 overlapping events, 1-2 distractors,
# 10-16 px objects, noise 12). With one event a video has one MR query (`mr_queries_per_video`
# distinct events at most).
LADDER = ("level0", "level1", "level2", "level3")
_LEVEL = dict(num_videos={"train": 240, "val": 40, "test": 40}, min_duration=20, max_duration=60, fps=5)
SIZES |= {
    "level0": SynthSpec(
        name="level0", **_LEVEL, min_events=1, max_events=1, num_distractors=(0, 0), noise=0,
        near_miss_prob=0.0, lane_height=40, object_size=(28, 36),
    ),
    "level1": SynthSpec(
        name="level1", **_LEVEL, min_events=1, max_events=1, num_distractors=(1, 1), noise=4,
        near_miss_prob=0.0, lane_height=40, object_size=(28, 36),
    ),
    "level2": SynthSpec(
        name="level2", **_LEVEL, min_events=2, max_events=2, num_distractors=(1, 1), noise=8,
        lane_height=30, object_size=(16, 26),
    ),
    "level3": dataclasses.replace(SIZES["small"], name="level3"),
}


@dataclass
class SceneObject:
    """One drawn object: an event (motion in MOTIONS) or a static distractor (motion STATIC)."""

    shape: str
    colour: str
    motion: str
    start: float  # seconds
    end: float  # seconds
    lane: int  # vertical band of the spec's lane_height pixels
    x0: float  # left edge at `start`, pixels
    x1: float  # left edge at `end` (differs for moves left/right)
    size: int  # full size in pixels

    @property
    def caption(self) -> str:
        return f"the {self.colour} {self.shape} {self.motion}"

    def visible(self, t: float) -> bool:
        if not self.start <= t < self.end:
            return False
        if self.motion == "blinks":
            return ((t - self.start) % BLINK_PERIOD) < BLINK_PERIOD / 2
        return True

    def box(self, t: float, lane_height: int = LANE_HEIGHT) -> tuple[int, int, int]:
        """(x, y, size) of the object's bounding square at time t (lanes of `lane_height` px)."""
        p = 0.0 if self.end <= self.start else min(max((t - self.start) / (self.end - self.start), 0), 1)
        size = self.size
        if self.motion == "grows":
            size = int(round(self.size * (0.35 + 0.65 * p)))
        elif self.motion == "shrinks":
            size = int(round(self.size * (1.0 - 0.65 * p)))
        x = self.x0 + (self.x1 - self.x0) * p
        y = self.lane * lane_height + (lane_height - size) // 2
        return int(round(x)), y, max(size, 3)


@dataclass
class Scene:
    vid: str
    split: str
    duration: float
    background: int  # grey level of the background
    objects: list[SceneObject] = field(default_factory=list)
    query_index: int = 0  # the VHD query event (index into `events`)
    mr_indices: list[int] = field(default_factory=list)  # the MR query events

    @property
    def events(self) -> list[SceneObject]:
        return [o for o in self.objects if o.motion != STATIC]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(**{**d, "objects": [SceneObject(**o) for o in d["objects"]]})


# --- scene sampling -------------------------------------------------------------------------


def _q(t: float) -> float:
    """Quantise to 0.1 s, the resolution of the time tokens."""
    return round(round(t * 10) / 10, 1)


def sample_scene(spec: SynthSpec, vid: str, split: str, rng: np.random.Generator) -> Scene:
    duration = _q(rng.uniform(spec.min_duration, spec.max_duration))
    num_lanes = spec.height // spec.lane_height
    scene = Scene(vid=vid, split=split, duration=duration, background=int(rng.integers(30, 90)))
    min_size, max_size = spec.object_size
    lanes = list(rng.permutation(num_lanes))
    for _ in range(int(rng.integers(spec.num_distractors[0], spec.num_distractors[1] + 1))):
        x = float(rng.uniform(4, spec.width - max_size - 4))
        scene.objects.append(
            SceneObject(
                shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), motion=STATIC,
                start=0.0, end=duration, lane=int(lanes.pop()), x0=x, x1=x,
                size=int(rng.integers(min_size, max_size + 1)),
            )
        )
    busy: dict[int, list[tuple[float, float]]] = {lane: [] for lane in lanes}
    events: list[SceneObject] = []
    used: set[tuple[str, str, str]] = set()
    num_events = int(rng.integers(spec.min_events, spec.max_events + 1))
    for _ in range(num_events * 20):
        if len(events) == num_events:
            break
        max_len = min(spec.max_event_len, duration / 2)
        length = _q(rng.uniform(min(spec.min_event_len, max_len), max_len))
        start = _q(rng.uniform(0, duration - length))
        end = min(_q(start + length), duration)
        free = [l for l in busy if all(end + 0.3 <= s or start >= e + 0.3 for s, e in busy[l])]
        if not free or end - start < 0.5:
            continue
        if events and rng.random() < spec.near_miss_prob:
            ref = events[int(rng.integers(len(events)))]
            keep = rng.integers(3)  # 0: colour+shape, 1: colour, 2: shape
            colour = ref.colour if keep in (0, 1) else str(rng.choice(list(COLOURS)))
            shape = ref.shape if keep in (0, 2) else str(rng.choice(SHAPES))
        else:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        motion = str(rng.choice(MOTIONS))
        if (colour, shape, motion) in used:
            continue
        lane = int(free[int(rng.integers(len(free)))])
        size = int(rng.integers(min_size, max_size + 1))
        span = spec.width - size - 8
        if motion in ("moves left", "moves right"):
            a, b = 4.0, float(4 + span)
            x0, x1 = (b, a) if motion == "moves left" else (a, b)
        else:
            x0 = x1 = float(rng.uniform(4, 4 + span))
        events.append(
            SceneObject(shape=shape, colour=colour, motion=motion, start=start, end=end, lane=lane,
                        x0=x0, x1=x1, size=size)
        )
        busy[lane].append((start, end))
        used.add((colour, shape, motion))
    if not events:
        raise RuntimeError(f"could not place any event in {vid} ({duration} s); spec {spec.name}")
    events.sort(key=lambda o: (o.start, o.end))
    scene.objects += events
    order = rng.permutation(len(events))
    scene.mr_indices = sorted(int(i) for i in order[: spec.mr_queries_per_video])
    scene.query_index = int(order[0])
    return scene


# --- rendering ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape filling its bounding square."""
    c = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":  # apex up
        return (y >= -1) & (np.abs(x) <= (y + 1) / 2)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_frames(scene: Scene, spec: SynthSpec, seed: int):
    """Yield the RGB uint8 frames of a scene (a generator: memory stays one frame)."""
    rng = np.random.default_rng(seed)
    h, w = spec.height, spec.width
    # 4x4-pixel blocks of noise: it survives H.264 at a small bitrate (per-pixel noise does not)
    blocks = rng.integers(-spec.noise, spec.noise + 1, size=(8, h // 4 + 1, w // 4 + 1, 3), dtype=np.int16)
    noise_bank = blocks.repeat(4, axis=1).repeat(4, axis=2)[:, :h, :w]
    base = np.full((h, w, 3), scene.background, np.int16)
    num_frames = int(round(scene.duration * spec.fps))
    for k in range(num_frames):
        t = k / spec.fps
        frame = np.clip(base + noise_bank[int(rng.integers(8))], 0, 255).astype(np.uint8)
        for obj in scene.objects:
            if not obj.visible(t):
                continue
            x, y, size = obj.box(t, spec.lane_height)
            mask = shape_mask(obj.shape, size)
            x_a, y_a = max(x, 0), max(y, 0)
            x_b, y_b = min(x + size, w), min(y + size, h)
            if x_b <= x_a or y_b <= y_a:
                continue
            m = mask[y_a - y : y_b - y, x_a - x : x_b - x]
            frame[y_a:y_b, x_a:x_b][m] = COLOURS[obj.colour]
        yield frame


def colour_present(frame: np.ndarray, colour: str, *, tol: int = 60, min_pixels: int = 6) -> bool:
    """Whether at least `min_pixels` of an RGB frame lie within `tol` of a palette colour."""
    ref = np.asarray(COLOURS[colour], np.int16)
    dist = np.abs(frame.astype(np.int16) - ref).max(axis=-1)
    return int((dist <= tol).sum()) >= min_pixels


# --- annotations ----------------------------------------------------------------------------


def _match(obj: SceneObject, query: SceneObject) -> float:
    """How well an event matches the query event: 1 same, 0.5 colour+shape, 0.25 one of them."""
    if obj is query:
        return 1.0
    same_colour, same_shape = obj.colour == query.colour, obj.shape == query.shape
    if same_colour and same_shape:
        return 0.5
    return 0.25 if (same_colour or same_shape) else 0.0


def saliency(scene: Scene, query: SceneObject, clip_len: float) -> list[float]:
    """Per-clip saliency 0-4: the best match x coverage of the clip over the video's events."""
    n = formats.num_clips(scene.duration, clip_len)
    out = []
    for c in range(n):
        a, b = c * clip_len, min((c + 1) * clip_len, scene.duration)
        best = 0.0
        for e in scene.events:
            cover = max(0.0, min(b, e.end) - max(a, e.start)) / max(b - a, 1e-6)
            best = max(best, _match(e, query) * cover)
        out.append(float(round(4 * best)))
    return out


def scene_records(scene: Scene, spec: SynthSpec) -> list[Record]:
    """The canonical records of one video: MR queries, one VHD query, one DVC record, one GQA
    question (when the video has an event to ask about)."""
    video = formats.DEFAULT_VIDEO_PATTERN.format(vid=scene.vid)
    events = scene.events
    common = dict(video=video, duration=scene.duration, split=scene.split, clip_len=spec.clip_len)
    records = [
        Record(id=f"{scene.vid}_{k}", task=Task.MR, query=events[i].caption,
               events=[Event(start=events[i].start, end=events[i].end)], **common)
        for k, i in enumerate(scene.mr_indices)
    ]
    q = events[scene.query_index]
    records.append(
        Record(id=f"{scene.vid}_hl", task=Task.VHD, query=q.caption,
               events=[Event(start=q.start, end=q.end)],
               saliency=saliency(scene, q, spec.clip_len), **common)
    )
    records.append(
        Record(id=scene.vid, task=Task.DVC, query="",
               events=[Event(start=e.start, end=e.end, caption=e.caption) for e in events], **common)
    )
    qa = gqa_record(scene, common)
    return records + ([qa] if qa is not None else [])


NUM_OPTIONS = 4  # answer options of a synthetic GQA question


def gqa_record(scene: Scene, common: dict) -> Record | None:
    """The video's grounded question: "what colour is the {shape} that {motion}?" about an event
    whose shape and motion no other event of the video shares (the frames decide the colour, the
    event's span is the evidence), with the right colour among NUM_OPTIONS palette colours. None
    when every event shares its shape and motion with another. Drawn from a generator of its own
    (seeded by the video id), so the other tasks' records do not move."""
    events = scene.events
    pairs = [(e.shape, e.motion) for e in events]
    unique = [e for e, pair in zip(events, pairs) if pairs.count(pair) == 1]
    if not unique:
        return None
    rng = np.random.default_rng([7, *scene.vid.encode()])
    event = unique[int(rng.integers(len(unique)))]
    others = [c for c in COLOURS if c != event.colour]
    options = [event.colour] + [str(c) for c in rng.choice(others, NUM_OPTIONS - 1, replace=False)]
    order = rng.permutation(NUM_OPTIONS)
    return Record(id=f"{scene.vid}_qa", task=Task.GQA,
                  query=f"what colour is the {event.shape} that {event.motion}?",
                  events=[Event(start=event.start, end=event.end)],
                  options=[options[i] for i in order], answer=int(np.flatnonzero(order == 0)[0]),
                  **common)


# --- generation -----------------------------------------------------------------------------


@dataclass
class SynthDataset:
    root: str  # where it was written
    spec: SynthSpec
    seed: int
    manifests: dict[str, str]  # split -> manifest URI
    num_videos: int
    num_records: int
    seconds: float  # wall time to generate

    def records(self, split: str) -> list[Record]:
        return formats.read_manifest(self.manifests[split])

    def scenes(self, split: str) -> list[Scene]:
        return read_scenes(self.root, split)


def read_scenes(root: str, split: str) -> list[Scene]:
    """What was drawn in a rendered split: its `scenes/{split}.jsonl` (FileNotFoundError when the
    dataset has none, e.g. a real benchmark)."""
    text = storage.read_text(storage.join_uri(root, "scenes", f"{split}.jsonl"))
    return [Scene.from_dict(json.loads(line)) for line in text.splitlines() if line]


def _render_one(args: tuple[Scene, SynthSpec, int, str, dict]) -> None:
    scene, spec, seed, uri, storage_options = args
    frames = render_frames(scene, spec, seed)
    if storage.split_scheme(uri)[0] == "s3":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "v.mp4")
            write_mp4(frames, path, fps=spec.fps, gop_seconds=spec.gop_seconds)
            with open(path, "rb") as f:
                storage.write_bytes(uri, f.read(), **storage_options)
    else:
        _, path = storage.filesystem(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_mp4(frames, path, fps=spec.fps, gop_seconds=spec.gop_seconds)


def _render_videos(jobs: list[tuple], workers: int, progress: Callable[[int, int], None]) -> None:
    """Encode every scene's video (`_render_one`), in `workers` processes when there are several."""
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            rendered = pool.map(_render_one, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
            for done, _ in enumerate(rendered, 1):
                progress(done, len(jobs))
    else:
        for done, job in enumerate(jobs, 1):
            _render_one(job)
            progress(done, len(jobs))


def _write_split(out_root: str, split: str, split_scenes: list[Scene], spec: SynthSpec,
                 opts: dict) -> tuple[str, int]:
    """A split's records: its manifest, the same records in every public annotation format (under
    annotations/{split}/) and the scenes drawn. Returns the manifest's URI and the record count."""
    records = [r for s in split_scenes for r in scene_records(s, spec)]
    manifest = storage.join_uri(out_root, "manifests", f"{split}.jsonl")
    formats.write_manifest(records, manifest, **opts)
    ann = storage.join_uri(out_root, "annotations", split)
    by_task = {t: [r for r in records if r.task == t] for t in Task}
    formats.write_format("charades_sta", by_task[Task.MR], f"{ann}/charades_sta.txt", storage_options=opts)
    storage.write_text(
        f"{ann}/durations.json", json.dumps({s.vid: s.duration for s in split_scenes}), **opts
    )
    formats.write_format("qvhighlights", by_task[Task.VHD], f"{ann}/qvhighlights.jsonl", storage_options=opts)
    formats.write_format("activitynet", by_task[Task.DVC], f"{ann}/activitynet.json", storage_options=opts)
    formats.write_format("youcook2", by_task[Task.DVC], f"{ann}/youcook2.json", storage_options=opts)
    formats.write_format("sharegpt", by_task[Task.MR] + by_task[Task.VHD] + by_task[Task.DVC],
                         f"{ann}/sharegpt.json", storage_options=opts)
    nextgqa.write_nextgqa(by_task[Task.GQA], f"{ann}/nextgqa.csv", f"{ann}/gsub.json",
                          storage_options=opts)
    formats.write_format(
        "evidence", by_task[Task.MR] + by_task[Task.DVC], f"{ann}/evidence.json", storage_options=opts
    )
    storage.write_text(
        storage.join_uri(out_root, "scenes", f"{split}.jsonl"),
        "".join(json.dumps(s.to_dict()) + "\n" for s in split_scenes),
        **opts,
    )
    return manifest, len(records)


def generate(
    size: str | SynthSpec,
    out_root: str,
    seed: int = 0,
    *,
    workers: int | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthDataset:
    """Render a synthetic benchmark (`size` in SIZES, or a SynthSpec) under `out_root`.

    Deterministic by seed: the same seed writes the same scenes, annotations and pixels.
    `workers` processes encode videos in parallel (default: the machine's cores, at most 8).
    `progress(rendered, total)` is called as the videos are written.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
        spec = SIZES[size]
    else:
        spec = size
    opts = storage_options or {}
    t0 = time.perf_counter()
    scenes: dict[str, list[Scene]] = {}
    for split_idx, (split, n) in enumerate(spec.num_videos.items()):
        scenes[split] = [
            sample_scene(
                spec, f"{spec.name}_{split}_{i:05d}", split,
                np.random.default_rng([seed, split_idx, i, 0]),
            )
            for i in range(n)
        ]
    jobs = [
        (s, spec, _pixel_seed(seed, s.vid),
         storage.join_uri(out_root, formats.DEFAULT_VIDEO_PATTERN.format(vid=s.vid)), opts)
        for split_scenes in scenes.values() for s in split_scenes
    ]
    _render_videos(jobs, workers or min(os.cpu_count() or 1, 8),
                   progress or (lambda done, total: None))
    manifests, num_records = {}, 0
    for split, split_scenes in scenes.items():
        manifests[split], count = _write_split(out_root, split, split_scenes, spec, opts)
        num_records += count
    seconds = time.perf_counter() - t0
    info = {
        "spec": dataclasses.asdict(spec),
        "seed": seed,
        "num_videos": len(jobs),
        "num_records": num_records,
        "manifests": manifests,
    }
    storage.write_text(storage.join_uri(out_root, "info.json"), json.dumps(info, indent=1), **opts)
    return SynthDataset(
        root=out_root, spec=spec, seed=seed, manifests=manifests, num_videos=len(jobs),
        num_records=num_records, seconds=seconds,
    )


def _pixel_seed(seed: int, vid: str) -> int:
    """A per-video noise seed that does not depend on Python's salted str hash."""
    return int(np.random.default_rng([seed, *vid.encode()]).integers(2**31))


# --- bad inputs -----------------------------------------------------------------------------

CORRUPTIONS = ("empty", "truncated", "garbage", "moov_less", "corrupt")


def corrupt_video(data: bytes, kind: str, seed: int = 0) -> bytes:
    """A damaged copy of a good mp4 (written by `write_mp4`, moov first), for tests and drills.

    empty: 0 bytes; truncated: cut in half; garbage: random bytes; moov_less: the moov box
    removed; corrupt: random bytes over the middle of the media data (opens, fails at decode).
    """
    rng = np.random.default_rng(seed)
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "garbage":
        return rng.bytes(len(data))
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, box = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        boxes.append((box, pos, size))
        pos += size
    if kind == "moov_less":
        return b"".join(data[p : p + s] for b, p, s in boxes if b != b"moov")
    if kind == "corrupt":
        _, p, s = next(b for b in boxes if b[0] == b"mdat")
        a, b = p + int(s * 0.3), p + int(s * 0.6)
        out = bytearray(data)
        out[a:b] = rng.bytes(b - a)
        return bytes(out)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
