"""The MoE FFN layer of the TimeExpert decoder: dense, top-k and task-aware dynamic gating.

Shape letters: N tokens, D model dim, F expert hidden dim, E expert slots (`max_experts`),
L expert slots held by this rank (E / ep_size; L == E without expert parallelism),
K experts per token (top-k), P routed (token, expert) pairs, T task token types (`TokenType`).

TimeExpert (Yang et al., ICCV 2025) sec. 3.2-3.4:
- `topk`: softmax top-k gating with renormalised weights (eq. 3-4).
- `dynamic`: the score of token n for expert e is the cosine similarity to the expert embedding
  W_g[e] plus alpha times the activation rate A_t[type(n), e] of the token's task type (eq. 5);
  the expert fires when sigmoid(score) > sigmoid(G[e]) (eq. 6, sign() with a straight-through
  gradient to the pre-activation sigmoid(score) - sigmoid(G[e])). A token fires 0..E experts and
  receives the plain mean of the experts it fired (DynMoE's top-any output).
  **A token that fires no expert** is recorded as unrouted (R_S, the add statistic) and is routed
  to its single best expert by pre-activation, in training and at inference alike (DynMoE does
  this at inference only): every token gets an FFN output, train and eval compute the same
  function, and the fallback pair carries the same straight-through gradient, which pushes that
  expert's threshold down / embedding towards the token.
- Token-adaptive routing (sec. 3.3, `update_experts`): R_E (per-expert firing counts), R_S (sum
  of unrouted token embeddings) and the token counts accumulate in training; an update prunes
  active experts whose firing rate is under `tau_min` and adds one expert, initialised with
  W_g = R_S/|R_S| and G = 0, when the unrouted share passes `add_threshold`. Expert slots are
  pre-allocated up to `max_experts` behind an active mask: shapes and optimizer state stay put.

All routing state (active mask, A_t, R_E, R_S, counts, W_g, G) lives in the state_dict.
Telemetry counters are non-persistent buffers (not checkpointed).

Expert compute is dropless and grouped: (token, expert) pairs are sorted by expert, each active
expert runs one contiguous SwiGLU over its rows, and the outputs are scatter-added back weighted.
The stacked weights are `unbind`-ed once per forward: slicing `w[e]` inside the loop would make
autograd materialise a full (E, F, D) zero gradient per expert. On CUDA in bf16 the same
function runs as one grouped GEMM per projection (`grouped_swiglu_gemm`, torch's grouped-mm
kernels, as in torchtitan); the tests compare both with a naive per-expert reference.

Precision: under bf16 autocast the experts compute in bf16 (fp32 master weights cast per
forward), while the router (logits, softmax / sigmoid, the routing decision, aux and z-loss)
stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from timeexpert.config import MoEConfig
from timeexpert.events import NUM_TOKEN_TYPES, TokenType
from timeexpert.models import expert_parallel


@dataclass
class MoELosses:
    """Router losses of one layer, already weighted; zeros in dense mode."""

    aux: Tensor  # task-dependent auxiliary loss, eq. 9 (lambda_1, lambda_2 applied)
    z: Tensor  # router z-loss (z_loss_weight applied)


@dataclass
class ExpertUpdate:
    """What one `update_experts()` call changed (global expert slot ids)."""

    added: list[int]
    pruned: list[int]


def swiglu(x_PD: Tensor, w1_FD: Tensor, w3_FD: Tensor, w2_DF: Tensor) -> Tensor:
    """SwiGLU FFN: w2 (silu(w1 x) * w3 x)."""
    return F.linear(F.silu(F.linear(x_PD, w1_FD)) * F.linear(x_PD, w3_FD), w2_DF)


class _GroupedSwiGLU(torch.autograd.Function):
    """Forward and backward of `grouped_swiglu`, written out per expert.

    Matmul results go straight into preallocated (P, .) buffers and into the rows of the stacked
    weight gradients (`out=`), so nothing is concatenated, split or stacked, and no per-expert
    zero gradient is ever materialised. Elementwise work stays per expert chunk (cache-sized).
    Saves x and the two (P, F) pre-activations, less than autograd's per-op saves.
    """

    @staticmethod
    def forward(ctx, x_PD, w1_LFD, w3_LFD, w2_LDF, counts):
        P, F_ = x_PD.shape[0], w1_LFD.shape[1]
        spans = [(e, a - c, a) for e, (c, a) in enumerate(zip(counts, _cumsum(counts))) if c]
        h1_PF, h3_PF = x_PD.new_empty(P, F_), x_PD.new_empty(P, F_)
        y_PD = x_PD.new_empty(P, w2_LDF.shape[1])
        for e, a, b in spans:
            x_e = x_PD[a:b]
            torch.mm(x_e, w1_LFD[e].t(), out=h1_PF[a:b])
            torch.mm(x_e, w3_LFD[e].t(), out=h3_PF[a:b])
            torch.mm(F.silu(h1_PF[a:b]).mul_(h3_PF[a:b]), w2_LDF[e].t(), out=y_PD[a:b])
        ctx.save_for_backward(x_PD, w1_LFD, w3_LFD, w2_LDF, h1_PF, h3_PF)
        ctx.spans = spans
        return y_PD

    @staticmethod
    def backward(ctx, gy_PD):
        x_PD, w1_LFD, w3_LFD, w2_LDF, h1_PF, h3_PF = ctx.saved_tensors
        gy_PD = gy_PD.contiguous()
        spans = ctx.spans
        full = len(spans) == w1_LFD.shape[0]  # experts without rows get a zero gradient
        new = torch.empty_like if full else torch.zeros_like
        gw1, gw3, gw2 = new(w1_LFD), new(w3_LFD), new(w2_LDF)
        gx_PD = torch.empty_like(x_PD)
        for e, a, b in spans:
            x_e, gy_e, h1, h3 = x_PD[a:b], gy_PD[a:b], h1_PF[a:b], h3_PF[a:b]
            silu = F.silu(h1)
            torch.mm(gy_e.t(), silu * h3, out=gw2[e])
            g_act = torch.mm(gy_e, w2_LDF[e])
            g_h3 = g_act * silu
            g_h1 = torch.ops.aten.silu_backward(g_act.mul_(h3), h1)  # one fused pass
            torch.mm(g_h1, w1_LFD[e], out=gx_PD[a:b]).addmm_(g_h3, w3_LFD[e])
            torch.mm(g_h1.t(), x_e, out=gw1[e])
            torch.mm(g_h3.t(), x_e, out=gw3[e])
        return gx_PD, gw1, gw3, gw2, None


def _cumsum(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


def grouped_swiglu(
    x_PD: Tensor, counts: list[int], w1_LFD: Tensor, w3_LFD: Tensor, w2_LDF: Tensor
) -> Tensor:
    """Rows of `x_PD` sorted by expert, `counts[l]` rows for expert l -> (P, D), same order.

    One contiguous SwiGLU per expert with rows; experts without rows cost nothing. A
    hand-written autograd Function: no per-expert weight slicing in autograd (which would
    materialise a full (L, F, D) zero gradient per expert), no concatenations.
    """
    if len(counts) != w1_LFD.shape[0] or sum(counts) != x_PD.shape[0]:
        raise ValueError(
            f"counts must give {w1_LFD.shape[0]} experts summing to {x_PD.shape[0]} rows, "
            f"got {len(counts)} summing to {sum(counts)}"
        )
    return _GroupedSwiGLU.apply(x_PD, w1_LFD, w3_LFD, w2_LDF, counts)


def grouped_swiglu_autograd(
    x_PD: Tensor, counts: list[int], w1_LFD: Tensor, w3_LFD: Tensor, w2_LDF: Tensor
) -> Tensor:
    """The same through plain autograd (weights unbound once): kept as a benchmark reference."""
    w1s, w3s, w2s = w1_LFD.unbind(0), w3_LFD.unbind(0), w2_LDF.unbind(0)
    outs = [
        swiglu(x_e, w1s[e], w3s[e], w2s[e])
        for e, x_e in enumerate(x_PD.split(counts))
        if counts[e]
    ]
    return torch.cat(outs) if outs else x_PD * 0.0


def grouped_swiglu_gemm(
    x_PD: Tensor, counts: list[int], w1_LFD: Tensor, w3_LFD: Tensor, w2_LDF: Tensor
) -> Tensor:
    """`grouped_swiglu` through torch's grouped GEMM (`F.grouped_mm`, as torchtitan's experts):
    one kernel per projection for all experts, differentiable by autograd. Its CUDA kernels take
    bf16 on SM >= 80 with 16-byte row strides (D and F multiples of 8); on the CPU torch runs a
    reference loop (how the tests compare it with `grouped_swiglu`)."""
    if len(counts) != w1_LFD.shape[0] or sum(counts) != x_PD.shape[0]:
        raise ValueError(
            f"counts must give {w1_LFD.shape[0]} experts summing to {x_PD.shape[0]} rows, "
            f"got {len(counts)} summing to {sum(counts)}"
        )
    offs_L = torch.tensor(_cumsum(counts), dtype=torch.int32, device=x_PD.device)
    h1_PF = F.grouped_mm(x_PD, w1_LFD.transpose(-2, -1), offs=offs_L)
    h3_PF = F.grouped_mm(x_PD, w3_LFD.transpose(-2, -1), offs=offs_L)
    return F.grouped_mm(F.silu(h1_PF) * h3_PF, w2_LDF.transpose(-2, -1), offs=offs_L)


def expert_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's (bf16) where it is on for `x`'s device, else
    `x`'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoELayer(nn.Module):
    """One MoE FFN (or the dense FFN) of the decoder.

    `forward(x_ND, token_type_N) -> (y_ND, MoELosses)`: x is (N, D), flattened tokens (the model
    flattens (B, L, D)); `token_type_N` holds `TokenType` values. With `ep_group` of size > 1 the
    expert slots are sharded over its ranks (rank r holds slots [r L, (r+1) L)), tokens travel by
    all-to-all; gating parameters and routing buffers are replicated.
    """

    def __init__(self, cfg: MoEConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.ep_group = ep_group
        D, F_, E = cfg.dim, cfg.hidden_dim, cfg.max_experts
        if cfg.gating == "dense":
            self.ep_size, self.ep_rank = 1, 0
            self.w1_FD = nn.Parameter(torch.empty(F_, D))
            self.w3_FD = nn.Parameter(torch.empty(F_, D))
            self.w2_DF = nn.Parameter(torch.empty(D, F_))
            self.reset_parameters()
            return
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if E % self.ep_size:
            raise ValueError(
                f"max_experts ({E}) must be divisible by the expert-parallel size ({self.ep_size})"
            )
        L = E // self.ep_size
        self.num_local_experts = L
        self.expert_offset = self.ep_rank * L
        self.w1_LFD = nn.Parameter(torch.empty(L, F_, D))
        self.w3_LFD = nn.Parameter(torch.empty(L, F_, D))
        self.w2_LDF = nn.Parameter(torch.empty(L, D, F_))
        # topk: router matrix W_r (eq. 3); dynamic: expert embeddings W_g (eq. 5). Replicated.
        self.w_gate_ED = nn.Parameter(torch.empty(E, D))
        active_E = torch.zeros(E, dtype=torch.bool)
        active_E[: cfg.num_experts] = True
        self.register_buffer("active_E", active_E)
        if cfg.gating == "dynamic":
            self.threshold_E = nn.Parameter(torch.zeros(E))  # G (eq. 6)
            T = NUM_TOKEN_TYPES
            self.register_buffer("task_rate_TE", torch.zeros(T, E))  # A_t (EMA, eq. 5)
            self.register_buffer("fired_count_E", torch.zeros(E))  # R_E since the last update
            self.register_buffer("unrouted_sum_D", torch.zeros(D))  # R_S (sum) since last update
            self.register_buffer("unrouted_count", torch.zeros(()))  # tokens that fired nothing
            self.register_buffer("token_count", torch.zeros(()))  # tokens seen since last update
            self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
            # seeds re-initialisation of added experts identically on every rank
            self.register_buffer("init_seed", torch.randint(0, 2**31 - 1, ()))
        # telemetry, not checkpointed: per type x expert pair counts, tokens, experts per token
        self.register_buffer("tel_pairs_TE", torch.zeros(NUM_TOKEN_TYPES, E), persistent=False)
        self.register_buffer("tel_tokens_T", torch.zeros(NUM_TOKEN_TYPES), persistent=False)
        self.register_buffer("tel_unrouted_T", torch.zeros(NUM_TOKEN_TYPES), persistent=False)
        self.reset_parameters()

    # --- parameters ------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        D, F_ = self.cfg.dim, self.cfg.hidden_dim
        if self.cfg.gating == "dense":
            for w, fan_in in ((self.w1_FD, D), (self.w3_FD, D), (self.w2_DF, F_)):
                nn.init.uniform_(w, -(fan_in**-0.5), fan_in**-0.5)
            return
        # every expert slot from its own seed (one draw of the global RNG, and the slot's global
        # id): a slot's weights do not depend on the EP rank that builds it, and the global RNG
        # advances alike at every EP degree, so an EP=2 build holds the slices of the EP=1 one
        base = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        if not self.w1_LFD.is_meta:  # a meta build gets its weights when materialised
            for local in range(self.num_local_experts):
                self._set_expert(local, self._draw_expert(base * 4099 + self.expert_offset + local))
        if self.cfg.gating == "topk":
            nn.init.normal_(self.w_gate_ED, std=D**-0.5)
        else:
            # Only directions matter (cosine, eq. 5). Unit rows, like an added expert's
            # R_S/|R_S|, so eq. 9's lambda_2 |W_g|^2 term starts at lambda_2 per expert instead
            # of lambda_2 * D, and does not dominate the loss.
            nn.init.normal_(self.w_gate_ED)
            self.w_gate_ED.div_(self.w_gate_ED.norm(dim=-1, keepdim=True))

    def load_full_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load an EP=1 state dict, keeping this rank's slice of the expert weights."""
        self.load_state_dict(
            expert_parallel.shard_state_dict(state_dict, self.ep_rank, self.ep_size)
        )

    # --- forward ---------------------------------------------------------------------------

    def forward(self, x_ND: Tensor, token_type_N: Tensor) -> tuple[Tensor, MoELosses]:
        cfg = self.cfg
        if x_ND.dim() != 2 or x_ND.shape[-1] != cfg.dim:
            raise ValueError(f"MoELayer expects x of shape (N, {cfg.dim}), got {tuple(x_ND.shape)}")
        if token_type_N.shape != x_ND.shape[:1]:
            raise ValueError(
                f"token_type_N must be ({x_ND.shape[0]},), got {tuple(token_type_N.shape)}"
            )
        if cfg.gating == "dense":
            zero = x_ND.new_zeros((), dtype=torch.promote_types(x_ND.dtype, torch.float32))
            y_ND = swiglu(x_ND, self.w1_FD, self.w3_FD, self.w2_DF)  # autocast's dtype
            return y_ND.to(x_ND.dtype), MoELosses(aux=zero, z=zero)

        N, E, T = x_ND.shape[0], cfg.max_experts, NUM_TOKEN_TYPES
        active_E = self.active_E
        # The router runs in fp32 under bf16 autocast too: logits, softmax / sigmoid, the routing
        # decision and the aux / z-losses (bf16 logits flip near-tied choices, exp overflows).
        with torch.autocast(x_ND.device.type, enabled=False):
            router_dtype = torch.promote_types(x_ND.dtype, torch.float32)  # fp64 tests stay fp64
            xr_ND, w_gate_ED = x_ND.to(router_dtype), self.w_gate_ED.to(router_dtype)
            if cfg.gating == "topk":
                # eq. 3-4: softmax over active experts, keep top-k, renormalise over the k
                logits_NE = F.linear(xr_ND, w_gate_ED).masked_fill(~active_E, float("-inf"))
                probs_NE = logits_NE.softmax(-1)
                top_NK, expert_NK = probs_NE.topk(cfg.num_experts_per_token, dim=-1)
                weight_NK = top_NK / top_NK.sum(-1, keepdim=True)
                expert_P, order_P = expert_NK.reshape(-1).sort(stable=True)
                token_P = order_P // cfg.num_experts_per_token
                weight_P = weight_NK.reshape(-1)[order_P]
                chosen_NE = torch.zeros(N, E, dtype=torch.bool, device=x_ND.device)
                chosen_NE.scatter_(1, expert_NK, True)
                soft_NE = probs_NE
                unrouted_N = None
            else:
                # eq. 5: cosine similarity to W_g plus alpha * A_t of the token's task type
                cos_NE = F.normalize(xr_ND, dim=-1) @ F.normalize(w_gate_ED, dim=-1).T
                logits_NE = cos_NE + cfg.alpha * self.task_rate_TE[token_type_N]
                logits_NE = logits_NE.masked_fill(~active_E, float("-inf"))
                # eq. 6: fire when sigmoid(score) > sigmoid(G); inactive slots give sigmoid = 0
                soft_NE = torch.sigmoid(logits_NE)
                pre_NE = soft_NE - torch.sigmoid(self.threshold_E.to(router_dtype))
                pre_NE = pre_NE.masked_fill(~active_E, -2.0)  # below any active pre-activation
                fired_NE = pre_NE > 0
                unrouted_N = ~fired_NE.any(-1)
                # an unrouted token goes to its best expert (see module docstring)
                best_NE = F.one_hot(pre_NE.argmax(-1), E).bool()
                chosen_NE = fired_NE | (best_NE & unrouted_N[:, None])
                expert_P, token_P = chosen_NE.T.nonzero(as_tuple=True)  # sorted by expert
                count_N = chosen_NE.sum(-1)
                pre_P = pre_NE[token_P, expert_P]
                # sign() with straight-through gradient: value 1, d/d pre = 1; mean over fired
                weight_P = (1.0 + pre_P - pre_P.detach()) / count_N[token_P]
            losses = self._router_losses(logits_NE, soft_NE, chosen_NE, token_type_N)

        # --- grouped dropless expert compute (in the autocast dtype: bf16 on GPUs) -------------
        counts_E = torch.bincount(expert_P, minlength=E)
        x_PD = x_ND.index_select(0, token_P).to(expert_dtype(x_ND))  # bf16 halves all-to-all bytes
        if self.ep_size > 1:
            y_PD = expert_parallel.dispatch_compute_combine(
                x_PD, counts_E, self._local_experts, self.ep_group
            )
        else:
            y_PD = self._local_experts(x_PD, counts_E.tolist())
        y_PD = (y_PD * weight_P[:, None]).to(x_ND.dtype)
        y_ND = x_ND.new_zeros(x_ND.shape).index_add_(0, token_P, y_PD)

        with torch.no_grad():
            type_onehot_NT = F.one_hot(token_type_N, T).to(router_dtype)
            if self.training and cfg.gating == "dynamic":
                self._record_routing(xr_ND, type_onehot_NT, fired_NE, unrouted_N)
            self.tel_pairs_TE += type_onehot_NT.T @ chosen_NE.to(router_dtype)
            self.tel_tokens_T += type_onehot_NT.sum(0)
            if unrouted_N is not None:
                self.tel_unrouted_T += type_onehot_NT.T @ unrouted_N.to(router_dtype)
        return y_ND, losses

    def _local_experts(self, x_PD: Tensor, counts: list[int]) -> Tensor:
        """This rank's experts on rows sorted by local expert, in `x_PD`'s dtype (fp32 master
        weights cast to it): one grouped GEMM per projection on CUDA in bf16
        (`grouped_swiglu_gemm`), the per-expert loop (`grouped_swiglu`) otherwise."""
        w1, w3, w2 = (w.to(x_PD.dtype) for w in (self.w1_LFD, self.w3_LFD, self.w2_LDF))
        with torch.autocast(x_PD.device.type, enabled=False):
            if x_PD.is_cuda and x_PD.dtype == torch.bfloat16 and self.cfg.dim % 8 == 0 \
                    and self.cfg.hidden_dim % 8 == 0:  # the kernel wants 16-byte strides
                return grouped_swiglu_gemm(x_PD, counts, w1, w3, w2)
            return grouped_swiglu(x_PD, counts, w1, w3, w2)

    def _router_losses(
        self, logits_NE: Tensor, soft_NE: Tensor, chosen_NE: Tensor, token_type_N: Tensor
    ) -> MoELosses:
        """Eq. 9 and the router z-loss.

        Eq. 9, task-dependent: per task type t present in the batch, A_te is expert e's share of
        the type's (differentiable) gate mass and N_te its share of the type's dispatched
        (token, expert) pairs; L_aux = lambda_1 sum_t (n_t / N) sum_e (A_te - N_te)^2
        + lambda_2 sum_{e active} |W_g[e]|^2. Z-loss: mean_n logsumexp_e(logits_ne)^2 over
        active experts (ST-MoE).
        """
        cfg = self.cfg
        N, T = logits_NE.shape[0], NUM_TOKEN_TYPES
        type_onehot_NT = F.one_hot(token_type_N, T).to(soft_NE.dtype)
        soft_TE = type_onehot_NT.T @ soft_NE
        hard_TE = type_onehot_NT.T @ chosen_NE.to(soft_NE.dtype)
        share_A_TE = soft_TE / soft_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        share_N_TE = hard_TE / hard_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        weight_T = type_onehot_NT.sum(0) / max(N, 1)
        load = (weight_T * ((share_A_TE - share_N_TE) ** 2).sum(-1)).sum()
        norm = (self.w_gate_ED[self.active_E] ** 2).sum()
        aux = cfg.lambda_1 * load + cfg.lambda_2 * norm
        z = cfg.z_loss_weight * (torch.logsumexp(logits_NE, dim=-1) ** 2).mean()
        return MoELosses(aux=aux, z=z)

    @torch.no_grad()
    def _record_routing(
        self, x_ND: Tensor, type_onehot_NT: Tensor, fired_NE: Tensor, unrouted_N: Tensor
    ) -> None:
        """Training statistics of sec. 3.3: A_t (EMA), R_E, R_S and counts."""
        fired_TE = type_onehot_NT.T @ fired_NE.to(x_ND.dtype)
        tokens_T = type_onehot_NT.sum(0)
        if self.ep_size > 1:  # A_t stays replicated: the batch rate is over all EP ranks' tokens
            both = torch.cat([fired_TE, tokens_T[:, None]], dim=1)
            dist.all_reduce(both, group=self.ep_group)
            fired_TE, tokens_T = both[:, :-1], both[:, -1]
        present_T = tokens_T > 0
        rate_TE = fired_TE / tokens_T.clamp_min(1)[:, None]
        m = self.cfg.rate_momentum
        self.task_rate_TE[present_T] = m * self.task_rate_TE[present_T] + (1 - m) * rate_TE[
            present_T
        ]
        self.fired_count_E += fired_NE.sum(0).to(x_ND.dtype)
        self.unrouted_sum_D += x_ND[unrouted_N].sum(0)
        self.unrouted_count += unrouted_N.sum()
        self.token_count += x_ND.shape[0]

    # --- token-adaptive routing --------------------------------------------------------------

    @torch.no_grad()
    def update_experts(self) -> ExpertUpdate:
        """Sec. 3.3: prune experts firing under `tau_min`, add one from R_S when too many unrouted.

        The statistics since the last update are summed over the EP group first, so every rank
        takes the same decision. Resets the statistics. No-op outside `dynamic` mode (or with no
        tokens seen).
        """
        cfg = self.cfg
        if cfg.gating != "dynamic":
            return ExpertUpdate(added=[], pruned=[])
        stats = torch.cat(
            [self.fired_count_E, self.unrouted_sum_D, self.unrouted_count[None], self.token_count[None]]
        )
        if self.ep_size > 1:
            dist.all_reduce(stats, group=self.ep_group)
        E, D = cfg.max_experts, cfg.dim
        fired_E, unrouted_sum_D = stats[:E], stats[E : E + D]
        unrouted, tokens = stats[E + D].item(), stats[E + D + 1].item()
        self._reset_statistics()
        if tokens == 0:
            return ExpertUpdate(added=[], pruned=[])

        # prune: active experts whose firing rate stayed under tau_min (at least one survives)
        rate_E = fired_E / tokens
        prune_E = self.active_E & (rate_E < cfg.tau_min)
        if not (self.active_E & ~prune_E).any():
            keep = int(torch.where(self.active_E, rate_E, -1.0).argmax())
            prune_E[keep] = False
        pruned = prune_E.nonzero().flatten().tolist()
        self.active_E[prune_E] = False
        self.task_rate_TE[:, prune_E] = 0.0

        # add: when the unrouted share passes add_threshold and a free slot exists
        added: list[int] = []
        free = (~self.active_E).nonzero().flatten().tolist()
        norm = unrouted_sum_D.norm()
        if unrouted / tokens > cfg.add_threshold and free and norm > 0:
            slot = next((s for s in free if s not in pruned), free[0])
            self.w_gate_ED[slot] = unrouted_sum_D / norm  # W_g = R_S / |R_S|
            self.threshold_E[slot] = 0.0
            self.task_rate_TE[:, slot] = 0.0
            self._reinit_expert(slot)
            self.active_E[slot] = True
            added.append(slot)
        self.num_updates += 1
        return ExpertUpdate(added=added, pruned=pruned)

    def _draw_expert(self, seed: int) -> list[Tensor]:
        """Fresh (w1, w3, w2) of one expert slot, uniform in +-1/sqrt(fan_in), from a CPU
        generator seeded by `seed`: the same values on every rank and device."""
        D, F_ = self.cfg.dim, self.cfg.hidden_dim
        gen = torch.Generator().manual_seed(seed)
        return [
            (torch.rand(F_, D, generator=gen) * 2 - 1) * D**-0.5,
            (torch.rand(F_, D, generator=gen) * 2 - 1) * D**-0.5,
            (torch.rand(D, F_, generator=gen) * 2 - 1) * F_**-0.5,
        ]

    def _set_expert(self, local: int, weights: list[Tensor]) -> None:
        for w, value in zip((self.w1_LFD, self.w3_LFD, self.w2_LDF), weights):
            w[local] = value.to(w)

    def _reinit_expert(self, slot: int) -> None:
        """Fresh weights for an added expert, drawn identically on every rank (seeded)."""
        local = slot - self.expert_offset
        if 0 <= local < self.num_local_experts:
            seed = int(self.init_seed) * 1_000_003 + int(self.num_updates) * 1009 + slot
            self._set_expert(local, self._draw_expert(seed))

    def _reset_statistics(self) -> None:
        for name in ("fired_count_E", "unrouted_sum_D", "unrouted_count", "token_count"):
            getattr(self, name).zero_()

    # --- telemetry ---------------------------------------------------------------------------

    def telemetry(self) -> dict:
        """Routing telemetry since the last reset (this rank's tokens; expert ids are global).

        `expert_counts[type][e]`: (token, expert e) pairs computed for tokens of that type;
        `tokens[type]`; `unrouted[type]`: tokens that fired no expert (dynamic, before the
        fallback); `mean_active_experts` (overall and `_per_type`): experts computed per token.
        """
        names = [t.name.lower() for t in TokenType]
        if self.cfg.gating == "dense":
            return {"gating": "dense"}
        pairs_TE = self.tel_pairs_TE.double().cpu()
        tokens_T = self.tel_tokens_T.double().cpu()
        total = float(tokens_T.sum())
        return {
            "gating": self.cfg.gating,
            "active_experts": self.active_E.nonzero().flatten().tolist(),
            "expert_counts": {n: [int(c) for c in pairs_TE[t]] for t, n in enumerate(names)},
            "tokens": {n: int(tokens_T[t]) for t, n in enumerate(names)},
            "unrouted": {n: int(self.tel_unrouted_T[t]) for t, n in enumerate(names)},
            "mean_active_experts": float(pairs_TE.sum()) / total if total else 0.0,
            "mean_active_experts_per_type": {
                n: (float(pairs_TE[t].sum() / tokens_T[t]) if tokens_T[t] else 0.0)
                for t, n in enumerate(names)
            },
        }

    def reset_telemetry(self) -> None:
        if self.cfg.gating == "dense":
            return
        for buf in (self.tel_pairs_TE, self.tel_tokens_T, self.tel_unrouted_T):
            buf.zero_()
