"""Per-GPU training memory, planned from the real parameter shapes, and checked against a measurement.

    python -m benchmarks.memory_plan --preset paper_gpu --gpus 8 --ep 8 --zero 2 [--json]

The model is built on the meta device (shapes, no storage), so the plan of a 13 B-expert preset
costs nothing. Per GPU, for a stage-3 step (all but the vision encoder trains, as the recipe's
last stage) at `--batch` examples of `--seq-len` tokens:
- parameters: fp32 master weights; expert weights are 1/EP of the total, the rest replicated
  (ZeRO-1/2 shard optimizer state and gradients, not parameters);
- gradients: fp32, experts 1/EP; the dense ones 1/W under ZeRO-2; under ZeRO-1/2 plus
  DeepSpeed's contiguous reduce bucket (`reduce_bucket_size`: 5e8 elements by default, allocated
  whole at every backward, 1.86 GiB in fp32);
- optimizer state: AdamW's two fp32 moments; dense ones under ZeRO-1/2 1/W, plus DeepSpeed's
  fp32 partition of the parameters it steps (another 4 bytes / W);
- activations: what autograd saves for the backward, counted tensor by tensor from the code of
  the decoder block, the MoE layer (router fp32, experts in the compute dtype), the heads, the
  slot compressor and projector (`activation_bytes`); with bf16 autocast, the bf16 copies of the
  trainable weights that autocast caches for the step are counted here too.

The check (`--measure`, default on): one tiny_cpu training step on this CPU in fp32, its peak of
allocated bytes read from torch's own CPU allocator through the profiler's memory events
(`profile_memory=True`, "Total Allocated"). Not tracemalloc, which sees Python's allocator only,
and not RSS deltas, which glibc's arenas and torch's cached pages blur at a few MB. The figure
is the plan's estimate over that measurement, for the same model, batch and sequence length.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

import torch

from benchmarks.common import emit, parse_args
from timeexpert.events import Event, Task
from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset
from timeexpert.train.parallel import build_on_meta, is_expert_param, is_routed_param
from timeexpert.train.recipes import set_stage_trainable, stage_loss, stage_spec

DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed ZeRO-2's default reduce_bucket_size (elements)
GIB = 1024**3


def meta_model(config):
    """The model of `config` on the meta device: every parameter with its real shape, no storage."""
    return build_on_meta(TimeExpertForGrounding, config)


def preset_config(name: str):
    """A preset's model config with its text vocab bound to the preset's tokenizer size (the
    few grammar tokens a trained tokenizer adds are left out: < 0.01% of paper_gpu's weights)."""
    preset = get_preset(name)
    config = preset.model
    if preset.tokenizer_vocab_size:
        config.text_vocab_size = preset.tokenizer_vocab_size
    return config


@dataclass
class ParamCounts:
    """Parameter counts of a whole (EP=1) model, by how training shards and steps them."""

    expert: int  # MoE expert weights (sharded over EP, local AdamW)
    gate: int  # MoE gates W_g, G (replicated, local AdamW)
    dense: int  # every other trainable parameter (data parallel; ZeRO's)
    frozen: int  # not trained in the stage (the vision encoder)


def count_params(model, stage: int = 3, recipe: str = "timeexpert") -> ParamCounts:
    """Split the model's parameters as `train.parallel` and the stage's recipe treat them."""
    spec = stage_spec(recipe, stage, vision_pretrained=True)
    trainable = set_stage_trainable(model, spec)
    out = dict(expert=0, gate=0, dense=0, frozen=0)
    for name, p in model.named_parameters():
        if name not in trainable:
            out["frozen"] += p.numel()
        elif is_expert_param(name):
            out["expert"] += p.numel()
        elif is_routed_param(name, model):
            out["gate"] += p.numel()
        else:
            out["dense"] += p.numel()
    return ParamCounts(**out)


def activation_bytes(config, *, batch: int, seq_len: int, target_tokens: int, elem: int,
                     grouped: bool) -> int:
    """Bytes autograd saves for the backward of one stage-3 step (vision encoder frozen), per
    rank. `elem`: bytes of the compute dtype (2 bf16 autocast, 4 fp32); router, norms and the
    cross-entropy stay fp32. `target_tokens`: labelled tokens per example. `grouped`: experts
    through `grouped_swiglu_gemm` (autograd saves two more (P, F) tensors than the loop)."""
    D, L, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    Dkv = config.num_key_value_heads * (D // H)
    moe = config.moe_config()
    dense = moe.gating == "dense"
    F_, E = moe.hidden_dim, moe.max_experts
    k = 1 if dense else moe.num_experts_per_token  # dynamic gating: k on average by design
    e = elem
    # a pre-norm RMSNorm: its fp32 input and normalised output (+ the bf16 copy under autocast)
    norm = 8 * D + (2 * D if e == 2 else 0)
    # attention: the norm's output as the q/k/v input (one fp32 tensor, or three bf16 casts),
    # RoPE (input and rotated half of q and k), SDPA (q, k, v, output, logsumexp), o_proj input
    attn = (4 * D if e == 4 else 3 * 2 * D) + 2 * e * (D + Dkv) + e * (2 * D + 2 * Dkv) + 4 * H + e * D
    # MoE: the routed tokens' copy, the router in fp32 (normalised x, logits, soft gate,
    # logsumexp), the experts' rows (x, and h1 h3, + silu(h1) and their product when grouped)
    # and their weighted output
    if dense:
        ffn = e * D + 4 * e * F_ + e * D
    else:
        router = 4 * D + 4 * D + 3 * 4 * E
        experts = k * e * D + (4 if grouped else 2) * k * e * F_
        ffn = 4 * D + router + experts + k * e * D
    per_token_layer = norm + attn + norm + ffn
    tokens = batch * seq_len
    decoder = L * tokens * per_token_layer
    # shared by the layers: the (B, 1, N, N) bool mask and the RoPE tables
    shared = batch * seq_len * seq_len + 2 * tokens * (D // H) * e
    # final norm; per labelled token: its hidden state, the head's input cast, the fp32 log-softmax
    V = config.text_vocab_size
    heads = tokens * norm + batch * target_tokens * (4 * D + e * D + 4 * V)
    # slot compressor + projector on every frame (trainable; the frozen encoder saves nothing)
    W, S = config.vision_width, config.tokens_per_frame
    patches = (config.image_size // config.patch_size) ** 2
    frames = batch * config.num_frames
    per_patch = 4 * W + 4 * W + e * W + 4 * e * W  # LayerNorm in/out, kv input, k v and copies
    per_slot = 24 * W + 3 * D + W  # queries, attention, out_proj, MLP (4W hidden), projector
    vision = frames * (patches * per_patch + S * per_slot)
    return decoder + shared + heads + vision


@dataclass
class MemoryPlan:
    """Bytes per GPU."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def plan(counts: ParamCounts, config, *, gpus: int, ep: int, zero: int, batch: int, seq_len: int,
         target_tokens: int, precision: str) -> MemoryPlan:
    """Per-GPU memory of a run of `gpus` ranks, EP degree `ep`, ZeRO stage `zero` (module
    docstring)."""
    if gpus < 1 or ep < 1 or gpus % ep:
        raise ValueError(f"--ep ({ep}) must divide --gpus ({gpus}), both >= 1")
    if zero not in (0, 1, 2):
        raise ValueError(f"--zero must be 0, 1 or 2, got {zero}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be bf16 or fp32, got {precision!r}")
    max_experts = config.moe_config().max_experts
    if counts.expert and max_experts % ep:
        raise ValueError(f"--ep ({ep}) must divide the preset's max_experts ({max_experts})")
    expert = counts.expert // ep
    routed = expert + counts.gate
    dense = counts.dense
    parameters = 4 * (routed + dense + counts.frozen)
    gradients = (4 * routed + (4 * dense // gpus if zero == 2 else 4 * dense)
                 + (4 * DS_REDUCE_BUCKET if zero else 0))
    optimizer = 8 * routed + ((8 + 4) * dense // gpus if zero else 8 * dense)
    elem = 2 if precision == "bf16" else 4
    activations = activation_bytes(config, batch=batch, seq_len=seq_len,
                                   target_tokens=target_tokens, elem=elem, grouped=elem == 2)
    if elem == 2:  # autocast's bf16 copies of the trainable weights, alive for the step
        activations += 2 * (routed + dense)
    return MemoryPlan(parameters=parameters, gradients=gradients, optimizer=optimizer,
                      activations=activations)


# --- the measurement -----------------------------------------------------------------------


def tiny_step_inputs(config, tokenizer, *, batch: int):
    """A batch of `batch` DVC examples with every frame and a few captioned events."""
    frames = config.num_frames
    times = [float(t) for t in range(frames)]
    events = [Event(start=1.0, end=3.0, caption="a red square moves left"),
              Event(start=4.0, end=6.5, caption="a blue circle grows")]
    encoded = [tokenizer.encode_example(Task.DVC, "describe every event", times, events,
                                        tokens_per_frame=config.tokens_per_frame,
                                        max_length=config.max_position_embeddings)
               for _ in range(batch)]
    inputs = collate(encoded)
    g = torch.Generator().manual_seed(0)
    inputs["pixel_values"] = torch.rand(batch * frames, 3, config.image_size, config.image_size,
                                        generator=g)
    return inputs


def peak_allocated(fn) -> int:
    """Peak bytes of torch's CPU allocator while `fn()` runs, over what was allocated before:
    the maximum "Total Allocated" of the profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="te-memplan-") as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [(e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"])
              for e in events if e.get("name") == "[memory]"
              and e.get("args", {}).get("Device Type") == 0]
    if not totals:
        raise RuntimeError("the profiler recorded no CPU memory events")
    totals.sort()
    before = totals[0][1] - totals[0][2]  # allocated before the first event of the step
    return max(t for _, t, _ in totals) - before


def measure_tiny(*, batch: int) -> dict:
    """One fp32 training step of tiny_cpu on this CPU (stage 3, plain AdamW), measured, and the
    plan's estimate of the same step."""
    torch.manual_seed(0)
    config = get_preset("tiny_cpu").model
    words = ["a red square moves left", "a blue circle grows", "describe every event"]
    tokenizer = GroundingTokenizer.train(words * 4, vocab_size=get_preset("tiny_cpu").tokenizer_vocab_size)
    config = config.with_tokenizer(tokenizer)
    inputs = tiny_step_inputs(config, tokenizer, batch=batch)
    seq_len = inputs["input_ids"].shape[1]
    targets = int((inputs["labels"] != -100).sum()) // batch

    model = create_model(config).train()
    set_stage_trainable(model, stage_spec("timeexpert", 3))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step():
        out = model(**inputs, return_logits=False)
        loss = stage_loss(out, 3, config, "timeexpert")
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on, as in every later step
    measured = peak_allocated(step) + _live_bytes(model, optim)
    estimate = plan(count_params(meta_model(config)), config, gpus=1, ep=1, zero=0, batch=batch,
                    seq_len=seq_len, target_tokens=targets, precision="fp32")
    return {"batch": batch, "seq_len": seq_len, "target_tokens": targets,
            "measured_bytes": measured, "estimate_bytes": estimate.total,
            "estimate": asdict(estimate),
            "ratio_estimate_to_measured": round(estimate.total / measured, 3)}


def _live_bytes(model, optim) -> int:
    """Parameters and optimizer state alive before the measured step (the peak is over them)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optim.state.values():
        n += sum(v.numel() * v.element_size() for v in state.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    return n


def _row(name: str, p: MemoryPlan) -> str:
    g = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    return (f"| {name:<24} | {g(p.parameters)} | {g(p.gradients)} | {g(p.optimizer)} | "
            f"{g(p.activations)} | {g(p.total)} |")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--preset", default="paper_gpu"),
        p.add_argument("--gpus", type=int, default=8),
        p.add_argument("--ep", type=int, default=8, help="expert-parallel degree"),
        p.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage (0, 1, 2)"),
        p.add_argument("--batch", type=int, default=1, help="examples per GPU per step"),
        p.add_argument("--seq-len", type=int, default=0,
                       help="tokens per example (default: frames x tokens per frame + 512)"),
        p.add_argument("--target-tokens", type=int, default=256, help="labelled tokens per example"),
        p.add_argument("--precision", default="bf16", choices=("bf16", "fp32")),
        p.add_argument("--no-measure", action="store_true", help="skip the tiny_cpu measurement"),
        p.add_argument("--measure-batch", type=int, default=2),
    ))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = preset_config(args.preset)
    seq_len = args.seq_len or config.num_frames * config.tokens_per_frame + 512
    counts = count_params(meta_model(config))
    per_gpu = plan(counts, config, gpus=args.gpus, ep=args.ep, zero=args.zero, batch=args.batch,
                   seq_len=seq_len, target_tokens=args.target_tokens, precision=args.precision)
    total_params = counts.expert + counts.gate + counts.dense + counts.frozen
    print(f"{args.preset}: {total_params / 1e9:.2f} B parameters ({counts.expert / 1e9:.2f} B "
          f"expert, {counts.dense / 1e9:.3f} B dense trainable, {counts.frozen / 1e9:.3f} B frozen "
          f"vision); {args.gpus} GPUs, EP={args.ep}, ZeRO-{args.zero}, {args.precision}, "
          f"batch {args.batch} x {seq_len} tokens per GPU")
    print("| per GPU (GiB)            |   params |    grads |    optim | activations |  total |")
    print(_row(f"{args.gpus} GPUs EP={args.ep} ZeRO-{args.zero}", per_gpu))
    result = {"preset": args.preset, "gpus": args.gpus, "ep": args.ep, "zero": args.zero,
              "precision": args.precision, "batch": args.batch, "seq_len": seq_len,
              "params": asdict(counts),
              "per_gpu_gib": {k: round(v / GIB, 3) for k, v in
                              {**asdict(per_gpu), "total": per_gpu.total}.items()}}
    if not args.no_measure:
        check = measure_tiny(batch=args.measure_batch)
        print(f"tiny_cpu check (fp32, batch {check['batch']} x {check['seq_len']} tokens, one "
              f"stage-3 step): estimate {check['estimate_bytes'] / 2**20:.2f} MiB, measured peak "
              f"{check['measured_bytes'] / 2**20:.2f} MiB -> ratio "
              f"{check['ratio_estimate_to_measured']:.3f} (target 0.8-1.25)")
        result["tiny_check"] = check
    emit(result, as_json=args.json)


if __name__ == "__main__":
    main()
