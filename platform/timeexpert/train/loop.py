"""The per-worker training loop: `train_loop_per_worker(config)` under Ray Train's TorchTrainer.

Per worker: build (tokenizer, model config, weights from the last checkpoint / the previous stage
/ fresh), shard (this rank's expert slice, optimizers: `parallel.py`), loop (batches of rows ->
tokens -> forward -> stage loss -> backward -> synced step -> token-adaptive add/prune), report
(progress line, MLflow step metrics from rank 0, checkpoints through `ray.train.report`).
With `TrainConfig.decode_once` each worker decodes its part of the training videos once, before
its first step, and draws every epoch from them; else Ray Data streams decoded frames each epoch.

Where the data changes form, around this loop: pipeline rows -> batches -> model inputs in
`train.batches`; where the time goes, the profiler trace, the progress line and the metrics
reduced over the ranks in `train.telemetry`; the driver's TorchTrainer run of this loop
(`fit`) in `train.fit`. What each stage trains and which loss it counts: `train.recipes`
(`TrainConfig.recipe`). With D2VLM evidence tokens on, batches carry `evidence_frames`; with
frame relevance, `frame_labels`; their losses join every stage's.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from timeexpert import devices
from timeexpert.checkpoints import local_copy, resumable
from timeexpert.models.expert_parallel import load_weights
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset
from timeexpert.tracking import StepLogger
from timeexpert.train import checkpoint as ckpt
from timeexpert.train import parallel
from timeexpert.train.batches import (data_config, decode_part, draws_segments, tokenize_batch,
                                      worker_batches)
from timeexpert.train.config import TrainConfig
from timeexpert.train.recipes import apply_lora, set_stage_trainable, stage_loss, stage_spec
from timeexpert.train.telemetry import (
    VAL_METRIC,
    StepTimes,
    accumulate_routing,
    progress_line,
    reduce_window,
    routing_metrics,
    routing_telemetry,
    save_profile,
    start_profiler,
    time_line,
    worker_logging,
)
from timeexpert.train.validation import ValidationProbe

log = logging.getLogger(__name__)


# --- build helpers (the driver builds the same model config) -----------------------------------


def model_config(cfg: TrainConfig, tokenizer):
    """The preset's TimeExpertConfig with the run's MoE / model overrides and the tokenizer's ids."""
    config = get_preset(cfg.preset).model
    for key, value in cfg.model_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model_overrides: {cfg.preset!r} config has no field {key!r}")
        setattr(config, key, value)
    if cfg.moe:
        moe = dict(config.moe or {})
        moe.update(cfg.moe)
        config.moe = moe
        config.moe_config()  # validates
    return config.with_tokenizer(tokenizer)


def load_tokenizer(uri: str):
    with local_copy(uri) as d:
        return GroundingTokenizer.from_pretrained(d)


def merged_lora_state(model, state: dict) -> dict:
    """A state dict with every LoRA-wrapped layer folded back into its plain weight
    (W + scale B A), so the checkpoint loads into a model without adapters."""
    out = {}
    for name, value in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            prefix, _, leaf = name.partition(".base_layer.")
            if leaf == "weight":
                value = value + model.get_submodule(prefix).get_delta_weight("default").detach()
            name = f"{prefix}.{leaf}"
        out[name] = value
    return out


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class Start:
    """Where a worker's stage starts."""

    weights: dict[str, Any] | None  # this rank's shard of the weights (None: fresh weights)
    state: dict[str, Any]  # stage, step, data position (epoch, batch in epoch), samples, restores
    routing: dict[str, Any]  # routing telemetry of the stage so far (a resumed run's)
    optim_state: dict[str, Any] | None = None  # the optimizers' state (resumed run,
    # `checkpoint.read_optimizer_state`)
    resumed: bool = False  # a restarted worker group, from the run's last checkpoint


@dataclass
class Worker:
    """What one worker built: its place, its data, its model shard and optimizers."""

    cfg: TrainConfig
    groups: parallel.ParallelGroups  # rank, EP / expert-DP groups, compute device
    tokenizer: Any
    mconfig: Any  # the model's TimeExpertConfig
    model: Any  # this rank's TimeExpertForGrounding (its expert slots only)
    optim: parallel.Optimizers
    spec: Any  # the stage's StageSpec
    logger: StepLogger | None  # rank 0 only
    data_stats: dict[str, float] = field(default_factory=dict)  # decode_s: this rank's decode
    storage_wait_s: float = 0.0  # this rank's checkpoint writes' wait for storage so far
    probe: ValidationProbe | None = None  # the validation queries of `val_every`
    val_score: float | None = None  # their last score


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, shard, loop, report.
    `config`: {"train": TrainConfig dict, "tokenizer_uri": str; for a decode-once run "rows":
    the pipeline rows of each rank, which the rank decodes itself, and "skip_counter": the
    pipeline's skip counter (else the rank reads Ray Train's "train" dataset shard)}."""
    cfg = TrainConfig.from_dict(config["train"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()  # this worker's GPU, or the CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed use the current device
    worker_logging()
    torch.manual_seed(cfg.seed)
    groups = parallel.init_groups(cfg.ep_size, device)
    # build: the tokenizer, the model config, where the stage starts
    tokenizer = load_tokenizer(config["tokenizer_uri"])
    mconfig = model_config(cfg, tokenizer)
    start = _start(cfg, groups)
    stats: dict[str, float] = {}
    source = (decode_part(config, cfg, mconfig, rank, stats) if "rows" in config
              else ray.train.get_dataset_shard("train"))
    segments = mconfig.num_frames if draws_segments(cfg) else 0
    batches = _prefetch_first(worker_batches(source, cfg, start.state["epoch"],
                                             start.state["batch_in_epoch"], rank, segments))
    # shard: this rank's expert slots on its device, the stage's trainable set, the optimizers
    model, optim, spec = _shard(cfg, mconfig, groups, start)
    logger = StepLogger(cfg.tracking_uri, cfg.mlflow_run_id) if rank == 0 else None
    probe = (ValidationProbe.build(data_config(cfg, mconfig), cfg.eval_split, cfg.val_records)
             if cfg.val_every else None)
    worker = Worker(cfg=cfg, groups=groups, tokenizer=tokenizer, mconfig=mconfig, model=model,
                    optim=optim, spec=spec, logger=logger, data_stats=stats, probe=probe)
    if rank == 0:
        log.info(_start_line(worker, start))
    # loop and report
    timer = _loop(worker, batches, start)
    if logger is not None:  # rank 0: the stage's breakdown, one line and MLflow
        total = timer.summary()
        log.info(time_line(cfg, total))
        logger.log(total, cfg.num_steps)
        logger.close()


def _start(cfg: TrainConfig, groups: parallel.ParallelGroups) -> Start:
    """The run's last checkpoint (a restarted worker group), else `init_from`'s weights, else
    fresh ones. Of a checkpoint's experts only this rank's slice is read."""
    state = {"stage": cfg.stage, "step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # Ray Train registers a checkpoint once every rank committed its part; a complete one is
        # checked again here, and one damaged since gives way to the run's previous complete one
        with local_copy(resumable(ckpt.checkpoint_uri(restored))) as d:
            train_state = ckpt.read_train_state(d)
            start = Start(weights=load_weights(d, groups.ep_rank, groups.ep_size),
                          state=train_state["state"], routing=ckpt.read_routing(d),
                          optim_state=ckpt.read_optimizer_state(
                              d, groups.rank, _layout(cfg, groups)),
                          resumed=True)
        start.state["restores"] = start.state.get("restores", 0) + 1
        start.state["resumed_at"] = start.state.get("resumed_at", []) + [start.state["step"]]
        written = train_state.get("layout") or _layout(cfg, groups)
        other = ""
        if written != _layout(cfg, groups):  # samples are counted per rank: keep the run's total
            start.state["samples"] = (start.state["samples"] * written["world_size"]
                                      // groups.world_size)
            other = (f"; written by {written['world_size']} workers at EP {written['ep_size']}, "
                     "optimizer state resharded")
        log.info(f"[rank {groups.rank}] resumed from checkpoint at step {start.state['step']} "
                 f"(data position: epoch {start.state['epoch']}, batch "
                 f"{start.state['batch_in_epoch']}{other})")
        return start
    if cfg.init_from:
        with local_copy(cfg.init_from) as d:
            return Start(weights=load_weights(d, groups.ep_rank, groups.ep_size),
                         state=state, routing={})
    return Start(weights=None, state=state, routing={})


def _layout(cfg: TrainConfig, groups: parallel.ParallelGroups) -> dict[str, int]:
    return ckpt.layout(groups.world_size, groups.ep_size, cfg.zero_stage)


def _prefetch_first(batches: Iterator) -> Iterator:
    """`batches`, its first item fetched in a thread from now on: the shard's split and iterator
    starting up (a second or two) overlap the model and optimizer build."""
    pool = ThreadPoolExecutor(max_workers=1)
    first = pool.submit(next, batches)
    pool.shutdown(wait=False)

    def chained():
        yield first.result()
        yield from batches

    return chained()


def _shard(cfg: TrainConfig, mconfig, groups: parallel.ParallelGroups, start: Start):
    """This rank's model on its device, built on the meta device with only its expert slots
    materialised (`parallel.materialize` / `fresh_model`), the stage's trainable parameters (and
    LoRA adapters), and the optimizers with a resumed run's state."""
    if start.weights is None:
        model = parallel.fresh_model(mconfig, groups)  # seeded: identical on every rank
    else:
        model = parallel.materialize(TimeExpertForGrounding, mconfig, groups, start.weights)
        start.weights = None  # the model holds them now
    model.train()
    spec = stage_spec(cfg.recipe, cfg.stage, vision_pretrained=bool(mconfig.vision_path))
    if spec.lora:  # adapters start at B = 0: the model's function is unchanged
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    set_stage_trainable(model, spec)
    optim = parallel.Optimizers(model, groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                grad_clip=cfg.grad_clip, zero_stage=cfg.zero_stage,
                                batch_size=cfg.batch_size)
    if start.optim_state is not None:
        optim.load_state_dict(start.optim_state)
    return model, optim, spec


def _start_line(w: Worker, start: Start) -> str:
    cfg, spec = w.cfg, w.spec
    n_train = sum(p.numel() for p in w.model.parameters() if p.requires_grad)
    n_expert = sum(p.numel() for n, p in w.model.named_parameters() if parallel.is_expert_param(n))
    return (f"[stage {cfg.stage}: {cfg.recipe} {spec.name}{' +LoRA' if spec.lora else ''}] "
            f"{cfg.num_workers} workers, EP={cfg.ep_size}, ZeRO-{cfg.zero_stage}, "
            f"{w.groups.device}, {devices.compute_dtype(w.groups.device, cfg.precision)}, "
            f"{torch.get_num_threads()} torch threads per worker, {n_train} trainable "
            f"parameters on rank 0 ({n_expert} in its expert slots), "
            f"steps {start.state['step'] + 1}..{cfg.num_steps}")


@dataclass
class StepResult:
    out: Any  # the model's TimeExpertOutput
    loss: torch.Tensor
    lr: float
    grad_norm: torch.Tensor
    tokens: int  # real (unpadded) tokens of the batch
    added: int = 0  # experts added by token-adaptive routing at this step
    pruned: int = 0


def _loop(w: Worker, batches: Iterator, start: Start) -> StepTimes:
    """A step per batch; a report every `log_every` steps, a checkpoint every
    `checkpoint_every` and at the last step. Returns rank's step times."""
    cfg, state, rank = w.cfg, start.state, w.groups.rank
    window: dict[str, Any] = {}  # sums over the window; tensors until the report (no host sync)
    timer = StepTimes()
    profiler = None
    first_profiled = min(state["step"] + 2, cfg.num_steps)  # after one warm-up step
    last_profiled = min(first_profiled + cfg.profile_steps - 1, cfg.num_steps)
    for step in range(state["step"] + 1, cfg.num_steps + 1):
        t0 = time.perf_counter()
        if rank == 0 and cfg.profile_steps and step == first_profiled:
            profiler = start_profiler()
        batch, epoch, index = next(batches)
        if step == state["step"] + 1 and "decode_s" in w.data_stats:
            timer.skip()  # waiting for this rank's decode: data/decode_s holds it, not the loop
        result = _step(w, batch, step, timer)
        state.update(step=step, epoch=epoch, batch_in_epoch=index,
                     samples=state["samples"] + len(batch["id"]))
        if (cfg.fail_at_step == step and rank == cfg.fail_rank and not start.resumed
                and not cfg.fail_after_part):
            _inject_failure(step, rank)
        _add_to_window(window, result, w.mconfig, time.perf_counter() - t0)
        timer.step_done()
        if profiler is not None and step == last_profiled:
            timer.lap("report")
            save_profile(profiler, cfg, first_profiled, last_profiled, w.logger)
            profiler = None
            timer.skip()
        if step % cfg.log_every and step % cfg.checkpoint_every and step != cfg.num_steps:
            timer.lap("report")
            continue
        _report(w, step, result.lr, epoch, state, window, start, timer)
        window.clear()
    return timer


def _step(w: Worker, batch: dict, step: int, timer: StepTimes) -> StepResult:
    """One optimizer step: the batch's tokens on the device, forward and the stage's loss under
    the run's precision, backward, gradient sync, update, A_t sync and token-adaptive routing."""
    cfg, optim = w.cfg, w.optim
    inputs = devices.to_device(tokenize_batch(batch, w.tokenizer, w.mconfig, w.model, step),
                               w.groups.device)
    lr = cfg.learning_rate(step)
    optim.set_lr(lr)
    timer.lap("data")
    with devices.autocast(w.groups.device, cfg.precision):  # fp32 master weights and router
        out = optim.forward_module()(**inputs, return_logits=False)  # no full-vocab logits
        loss = stage_loss(out, cfg.stage, w.mconfig, cfg.recipe)
    timer.lap("forward")
    optim.backward(loss)
    timer.lap("backward")
    optim.sync()
    timer.lap("grad_sync")
    grad_norm = optim.update()
    timer.lap("optimizer")
    parallel.sync_routing_rates(w.model, w.groups)
    result = StepResult(out=out, loss=loss, lr=lr, grad_norm=grad_norm,
                        tokens=int(inputs["attention_mask"].sum()))
    if cfg.expert_update_every and cfg.stage > 1 and step % cfg.expert_update_every == 0:
        updates = parallel.update_experts(w.model, w.groups, optim.local)
        result.added = sum(len(u.added) for u in updates)
        result.pruned = sum(len(u.pruned) for u in updates)
    timer.lap("experts")
    return result


def _inject_failure(step: int, rank: int) -> None:
    """Fault injection (`TrainConfig.fail_at_step` / `fail_rank`): this worker exits as a killed
    process would, with no cleanup, so that Ray Train restarts the group from the last
    checkpoint."""
    log.warning(f"[rank {rank}] fail_at_step={step}: exiting to test fault tolerance")
    time.sleep(3)  # let the controller collect the last checkpoint report first
    os._exit(1)


def _add_to_window(window: dict[str, Any], r: StepResult, mconfig, seconds: float) -> None:
    """Add a step's losses and counts to the window's sums (every rank has every key: they are
    all-reduced by name)."""
    out = r.out
    values = {"loss": r.loss, "loss_time": out.loss_time, "loss_score": out.loss_score,
              "loss_text": out.loss_text, "aux_loss": out.aux_loss, "z_loss": out.z_loss,
              "grad_norm": r.grad_norm, "experts_added": r.added, "experts_pruned": r.pruned,
              "_steps": 1, "_tokens": r.tokens, "_seconds": seconds}
    if mconfig.frame_relevance:
        values["loss_frames"] = out.loss_frames
    if mconfig.evidence is not None:  # D2VLM
        values.update(loss_grounding=out.loss_grounding, loss_consistency=out.loss_consistency)
    for key, value in values.items():
        value = 0.0 if value is None else value
        window[key] = window.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)


def _report(w: Worker, step: int, lr: float, epoch: int, state: dict, window: dict,
            start: Start, timer: StepTimes) -> None:
    """Metrics averaged over ranks, routing telemetry summed over ranks, rank 0's progress line
    and MLflow metrics, `ray.train.report` (with a checkpoint every `checkpoint_every` steps and
    at the last step, each rank storing and committing its part: `_upload`)."""
    cfg, groups, routing_total = w.cfg, w.groups, start.routing
    metrics = reduce_window(window, groups)
    routing = routing_telemetry(w.model, groups)
    accumulate_routing(routing_total, routing)
    metrics.update(routing_metrics(routing))
    metrics.update(step=step, stage=cfg.stage, lr=lr, epoch=epoch,
                   samples=state["samples"] * groups.world_size,
                   restores=state.get("restores", 0))  # worker-group restarts so far (MLflow)
    metrics["data/decode_s"] = _decode_seconds(w)
    metrics["checkpoint/storage_wait_s"] = w.storage_wait_s
    # expert parameters this rank holds: 1/EP of the model's (built and read sharded; only
    # rank 0 receives the whole stack, one tensor at a time, to write a checkpoint)
    metrics["experts/params_on_rank"] = float(sum(
        p.numel() for n, p in w.model.named_parameters() if parallel.is_expert_param(n)))
    w.model.reset_routing_telemetry()
    timer.lap("report")
    last = step == cfg.num_steps
    if w.probe is not None:  # every report carries the last score (what a Tune scheduler reads)
        if w.val_score is None or step % cfg.val_every == 0 or last:
            w.val_score = w.probe.score(w.model, w.tokenizer)
        metrics[VAL_METRIC] = w.val_score
        timer.lap("validate")
    metrics.update(timer.window())  # this rank's; the result and MLflow keep rank 0's
    if w.logger is not None:
        log.info(progress_line(cfg, metrics))
        w.logger.log(metrics, step)
    if step % cfg.checkpoint_every and not last:
        ray.train.report(metrics)
        timer.lap("report")
        return
    timer.lap("report")
    weights = parallel.checkpoint_state(w.model, groups)
    if w.spec.lora:
        weights = merged_lora_state(w.model, weights)
    with tempfile.TemporaryDirectory(prefix="te-ckpt-") as d:
        ckpt.write_checkpoint(d, rank=groups.rank, model=w.model, state=weights,
                              ep_rank=groups.ep_rank, ep_size=groups.ep_size,
                              tokenizer=w.tokenizer, optimizers=w.optim,
                              train_state={"state": state, "config": cfg.to_dict(),
                                           "layout": _layout(cfg, groups)},
                              routing=routing_total)
        if last:  # the stage's breakdown, but for the report below
            timer.lap("checkpoint")
            metrics.update(timer.summary())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_upload_fn=lambda c, name: _upload(w, c, name, step, start))
    timer.lap("checkpoint")


def _upload(w: Worker, checkpoint, dir_name: str, step: int, start: Start):
    """Ray Train's `checkpoint_upload_fn`: this rank stores its part and its commit marker
    (`checkpoint.upload`), waiting up to `storage_wait_s` for storage; the wait is logged and
    counted (`checkpoint/storage_wait_s` of the next reports). With `fail_after_part`, rank
    `fail_rank` exits once that part is stored (a crash in the middle of a checkpoint)."""
    cfg, rank = w.cfg, w.groups.rank
    after_part = None
    if (cfg.fail_after_part and cfg.fail_at_step == step and rank == cfg.fail_rank
            and not start.resumed):
        def after_part(name: str) -> None:
            if name == cfg.fail_after_part:
                _inject_failure(step, rank)
    stored, waited = ckpt.upload(checkpoint, dir_name, rank=rank,
                                 world_size=w.groups.world_size, budget_s=cfg.storage_wait_s,
                                 after_part=after_part)
    if waited:
        w.storage_wait_s += waited
        log.warning(f"[rank {rank}] the checkpoint of step {step} waited {waited:.1f} s for "
                    f"storage ({w.storage_wait_s:.1f} s in this run so far)")
    return stored


def _decode_seconds(w: Worker) -> float:
    """The slowest rank's decode-once seconds (0 when streaming), reduced over the ranks at the
    first report (every rank decoded its part before its first step) and kept."""
    if "decode_s_max" not in w.data_stats:
        value = torch.tensor([w.data_stats.get("decode_s", 0.0)], dtype=torch.float64,
                             device=w.groups.device)
        if w.groups.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        w.data_stats["decode_s_max"] = float(value)
    return w.data_stats["decode_s_max"]
