"""D2VLM evidence tokens (Factorized Learning for Temporally Grounded Video-LLMs, ICCV 2025).

A response is "pure grounding" (`<evi>` x K then `</evi>`) followed by the interleaved
text-evidence answer, where the k-th event again carries an `<evi>`. When an `<evi>` is produced,
the hidden state that emits it (the decoder output one position before it, as LISA's `<SEG>`)
goes through a 2-layer MLP; its normalised (cosine) similarity to every frame-level video token
f_t (the frame's S visual tokens, mean-pooled) gives a per-frame grounding probability

    p_t = sigmoid( cos(MLP(h), f_t) / tau_e )

At inference the frames with p_t >= 0.6 max_t p_t (configurable) are the salient frames; they
form the interval, and their features, average-pooled, are added to the `<evi>` token's input
embedding (visual semantic aggregation; in teacher-forced training the ground-truth frames are
pooled, as the ground-truth tokens are fed).

Losses: L_gnd, per-frame BCE against the ground-truth interval averaged over the `<evi>` tokens
of both stages; L_cons, L1 between the grounding of matching `<evi>` tokens (k-th of the pure
grounding stage vs k-th of the answer). FPO (`timeexpert.train.fpo`) uses
`interval_log_prob`: sum_t in log p_t + sum_t out log(1 - p_t) (D2VLM eq. 6-7).

Shape letters: B batch, N tokens, E `<evi>` tokens (flattened over the batch), T frames of one
row (padded), M frames of the whole batch, S tokens per frame, D model width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timeexpert.events import (
    EOS,
    EVI,
    EVI_END,
    SWITCH,
    SYNC,
    TokenType,
    number_symbol_id,
    serialize_events,
)
from timeexpert.models.tokenizer import Encoded

EPS = 1e-6


@dataclass(kw_only=True)
class EvidenceConfig:
    """Evidence-token grounding; stored as the `evidence` dict of TimeExpertConfig."""

    temperature: float = 0.1  # tau_e: p_t = sigmoid(cos / tau_e)
    threshold_ratio: float = 0.6  # inference: salient frames have p_t >= ratio * max p
    aggregate: bool = True  # add the salient frames' pooled features to the <evi> embedding
    loss_weight_grounding: float = 1.0  # weight of L_gnd in the SFT loss
    loss_weight_consistency: float = 1.0  # weight of L_cons in the SFT loss

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"evidence temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.threshold_ratio <= 1.0:
            raise ValueError(f"evidence threshold_ratio must be in (0, 1], got {self.threshold_ratio}")
        for name in ("loss_weight_grounding", "loss_weight_consistency"):
            if getattr(self, name) < 0:
                raise ValueError(f"evidence {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "EvidenceConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise ValueError(f"unknown evidence fields {unknown}; expected some of {sorted(known)}")
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return asdict(self)


# --- tokens --------------------------------------------------------------------------------------


def add_evidence_tokens(tokenizer) -> tuple[int, int]:
    """Add `<evi>` / `</evi>` to a GroundingTokenizer's text tokenizer (special tokens, through the
    tokenizer API; saved with it). Returns their ids. Idempotent."""
    tokenizer.text.add_tokens([EVI, EVI_END], special_tokens=True)
    return evidence_token_ids(tokenizer)


def evidence_token_ids(tokenizer) -> tuple[int, int] | None:
    """(`<evi>`, `</evi>`) ids when the tokenizer has them, else None."""
    vocab = tokenizer.text.get_vocab()
    if EVI in vocab and EVI_END in vocab:
        return vocab[EVI], vocab[EVI_END]
    return None


def frame_targets(intervals: Sequence[tuple[float, float]], timestamps_T: Sequence[float],
                  duration: float | None = None) -> torch.Tensor:
    """(E, T) 0/1: frame t (covering [ts_t, ts_{t+1})) lies in interval e when the two overlap;
    a zero-length interval marks the frame it falls in."""
    ts = torch.as_tensor(list(timestamps_T), dtype=torch.float64)
    if ts.numel() == 0:
        raise ValueError("frame_targets needs at least one frame timestamp")
    gap = float(ts[1:].sub(ts[:-1]).median()) if ts.numel() > 1 else 1.0
    end_T = torch.cat([ts[1:], ts[-1:] + gap]) if duration is None else torch.cat([ts[1:], ts.new_tensor([float(duration)])])
    iv = torch.as_tensor([list(i) for i in intervals], dtype=torch.float64).view(-1, 2)
    overlap = (ts[None] < iv[:, 1:2]) & (end_T[None] > iv[:, 0:1])
    inside = (ts[None] <= iv[:, 0:1]) & (end_T[None] > iv[:, 0:1])  # the frame holding the start
    return (overlap | inside).float()


# --- grounding -----------------------------------------------------------------------------------


class EvidenceHead(nn.Module):
    """2-layer MLP on the `<evi>`-emitting hidden state; cosine similarity to frame tokens."""

    def __init__(self, config: EvidenceConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, h_ED: torch.Tensor, frames_ETD: torch.Tensor, frame_mask_ET: torch.Tensor) -> torch.Tensor:
        """Per-frame grounding probability p (E, T); padded frames get 0."""
        e_ED = F.normalize(self.mlp(h_ED).float(), dim=-1)
        f_ETD = F.normalize(frames_ETD.float(), dim=-1)
        cos_ET = torch.einsum("ed,etd->et", e_ED, f_ETD)
        return torch.sigmoid(cos_ET / self.config.temperature) * frame_mask_ET

    def salient(self, prob_ET: torch.Tensor, frame_mask_ET: torch.Tensor) -> torch.Tensor:
        """Frames at or above `threshold_ratio` of the row's maximum probability."""
        peak_E1 = prob_ET.masked_fill(~frame_mask_ET.bool(), 0).amax(-1, keepdim=True)
        return (prob_ET >= self.config.threshold_ratio * peak_E1) & frame_mask_ET.bool()


def aggregate_frames(frames_ETD: torch.Tensor, weight_ET: torch.Tensor) -> torch.Tensor:
    """Average-pool the chosen frames' features (visual semantic aggregation) -> (E, D)."""
    w_ET = weight_ET.to(frames_ETD.dtype)
    return (w_ET[..., None] * frames_ETD).sum(1) / w_ET.sum(1, keepdim=True).clamp(min=1.0)


def frame_features(visual_MSD: torch.Tensor, types_BN: torch.Tensor, valid_BN: torch.Tensor,
                   tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-level video tokens per row: (B, T, D) mean over each frame's S tokens, and (B, T)
    mask of real frames (rows hold their frames in order, as `embed_tokens` places them)."""
    S = tokens_per_frame
    frame_MD = visual_MSD.mean(1)
    frames_B = (((types_BN == TokenType.VISUAL) & valid_BN).sum(1) // S)
    T = max(int(frames_B.max()), 1)
    mask_BT = torch.arange(T, device=frame_MD.device)[None] < frames_B[:, None]
    out_BTD = frame_MD.new_zeros(types_BN.shape[0], T, frame_MD.shape[-1])
    out_BTD[mask_BT] = frame_MD
    return out_BTD, mask_BT


def interval_from_salient(salient_T: torch.Tensor, timestamps_T: Sequence[float],
                          duration: float | None = None) -> tuple[float, float] | None:
    """The interval the salient frames form: from the first salient frame's timestamp to the end
    of the last one (next timestamp, or the duration). None when no frame is salient."""
    idx = torch.nonzero(salient_T.bool().flatten()).flatten().tolist()
    if not idx:
        return None
    ts = [float(t) for t in timestamps_T]
    last = idx[-1]
    if last + 1 < len(ts):
        end = ts[last + 1]
    else:
        gap = ts[-1] - ts[-2] if len(ts) > 1 else 1.0
        end = float(duration) if duration is not None else ts[-1] + gap
    return ts[idx[0]], end


# --- where the <evi> tokens are ------------------------------------------------------------------


@dataclass
class EvidenceSites:
    """Every `<evi>` token of a batch (E of them), flattened."""

    row_E: torch.Tensor  # batch row
    pos_E: torch.Tensor  # column of the `<evi>` token
    stage_E: torch.Tensor  # 0: pure grounding (before `</evi>`), 1: the interleaved answer
    index_E: torch.Tensor  # k: the k-th `<evi>` of its stage, the k-th event


def find_evidence(input_ids_BN: torch.Tensor, types_BN: torch.Tensor, valid_BN: torch.Tensor,
                  evi_id: int, evi_end_id: int) -> EvidenceSites:
    """The `<evi>` tokens that have a previous position (whose hidden state emits them)."""
    text_BN = (types_BN == TokenType.TEXT) & valid_BN
    evi_BN = text_BN & (input_ids_BN == evi_id)
    evi_BN[:, 0] = False
    after_BN = (text_BN & (input_ids_BN == evi_end_id)).long().cumsum(1) > 0
    k_ground_BN = (evi_BN & ~after_BN).long().cumsum(1) - 1
    k_answer_BN = (evi_BN & after_BN).long().cumsum(1) - 1
    row_E, pos_E = torch.nonzero(evi_BN, as_tuple=True)
    stage_E = after_BN[row_E, pos_E].long()
    index_E = torch.where(stage_E.bool(), k_answer_BN[row_E, pos_E], k_ground_BN[row_E, pos_E])
    return EvidenceSites(row_E=row_E, pos_E=pos_E, stage_E=stage_E, index_E=index_E)


# --- losses (D2VLM sec. 4, eq. 6-7) ----------------------------------------------------------------


def grounding_loss(prob_ET: torch.Tensor, target_ET: torch.Tensor, frame_mask_ET: torch.Tensor) -> torch.Tensor:
    """L_gnd: per-frame BCE against the ground-truth frames, mean over each token's real frames,
    then over the `<evi>` tokens (of both stages)."""
    if prob_ET.shape[0] == 0:
        return prob_ET.sum() * 0.0
    m = frame_mask_ET.float()
    bce_ET = F.binary_cross_entropy(prob_ET.clamp(EPS, 1 - EPS), target_ET.float(), reduction="none")
    return ((bce_ET * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def consistency_loss(prob_ET: torch.Tensor, sites: EvidenceSites, frame_mask_ET: torch.Tensor) -> torch.Tensor:
    """L_cons: L1 between the grounding of the k-th `<evi>` of the pure-grounding stage and the
    k-th of the answer in the same row (mean over real frames, then over matched pairs)."""
    key_E = sites.row_E * 100_000 + sites.index_E
    g = (sites.stage_E == 0).nonzero().flatten()
    a = (sites.stage_E == 1).nonzero().flatten()
    match_GA = key_E[g][:, None] == key_E[a][None, :]
    gi, ai = torch.nonzero(match_GA, as_tuple=True)
    if gi.numel() == 0:
        return prob_ET.sum() * 0.0
    pg, pa, m = prob_ET[g[gi]], prob_ET[a[ai]], frame_mask_ET[g[gi]].float()
    return (((pg - pa).abs() * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def interval_log_prob(prob_ET: torch.Tensor, target_ET: torch.Tensor, frame_mask_ET: torch.Tensor) -> torch.Tensor:
    """log P(interval | <evi>) = sum_t in log p_t + sum_t out log(1 - p_t) per token (D2VLM
    eq. 6-7), over real frames -> (E,)."""
    p = prob_ET.clamp(EPS, 1 - EPS)
    t = target_ET.float()
    return ((t * p.log() + (1 - t) * (1 - p).log()) * frame_mask_ET.float()).sum(1)


def evidence_terms(head: EvidenceHead, h_BND: torch.Tensor, sites: EvidenceSites,
                   frames_BTD: torch.Tensor, frame_mask_BT: torch.Tensor,
                   targets_BKT: torch.Tensor | None):
    """Grounding of every `<evi>` site from the hidden state before it: (prob_ET, frame mask_ET,
    target_ET or None). targets_BKT: the k-th event's frames of each row (K events, padded)."""
    h_ED = h_BND[sites.row_E, sites.pos_E - 1]
    frames_ETD, mask_ET = frames_BTD[sites.row_E], frame_mask_BT[sites.row_E]
    prob_ET = head(h_ED, frames_ETD, mask_ET)
    target_ET = None if targets_BKT is None else site_targets(sites, targets_BKT, prob_ET.shape[1])
    return prob_ET, mask_ET, target_ET


def site_targets(sites: EvidenceSites, targets_BKT: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The ground-truth frames (E, T) of every `<evi>` site: its row's k-th event."""
    B, K, T = targets_BKT.shape
    if sites.index_E.numel() and int(sites.index_E.max()) >= K:
        raise ValueError(
            f"an answer has {int(sites.index_E.max()) + 1} {EVI} tokens in one stage but "
            f"evidence_frames gives {K} intervals per row"
        )
    if T < num_frames:
        targets_BKT = F.pad(targets_BKT, (0, num_frames - T))
    return targets_BKT[sites.row_E, sites.index_E][:, :num_frames].float()


def evidence_answer_pieces(events) -> list:
    """A D2VLM response for our grammar: pure grounding (`<evi>` x K `</evi>`) then the events
    answer (`serialize_events`) where each event's caption starts with its `<evi>`."""
    pieces = [(TokenType.TEXT, EVI)] * len(events) + [(TokenType.TEXT, EVI_END)]
    for kind, piece in serialize_events(events):
        pieces.append((kind, piece))
        if kind == TokenType.SCORE and piece == SYNC:
            pieces.append((TokenType.TEXT, EVI))
    assert sum(1 for k, p in pieces if p == SWITCH) == len(events)
    return pieces


def encode_evidence_example(tokenizer, task, query: str, timestamps: Sequence[float], events, *,
                            tokens_per_frame: int, duration: float | None = None,
                            max_length: int | None = None, query_first: bool = False,
                            options: Sequence[str] | None = None):
    """Prompt + D2VLM answer (labels on the answer) and the (K, T) frame targets of its events
    (GQA: the question's `options` go into the prompt)."""
    ids_pair = evidence_token_ids(tokenizer)
    if ids_pair is None:
        raise ValueError("the tokenizer has no <evi> tokens; call add_evidence_tokens(tokenizer)")
    prompt = tokenizer.encode_prompt(task, query, timestamps, tokens_per_frame=tokens_per_frame,
                                     query_first=query_first, options=options)
    special = {EVI: ids_pair[0], EVI_END: ids_pair[1], SWITCH: tokenizer.switch_id, EOS: tokenizer.eos_id}
    ids, types = [], []
    for kind, piece in evidence_answer_pieces(events):
        if kind == TokenType.TEXT:
            new = [special[piece]] if piece in special else tokenizer.encode_text(piece)
        else:
            new = [number_symbol_id(piece)]
        ids += new
        types += [int(kind)] * len(new)
    total = len(prompt) + len(ids)
    if max_length is not None and total > max_length:
        raise ValueError(f"evidence example of {total} tokens exceeds the context of {max_length}")
    enc = Encoded(ids=prompt.ids + ids, types=prompt.types + types, labels=prompt.labels + ids)
    targets = frame_targets([(e.start, e.end) for e in events], timestamps, duration) if events else torch.zeros(0, len(timestamps))
    return enc, targets


def pad_targets(targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row (K_b, T_b) targets -> (B, K, T) zero-padded."""
    K = max([t.shape[0] for t in targets] + [1])
    T = max([t.shape[1] for t in targets] + [1])
    out = torch.zeros(len(targets), K, T)
    for b, t in enumerate(targets):
        out[b, : t.shape[0], : t.shape[1]] = t
    return out


__all__ = [
    "EVI", "EVI_END", "EvidenceConfig", "EvidenceHead", "EvidenceSites", "add_evidence_tokens",
    "aggregate_frames", "consistency_loss", "encode_evidence_example", "evidence_answer_pieces",
    "evidence_terms", "evidence_token_ids", "find_evidence", "frame_features", "frame_targets",
    "grounding_loss", "interval_from_salient", "site_targets", "interval_log_prob", "pad_targets",
]
