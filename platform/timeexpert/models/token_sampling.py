"""GroundVTS query-guided visual token sampling (Fan et al., CVPR 2026, sec. 3 "VTS module").

After the projector and before the decoder, every visual token is scored against the mean-pooled
query embedding through two low-rank projections (width D_r) and a temperature softmax (tau):

    r_i = softmax_i( <W_v x_i, W_q q> / (sqrt(D_r) tau) )      over the video's visual tokens

K = ceil(rho N) tokens are kept per video: in training through a Gumbel-softmax relaxation with a
straight-through hard top-K mask (tau_g), at inference by deterministic top-K. Kept tokens are
re-weighted by their relevance renormalised over the kept set (tau') times an MLP of the token,
x_i' = m_i (x_i + w_i MLP(x_i)), where m_i is the straight-through mask (1 in the forward pass) and
the MLP's last layer starts at zero (the sampler starts as a pure selector). Dropped tokens leave
the sequence (`compact`); the kept ones keep their original position ids, so time stays aligned.

Variants for the paper's ablation (`mode`): "token" (default), "frame" (mean relevance per frame,
whole frames kept, K_f = ceil(rho T)), "uniform" and "random" (same budget, no scorer), and
position ids on/off (`keep_position_ids`).

Shape letters: B batch, N tokens of the sequence, M frames of the whole batch, T frames of one
row (padded), S tokens per frame, D model width, R the low rank D_r.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from timeexpert.events import TokenType

MODES = ("token", "frame", "uniform", "random")


@dataclass(kw_only=True)
class TokenSamplingConfig:
    """GroundVTS sampler; stored as the `token_sampling` dict of TimeExpertConfig."""

    mode: str = "token"  # "token" | "frame" | "uniform" | "random" (ablation variants)
    keep_ratio: float = 0.5  # rho: K = ceil(rho * N) visual tokens (or frames) kept per video
    rank: int = 32  # D_r: width of the two low-rank scoring projections
    temperature: float = 1.0  # tau: relevance softmax temperature
    gumbel_temperature: float = 1.0  # tau_g: Gumbel-softmax relaxation temperature (training)
    reweight_temperature: float = 1.0  # tau': temperature of the relevance renormalised over kept
    keep_position_ids: bool = True  # kept tokens keep their original position ids (else 0..N'-1)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"token_sampling mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"token_sampling keep_ratio (rho) must be in (0, 1], got {self.keep_ratio}")
        if self.rank < 1:
            raise ValueError(f"token_sampling rank (D_r) must be >= 1, got {self.rank}")
        for name in ("temperature", "gumbel_temperature", "reweight_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"token_sampling {name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "TokenSamplingConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise ValueError(f"unknown token_sampling fields {unknown}; expected some of {sorted(known)}")
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampledSequence:
    """The decoder's input after sampling: dropped visual tokens removed (compacted)."""

    x_BND: torch.Tensor  # re-weighted embeddings, N <= the original length
    gather_BN: torch.Tensor  # original column of every kept column (for any other (B, N) tensor)
    valid_BN: torch.Tensor  # attention mask of the compacted sequence
    position_ids_BN: torch.Tensor  # original position ids (or contiguous ones when switched off)
    keep_BN: torch.Tensor  # (original layout) visual tokens kept
    density_M: torch.Tensor  # fraction of each frame's S tokens kept, frames in batch order
    relevance_BN: torch.Tensor | None  # (original layout) r_i, None for uniform / random

    def take(self, t_BN: torch.Tensor) -> torch.Tensor:
        """Any (B, N, ...) tensor of the original layout in the compacted layout."""
        index = self.gather_BN
        if t_BN.ndim > 2:
            index = index.view(*index.shape, *([1] * (t_BN.ndim - 2))).expand(-1, -1, *t_BN.shape[2:])
        return torch.gather(t_BN, 1, index)


def budget(count_B: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """K = ceil(rho N) per row (0 where N = 0); the float guard keeps ceil(0.5 * 8) = 4."""
    return torch.ceil(count_B.double() * keep_ratio - 1e-9).long().clamp(min=0)


def top_k_mask(score_BX: torch.Tensor, k_B: torch.Tensor, allowed_BX: torch.Tensor) -> torch.Tensor:
    """Per row, the k_B highest scores among `allowed` (ties by position); no loop over tokens."""
    score = score_BX.masked_fill(~allowed_BX, float("-inf"))
    order_BX = torch.argsort(score, dim=1, descending=True, stable=True)
    rank_BX = torch.argsort(order_BX, dim=1, stable=True)
    return (rank_BX < k_B[:, None]) & allowed_BX


def uniform_mask(index_BX: torch.Tensor, count_B: torch.Tensor, k_B: torch.Tensor,
                 allowed_BX: torch.Tensor) -> torch.Tensor:
    """Exactly K of N evenly spaced from the first: item j is kept when
    ceil((j+1)K/N) - ceil(jK/N) = 1."""
    n = count_B.clamp(min=1)[:, None]
    k = k_B[:, None]
    step = (torch.div((index_BX + 1) * k + n - 1, n, rounding_mode="floor")
            - torch.div(index_BX * k + n - 1, n, rounding_mode="floor"))
    return (step == 1) & allowed_BX


def compact(keep_BN: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
    """Column order that moves every dropped token to the front (stable, so the rest keeps its
    order and a left-padded prompt still ends on its last real token), minus the columns dropped
    in every row. Returns gather_BN (B, N')."""
    dropped_BN = valid_BN & ~keep_BN
    order_BN = torch.sort(torch.where(dropped_BN, 0, 1), dim=1, stable=True).indices
    cut = int(dropped_BN.sum(1).min()) if dropped_BN.shape[0] else 0
    return order_BN[:, cut:]


class VisualTokenSampler(nn.Module):
    """GroundVTS VTS module over the decoder's embedded sequence (visual tokens in place)."""

    def __init__(self, config: TokenSamplingConfig, dim: int, tokens_per_frame: int) -> None:
        super().__init__()
        self.config = config
        self.S = tokens_per_frame
        R = config.rank
        # low-rank query-guided scoring (W_v, W_q)
        self.visual_proj = nn.Linear(dim, R, bias=False)
        self.query_proj = nn.Linear(dim, R, bias=False)
        # re-weighting MLP; zero last layer: at init a kept token passes unchanged
        self.reweight = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.reweight[2].weight)
        nn.init.zeros_(self.reweight[2].bias)

    def relevance_logits(self, x_BND: torch.Tensor, visual_BN: torch.Tensor, query_BN: torch.Tensor) -> torch.Tensor:
        """<W_v x_i, W_q q> / (sqrt(D_r) tau), q the mean-pooled query embedding of the row."""
        q_count_B1 = query_BN.sum(1, keepdim=True).clamp(min=1)
        q_BD = (x_BND * query_BN[..., None]).sum(1) / q_count_B1
        k_BNR = self.visual_proj(x_BND)
        q_BR = self.query_proj(q_BD)
        logits_BN = torch.einsum("bnr,br->bn", k_BNR, q_BR) / math.sqrt(self.config.rank)
        return (logits_BN / self.config.temperature).float().masked_fill(~visual_BN, float("-inf"))

    def forward(self, x_BND: torch.Tensor, types_BN: torch.Tensor, valid_BN: torch.Tensor,
                position_ids_BN: torch.Tensor) -> SampledSequence:
        cfg, S = self.config, self.S
        visual_BN = (types_BN == TokenType.VISUAL) & valid_BN
        query_BN = (types_BN == TokenType.QUERY) & valid_BN
        count_B = visual_BN.sum(1)
        if bool((count_B % S).any()):
            raise ValueError(f"every row needs whole frames of {S} visual tokens, got {count_B.tolist()}")
        vis_index_BN = visual_BN.long().cumsum(1) - 1  # index among the row's visual tokens
        frame_BN = torch.where(visual_BN, torch.div(vis_index_BN, S, rounding_mode="floor"), 0)
        frames_B = torch.div(count_B, S, rounding_mode="floor")
        T = max(int(frames_B.max()), 1) if frames_B.numel() else 1
        frame_ok_BT = torch.arange(T, device=x_BND.device)[None] < frames_B[:, None]
        straight_BN = None
        relevance_BN = None
        logits_BN = None

        if cfg.mode in ("token", "frame"):
            logits_BN = self.relevance_logits(x_BND, visual_BN, query_BN)
            relevance_BN = torch.softmax(logits_BN, dim=1).nan_to_num(0.0)  # rows without video: 0
            if cfg.mode == "token":
                units_logp, units_ok, k_B = torch.log(relevance_BN + 1e-20), visual_BN, budget(count_B, cfg.keep_ratio)
            else:  # frame relevance: the mean over the frame's tokens
                rel_BT = relevance_BN.new_zeros(x_BND.shape[0], T).scatter_add(1, frame_BN, relevance_BN * visual_BN) / S
                units_logp, units_ok, k_B = torch.log(rel_BT + 1e-20), frame_ok_BT, budget(frames_B, cfg.keep_ratio)
            if self.training:
                # Gumbel-softmax relaxation, hard top-K forward, soft gradient (straight-through)
                u = torch.rand_like(units_logp).clamp(1e-9, 1 - 1e-9)
                z = (units_logp - torch.log(-torch.log(u))) / cfg.gumbel_temperature
                hard = top_k_mask(z, k_B, units_ok)
                soft = torch.softmax(z.masked_fill(~units_ok, float("-inf")), dim=1).nan_to_num(0.0)
                soft = soft * k_B[:, None]  # sums to K like the hard mask
                straight = hard.float() + soft - soft.detach()
            else:
                hard = top_k_mask(units_logp, k_B, units_ok)
                straight = hard.float()
            if cfg.mode == "token":
                keep_BN, straight_BN = hard, straight
            else:
                keep_BN = torch.gather(hard, 1, frame_BN) & visual_BN
                straight_BN = torch.gather(straight, 1, frame_BN)
        elif cfg.mode == "uniform":
            keep_BN = uniform_mask(vis_index_BN, count_B, budget(count_B, cfg.keep_ratio), visual_BN)
        else:  # random at the same budget
            keep_BN = top_k_mask(torch.rand(visual_BN.shape, device=x_BND.device), budget(count_B, cfg.keep_ratio), visual_BN)

        if logits_BN is not None:
            # re-weighting: relevance renormalised over the kept tokens (tau'), times MLP(x)
            w_BN = torch.softmax((logits_BN * cfg.temperature / cfg.reweight_temperature).masked_fill(~keep_BN, float("-inf")), dim=1)
            w_BN = (w_BN * keep_BN.sum(1, keepdim=True)).nan_to_num(0.0)  # mean 1 over the kept
            x_new_BND = straight_BN[..., None] * (x_BND + w_BN[..., None].to(x_BND.dtype) * self.reweight(x_BND))
            x_BND = torch.where(keep_BN[..., None], x_new_BND.to(x_BND.dtype), x_BND)

        gather_BN = compact(keep_BN | ~visual_BN, valid_BN)
        valid_new_BN = torch.gather(valid_BN & (keep_BN | ~visual_BN), 1, gather_BN)
        if cfg.keep_position_ids:
            position_new_BN = torch.gather(position_ids_BN, 1, gather_BN)
        else:
            position_new_BN = (valid_new_BN.long().cumsum(1) - 1).clamp(min=0)
        out = SampledSequence(
            x_BND=x_BND, gather_BN=gather_BN, valid_BN=valid_new_BN, position_ids_BN=position_new_BN,
            keep_BN=keep_BN, density_M=keep_BN[visual_BN].view(-1, S).float().mean(1),
            relevance_BN=relevance_BN,
        )
        out.x_BND = out.take(x_BND)
        return out
