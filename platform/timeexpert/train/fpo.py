"""Factorized preference optimization (D2VLM sec. 5, eq. 6-8): DPO with a grounding term.

    L_FPO = -log sigmoid( beta [ (log pi(R) - log pi_ref(R)) - (log pi(R_bar) - log pi_ref(R_bar)) ] )

where log pi(R) is the response's token log-likelihood (each token under its own head: text,
time or score) plus, for every `<evi>` token, the log-probability of its interval under the
per-frame grounding probabilities p_t (eq. 6-7):

    log P(interval | <evi>) = sum_{t in interval} log p_t + sum_{t not in interval} log(1 - p_t)

The chosen (R) and the rejected (R_bar) responses are encoded with
`timeexpert.models.evidence.encode_evidence_example`, each with the frames of its own events
(`evidence_frames`), so a temporal perturbation changes the grounding term and a textual one
the token term. Pairs come from `timeexpert.data.preference`.

Shape letters: B batch, N tokens, E `<evi>` tokens, T frames, U number vocab, V text vocab.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from timeexpert import devices, storage
from timeexpert.data.pipeline import build_dataset, row_options
from timeexpert.data.preference import make_pairs
from timeexpert.events import IGNORE_INDEX, TokenType
from timeexpert.inference import GroundingModel
from timeexpert.models.evidence import (encode_evidence_example, find_evidence,
                                        interval_log_prob, pad_targets, site_targets)
from timeexpert.models.tokenizer import collate
from timeexpert.tracking import StepLogger
from timeexpert.train.loop import answer_events, data_config
from timeexpert.train.recipes import set_trainable

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FPOConfig:
    """FPO objective."""

    beta: float = 0.1  # DPO inverse temperature
    grounding_weight: float = 1.0  # weight of the <evi> interval log-probability inside log pi

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.grounding_weight < 0:
            raise ValueError(f"grounding_weight must be >= 0, got {self.grounding_weight}")


def token_log_prob(out, labels_BN: torch.Tensor, types_BN: torch.Tensor) -> torch.Tensor:
    """Sum over the answer of log p(token n+1 | prefix) under the head of its type -> (B,).
    `labels_BN` / `types_BN` in the layout the decoder saw (as `out` reports when sampling)."""
    target_BN, kind_BN = labels_BN[:, 1:], types_BN[:, 1:]
    total_B = out.text_logits.new_zeros(labels_BN.shape[0], dtype=torch.float32)
    for logits, kind in ((out.time_logits, TokenType.TIME), (out.score_logits, TokenType.SCORE),
                         (out.text_logits, TokenType.TEXT)):
        sel_BN = (target_BN != IGNORE_INDEX) & (kind_BN == kind)
        logp_BNX = F.log_softmax(logits[:, :-1].float(), dim=-1)
        lp_BN = logp_BNX.gather(-1, target_BN.masked_fill(~sel_BN, 0)[..., None]).squeeze(-1)
        total_B = total_B + (lp_BN * sel_BN).sum(1)
    return total_B


def grounding_log_prob(out, batch: dict[str, torch.Tensor], config) -> torch.Tensor:
    """Sum over each row's `<evi>` tokens of log P(interval | <evi>) (D2VLM eq. 6-7) -> (B,)."""
    B = batch["input_ids"].shape[0]
    total_B = torch.zeros(B, dtype=torch.float32, device=batch["input_ids"].device)
    if out.evidence_probs is None or out.evidence_probs.shape[0] == 0:
        return total_B
    sites = find_evidence(batch["input_ids"], batch["token_types"], batch["attention_mask"].bool(),
                          config.evidence_token_id, config.evidence_end_token_id)
    T = out.evidence_probs.shape[1]
    target_ET = site_targets(sites, batch["evidence_frames"], T)
    lp_E = interval_log_prob(out.evidence_probs, target_ET, out.frame_mask[sites.row_E])
    return total_B.index_add(0, sites.row_E, lp_E.float())


def policy_log_prob(model, batch: dict[str, torch.Tensor], pixel_values: torch.Tensor,
                    fpo: FPOConfig) -> torch.Tensor:
    """log pi(R) of each row: token log-likelihood + grounding_weight x interval log-prob."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, pixel_values=pixel_values)
    labels, types = batch["labels"], batch["token_types"]
    if out.kept_columns is not None:  # token sampling compacted the sequence
        labels, types = torch.gather(labels, 1, out.kept_columns), torch.gather(types, 1, out.kept_columns)
    logp_B = token_log_prob(out, labels, types)
    if fpo.grounding_weight:
        logp_B = logp_B + fpo.grounding_weight * grounding_log_prob(out, batch, model.config)
    return logp_B


def fpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor,
             ref_chosen_B: torch.Tensor, ref_rejected_B: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta [(pi_c - ref_c) - (pi_r - ref_r)]), mean over pairs (DPO form)."""
    margin_B = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
    return -F.logsigmoid(beta * margin_B).mean()


def fpo_step(model, ref_model, chosen: dict[str, torch.Tensor], rejected: dict[str, torch.Tensor],
             pixel_values: torch.Tensor, fpo: FPOConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """FPO loss of a batch of pairs (the same videos in `chosen` and `rejected`); the reference
    policy runs without gradients. Returns (loss, metrics)."""
    pc = policy_log_prob(model, chosen, pixel_values, fpo)
    pr = policy_log_prob(model, rejected, pixel_values, fpo)
    with torch.no_grad():
        rc = policy_log_prob(ref_model, chosen, pixel_values, fpo)
        rr = policy_log_prob(ref_model, rejected, pixel_values, fpo)
    loss = fpo_loss(pc, pr, rc, rr, fpo.beta)
    margin = ((pc - rc) - (pr - rr)).detach()
    metrics = {"fpo_loss": float(loss.detach()), "reward_margin": float(margin.mean()),
               "reward_accuracy": float((margin > 0).float().mean())}
    return loss, metrics


# --- FPO as a pipeline stage (driver process) ---------------------------------------------------


def encode_pairs(rows: list[dict[str, Any]], tokenizer, config, model, *, seed: int):
    """Pipeline rows -> (chosen, rejected, pixel_values) of one preference pair per row, the
    factor cycling over `data.preference.make_pairs`'s applicable factors; rows without any
    applicable factor are left out (None when none is left). With evidence tokens on, each side
    is the D2VLM answer with its own `evidence_frames`."""
    rng = random.Random(seed)
    sides: dict[str, list] = {"chosen": [], "rejected": []}
    targets: dict[str, list] = {"chosen": [], "rejected": []}
    pixels = []
    for row in rows:
        events = answer_events(row, config.max_events)  # the SFT target is the chosen side
        duration = float(row["duration"])
        pairs = make_pairs(events, duration, seed=rng.randrange(1 << 30)) if events else []
        if not pairs:
            continue
        pair = rng.choice(pairs)
        mask = row["frame_mask"]
        times = row["timestamps"][mask].tolist()
        for side, evs in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            if config.evidence is not None:
                enc, target_KT = encode_evidence_example(
                    tokenizer, str(row["task"]), str(row["query"]), times, evs,
                    tokens_per_frame=config.tokens_per_frame, duration=duration,
                    max_length=config.max_position_embeddings, query_first=config.query_first,
                    options=row_options(row))
                targets[side].append(target_KT)
            else:
                enc = tokenizer.encode_example(str(row["task"]), str(row["query"]), times, evs,
                                               tokens_per_frame=config.tokens_per_frame,
                                               max_length=config.max_position_embeddings,
                                               query_first=config.query_first,
                                               options=row_options(row))
            sides[side].append(enc)
        pixels.append(model.preprocess_frames(row["frames"][mask]))
    if not pixels:
        return None
    batches = []
    for side in ("chosen", "rejected"):
        batch = collate(sides[side])
        if targets[side]:
            batch["evidence_frames"] = pad_targets(targets[side])
        batches.append(batch)
    return batches[0], batches[1], torch.cat(pixels)


def train_fpo(checkpoint_uri: str, cfg, *, output_uri: str, mlflow_run_id: str = "") -> dict[str, float]:
    """`cfg.fpo_steps` FPO steps from the checkpoint at `checkpoint_uri` against a frozen copy of
    it (the reference policy), on pairs made from `cfg.data_root`'s train split; writes a loadable
    checkpoint to `output_uri` and returns the last step's metrics (+ "fpo/first_margin").

    Runs in the calling process (the driver), not under Ray Train: one worker, no expert
    parallelism. Trains what the recipe's stage 3 trains (all but the vision encoder). Policy
    and reference both run in eval mode (deterministic top-K token sampling, no routing-rate
    updates), so at step 1 they agree and the margin starts at 0."""
    torch.manual_seed(cfg.seed)
    device = devices.default_device()
    gm = GroundingModel.load(checkpoint_uri, device=str(device))
    policy, tokenizer, config = gm.model.eval(), gm.tokenizer, gm.model.config
    reference = copy.deepcopy(policy).requires_grad_(False)
    set_trainable(policy, 3, cfg.recipe)
    params = [p for p in policy.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fpo = FPOConfig(beta=cfg.fpo_beta)
    dataset = build_dataset(data_config(cfg, config), split="train", shuffle=False, preserve_order=True)
    dataset.dataset.context.enable_progress_bars = False
    logger = StepLogger(cfg.tracking_uri, mlflow_run_id)

    def pair_batches():  # endless; the same pairs every epoch (seeded by batch position)
        while True:
            n = 0
            for batch in dataset.dataset.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
                rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))]
                encoded = encode_pairs(rows, tokenizer, config, policy, seed=cfg.seed + n)
                n += 1
                if encoded is not None:
                    yield encoded
            if n == 0:
                raise ValueError(f"no training rows under {cfg.data_root!r} for FPO")

    batches = pair_batches()
    metrics: dict[str, float] = {}
    first_margin = None
    for step in range(1, cfg.fpo_steps + 1):
        chosen, rejected, pixel_values = next(batches)
        chosen, rejected = devices.to_device(chosen, device), devices.to_device(rejected, device)
        with devices.autocast(device, cfg.precision):
            loss, metrics = fpo_step(policy, reference, chosen, rejected,
                                     pixel_values.to(device), fpo)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        first_margin = metrics["reward_margin"] if first_margin is None else first_margin
        metrics = {f"fpo/{k}": v for k, v in metrics.items()}
        if step % cfg.log_every == 0 or step == cfg.fpo_steps:
            log.info(f"[fpo] step {step}/{cfg.fpo_steps} loss {metrics['fpo/fpo_loss']:.4f} "
                     f"margin {metrics['fpo/reward_margin']:.3f} acc "
                     f"{metrics['fpo/reward_accuracy']:.2f}")
            logger.log(metrics, step)
    logger.close()
    with tempfile.TemporaryDirectory(prefix="te-fpo-") as d:
        gm.save(d)
        with open(os.path.join(d, "train_state.json"), "w") as f:
            json.dump({"state": {"stage": "fpo", "step": cfg.fpo_steps}, "config": cfg.to_dict()}, f)
        storage.upload_dir(d, output_uri)
    return {**metrics, "fpo/first_margin": float(first_margin or 0.0), "step": cfg.fpo_steps}
