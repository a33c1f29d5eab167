"""Export a training checkpoint as one plain model directory.

    python jobs/export.py --checkpoint CKPT_URI --out DIR_OR_S3_URI

A checkpoint written by expert-parallel ranks keeps each rank's expert slice in its own file
(`experts/ep_{r}-of-{P}.safetensors`, next to the rest of the model); training, evaluation and
Serve read it as it is. The export stitches the slices into one `model.safetensors` (the EP=1
model), with its config and processor (tokenizer included), and leaves the training state out
(optimizer, ZeRO partitions, data position): what `AutoModel` / `AutoProcessor` and other tools
load. The checkpoint may be any URI `GroundingModel.load` reads (a folder, `s3://`, `runs:/`,
`models:/`); the output a local folder or an `s3://` prefix, which must not hold a model yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also when imported
import _common  # noqa: E402,F401  (sys.path and environment defaults)

from timeexpert import storage  # noqa: E402
from timeexpert.inference import GroundingModel  # noqa: E402


def export(checkpoint: str, out: str) -> str:
    """Write `checkpoint` as one plain model directory at `out`; returns `out`."""
    if storage.exists(storage.join_uri(out, "config.json")):
        raise ValueError(f"{out!r} already holds a model; export into a new folder")
    gm = GroundingModel.load(checkpoint)
    if storage.split_scheme(out)[0] in ("", "file"):
        gm.save(storage.filesystem(out)[1])
        return out
    with tempfile.TemporaryDirectory(prefix="te-export-") as tmp:
        gm.save(tmp)
        storage.upload_dir(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint URI")
    parser.add_argument("--out", required=True, help="a new local folder or s3:// prefix")
    args = parser.parse_args(argv)
    try:
        print(f"exported {args.checkpoint} to {export(args.checkpoint, args.out)}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
