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
import posixpath
import random
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from timeexpert import devices, storage
from timeexpert.checkpoints import read_config
from timeexpert.data.pipeline import build_dataset, decode_rows, row_options
from timeexpert.data.preference import make_pairs
from timeexpert.events import IGNORE_INDEX, TokenType
from timeexpert.inference import GroundingModel
from timeexpert.models.evidence import (encode_evidence_example, find_evidence,
                                        interval_log_prob, pad_targets, site_targets)
from timeexpert.models.configuration_timeexpert import TimeExpertConfig
from timeexpert.models.tokenizer import collate
from timeexpert.tracking import StepLogger
from timeexpert.train import checkpoint as ckpt
from timeexpert.train import parallel
from timeexpert.train.batches import answer_events, data_config
from timeexpert.train.config import TrainConfig
from timeexpert.train.fit import torch_trainer
from timeexpert.train.recipes import set_trainable
from timeexpert.train.telemetry import worker_logging

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


# --- FPO as a pipeline stage (a Ray Train run) ---------------------------------------------------


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


def rank_pairs(rows: list[dict[str, Any]], cfg, mconfig, tokenizer, model, *, rank: int,
               world_size: int) -> Iterator[tuple[dict, dict, torch.Tensor]]:
    """Endless (chosen, rejected, pixel_values) of this rank's share of the train rows: the rows,
    in order, cut into batches of `cfg.batch_size` (the last one may be short), batch n going to
    rank n % world_size and decoded once, here. Every epoch a batch gives the same pairs
    (`encode_pairs` seeded by cfg.seed + n, whichever the world size); a batch without any pair
    is passed over."""
    data = data_config(cfg, mconfig)
    starts = range(rank * cfg.batch_size, len(rows), world_size * cfg.batch_size)
    mine = [(start // cfg.batch_size, decode_rows(rows[start: start + cfg.batch_size], data))
            for start in starts]
    if not mine:
        raise ValueError(f"{len(rows)} train records under {cfg.data_root!r} make fewer than "
                         f"{world_size} batches of {cfg.batch_size}, one per FPO worker; use a "
                         "smaller batch_size or fewer workers")
    while True:
        pairs = 0
        for n, batch in mine:
            batch_rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))]
            encoded = encode_pairs(batch_rows, tokenizer, mconfig, model, seed=cfg.seed + n)
            if encoded is not None:
                pairs += 1
                yield encoded
        if not pairs:
            raise ValueError(f"worker {rank}: none of its {len(mine)} batches of train records "
                             f"under {cfg.data_root!r} gives a preference pair "
                             "(data.preference.make_pairs); use fewer workers or more data")


def fpo_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of FPO: build, shard, loop, report.
    `config`: {"train": TrainConfig dict, "checkpoint_uri": the policy to start from, "rows": the
    train split's pipeline rows in order, "mlflow_run_id": rank 0's MLflow run,
    "checkpoint_dir_name": where Ray Train persists the result under the run's folder}."""
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # this worker's GPU, or the CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    worker_logging()
    torch.manual_seed(cfg.seed)
    groups = parallel.init_groups(1, device)  # plain data parallel: every rank holds every expert
    # build: the policy, its frozen copy (the reference), what stage 3 trains, AdamW
    gm = GroundingModel.load(config["checkpoint_uri"], device=str(device))
    policy, tokenizer, mconfig = gm.model.eval(), gm.tokenizer, gm.model.config
    reference = copy.deepcopy(policy).requires_grad_(False)
    set_trainable(policy, 3, cfg.recipe)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fpo = FPOConfig(beta=cfg.fpo_beta)
    # shard: this rank's batches of the train rows
    batches = rank_pairs(config["rows"], cfg, mconfig, tokenizer, policy, rank=rank,
                         world_size=world_size)
    logger = StepLogger(cfg.tracking_uri, config["mlflow_run_id"]) if rank == 0 else None
    # loop: the objective is the mean over ranks of each rank's mean loss over its pairs
    metrics: dict[str, float] = {}
    first_margin = 0.0
    for step in range(1, cfg.fpo_steps + 1):
        chosen, rejected, pixel_values = next(batches)
        chosen, rejected = devices.to_device(chosen, device), devices.to_device(rejected, device)
        with devices.autocast(device, cfg.precision):
            loss, metrics = fpo_step(policy, reference, chosen, rejected,
                                     pixel_values.to(device), fpo)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        parallel.sync_gradients(named, groups)  # averaged over ranks (none to average on one)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        if world_size > 1:  # the step's metrics over all ranks' pairs: mean of the ranks' means
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(values)
            metrics = {k: float(v) / world_size for k, v in zip(keys, values)}
        if step == 1:  # policy == reference: 0 up to rounding
            first_margin = metrics["reward_margin"]
        metrics = {f"fpo/{k}": v for k, v in metrics.items()}
        if logger is not None and (step % cfg.log_every == 0 or step == cfg.fpo_steps):
            log.info(f"[fpo] step {step}/{cfg.fpo_steps} loss {metrics['fpo/fpo_loss']:.4f} "
                     f"margin {metrics['fpo/reward_margin']:.3f} acc "
                     f"{metrics['fpo/reward_accuracy']:.2f}")
            logger.log(metrics, step)
    # report: rank 0's model directory is the run's one checkpoint
    result = {**metrics, "fpo/first_margin": first_margin, "step": cfg.fpo_steps}
    with tempfile.TemporaryDirectory(prefix="te-fpo-") as d:
        checkpoint = None
        if logger is not None:
            logger.close()
            gm.save(d)
            with open(os.path.join(d, ckpt.TRAIN_STATE), "w") as f:
                json.dump({"state": {"stage": "fpo", "step": cfg.fpo_steps},
                           "config": cfg.to_dict()}, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(  # rank 0 alone writes the checkpoint: it commits it as a world of one
            result, checkpoint=checkpoint, checkpoint_dir_name=config["checkpoint_dir_name"],
            checkpoint_upload_fn=lambda c, name: ckpt.upload(
                c, name, rank=0, world_size=1, budget_s=cfg.storage_wait_s)[0])


def run_location(output_uri: str) -> tuple[str, str, str]:
    """Ray Train's (storage path, run name, checkpoint folder) for a run that persists its
    checkpoint at `output_uri`: the URI's grandparent, parent and last part. The pipeline's
    `{storage root}/{name}-fpo/checkpoint` is the run `{name}-fpo` under the storage root, as a
    stage's run is."""
    scheme, _ = storage.split_scheme(output_uri)
    path = storage.filesystem(output_uri)[1].rstrip("/")  # absolute, or bucket/key on S3
    parent, folder = posixpath.split(path)
    root, name = posixpath.split(parent)
    if not (root and name and folder):
        raise ValueError(f"output_uri must be <storage path>/<run name>/<folder> (an s3 bucket "
                         f"counts as the storage path), got {output_uri!r}")
    return (f"s3://{root}" if scheme == "s3" else root), name, folder


def train_fpo(checkpoint_uri: str, cfg, *, output_uri: str, mlflow_run_id: str = "") -> dict[str, float]:
    """`cfg.fpo_steps` FPO steps from the checkpoint at `checkpoint_uri` against a frozen copy of
    it (the reference policy), on pairs made from `cfg.data_root`'s train split; writes a loadable
    checkpoint (the model, its tokenizer, train_state.json of stage "fpo") to `output_uri` and
    returns the last step's metrics (+ "fpo/first_margin", "step").

    A Ray Train run on the connected cluster, as a stage's (`train.fit.fit`): `cfg.num_workers`
    workers (gloo on CPU, NCCL with `cfg.use_gpu`), each with the whole policy and reference on
    its device. Plain data parallel, no expert parallelism: `cfg.ep_size` is ignored (a warning).
    The train rows are cut in order into batches of `cfg.batch_size`, batch n going to rank
    n % num_workers (`rank_pairs`): a step takes one batch per rank, so num_workers x batch_size
    records (each giving at most one pair), and its gradient, averaged over the ranks
    (`parallel.sync_gradients`), is that of the mean over ranks of each rank's mean loss; the
    metrics are the ranks' mean. One worker takes the batches as the single-process FPO did,
    with the same pairs. Trains what the recipe's stage 3 trains (all but the vision encoder).
    Policy and reference both run in eval mode (deterministic top-K token sampling, no
    routing-rate updates), so at step 1 they agree and the margin starts at 0. Rank 0 logs the
    metrics to `mlflow_run_id` and reports its model directory as the run's one checkpoint,
    which Ray Train persists at `output_uri` (`run_location`); no optimizer state is kept, and a
    restarted worker group (`cfg.max_failures`) starts FPO afresh."""
    if cfg.ep_size > 1:
        warnings.warn(f"FPO ignores ep_size={cfg.ep_size}: it runs plain data parallel, every "
                      "worker holding the whole model", stacklevel=2)
    storage_path, name, folder = run_location(output_uri)
    mconfig = TimeExpertConfig.from_dict(read_config(checkpoint_uri))  # its frames and size
    dataset = build_dataset(data_config(cfg, mconfig), split="train", shuffle=False,
                            preserve_order=True)  # its rows, decoded by the workers
    trainer = torch_trainer(
        fpo_loop_per_worker,
        {"train": cfg.to_dict(), "checkpoint_uri": checkpoint_uri, "rows": dataset.rows,
         "mlflow_run_id": mlflow_run_id, "checkpoint_dir_name": folder},
        cfg, name=name, storage_path=storage_path,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"FPO finished without a checkpoint: {result.error}")
    return dict(result.metrics)
