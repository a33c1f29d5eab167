"""Prepare a dataset: render the synthetic VTG benchmark, or convert public annotations.

    python jobs/prepare_data.py --synthetic {tiny,small,medium,large,level0..level3} [--out ROOT]
        [--seed 0] [--workers N] [--no-baselines] [--captions]
    python jobs/prepare_data.py --convert FORMAT --input URI --out ROOT/manifests/SPLIT.jsonl
        [--split SPLIT] [--durations URI] [--video-pattern 'videos/{vid}.mp4']

A dataset root, what the training and evaluation jobs read (--data-root, --root):

    ROOT/manifests/{train,val,test}.jsonl   one canonical record a line
    ROOT/videos/VID.mp4                     the videos, named in the records relative to ROOT

--synthetic writes mp4s, the public-format annotation files and one canonical manifest per split
under ROOT (a local folder, default .cache/data/{size}, or s3://bucket/prefix), then prints the
trivial baselines' scores on the test split (the chance level results are read against).
level0..level3 are the difficulty ladder (`synth.LADDER`): one large object acting once, up to
small's settings.
--convert reads a public annotation file (charades_sta, qvhighlights, activitynet, youcook2,
sharegpt, evidence) and writes it as a canonical manifest; Charades-STA needs --durations, a JSON
object {vid: seconds}. Write it as ROOT/manifests/SPLIT.jsonl and put the videos under
ROOT/videos/ (--video-pattern names them). Each malformed row is reported as `FILE:LINE: what is
wrong` (json formats: `FILE: video 'VID': ...`) and left out: unparsable times, start > end, a
start past the video's end, an empty query, a video without a duration; an end past the video's
duration is clamped to it and said. The last line counts the rows read, written and refused.
"""

from __future__ import annotations

import argparse
import collections
import json
import posixpath
import sys

from timeexpert import storage
from timeexpert.data import formats, synth
from timeexpert.eval.baselines import trivial_baselines


def _print_baselines(dataset: synth.SynthDataset, seed: int, captions: bool) -> None:
    test_split = "test" if "test" in dataset.manifests else list(dataset.manifests)[-1]
    scores = trivial_baselines(
        dataset.records("train"), dataset.records(test_split), seed=seed, captions=captions
    )
    print(f"\ntrivial baselines on the {test_split} split (the chance level):")
    for name, metrics in scores.items():
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()
                 if isinstance(v, (int, float))}
        print(f"  {name}: {json.dumps(shown)}")


def synthetic(args: argparse.Namespace) -> None:
    out = args.out or f".cache/data/{args.synthetic}"
    print(f"rendering the {args.synthetic} synthetic benchmark (seed {args.seed}) under {out} ...")
    ds = synth.generate(args.synthetic, out, seed=args.seed, workers=args.workers)
    print(f"{ds.num_videos} videos, {ds.num_records} records in {ds.seconds:.1f} s")
    for split, uri in ds.manifests.items():
        counts = collections.Counter(r.task.value for r in ds.records(split))
        print(f"  {split}: {uri}  {dict(sorted(counts.items()))}")
    print(f"public formats under {storage.join_uri(out, 'annotations')}/{{split}}/")
    if not args.no_baselines:
        _print_baselines(ds, args.seed, args.captions)


def convert(args: argparse.Namespace) -> None:
    if not args.input or not args.out:
        sys.exit("--convert needs --input and --out (ROOT/manifests/SPLIT.jsonl)")
    kwargs: dict = {}
    if args.convert in ("charades_sta", "qvhighlights", "activitynet", "youcook2"):
        kwargs["video_pattern"] = args.video_pattern
    if args.convert in ("charades_sta", "qvhighlights", "activitynet"):
        kwargs["split"] = args.split
    if args.convert == "charades_sta":
        if not args.durations:
            sys.exit("Charades-STA has no durations: pass --durations URI of a {vid: seconds} JSON")
        try:
            kwargs["durations"] = json.loads(storage.read_text(args.durations))
        except (OSError, ValueError) as e:
            sys.exit(f"error: --durations {args.durations}: {e}")
    problems: list[formats.RowProblem] = []
    try:
        records = formats.read_format(args.convert, args.input, problems=problems, **kwargs)
    except (OSError, ValueError) as e:  # the file as a whole: absent, not json
        sys.exit(f"error: {args.input}: {e}")
    for problem in problems:
        print(f"{formats.place(args.input, problem.where)}: {problem.message}", file=sys.stderr)
    refused = sum(p.refused for p in problems)
    clamped = len(problems) - refused
    formats.write_manifest(records, args.out)
    counts = collections.Counter(r.task.value for r in records)
    print(f"{args.input}: {len(records) + refused} rows read, {len(records)} written "
          f"{dict(sorted(counts.items()))} to {args.out}, {refused} refused"
          + (f", {clamped} clamped to their video's duration" if clamped else ""))
    if posixpath.basename(posixpath.dirname(args.out)) != formats.MANIFESTS_DIR:
        print(f"note: the jobs read a dataset as ROOT/{formats.MANIFESTS_DIR}/SPLIT.jsonl with the "
              f"videos under ROOT/ (see --help); {args.out} is not in a {formats.MANIFESTS_DIR}/ folder")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--synthetic", choices=sorted(synth.SIZES), help="render a synthetic benchmark")
    mode.add_argument("--convert", choices=sorted(set(formats.FORMATS) - {"manifest"}),
                      help="convert a public annotation file to a manifest")
    parser.add_argument("--out", help="--synthetic: the dataset root (default .cache/data/SIZE); "
                        "--convert: the manifest, ROOT/manifests/SPLIT.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="encoding processes")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baseline scores")
    parser.add_argument("--captions", action="store_true",
                        help="also score the DVC baselines' captions (METEOR needs java)")
    parser.add_argument("--input", help="--convert: the public annotation file URI")
    parser.add_argument("--split", default="train", help="--convert: split of the records")
    parser.add_argument("--durations", help="--convert charades_sta: {vid: seconds} JSON URI")
    parser.add_argument("--video-pattern", default=formats.DEFAULT_VIDEO_PATTERN,
                        help="--convert: video URI from the video id, relative to the root")
    args = parser.parse_args(argv)
    if args.synthetic:
        synthetic(args)
    else:
        convert(args)


if __name__ == "__main__":
    main()
