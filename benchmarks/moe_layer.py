"""One MoE layer, forward+backward on CPU in fp32: TimeExpert's MoELayer against its peers and limit.

`python -m benchmarks.moe_layer [--json]`. 4096 tokens, d=256, SwiGLU experts of width 512, at
8 experts top-2 and 64 experts top-6. Peers measured in this run: transformers'
MixtralSparseMoeBlock with its `eager` and `grouped_mm` expert backends, DeepSpeed's MoE layer
(dropless, same SwiGLU expert, gloo world of 1). The limit: one dense SwiGLU over N*k rows.
Ours, the peers and the limit are timed round-robin, one run of each per round (median per
contender), so a change in machine load shifts them alike.
Dynamic mode: thresholds calibrated to fire k experts per token on average, plus a sweep that
prints cost against the mean number of activated experts.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from torch import nn

from benchmarks.common import emit, interleaved_medians, median_seconds, parse_args
from timeexpert.config import MoEConfig
from timeexpert.models.moe import MoELayer, swiglu

N_TOKENS, DIM, HIDDEN = 4096, 256, 512
SIZES = ((8, 2), (64, 6))


class SwiGLUExpert(nn.Module):
    """The same SwiGLU expert, as a module for DeepSpeed."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight)


def fwd_bwd(fn, x, grad):
    def run():
        x.grad = None
        y = fn(x)
        y.backward(grad)

    return run


def ours(gating: str, E: int, k: int) -> MoELayer:
    cfg = MoEConfig(dim=DIM, hidden_dim=HIDDEN, gating=gating, num_experts=E, max_experts=E,
                    num_experts_per_token=k)
    return MoELayer(cfg)


def hf_block(E: int, k: int, backend: str):
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_local_experts=E,
                        num_experts_per_tok=k, router_jitter_noise=0.0)
    cfg._experts_implementation = backend
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            nn.init.normal_(p, std=0.02)
    return block


def init_deepspeed() -> bool:
    """A gloo world of one process for DeepSpeed's MoE (see STACK_NOTES)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mkstemp(prefix="moe-bench-")[1], 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    return True


def ds_moe(E: int, k: int):
    from deepspeed.moe.layer import MoE

    return MoE(hidden_size=DIM, expert=SwiGLUExpert(), num_experts=E, ep_size=1, k=k,
               drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)


def calibrate_dynamic(layer: MoELayer, x, target: float) -> None:
    """Thresholds G at the (1 - target/E) quantile of each expert's cosine: ~target fire per token."""
    E = layer.cfg.max_experts
    with torch.no_grad():
        cos = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(layer.w_gate_ED, dim=-1).T
        q = torch.quantile(cos, 1 - min(target / E, 1.0), dim=0)
        layer.threshold_E.copy_(q)  # sigmoid(cos) > sigmoid(G)  <=>  cos > G


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--threads", type=int, default=2, help="torch intra-op threads"),
        p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement"),
        p.add_argument("--skip-deepspeed", action="store_true"),
        p.add_argument("--tokens", type=int, default=N_TOKENS, help="tokens (4096 is the benchmark)"),
    ))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    med = lambda fn: median_seconds(fn, repeats=args.repeats, warmup=2)  # noqa: E731
    n_tokens = args.tokens
    x_ND = torch.randn(n_tokens, DIM, requires_grad=True)
    grad_ND = torch.randn(n_tokens, DIM)
    types_N = torch.randint(0, 5, (n_tokens,))
    print(f"torch {torch.__version__}, {args.threads} threads, {n_tokens} tokens, d={DIM}, "
          f"SwiGLU width {HIDDEN}, fp32, forward+backward, median of {args.repeats}")

    have_ds = False
    if not args.skip_deepspeed:
        try:
            have_ds = init_deepspeed()
        except Exception as exc:  # reported, not fatal: the other figures still stand
            print(f"deepspeed unavailable: {type(exc).__name__}: {exc}")

    seconds: dict[str, float] = {}
    mean_active: dict[str, float] = {}
    sweep: dict[str, list] = {}
    for E, k in SIZES:
        size = f"{E}x{k}"
        # the peers and the limit timed round-robin: load drift hits them all alike
        layer = ours("topk", E, k)
        contenders = {f"timeexpert/topk/{size}": fwd_bwd(lambda x: layer(x, types_N)[0], x_ND, grad_ND)}
        for backend in ("eager", "grouped_mm"):
            block = hf_block(E, k, backend)
            contenders[f"hf_{backend}/topk/{size}"] = fwd_bwd(
                lambda x, block=block: block(x[None])[0], x_ND, grad_ND
            )
        if have_ds:
            moe = ds_moe(E, k)
            contenders[f"deepspeed/topk/{size}"] = fwd_bwd(
                lambda x: moe(x[None])[0][0], x_ND, grad_ND
            )
        x_rows = torch.randn(n_tokens * k, DIM, requires_grad=True)
        dense = SwiGLUExpert()
        contenders[f"dense_limit/{size}"] = fwd_bwd(
            lambda x: dense(x), x_rows, torch.randn(n_tokens * k, DIM)
        )
        seconds.update(interleaved_medians(contenders, repeats=args.repeats, warmup=2))
        del contenders
        # dynamic: calibrated to ~k active experts per token, then a sweep over the mean
        dyn = ours("dynamic", E, k).eval()  # eval: statistics frozen, thresholds stay put
        sweep[size] = []
        for target in sorted({k / 2, k, 2 * k}):
            calibrate_dynamic(dyn, x_ND.detach(), target)
            dyn.reset_telemetry()
            t = med(fwd_bwd(lambda x: dyn(x, types_N)[0], x_ND, grad_ND))
            m = dyn.telemetry()["mean_active_experts"]
            sweep[size].append({"mean_active_experts": round(m, 3), "seconds": round(t, 4),
                                "ms_per_active_expert": round(1e3 * t / m, 2)})
            print(f"dynamic {size}: mean active experts {m:.2f} of {E} -> {1e3 * t:.1f} ms "
                  f"({1e3 * t / m:.1f} ms per active expert)")
            if target == k:
                seconds[f"timeexpert/dynamic/{size}"] = t
                mean_active[size] = round(m, 3)
        for key in [key for key in seconds if key.endswith(size)]:
            print(f"{key}: {1e3 * seconds[key]:.1f} ms")

    def ratio(num: str, den: str, size: str) -> float:
        return seconds[f"{num}/{size}"] / seconds[f"{den}/{size}"]

    sizes = [f"{E}x{k}" for E, k in SIZES]
    hf_best = {s: min(seconds[f"hf_eager/topk/{s}"], seconds[f"hf_grouped_mm/topk/{s}"]) for s in sizes}
    result = {
        "tokens_per_s": {key: round(n_tokens / t, 1) for key, t in seconds.items()},
        "speedup_vs_hf_best": round(
            min(hf_best[s] / seconds[f"timeexpert/topk/{s}"] for s in sizes), 3
        ),
        "speedup_vs_deepspeed": (
            round(min(ratio("deepspeed/topk", "timeexpert/topk", s) for s in sizes), 3)
            if have_ds else None
        ),
        "slowdown_vs_dense_limit": round(
            max(seconds[f"timeexpert/topk/{s}"] / seconds[f"dense_limit/{s}"] for s in sizes), 3
        ),
        "dynamic_mean_active_experts": mean_active,
        "dynamic_sweep": sweep,
        "threads": args.threads,
        "tokens": n_tokens,
    }
    emit(result, as_json=args.json)


if __name__ == "__main__":
    main()
