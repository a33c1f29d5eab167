"""The `timeexpert` command: ground one video with a checkpoint, list the presets.

    timeexpert ground VIDEO --query "the red circle grows" --checkpoint CKPT [--task mr]
    timeexpert ground VIDEO --task gqa --query "what grows?" --options "a circle" "a square" \\
        --checkpoint models:/timeexpert-demo/latest --tracking-uri sqlite:///.cache/demo/mlflow.db
    timeexpert presets

`ground` prints the answer as one JSON object: the task, the video's duration, the frames the
model saw and its events (MR windows ranked by score; VHD windows and one saliency score per
clip; DVC captioned events in time order; GQA the chosen option and its evidence span), and a
`warning` naming the query's words that the model's vocabulary lacks. VIDEO is
a local path or an s3:// URI; CKPT a local directory, s3://, runs:/ or models:/ URI (the MLflow
ones read --tracking-uri or MLFLOW_TRACKING_URI). The frames are read as training and serving
read them: `decode_frames`, the model's frame count and size. Errors (a missing video, an
unreadable checkpoint, a task without its query) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from timeexpert.events import Task


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timeexpert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("ground", help="ground one video: print its answer as JSON")
    g.add_argument("video", help="an mp4 (local path or s3:// URI)")
    g.add_argument("--checkpoint", required=True,
                   help="model: a local dir, s3://, runs:/RUN/PATH or models:/NAME/VERSION")
    g.add_argument("--task", default="mr", choices=[t.value for t in Task],
                   help="mr: moments of the query; vhd: highlights; dvc: captioned events; "
                        "gqa: the answer to a question among --options, with its evidence")
    g.add_argument("--query", default="", help="the query (mr, vhd) or the question (gqa)")
    g.add_argument("--options", nargs="+", help="gqa: the answer options")
    g.add_argument("--max-events", type=int, help="at most this many windows / events")
    g.add_argument("--clip-len", type=float, default=2.0, help="vhd: seconds per saliency clip")
    g.add_argument("--tracking-uri", default="", help="MLflow URI for runs:/ and models:/")
    sub.add_parser("presets", help="list the model and training presets")
    return p


def ground(args) -> dict:
    """The answer to one video, as the JSON object `ground` prints."""
    task = Task.parse(args.task)
    if task != Task.DVC and not args.query.strip():
        raise ValueError(f"task {task.value!r} needs --query")
    if (task == Task.GQA) != bool(args.options):
        raise ValueError("--options go with --task gqa (the query is the question), and "
                         "--task gqa needs them")
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    # torch, decord and transformers load here, after the arguments are checked: a mistake is
    # told at once, and `timeexpert presets` never pays for them
    from timeexpert import storage
    from timeexpert.data.video import decode_frames
    from timeexpert.inference import GroundingModel

    scheme = storage.split_scheme(args.video)[0]
    if scheme in ("", "file") and not os.path.isfile(storage.split_scheme(args.video)[1]):
        raise ValueError(f"no video file at {args.video!r}")
    try:
        gm = GroundingModel.load(args.checkpoint)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the checkpoint {args.checkpoint!r}: {err}") from None
    config = gm.model.config
    source = (storage.split_scheme(args.video)[1] if scheme in ("", "file")
              else storage.read_bytes(args.video))
    video = decode_frames(source, num_frames=config.num_frames,
                          size=(config.image_size, config.image_size))
    pred = gm.predict(video.frames, video.timestamps, task, args.query, duration=video.duration,
                      max_events=args.max_events, clip_len=args.clip_len, options=args.options)
    out = {"task": task.value, "video": args.video, "checkpoint": args.checkpoint,
           "duration": round(float(video.duration), 3), "num_frames": len(video.timestamps),
           "events": [e.to_dict() for e in pred.events]}
    if pred.warning:  # words of the query the model's vocabulary lacks
        out.update(warning=pred.warning, unknown_words=pred.unknown_words)
    if task == Task.VHD:
        out.update(clip_len=args.clip_len, saliency=list(pred.saliency or []))
    if task == Task.GQA:
        out.update(answer_index=pred.answer,
                   answer=None if pred.answer is None else args.options[pred.answer])
    return out


def presets() -> list[str]:
    from timeexpert.presets import get_preset, list_presets

    return [f"{name:<16}{get_preset(name).description}" for name in list_presets()]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        print("\n".join(presets()))
        return 0
    try:
        print(json.dumps(ground(args)))
    except ValueError as err:  # VideoDecodeError is one: a bad video is a user's mistake
        print(f"timeexpert ground: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
