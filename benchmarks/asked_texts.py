"""Texts asked over one video's frames: one vision-tower pass for all of them, against one per text.

    python -m benchmarks.asked_texts [--json] [--texts 64] [--repeats 5]

Dense captioning by grounding captions asks `--texts` captions as MR queries over the same
frames (`GroundingModel.ask_frames`; GQA asks each option likewise). The `binding_cpu` model
(fresh weights: the cost does not depend on them) reads its patches with each prompt. Timed on
the same request, round-robin: `ask_frames` (the frames through the vision tower once, the
patches shared by every prompt) against the same prompts passed with the pixels once per text
(what `ask_frames` did before), and the two answers compared.

JSON keys: shared_seconds, per_text_seconds, speedup (per_text / shared), max_abs_diff.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import emit, interleaved_medians, parse_args


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--texts", type=int, default=64),
        p.add_argument("--repeats", type=int, default=5),
    ))
    from timeexpert.data.synth import COLOURS, MOTIONS, SHAPES
    from timeexpert.events import Task
    from timeexpert.inference import GroundingModel, PredictRequest
    from timeexpert.models.timeexpert import TimeExpertForGrounding
    from timeexpert.models.tokenizer import GroundingTokenizer, collate
    from timeexpert.presets import get_preset

    texts = [f"the {c} {s} {m}" for c in COLOURS for s in SHAPES for m in MOTIONS][: args.texts]
    preset = get_preset("binding_cpu")
    tok = GroundingTokenizer.train(texts, vocab_size=preset.tokenizer_vocab_size, captions=texts)
    cfg = preset.model.with_tokenizer(tok)
    torch.manual_seed(0)
    gm = GroundingModel(TimeExpertForGrounding(cfg).eval(), tok)
    T = cfg.num_frames
    frames = np.random.default_rng(0).integers(0, 256, (T, 96, 96, 3), dtype=np.uint8)
    times = np.arange(T, dtype=np.float64) * 2.0 + 1.0
    request = PredictRequest(frames, times, Task.MR, duration=2.0 * T)
    px = gm.model.preprocess_frames(frames)
    asks = [(request, px, text) for text in texts]
    batch = collate([tok.encode_prompt(Task.MR, text, times.tolist(),
                                       tokens_per_frame=cfg.tokens_per_frame, query_first=True)
                     for text in texts], padding_side="right")

    def per_text() -> torch.Tensor:
        with torch.inference_mode():
            out = gm.model(batch["input_ids"], batch["token_types"],
                           attention_mask=batch["attention_mask"],
                           pixel_values=px.repeat(len(texts), 1, 1, 1), return_logits=False)
        return torch.sigmoid(out.frame_logits.float())

    shared = np.stack(gm.ask_frames(asks))
    diff = float(np.abs(shared - per_text().numpy()).max())
    seconds = interleaved_medians({"shared": lambda: gm.ask_frames(asks), "per_text": per_text},
                                  repeats=args.repeats, warmup=1)
    shared_s, per_text_s = round(seconds["shared"], 4), round(seconds["per_text"], 4)
    emit({"setup": f"binding_cpu, {len(texts)} texts over {T} frames of 96x96, "
                   f"CPU threads {torch.get_num_threads()}",
          "shared_seconds": shared_s, "per_text_seconds": per_text_s,
          "speedup": round(per_text_s / shared_s, 2), "max_abs_diff": diff}, as_json=args.json)


if __name__ == "__main__":
    main()
