"""Query-conditioned frame relevance: which frames show the queried moment, read off the decoder.

With the query placed before the frames (`TimeExpertConfig.query_first`), every frame's tokens
attend to the query in the causal decoder, so the decoder's hidden state of a frame can say
whether that frame shows what the query asks for. A linear head on each frame's pooled hidden
states gives one logit per frame, trained with a per-frame BCE against "the frame's timestamp
lies inside a ground-truth window" (D2VLM's L_gnd, sec. 4, taken on the decoder's frame tokens
instead of an evidence token's similarity). At inference the windows are read off the relevant
frames, as D2VLM reads its answer's timestamps off the salient frames: each run of consecutive
frames at or above a share of the most relevant frame's probability is one window, from its
first frame's segment start to its last frame's segment end.

Shape letters: B batch, N tokens, M frames of the whole batch, S tokens per frame, T frames of a
row, D model width, C saliency clips.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from timeexpert.events import Event, TokenType
from timeexpert.models.evidence import frame_features

IGNORE_FRAME = -1.0  # frame label of frames without a target (padding, tasks without one)
RELEVANT = 0.5  # a frame the model finds more likely relevant than not


class FrameRelevanceHead(nn.Module):
    """(B, T, D) pooled frame hidden states and the (B, D) pooled query state -> (B, T) logits.

    logit_t = w . f_t + b + (W_q q) . (W_f f_t) / sqrt(r): a linear read of the frame state (the
    decoder has already mixed the query in through attention) plus a low-rank query-frame
    similarity, the direct multiplicative path of GroundVTS's query-guided token scoring (low-rank
    projections of query and visual tokens) and of D2VLM's evidence-frame similarity.
    """

    def __init__(self, dim: int, rank: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, 1)
        self.query_proj = nn.Linear(dim, rank, bias=False)
        self.frame_proj = nn.Linear(dim, rank, bias=False)

    def forward(self, frames_BTD: torch.Tensor, query_BD: torch.Tensor) -> torch.Tensor:
        f_BTD, q_BD = self.norm(frames_BTD), self.norm(query_BD)
        sim_BT = torch.einsum("btr,br->bt", self.frame_proj(f_BTD), self.query_proj(q_BD))
        return self.proj(f_BTD).squeeze(-1) + sim_BT / self.query_proj.out_features ** 0.5


class PatchQueryScore(nn.Module):
    """GroundVTS's query-guided scoring of visual tokens, taken on the vision tower's patches:
    s(q, t) = max over frame t's patches p of (W_q q) . (W_p p) / sqrt(r), with q an attention
    pool of the query's word embeddings. It is query-dependent by construction (no frame term
    of its own) and sees each object's own patches, before slot compression mixes the objects of
    a frame: "is the red circle in this frame" is one patch's match. Added to the frame-relevance
    logit; trained by the per-frame BCE and the caption contrast (`caption_contrast_loss`)."""

    def __init__(self, text_dim: int, vision_dim: int, rank: int = 64) -> None:
        super().__init__()
        self.word_score = nn.Linear(text_dim, 1)
        self.query_proj = nn.Linear(text_dim, rank, bias=False)
        self.patch_norm = nn.LayerNorm(vision_dim)
        self.patch_proj = nn.Linear(vision_dim, rank, bias=False)

    def embed_text(self, emb_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """(B, L, D) word embeddings and their (B, L) mask -> (B, r): attention-pooled words
        (the pool learns which words name objects), projected. Rows without words give zeros."""
        w_BL = self.word_score(emb_BLD).squeeze(-1).float().masked_fill(~mask_BL, float("-inf"))
        w_BL = torch.nan_to_num(w_BL.softmax(-1), nan=0.0).to(emb_BLD.dtype)
        return self.query_proj(torch.einsum("bl,bld->bd", w_BL, emb_BLD))

    def forward(self, query_BR: torch.Tensor, patches_BTPV: torch.Tensor) -> torch.Tensor:
        """(B, R) texts against (B, T, P, V) patches of the same rows -> (B, T) scores."""
        return self.captions(query_BR[:, None], patches_BTPV)[:, 0]

    def captions(self, captions_BKR: torch.Tensor, patches_BTPV: torch.Tensor) -> torch.Tensor:
        """(B, K, R) captions of each row's video against its (B, T, P, V) patches -> (B, K, T)."""
        keys_BTPR = self.patch_proj(self.patch_norm(patches_BTPV))
        sim_BKTP = torch.einsum("btpr,bkr->bktp", keys_BTPR, captions_BKR)
        return sim_BKTP.amax(-1) / self.query_proj.out_features ** 0.5


def caption_contrast_loss(scores_BKT: torch.Tensor, targets_BKT: torch.Tensor) -> torch.Tensor:
    """Each frame against every caption of its video: cross-entropy of a softmax over the K
    captions, the frame's positives (the events it lies in) pooled (-log of their summed
    probability). Only frames inside some event and outside another count: there the captions
    disagree, and only reading the caption can tell them apart; a frame every caption (or none)
    covers says nothing about the words. Targets 1 / 0, IGNORE_FRAME for padding captions or
    frames. The query-independent "is something happening here" cancels in the softmax, so this
    trains the binding of words to objects alone."""
    valid_BKT = targets_BKT >= 0
    pos_BKT = valid_BKT & (targets_BKT > 0.5)
    informative_BT = pos_BKT.any(1) & (valid_BKT & ~pos_BKT).any(1)
    if not bool(informative_BT.any()):
        return scores_BKT.sum() * 0.0
    s_BKT = scores_BKT.float()
    all_BT = s_BKT.masked_fill(~valid_BKT, float("-inf")).logsumexp(1)
    pos_BT = s_BKT.masked_fill(~pos_BKT, float("-inf")).logsumexp(1)
    return (all_BT - pos_BT)[informative_BT].mean()


def pad_caption_ids(ids: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """K captions' text ids -> (K, L) ids, -1 padding (what `embed_captions` reads); L is the
    longest caption's, or `length`."""
    ids_KL = torch.full((len(ids), length or max(map(len, ids), default=0)), -1, dtype=torch.long)
    for k, x in enumerate(ids):
        ids_KL[k, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return ids_KL


def caption_targets(events: Sequence[tuple[float, float, Sequence[int]]],
                    timestamps_T: Sequence[float]) -> tuple[list[list[int]], np.ndarray]:
    """A video's captioned events [(start, end, word ids)] -> (word ids per caption, the (K, T)
    0/1 frames each caption's event covers)."""
    covers_KT = np.stack([frame_labels([(start, end)], timestamps_T) for start, end, _ in events])
    return [list(ids) for _, _, ids in events], covers_KT


def pool_query(h_BND: torch.Tensor, types_BN: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
    """(B, D) mean of each row's QUERY hidden states (the instruction and query)."""
    w_BN = ((types_BN == TokenType.QUERY) & valid_BN).to(h_BND.dtype)
    return (w_BN[..., None] * h_BND).sum(1) / w_BN.sum(1, keepdim=True).clamp(min=1.0)


def pool_frames(h_BND: torch.Tensor, types_BN: torch.Tensor, valid_BN: torch.Tensor,
                tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's S visual hidden states averaged -> (B, T, D) and the (B, T) mask of real
    frames. Rows hold their frames in order, S visual tokens each (the prompt layout)."""
    is_visual_BN = (types_BN == TokenType.VISUAL) & valid_BN
    visual_MSD = h_BND[is_visual_BN].view(-1, tokens_per_frame, h_BND.shape[-1])
    return frame_features(visual_MSD, types_BN, valid_BN, tokens_per_frame)


def relevance_loss(logits_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the labelled frames (labels in [0, 1]; IGNORE_FRAME elsewhere)."""
    if labels_BT.shape != logits_BT.shape:
        raise ValueError(
            f"frame_labels must be (B, T) = {tuple(logits_BT.shape)}, got {tuple(labels_BT.shape)}"
        )
    sel_BT = labels_BT >= 0
    if not bool(sel_BT.any()):
        return logits_BT.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits_BT[sel_BT].float(), labels_BT[sel_BT].float())


def segment_edges(timestamps_T: Sequence[float], duration: float) -> np.ndarray:
    """(T + 1,) edges of the segments the frames stand for: midpoints between neighbouring
    timestamps, 0 and the duration at the ends (the uniform grid's edges for centre sampling)."""
    ts_T = np.asarray(timestamps_T, dtype=np.float64).reshape(-1)
    if ts_T.size == 0:
        raise ValueError("need at least one frame timestamp")
    mid = (ts_T[1:] + ts_T[:-1]) / 2
    return np.concatenate([[0.0], mid, [max(float(duration), float(ts_T[-1]))]])


def frame_labels(windows: Sequence[tuple[float, float]], timestamps_T: Sequence[float],
                 weights: Sequence[float] | None = None) -> np.ndarray:
    """(T,) target of each frame: 1 (or the window's weight, the highest over windows) when the
    frame's timestamp lies in a window [start, end), else 0."""
    ts_T = np.asarray(timestamps_T, dtype=np.float64).reshape(-1)
    out_T = np.zeros(ts_T.shape, dtype=np.float32)
    for k, (start, end) in enumerate(windows):  # a handful of windows per record
        w = 1.0 if weights is None else float(weights[k])
        inside_T = (ts_T >= start) & (ts_T < end)
        out_T = np.where(inside_T, np.maximum(out_T, w), out_T)
    return out_T


def windows_from_relevance(prob_T: Sequence[float], timestamps_T: Sequence[float], duration: float,
                           threshold_ratio: float) -> list[Event]:
    """Runs of consecutive salient frames -> windows scored by their peak probability, best
    first (the top-1 window holds the most relevant frame). A frame is salient at
    `threshold_ratio` x the most relevant frame's probability or above (D2VLM sec. 4: 60% of the
    maximum), so an unsure model still answers around its peak."""
    p_T = np.asarray(prob_T, dtype=np.float64).reshape(-1)
    events = _runs(p_T >= threshold_ratio * p_T.max(), p_T, segment_edges(timestamps_T, duration))
    return sorted(events, key=lambda e: -(e.score or 0.0))


def dense_events_from_relevance(prob_T: Sequence[float], timestamps_T: Sequence[float],
                                duration: float, generated: Sequence[Event],
                                max_events: int, threshold_ratio: float) -> list[Event]:
    """Dense captioning read off the frames (answer choice `dvc: frames`): each run of frames the
    model finds relevant (at `RELEVANT` or above; trained against "inside some event") is one
    event, in time order; an unsure model still answers its best run (`windows_from_relevance`
    at `threshold_ratio` of the peak, as MR answers). Past `max_events` runs, the most relevant ones (by peak) are kept. Each
    event takes the caption of the generated event overlapping it most
    (the nearest one by centre when none overlaps; empty when nothing was generated)."""
    p_T = np.asarray(prob_T, dtype=np.float64).reshape(-1)
    events = _runs(p_T >= RELEVANT, p_T, segment_edges(timestamps_T, duration))
    if not events:
        events = windows_from_relevance(p_T, timestamps_T, duration, threshold_ratio)[:1]
    events = sorted(events, key=lambda e: -(e.score or 0.0))[:max_events]
    captioned = [g for g in generated if g.caption]
    if captioned:
        g_start = np.array([g.start for g in captioned])
        g_end = np.array([g.end for g in captioned])
        for e in events:
            overlap = np.minimum(g_end, e.end) - np.maximum(g_start, e.start)
            gap = np.abs((g_start + g_end) / 2 - (e.start + e.end) / 2)
            best = int(overlap.argmax()) if overlap.max() > 0 else int(gap.argmin())
            e.caption = captioned[best].caption
    return sorted(events, key=lambda e: (e.start, e.end))


def _runs(on_T: np.ndarray, p_T: np.ndarray, edges: np.ndarray) -> list[Event]:
    """Each run [a, b) of consecutive frames that are on -> one window from frame a's segment
    start to frame b - 1's segment end, scored by its peak probability; in time order."""
    change = np.flatnonzero(np.diff(np.r_[0, on_T.astype(np.int8), 0]))
    return [
        Event(start=float(edges[a]), end=float(edges[b]), score=float(p_T[a:b].max()))
        for a, b in zip(change[0::2], change[1::2])
    ]


def clip_saliency(prob_T: Sequence[float], timestamps_T: Sequence[float], duration: float,
                  clip_len: float) -> list[float]:
    """Per-clip saliency on the 0-4 scale: 4 x the relevance of the frames whose segments overlap
    the clip (overlap-weighted mean)."""
    p_T = np.asarray(prob_T, dtype=np.float64).reshape(-1)
    edges = segment_edges(timestamps_T, duration)
    num_clips = max(1, math.ceil(duration / clip_len - 1e-9))
    a_C = np.arange(num_clips) * clip_len
    b_C = np.minimum(a_C + clip_len, duration)
    overlap_CT = np.clip(np.minimum(b_C[:, None], edges[None, 1:])
                         - np.maximum(a_C[:, None], edges[None, :-1]), 0, None)
    weight_C = overlap_CT.sum(1)
    nearest_C = np.abs(((a_C + b_C) / 2)[:, None] - np.asarray(timestamps_T)[None]).argmin(1)
    sal_C = np.where(weight_C > 0, (overlap_CT * p_T).sum(1) / np.maximum(weight_C, 1e-9),
                     p_T[nearest_C])
    return [float(4.0 * s) for s in sal_C]
