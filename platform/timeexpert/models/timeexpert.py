"""TimeExpert for video temporal grounding, top to bottom.

frames -> vision encoder -> slot compression -> projector -> [timestamp tokens + visual tokens per
frame, instruction] -> decoder (causal attention + MoE FFN per block, every token tagged with its
TokenType) -> time head / score head / LM head (TimeExpert, Yang et al. 2025, eq. 1-2: the answer
is a causal sequence of events (t_m, s_m, c_m), following TRACE). Tensors in, tensors out: the
loop that chooses the answer's tokens under its grammar is `generation.py`, the inputs come from
`processor.py`, the config (`TimeExpertConfig`, its fields and their validation) is
`configuration_timeexpert.py`.

Shape letters: B batch, N tokens of this call, L cached (past) tokens, K keys (L + N), M frames of
the whole batch, S tokens per frame, D model width, H query heads, G key/value heads, d head dim,
V text vocab, U number vocab (13).

Reading order: decoder building blocks (norm, rotary, attention, block) -> output type and the
loss combiner -> the model (vision, embedding, forward: inputs, evidence, token sampling, decoder,
evidence grounding, frame relevance, heads and losses; routing; checkpoints) -> Auto registration
(model, processor; the config registers itself) -> `create_model` (fresh model with pretrained
parts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoProcessor, PreTrainedModel
from transformers.utils import ModelOutput

from timeexpert.events import IGNORE_INDEX, NUM_TOKEN_TYPES, TokenType
from timeexpert.models.configuration_timeexpert import TimeExpertConfig, check_checkpoint_config
from timeexpert.models.expert_parallel import expert_shards, load_weights
from timeexpert.models.moe import MoELayer, ExpertUpdate
from timeexpert.models.temporal import NumberEncoder, NumberHead
from timeexpert.models.evidence import (
    EvidenceConfig,
    EvidenceHead,
    aggregate_frames,
    consistency_loss,
    evidence_terms,
    find_evidence,
    frame_features,
    grounding_loss,
    site_targets,
)
from timeexpert.models.frame_relevance import (
    FrameRelevanceHead,
    IGNORE_FRAME,
    PatchQueryScore,
    caption_contrast_loss,
    pool_frames,
    pool_query,
    relevance_loss,
)
from timeexpert.models.processor import TimeExpertProcessor
from timeexpert.models.token_sampling import TokenSamplingConfig, VisualTokenSampler
from timeexpert.models.upcycle import upcycle_decoder
from timeexpert.models.vision import (
    FrameProcessor,
    PatchViT,
    Projector,
    SiglipFrameEncoder,
    SlotCompressor,
)


# --- decoder building blocks --------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(position_ids_BN: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE tables for explicit positions (kept tokens keep their original position ids)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids_BN.device).float() / head_dim)
    )
    freqs_BNh = position_ids_BN.float()[..., None] * inv_freq
    emb_BNd = torch.cat([freqs_BNh, freqs_BNh], dim=-1)
    return emb_BNd.cos().to(dtype)[:, None], emb_BNd.sin().to(dtype)[:, None]  # (B, 1, N, d)


def apply_rotary(x_BHNd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHNd.chunk(2, dim=-1)
    return x_BHNd * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with RoPE, grouped-query heads and an optional KV cache."""

    def __init__(self, config: TimeExpertConfig) -> None:
        super().__init__()
        D, H, G = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.H, self.G, self.d = H, G, D // H
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * self.d, bias=bias)
        self.k_proj = nn.Linear(D, G * self.d, bias=bias)
        self.v_proj = nn.Linear(D, G * self.d, bias=bias)
        self.o_proj = nn.Linear(H * self.d, D, bias=False)

    def forward(self, x_BND, cos, sin, mask_B1NK, past_kv):
        B, N, _ = x_BND.shape
        q_BHNd = self.q_proj(x_BND).view(B, N, self.H, self.d).transpose(1, 2)
        k_BGNd = self.k_proj(x_BND).view(B, N, self.G, self.d).transpose(1, 2)
        v_BGNd = self.v_proj(x_BND).view(B, N, self.G, self.d).transpose(1, 2)
        q_BHNd, k_BGNd = apply_rotary(q_BHNd, cos, sin), apply_rotary(k_BGNd, cos, sin)
        if past_kv is not None:
            k_BGKd = torch.cat([past_kv[0], k_BGNd], dim=2)
            v_BGKd = torch.cat([past_kv[1], v_BGNd], dim=2)
        else:
            k_BGKd, v_BGKd = k_BGNd, v_BGNd
        out_BHNd = F.scaled_dot_product_attention(
            q_BHNd, k_BGKd, v_BGKd, attn_mask=mask_B1NK, enable_gqa=self.G != self.H
        )
        return self.o_proj(out_BHNd.transpose(1, 2).reshape(B, N, -1)), (k_BGKd, v_BGKd)


class DecoderBlock(nn.Module):
    """Pre-norm block: attention, then the MoE FFN over the real (unpadded) tokens."""

    def __init__(self, config: TimeExpertConfig, ep_group=None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoELayer(config.moe_config(), ep_group=ep_group)

    def forward(self, x_BND, types_BN, valid_BN, cos, sin, mask_B1NK, past_kv):
        a_BND, kv = self.attn(self.attn_norm(x_BND), cos, sin, mask_B1NK, past_kv)
        x_BND = x_BND + a_BND
        h_BND = self.ffn_norm(x_BND)
        # padding and finished sequences neither cost expert compute nor enter routing statistics
        index = valid_BN.nonzero(as_tuple=True)
        y_ND, losses = self.ffn(h_BND[index], types_BN[index])
        y_BND = h_BND.new_zeros(h_BND.shape).index_put(index, y_ND)
        return x_BND + y_BND, kv, losses


# --- output -------------------------------------------------------------------------------------


@dataclass
class TimeExpertOutput(ModelOutput):
    """Losses per head (cross-entropy, mean over that head's target tokens), router losses summed
    over layers, logits of the three heads, and the KV cache."""

    loss: torch.Tensor | None = None  # weighted sum of the five terms below
    loss_time: torch.Tensor | None = None
    loss_score: torch.Tensor | None = None
    loss_text: torch.Tensor | None = None
    loss_grounding: torch.Tensor | None = None  # D2VLM L_gnd (with evidence_frames)
    loss_consistency: torch.Tensor | None = None  # D2VLM L_cons (with evidence_frames)
    aux_loss: torch.Tensor | None = None  # TimeExpert eq. 9, summed over layers
    z_loss: torch.Tensor | None = None  # router z-loss, summed over layers
    time_logits: torch.Tensor | None = None  # (B, N, U)
    score_logits: torch.Tensor | None = None  # (B, N, U)
    text_logits: torch.Tensor | None = None  # (B, N, V)
    hidden_states: torch.Tensor | None = None  # (B, N, D), after the final norm
    past_key_values: list | None = None  # per layer (k, v), each (B, G, K, d)
    # set when token sampling shortened the sequence: what the decoder saw
    attention_mask: torch.Tensor | None = None  # (B, N') of the compacted sequence
    position_ids: torch.Tensor | None = None  # (B, N') the kept tokens' position ids
    token_density: torch.Tensor | None = None  # (M,) fraction of each frame's tokens kept
    kept_columns: torch.Tensor | None = None  # (B, N') input column of every token seen
    # evidence tokens (D2VLM): frame-level video tokens and the grounding of every <evi>
    frame_features: torch.Tensor | None = None  # (B, T, D)
    frame_mask: torch.Tensor | None = None  # (B, T) real frames
    evidence_probs: torch.Tensor | None = None  # (E, T) per <evi> token, batch order
    # query-conditioned frame relevance (config `frame_relevance`)
    frame_logits: torch.Tensor | None = None  # (B, T), meaningful where frame_mask
    loss_frames: torch.Tensor | None = None  # per-frame BCE (with frame_labels)
    loss_captions: torch.Tensor | None = None  # caption contrast (config patch_relevance, with
    # caption_ids)


HEAD_LOSSES = ("loss_time", "loss_score", "loss_text")  # the three heads' cross-entropies
ALL_LOSSES = HEAD_LOSSES + ("aux_loss", "z_loss")  # + the MoE's task-dependent aux and z-loss


def combine_losses(out: TimeExpertOutput, config: TimeExpertConfig,
                   terms: tuple[str, ...] = ALL_LOSSES) -> torch.Tensor:
    """The one loss combiner (the model's `loss` and every training stage's): the `terms` of
    `out`, the heads' CE weighted by `loss_weight_time / score / text` (aux and z-loss carry
    their weights from the MoE layer), plus the auxiliaries of the modules that are on, in every
    stage: the frame-relevance BCE, the caption contrast and D2VLM's
    L_gnd + L_cons."""
    weights = {"loss_time": config.loss_weight_time, "loss_score": config.loss_weight_score,
               "loss_text": config.loss_weight_text}
    loss = sum(weights.get(name, 1.0) * getattr(out, name) for name in terms)
    if out.loss_frames is not None:
        loss = loss + config.loss_weight_frames * out.loss_frames
    if out.loss_captions is not None:
        loss = loss + config.loss_weight_captions * out.loss_captions
    if out.loss_grounding is not None:  # D2VLM: SFT + L_gnd + L_cons
        ecfg = EvidenceConfig.from_dict(config.evidence)
        loss = (loss + ecfg.loss_weight_grounding * out.loss_grounding
                + ecfg.loss_weight_consistency * out.loss_consistency)
    return loss


# --- the model ----------------------------------------------------------------------------------


class TimeExpertForGrounding(PreTrainedModel):
    """Video + instruction -> events, through a MoE decoder with time, score and text heads."""

    config_class = TimeExpertConfig
    base_model_prefix = "timeexpert"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderBlock"]

    def __init__(self, config: TimeExpertConfig, ep_group=None) -> None:
        super().__init__(config)
        D = config.hidden_size
        # vision: frames -> patch tokens -> S slots per frame -> decoder width
        self.frame_processor = FrameProcessor(
            image_size=config.image_size, mean=config.image_mean, std=config.image_std
        )
        if config.vision_encoder == "siglip":
            self.frame_encoder = SiglipFrameEncoder(config.vision_siglip)
        else:
            self.frame_encoder = PatchViT(
                image_size=config.image_size,
                patch_size=config.patch_size,
                width=config.vision_width,
                num_layers=config.vision_num_layers,
                num_heads=config.vision_num_heads,
            )
        self.compressor = SlotCompressor(
            width=config.vision_width,
            num_slots=config.tokens_per_frame,
            num_heads=config.compressor_num_heads,
        )
        self.projector = Projector(config.vision_width, D)
        # (token sampling) GroundVTS: query-guided choice of the visual tokens the decoder sees
        self.token_sampler = (
            VisualTokenSampler(
                TokenSamplingConfig.from_dict(config.token_sampling), D, config.tokens_per_frame
            )
            if config.token_sampling is not None
            else None
        )
        # token embeddings: text (TEXT, QUERY) and the separate time / score encoders
        self.text_embed = nn.Embedding(config.text_vocab_size, D)
        nn.init.normal_(self.text_embed.weight, std=config.initializer_range)
        self.time_encoder = NumberEncoder(D, init_std=config.initializer_range)
        self.score_encoder = NumberEncoder(D, init_std=config.initializer_range)
        # decoder
        self.layers = nn.ModuleList(
            DecoderBlock(config, ep_group=ep_group) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(D, config.rms_norm_eps)
        # heads
        self.time_head = NumberHead(D, init_std=config.initializer_range)
        self.score_head = NumberHead(D, init_std=config.initializer_range)
        self.lm_head = nn.Linear(D, config.text_vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        # D2VLM evidence grounding: <evi> hidden state -> per-frame probability
        self.evidence_head = (
            EvidenceHead(EvidenceConfig.from_dict(config.evidence), D)
            if config.evidence is not None
            else None
        )
        # query-conditioned frame relevance: pooled frame hidden states -> one logit per frame
        self.frame_head = FrameRelevanceHead(D) if config.frame_relevance else None
        self.patch_score = PatchQueryScore(D, config.vision_width) if config.patch_relevance else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every submodule initialises itself when built (torch defaults, slot queries, the MoE
        # layer's own scheme), and `from_pretrained` refuses incomplete checkpoints, so there is
        # nothing left to fill in; the generic re-init would overwrite the MoE gate init.
        return

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # --- vision -----------------------------------------------------------------------------

    def preprocess_frames(self, frames_THWC) -> torch.Tensor:
        """uint8 (T, H, W, 3) frames -> normalised pixels (T, 3, image_size, image_size)."""
        return self.frame_processor(frames_THWC)

    def encode_frames(self, pixels_MCHW: torch.Tensor) -> torch.Tensor:
        """Pixels of M frames -> (M, S, D) visual tokens for the decoder."""
        return self.project_patches(self.encode_patches(pixels_MCHW))

    def encode_patches(self, pixels_MCHW: torch.Tensor) -> torch.Tensor:
        """Pixels of M frames -> the vision tower's (M, P, V) patch tokens."""
        expected = (3, self.config.image_size, self.config.image_size)
        if pixels_MCHW.ndim != 4 or tuple(pixels_MCHW.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be (M, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(pixels_MCHW.shape)}; use preprocess_frames on uint8 frames"
            )
        return self.frame_encoder(pixels_MCHW.to(self.projector.net[0].weight.dtype))

    def project_patches(self, patches_MPV: torch.Tensor) -> torch.Tensor:
        """(M, P, V) patch tokens -> (M, S, D) visual tokens: slot compression, projector."""
        return self.projector(self.compressor(patches_MPV))

    def embed_captions(self, ids_BKL: torch.Tensor) -> torch.Tensor:
        """(B, K, L) text ids of captions (-1 padding) -> (B, K, r): the patch score's pooled
        projection of each caption's words (`patch_relevance`)."""
        B, K, L = ids_BKL.shape
        words_BKLD = self.text_embed(ids_BKL.clamp_min(0))
        return self.patch_score.embed_text(words_BKLD.view(B * K, L, -1),
                                           (ids_BKL >= 0).view(B * K, L)).view(B, K, -1)

    def caption_scores(self, patches_TPV: torch.Tensor, ids_KL: torch.Tensor) -> torch.Tensor:
        """One video's T frames, as their vision-tower patches (`encode_patches`), against K
        captions (-1 padded ids) -> (K, T) patch scores: the caption's best match among each
        frame's patches, no decoder pass (`patch_relevance`)."""
        if self.patch_score is None:
            raise ValueError("caption_scores needs patch_relevance=True")
        return self.patch_score.captions(self.embed_captions(ids_KL[None]), patches_TPV[None])[0]

    # --- embedding ---------------------------------------------------------------------------

    def embed_tokens(
        self, input_ids_BN: torch.Tensor, types_BN: torch.Tensor, visual_MSD: torch.Tensor | None
    ) -> torch.Tensor:
        """Each token embedded by its type's encoder; VISUAL slots take the frames' tokens in
        order (batch row by row, frame by frame)."""
        is_text = (types_BN == TokenType.TEXT) | (types_BN == TokenType.QUERY)
        is_time, is_score = types_BN == TokenType.TIME, types_BN == TokenType.SCORE
        is_visual = types_BN == TokenType.VISUAL
        x_BND = self.text_embed(input_ids_BN.masked_fill(~is_text, 0))
        x_BND = torch.where(
            is_time[..., None], self.time_encoder(input_ids_BN.masked_fill(~is_time, 0)), x_BND
        )
        x_BND = torch.where(
            is_score[..., None], self.score_encoder(input_ids_BN.masked_fill(~is_score, 0)), x_BND
        )
        num_visual = int(is_visual.sum())
        available = 0 if visual_MSD is None else visual_MSD.shape[0] * visual_MSD.shape[1]
        if num_visual != available:
            raise ValueError(
                f"the batch has {num_visual} VISUAL tokens but the frames give {available} "
                f"({self.config.tokens_per_frame} per frame); pass pixel_values for every frame"
            )
        if num_visual:
            x_BND = x_BND.masked_scatter(
                is_visual[..., None], visual_MSD.reshape(-1, x_BND.shape[-1]).to(x_BND.dtype)
            )
        return x_BND

    # --- forward -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, token_types: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                visual_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: list | None = None,
                use_cache: bool = False, return_logits: bool = True,
                evidence_frames: torch.Tensor | None = None,
                evidence_embeds: torch.Tensor | None = None,
                frame_labels: torch.Tensor | None = None,
                caption_ids: torch.Tensor | None = None,
                caption_frames: torch.Tensor | None = None,
                patches: torch.Tensor | None = None) -> TimeExpertOutput:
        """One decoder pass.

        input_ids, token_types (B, N): ids local to each token's TokenType vocabulary
        (`tokenizer.py`); attention_mask (B, K): 1 real, 0 padding, over the cached and new tokens;
        position_ids (B, N): by default the count of real tokens before each one; pixel_values
        (M, 3, H, W), their vision-tower patches (M, P, V) (`encode_patches`: frames asked with
        several prompts need the tower once) or visual_embeds (M, S, D): the frames behind the
        VISUAL tokens; labels (B, N): targets (IGNORE_INDEX where none), each predicted from the
        previous position by its type's head. Evidence tokens (config `evidence`): evidence_frames (B, K, T) the 0/1 frames of the
        k-th event of each row (targets of L_gnd / L_cons, pooled into the k-th `<evi>` of each
        stage under teacher forcing); evidence_embeds (B, N, D) added to the inputs (generation's
        pooled salient frames). Frame relevance (config `frame_relevance`): frame_labels (B, T)
        targets in [0, 1], IGNORE_FRAME (-1) where none. Caption contrast (config `patch_relevance`):
        caption_ids (B, K, L) the text ids of the K captions of each row's video (-1 padding),
        caption_frames (B, K, T) the 0/1 frames each caption's event covers (IGNORE_FRAME where
        none).
        """
        self._check_inputs(input_ids, token_types, attention_mask, past_key_values, pixel_values,
                           visual_embeds, frame_labels, caption_ids, caption_frames, patches)
        key_valid_BK, valid_BN, position_ids = self._masks(input_ids, attention_mask, position_ids,
                                                           past_key_values)
        # frames -> vision -> compression -> projector; every token by its type's encoder
        patches_MPV = patches
        if pixel_values is not None:
            patches_MPV = self.encode_patches(pixel_values)
        if patches_MPV is not None:
            visual_embeds = self.project_patches(patches_MPV)
        x_BND = self.embed_tokens(input_ids, token_types, visual_embeds)
        # evidence tokens (D2VLM): frame-level video tokens, pooled into the `<evi>` inputs
        x_BND, frames_BTD, frame_mask_BT = self._evidence_inputs(
            x_BND, input_ids, token_types, valid_BN, visual_embeds, evidence_frames,
            evidence_embeds)
        # (token sampling) GroundVTS: K = ceil(rho N) visual tokens per video go on, re-weighted,
        # at their original position ids; the dropped ones leave the sequence
        sampled = None
        if self.token_sampler is not None and bool((token_types == TokenType.VISUAL).any()):
            sampled = self.token_sampler(x_BND, token_types, valid_BN, position_ids)
            x_BND, valid_BN = sampled.x_BND, sampled.valid_BN
            position_ids = sampled.position_ids_BN
            input_ids, token_types = sampled.take(input_ids), sampled.take(token_types)
            labels, key_valid_BK = None if labels is None else sampled.take(labels), valid_BN
        # decoder -> heads
        out = self.run_decoder(x_BND, token_types, valid_BN, key_valid_BK, position_ids,
                               past_key_values, use_cache)
        if sampled is not None:
            out.attention_mask, out.position_ids = valid_BN.long(), position_ids
            out.token_density, out.kept_columns = sampled.density_M, sampled.gather_BN
        if frames_BTD is not None:
            self._ground_evidence(out, input_ids, token_types, valid_BN, frames_BTD,
                                  frame_mask_BT, evidence_frames)
        if self.frame_head is not None and bool((token_types == TokenType.VISUAL).any()):
            self._frame_relevance(out, input_ids, token_types, valid_BN, frame_labels,
                                  patches_MPV, caption_ids, caption_frames)
        self._heads(out, token_types, labels, return_logits)
        return out

    def _check_inputs(self, input_ids, token_types, attention_mask, past_key_values, pixel_values,
                      visual_embeds, frame_labels, caption_ids, caption_frames,
                      patches) -> None:
        """ValueError naming what is wrong with the arguments of `forward`."""
        cfg = self.config
        if input_ids.shape != token_types.shape or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids and token_types must both be (B, N), got {tuple(input_ids.shape)} "
                f"and {tuple(token_types.shape)}"
            )
        if token_types.numel() and (token_types.min() < 0 or token_types.max() >= NUM_TOKEN_TYPES):
            raise ValueError(f"token_types must be TokenType values 0..{NUM_TOKEN_TYPES - 1}")
        B, N = input_ids.shape
        L = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if L + N > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {L + N} tokens exceeds the context of {cfg.max_position_embeddings}"
            )
        if attention_mask is not None and attention_mask.shape != (B, L + N):
            raise ValueError(
                f"attention_mask must be (B, past + N) = ({B}, {L + N}), got "
                f"{tuple(attention_mask.shape)}"
            )
        if sum(x is not None for x in (pixel_values, patches, visual_embeds)) > 1:
            raise ValueError("pass one of pixel_values, patches or visual_embeds")
        if patches is not None and (patches.ndim != 3 or patches.shape[-1] != cfg.vision_width):
            raise ValueError(f"patches must be (M, P, {cfg.vision_width}) vision-tower tokens "
                             f"(encode_patches), got {tuple(patches.shape)}")
        if (self.token_sampler is not None and past_key_values is not None
                and bool((token_types == TokenType.VISUAL).any())):
            raise ValueError("token sampling needs the frames and the query in the first call")
        if frame_labels is not None and self.frame_head is None:
            raise ValueError("frame_labels given, but the model has no frame relevance head "
                             "(config frame_relevance=False)")
        if self.patch_score is not None and visual_embeds is not None:
            raise ValueError("a patch_relevance model scores the query against the frames' "
                             "patches: pass pixel_values, not visual_embeds")
        if (caption_ids is None) != (caption_frames is None):
            raise ValueError("pass caption_ids and caption_frames together")
        if caption_ids is not None and self.patch_score is None:
            raise ValueError("caption_ids given, but the model has no patch score "
                             "(config patch_relevance=False)")
        if caption_ids is not None and caption_ids.shape != caption_frames.shape[:2] + (
                caption_ids.shape[-1],):
            raise ValueError(f"caption_ids (B, K, L) and caption_frames (B, K, T) disagree on "
                             f"B, K: {tuple(caption_ids.shape)} and {tuple(caption_frames.shape)}")

    def _masks(self, input_ids_BN, attention_mask_BK, position_ids_BN, past_key_values):
        """(key_valid_BK, valid_BN, position_ids_BN): the real keys over the cache and the new
        tokens, the real new tokens, and their positions (by default the real tokens before)."""
        L = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask_BK is None:
            B, N = input_ids_BN.shape
            attention_mask_BK = torch.ones(B, L + N, dtype=torch.long, device=input_ids_BN.device)
        key_valid_BK = attention_mask_BK.bool()
        if position_ids_BN is None:
            position_ids_BN = (attention_mask_BK.long().cumsum(-1) - 1).clamp_min(0)[:, L:]
        return key_valid_BK, key_valid_BK[:, L:], position_ids_BN

    def _evidence_inputs(self, x_BND, input_ids_BN, types_BN, valid_BN, visual_MSD,
                         evidence_frames_BKT, evidence_embeds_BND):
        """D2VLM on the inputs: (x_BND, frames_BTD, frame_mask_BT); the frame-level video
        tokens (None without the evidence head or frames); under teacher forcing the k-th event's
        frames pooled into the k-th `<evi>` of each stage; `evidence_embeds` added."""
        frames_BTD = frame_mask_BT = None
        if self.evidence_head is not None and visual_MSD is not None:
            frames_BTD, frame_mask_BT = frame_features(visual_MSD, types_BN, valid_BN,
                                                       self.config.tokens_per_frame)
            if evidence_frames_BKT is not None and self.evidence_head.config.aggregate:
                x_BND = self._pool_evidence_frames(x_BND, input_ids_BN, types_BN, valid_BN,
                                                   frames_BTD, evidence_frames_BKT)
        if evidence_embeds_BND is not None:
            x_BND = x_BND + evidence_embeds_BND.to(x_BND.dtype)
        return x_BND, frames_BTD, frame_mask_BT

    def _pool_evidence_frames(self, x_BND, input_ids_BN, types_BN, valid_BN, frames_BTD,
                              evidence_frames_BKT) -> torch.Tensor:
        """Teacher forcing (D2VLM): the k-th event's frames, pooled, added to the input of the
        k-th `<evi>` of each stage."""
        cfg = self.config
        sites = find_evidence(input_ids_BN, types_BN, valid_BN, cfg.evidence_token_id,
                              cfg.evidence_end_token_id)
        target_ET = site_targets(sites, evidence_frames_BKT, frames_BTD.shape[1])
        pooled_ED = aggregate_frames(frames_BTD[sites.row_E], target_ET)
        return x_BND.index_put((sites.row_E, sites.pos_E), pooled_ED.to(x_BND.dtype),
                               accumulate=True)

    def run_decoder(self, x_BND, types_BN, valid_BN, key_valid_BK, position_ids_BN,
                    past_key_values, use_cache: bool = False) -> TimeExpertOutput:
        """The decoder blocks over embedded tokens: the final hidden states, the router losses
        summed over layers and (with `use_cache`) the new KV cache. Causal mask over the cache +
        new tokens (with `bidirectional_frames`, the new visual tokens see each other); a token
        always sees itself (a padding row never has an empty softmax)."""
        cfg = self.config
        L = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        N = x_BND.shape[1]
        q_pos_N = torch.arange(L, L + N, device=x_BND.device)
        k_pos_K = torch.arange(L + N, device=x_BND.device)
        causal_NK = k_pos_K[None, :] <= q_pos_N[:, None]
        mask_BNK = causal_NK & key_valid_BK[:, None, :]
        if cfg.bidirectional_frames:  # the new call's visual tokens see each other
            vis_BN = (types_BN == TokenType.VISUAL) & valid_BN
            mask_BNK[:, :, L:] |= vis_BN[:, :, None] & vis_BN[:, None, :]
        mask_B1NK = (mask_BNK | (k_pos_K[None, :] == q_pos_N[:, None]))[:, None]
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cos, sin = rotary_cos_sin(position_ids_BN, head_dim, cfg.rope_theta, x_BND.dtype)
        aux = z = x_BND.new_zeros(())
        new_cache = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            x_BND, kv, losses = layer(x_BND, types_BN, valid_BN, cos, sin, mask_B1NK, past)
            aux, z = aux + losses.aux, z + losses.z
            new_cache.append(kv)
        return TimeExpertOutput(aux_loss=aux, z_loss=z, hidden_states=self.norm(x_BND),
                                past_key_values=new_cache if use_cache else None)

    def _ground_evidence(self, out, input_ids_BN, types_BN, valid_BN, frames_BTD, frame_mask_BT,
                         evidence_frames_BKT) -> None:
        """D2VLM: every `<evi>` grounded over the frames (out.evidence_probs), and with targets
        L_gnd and L_cons."""
        cfg = self.config
        out.frame_features, out.frame_mask = frames_BTD, frame_mask_BT
        sites = find_evidence(input_ids_BN, types_BN, valid_BN, cfg.evidence_token_id,
                              cfg.evidence_end_token_id)
        prob_ET, mask_ET, target_ET = evidence_terms(
            self.evidence_head, out.hidden_states, sites, frames_BTD, frame_mask_BT,
            evidence_frames_BKT
        )
        out.evidence_probs = prob_ET
        if target_ET is not None:
            out.loss_grounding = grounding_loss(prob_ET, target_ET, mask_ET)
            out.loss_consistency = consistency_loss(prob_ET, sites, mask_ET)

    def _frame_relevance(self, out, input_ids_BN, types_BN, valid_BN, frame_labels_BT,
                         patches_MPV, caption_ids_BKL, caption_frames_BKT) -> None:
        """Query-conditioned frame relevance from the decoder's frame states (after the query,
        not the vision features), plus (`patch_relevance`) the query's match among each frame's
        patches: out.frame_logits, and with targets the per-frame BCE and the caption contrast."""
        h_BND = out.hidden_states
        states_BTD, frame_mask_BT = pool_frames(h_BND, types_BN, valid_BN,
                                                self.config.tokens_per_frame)
        out.frame_logits = self.frame_head(states_BTD, pool_query(h_BND, types_BN, valid_BN))
        out.frame_mask = frame_mask_BT
        if self.patch_score is not None:
            patches_BTPV = patches_MPV.new_zeros(*frame_mask_BT.shape, *patches_MPV.shape[1:])
            patches_BTPV[frame_mask_BT] = patches_MPV
            is_query_BN = (types_BN == TokenType.QUERY) & valid_BN
            words_BND = self.text_embed(input_ids_BN.masked_fill(~is_query_BN, 0))
            query_BR = self.patch_score.embed_text(words_BND, is_query_BN)
            out.frame_logits = out.frame_logits + self.patch_score(query_BR, patches_BTPV)
            if caption_ids_BKL is not None:
                captions_BKR = self.embed_captions(caption_ids_BKL.to(h_BND.device))
                T = frame_mask_BT.shape[1]
                targets_BKT = caption_frames_BKT.to(h_BND.device)[..., :T].masked_fill(
                    ~frame_mask_BT[:, None, :], IGNORE_FRAME)
                out.loss_captions = caption_contrast_loss(
                    self.patch_score.captions(captions_BKR, patches_BTPV),
                    targets_BKT)
        if frame_labels_BT is not None:
            labels_BT = frame_labels_BT.to(h_BND.device)
            if labels_BT.shape[1] < frame_mask_BT.shape[1]:
                raise ValueError(f"frame_labels cover {labels_BT.shape[1]} frames, the batch "
                                 f"has {frame_mask_BT.shape[1]}")
            labels_BT = labels_BT[:, : frame_mask_BT.shape[1]].masked_fill(~frame_mask_BT,
                                                                           IGNORE_FRAME)
            out.loss_frames = relevance_loss(out.frame_logits, labels_BT)

    def _heads(self, out, types_BN, labels_BN, return_logits: bool) -> None:
        """The three heads' logits (with `return_logits`) and, with labels, their losses and the
        combined loss."""
        h_BND = out.hidden_states
        if return_logits:
            out.time_logits = self.time_head(h_BND)
            out.score_logits = self.score_head(h_BND)
            out.text_logits = self.lm_head(h_BND)
        if labels_BN is not None:
            out.loss_time, out.loss_score, out.loss_text = self._head_losses(h_BND, types_BN,
                                                                             labels_BN)
            out.loss = combine_losses(out, self.config)

    def _head_losses(self, h_BND, types_BN, labels_BN):
        """Cross-entropy per head: position n predicts token n+1 with the head of its type."""
        if labels_BN.shape != types_BN.shape:
            raise ValueError(f"labels must be (B, N) like input_ids, got {tuple(labels_BN.shape)}")
        h_BND, target_BN, target_type_BN = h_BND[:, :-1], labels_BN[:, 1:], types_BN[:, 1:]
        losses = []
        for head, kind in (
            (self.time_head, TokenType.TIME),
            (self.score_head, TokenType.SCORE),
            (self.lm_head, TokenType.TEXT),
        ):
            sel_BN = (target_BN != IGNORE_INDEX) & (target_type_BN == kind)
            if sel_BN.any():
                losses.append(F.cross_entropy(head(h_BND[sel_BN]), target_BN[sel_BN]))
            else:
                losses.append(h_BND.sum() * 0.0)  # no target of this head in the batch
        return tuple(losses)

    # --- routing (TimeExpert sec. 3.3) ---------------------------------------------------------

    def update_experts(self) -> list[ExpertUpdate]:
        """Token-adaptive routing step of every MoE layer (add / prune experts)."""
        return [layer.ffn.update_experts() for layer in self.layers]

    def routing_telemetry(self) -> list[dict]:
        return [layer.ffn.telemetry() for layer in self.layers]

    def reset_routing_telemetry(self) -> None:
        for layer in self.layers:
            layer.ffn.reset_telemetry()

    # --- checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint that does not match: a config
        given here that differs from the checkpoint's in an architecture field, or missing,
        unexpected or mis-shaped weights -> ValueError naming them. A checkpoint written by
        expert-parallel ranks (its experts in per-rank shard files) is read whole."""
        path = str(pretrained_model_name_or_path)
        config = kwargs.get("config")
        check_checkpoint_config(path, config)
        want_info = kwargs.pop("output_loading_info", False)
        source = path
        if expert_shards(path):  # the shards stitched into the EP=1 state dict
            kwargs.update(config=config if isinstance(config, TimeExpertConfig)
                          else TimeExpertConfig.from_pretrained(path), state_dict=load_weights(path))
            source = None
        try:
            model, info = super().from_pretrained(source, *args, output_loading_info=True, **kwargs)
        except RuntimeError as err:  # size mismatches surface here
            raise ValueError(f"checkpoint {path!r} does not match its config: {err}") from err
        problems = {
            k: sorted(v)
            for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if problems:
            raise ValueError(f"checkpoint {path!r} does not match the model: {problems}")
        return (model, info) if want_info else model


AutoModel.register(TimeExpertConfig, TimeExpertForGrounding, exist_ok=True)
AutoProcessor.register(TimeExpertConfig, TimeExpertProcessor, exist_ok=True)


# --- a fresh model with its pretrained parts ----------------------------------------------------


def create_model(config: TimeExpertConfig, ep_group=None) -> TimeExpertForGrounding:
    """A new model: random init, then the SigLIP weights from `config.vision_path` and the dense
    decoder from `config.upcycle_from` (sparse upcycling) when those are given."""
    model = TimeExpertForGrounding(config, ep_group=ep_group)
    if config.vision_encoder == "siglip" and config.vision_path:
        model.frame_encoder.load_pretrained(config.vision_path)
    if config.upcycle_from:
        upcycle_decoder(model, config.upcycle_from, noise_std=config.upcycle_noise_std)
    return model
