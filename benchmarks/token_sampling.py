"""GroundVTS token sampling and D2VLM evidence grounding: what they cost and save.

    python -m benchmarks.token_sampling [--json] [--frames 32] [--tokens-per-frame 32]

1. Decoder forward (prefill) time and decoder tokens at rho = 1.0, 0.5, 0.25 on the same input
   (the same model and frames; only the sampler's keep ratio changes). Target: rho 0.5 at most
   0.6x the rho 1.0 time. The saving scales with the share of visual tokens in the prompt, so
   the setup is printed: frames x tokens per frame, timestamp tokens, query.
2. Evidence-token grounding overhead per generated token: the grounding of one `<evi>` (2-layer
   MLP, cosine similarity to every frame token, salient threshold, pooling) against one cached
   decoder step at that context (D2VLM reports 0.4 ms of 29 ms on a GPU).

JSON keys: time_ratio_rho_0_5, time_ratio_rho_0_25, evidence_overhead_ratio (+ the raw figures).
"""

from __future__ import annotations

import torch

from benchmarks.common import emit, median_seconds, parse_args


def build(frames: int, tokens_per_frame: int):
    from timeexpert.events import Task
    from timeexpert.models.configuration_timeexpert import TimeExpertConfig
    from timeexpert.models.timeexpert import TimeExpertForGrounding
    from timeexpert.models.tokenizer import GroundingTokenizer, collate

    tok = GroundingTokenizer.train(["a person opens the door and walks out"], vocab_size=400)
    cfg = TimeExpertConfig(
        image_size=32, patch_size=8, vision_width=32, vision_num_layers=1, vision_num_heads=2,
        tokens_per_frame=tokens_per_frame, compressor_num_heads=2, num_frames=frames,
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=frames * (tokens_per_frame + 8) + 128,
        moe={"gating": "topk", "num_experts": 4, "max_experts": 4, "num_experts_per_token": 2},
        token_sampling={"mode": "token", "keep_ratio": 1.0, "rank": 32},
        evidence={"threshold_ratio": 0.6},
    ).with_tokenizer(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).eval()
    ts = [float(t) for t in range(frames)]
    prompt = tok.encode_prompt(Task.MR, "a person opens the door", ts, tokens_per_frame=tokens_per_frame)
    batch = collate([prompt])
    visual = torch.randn(frames, tokens_per_frame, cfg.hidden_size)
    return model, batch, visual


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--frames", type=int, default=32),
        p.add_argument("--tokens-per-frame", type=int, default=32),
        p.add_argument("--repeats", type=int, default=5),
    ))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, batch, visual = build(args.frames, args.tokens_per_frame)
    n_prompt = int(batch["input_ids"].shape[1])
    result: dict = {"setup": f"{args.frames} frames x {args.tokens_per_frame} visual tokens, prompt {n_prompt} tokens, "
                             f"hidden 256, 4 layers, topk MoE, batch 1, CPU threads {torch.get_num_threads()}"}
    times = {}
    with torch.inference_mode():
        for rho in (1.0, 0.5, 0.25):
            model.token_sampler.config.keep_ratio = rho

            def forward():
                return model(batch["input_ids"], batch["token_types"], batch["attention_mask"],
                             visual_embeds=visual, return_logits=False)

            out = forward()
            tokens = int(out.attention_mask.sum()) if out.attention_mask is not None else n_prompt
            times[rho] = median_seconds(forward, repeats=args.repeats, warmup=1)
            key = str(rho).replace(".", "_")
            result[f"decoder_tokens_rho_{key}"] = tokens
            result[f"forward_ms_rho_{key}"] = round(times[rho] * 1e3, 2)
        result["time_ratio_rho_0_5"] = round(times[0.5] / times[1.0], 3)
        result["time_ratio_rho_0_25"] = round(times[0.25] / times[1.0], 3)
        result["target_rho_0_5_met"] = result["time_ratio_rho_0_5"] <= 0.6

        # evidence grounding vs one cached decoder step at the rho = 1.0 context
        model.token_sampler.config.keep_ratio = 1.0
        out = model(batch["input_ids"], batch["token_types"], batch["attention_mask"],
                    visual_embeds=visual, use_cache=True, return_logits=False)
        cache, h_1D = out.past_key_values, out.hidden_states[:, -1]
        mask = torch.cat([out.attention_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        next_id = torch.tensor([[model.config.evidence_token_id]])
        next_type = torch.tensor([[2]])
        position = out.position_ids[:, -1:] + 1

        def step():
            return model(next_id, next_type, attention_mask=mask, position_ids=position,
                         past_key_values=cache, use_cache=True, return_logits=False)

        def step_and_heads():
            s = step()
            h = s.hidden_states[:, -1]
            return model.lm_head(h), model.time_head(h), model.score_head(h)

        frames_1TD, frame_mask_1T = out.frame_features, out.frame_mask

        def ground():
            from timeexpert.models.evidence import aggregate_frames

            prob = model.evidence_head(h_1D, frames_1TD, frame_mask_1T)
            salient = model.evidence_head.salient(prob, frame_mask_1T)
            return aggregate_frames(frames_1TD, salient)

        t_step = median_seconds(step_and_heads, repeats=args.repeats * 4, warmup=2)
        t_ground = median_seconds(ground, repeats=args.repeats * 20, warmup=5)
    result["decode_step_ms"] = round(t_step * 1e3, 3)
    result["evidence_grounding_ms"] = round(t_ground * 1e3, 3)
    result["evidence_overhead_ratio"] = round(t_ground / t_step, 4)
    emit(result, as_json=args.json)


if __name__ == "__main__":
    main()
