"""Data + expert parallelism for the training loop: groups, sharded model, gradient sync, optimizers.

Layout of a world of W ranks with expert-parallel degree P (P divides W):
- EP groups: consecutive ranks {kP, ..., kP + P - 1}; rank r holds expert slots
  [(r mod P) L, (r mod P + 1) L) of every MoE layer (L = max_experts / P), tokens travel by
  all-to-all inside the EP group (`models.expert_parallel`).
- expert-DP groups: ranks holding the same slice, {r mod P == j}: W / P replicas of each slice.

Gradients (the objective is the mean over ranks of each rank's mean loss):
- *routed* parameters, those of the MoE layers, are always synced here explicitly and stepped by a
  local AdamW: an expert weight's gradient already sums every EP rank's tokens (the all-to-all
  backward brings them home), so it is all-reduced (sum) over its expert-DP group only and scaled
  1/W; the replicated gate parameters (W_g, G) are all-reduced over the world and scaled 1/W.
  They are never all-reduced across EP ranks: those hold different experts.
- *dense* parameters (vision, attention, embeddings, heads): with `zero_stage` 0 the same
  explicit all-reduce over the world (plain data parallel); with 1/2, DeepSpeed ZeRO partitions
  their optimizer state (and with 2 their gradients) over the world. Expert parameters stay out of
  DeepSpeed: their optimizer state is already sharded by EP.

Memory: a rank materialises only its expert slots. A fresh model is built with this rank's slots
(`fresh_model`: each slot seeded by its global id, so the shards equal an EP=1 build); a
checkpoint is read as this rank's slice (`expert_parallel.load_weights(d, ep_rank, ep_size)`)
into a model built on the meta device (`materialize`). Dense parameters stay replicated, ZeRO-1/2
sharding their optimizer state (and with 2 their gradients): in paper_gpu they are 0.4 B of
13.8 B parameters, 1.5 GiB in fp32 per GPU (`benchmarks.memory_plan`), while the experts are 97%.
No rank ever holds the whole expert stack: a checkpoint is written by the ranks of world rank 0's
EP group, each its own expert slice (`checkpoint_state`, `checkpoint.write_checkpoint`).

Token-adaptive routing under EP: before `update_experts`, each layer's statistics are summed over
the expert-DP group (the layer itself sums over its EP group), so every rank takes the same
add/prune decision; the optimizer state of a re-initialised slot is zeroed. The EMA rates A_t are
averaged over the expert-DP group every step, so they stay identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from timeexpert import devices
from timeexpert.models.expert_parallel import EXPERT_PARAM_NAMES, is_expert_param, shard_state_dict
from timeexpert.models.moe import ExpertUpdate, MoELayer
from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model

ROUTING_STAT_BUFFERS = ("fired_count_E", "unrouted_sum_D", "unrouted_count", "token_count")
GATE_PARAM_NAMES = ("w_gate_ED", "threshold_E")  # indexed by global expert slot, replicated
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step count


@dataclass
class ParallelGroups:
    """This rank's place in the data x expert parallel layout."""

    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: Any  # process group of this rank's EP group (None when ep_size == 1)
    expert_dp_group: Any  # ranks holding the same expert slice (None when it is just this rank)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's
    # compute device, where collectives' tensors live (NCCL reduces CUDA tensors only)

    @property
    def expert_dp_size(self) -> int:
        return self.world_size // self.ep_size


def init_groups(ep_size: int, device: torch.device | None = None) -> ParallelGroups:
    """Create the EP and expert-DP groups (every rank calls this; `new_group` is collective).
    `device`: this rank's compute device (default the CPU)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if not dist.is_initialized():  # a single process: no collectives at all
        if ep_size != 1:
            raise ValueError(f"ep_size {ep_size} needs a distributed run of >= {ep_size} workers")
        return ParallelGroups(world_size=1, rank=0, ep_size=1, ep_rank=0, ep_group=None,
                              expert_dp_group=None, device=device)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world})")
    ep_group = expert_dp_group = None
    for k in range(world // ep_size):
        ranks = list(range(k * ep_size, (k + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks and ep_size > 1:
            ep_group = group
    for j in range(ep_size):
        ranks = list(range(j, world, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks and len(ranks) > 1:
            expert_dp_group = group
    return ParallelGroups(world_size=world, rank=rank, ep_size=ep_size, ep_rank=rank % ep_size,
                          ep_group=ep_group, expert_dp_group=expert_dp_group, device=device)


# --- the sharded model -------------------------------------------------------------------------


def is_routed_param(name: str, module: nn.Module) -> bool:
    """Parameters of a MoE layer (experts and gates): synced and stepped outside DeepSpeed."""
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return isinstance(owner, MoELayer)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def build_on_meta(model_cls, config, ep_group=None) -> nn.Module:
    """`model_cls(config, ep_group)` on the meta device: every parameter and buffer with its
    real shape (with `ep_group`, this rank's expert slots only), no storage."""
    with torch.device("meta"):
        return model_cls(config, ep_group=ep_group)


def materialize(model_cls, config, groups: ParallelGroups, shard_state: dict[str, Tensor]):
    """This rank's model on its device, holding `shard_state` (this rank's expert slice and
    everything else whole, as `expert_parallel.load_weights(d, ep_rank, ep_size)` reads it): built on
    the meta device, then storage for this rank's part only."""
    model = build_on_meta(model_cls, config, groups.ep_group).to_empty(device=groups.device)
    missing, unexpected = model.load_state_dict(shard_state, strict=False)
    # telemetry buffers are not persistent; anything else missing is a real mismatch
    missing = [k for k in missing if ".tel_" not in k]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    for layer in moe_layers(model):
        layer.reset_telemetry()  # to_empty left them unset
    return model


def build_sharded_model(model_cls, config, groups: ParallelGroups, full_state: dict[str, Tensor]):
    """`materialize` from a full (EP=1) state dict: this rank's expert slice of it."""
    return materialize(model_cls, config, groups,
                       shard_state_dict(full_state, groups.ep_rank, groups.ep_size))


def fresh_model(config, groups: ParallelGroups):
    """A new model holding this rank's expert slots only, identical on every rank and equal to
    the slices of an EP=1 build at the same seed (`MoELayer` seeds each slot). A decoder
    upcycled from a dense LM perturbs its whole expert stack at once: built whole, then sliced."""
    if config.upcycle_from:
        return build_sharded_model(TimeExpertForGrounding, config, groups,
                                   create_model(config).state_dict())
    return create_model(config, ep_group=groups.ep_group).to(groups.device)


@torch.no_grad()
def checkpoint_state(model: nn.Module, groups: ParallelGroups) -> dict[str, Tensor]:
    """What this rank writes into a checkpoint, on the CPU: for the ranks of world rank 0's EP
    group their state dict (their own expert slice, everything else whole: the same on every
    rank); {} for the other data replicas. No collective, no rank gathers the experts."""
    if groups.rank >= groups.ep_size:  # another replica of the same weights
        return {}
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


# --- gradient and routing-state sync -----------------------------------------------------------


def _flat_all_reduce(tensors: list[Tensor], group, scale: float) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def sync_gradients(named_params: list[tuple[str, nn.Parameter]], groups: ParallelGroups) -> None:
    """Average gradients as described in the module docstring. Every rank passes the same list;
    a parameter without a gradient this step (an expert no token reached) counts as zeros."""
    if groups.world_size == 1:
        return
    for _, p in named_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    scale = 1.0 / groups.world_size
    expert = [p.grad for n, p in named_params if is_expert_param(n)]
    replicated = [p.grad for n, p in named_params if not is_expert_param(n)]
    _flat_all_reduce(replicated, dist.group.WORLD, scale)
    if groups.expert_dp_group is not None:
        _flat_all_reduce(expert, groups.expert_dp_group, scale)
    else:
        for g in expert:
            g.mul_(scale)


@torch.no_grad()
def sync_routing_rates(model: nn.Module, groups: ParallelGroups) -> None:
    """Average the EMA activation rates A_t over the expert-DP group (identical on every rank)."""
    if groups.expert_dp_group is None:
        return
    layers = [m for m in moe_layers(model) if hasattr(m, "task_rate_TE")]
    _flat_all_reduce([m.task_rate_TE for m in layers], groups.expert_dp_group,
                     1.0 / groups.expert_dp_size)


@torch.no_grad()
def update_experts(model: nn.Module, groups: ParallelGroups, optimizer) -> list[ExpertUpdate]:
    """Token-adaptive add/prune on every layer, agreed by all ranks; resets re-initialised slots'
    optimizer state (`optimizer`: the local AdamW that holds the routed parameters)."""
    updates = []
    for layer in moe_layers(model):
        if groups.expert_dp_group is not None and hasattr(layer, "token_count"):
            _flat_all_reduce([getattr(layer, b) for b in ROUTING_STAT_BUFFERS],
                             groups.expert_dp_group, 1.0)
        update = layer.update_experts()
        for slot in update.added:
            reset_slot_optimizer_state(layer, slot, optimizer)
        updates.append(update)
    return updates


def reset_slot_optimizer_state(layer: MoELayer, slot: int, optimizer) -> None:
    """Zero Adam's moments of global expert slot `slot` (its expert weights and gate entries)."""
    local = slot - layer.expert_offset
    targets = [(getattr(layer, n), slot) for n in GATE_PARAM_NAMES if hasattr(layer, n)]
    if 0 <= local < layer.num_local_experts:
        targets += [(getattr(layer, n), local) for n in EXPERT_PARAM_NAMES]
    for p, index in targets:
        state = optimizer.state.get(p, {})
        for key in MOMENTS:
            if key in state:
                state[key][index].zero_()


# --- optimizers --------------------------------------------------------------------------------


class Optimizers:
    """The routed parameters' local AdamW, plus the dense parameters' optimizer: the same local
    AdamW (zero_stage 0) or a DeepSpeed ZeRO engine (1/2). `backward`, `step`, `state_dict`."""

    def __init__(self, model: nn.Module, groups: ParallelGroups, *, lr: float, weight_decay: float,
                 grad_clip: float, zero_stage: int, batch_size: int) -> None:
        self.model, self.groups, self.grad_clip, self.zero_stage = model, groups, grad_clip, zero_stage
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.routed = [(n, p) for n, p in trainable if is_routed_param(n, model)]
        self.dense = [(n, p) for n, p in trainable if not is_routed_param(n, model)]
        self.engine = None
        local = self.routed if zero_stage else self.routed + self.dense
        self.local_params = local
        # fused: one kernel per parameter for the whole update (CPU and CUDA); on CPU about 6x
        # less optimizer time than foreach, itself a third less than the per-parameter loop
        self.local = torch.optim.AdamW([p for _, p in local] or [nn.Parameter(torch.zeros(1))],
                                       lr=lr, weight_decay=weight_decay, fused=True)
        if zero_stage and self.dense:
            self.engine = _deepspeed_engine(model, [p for _, p in self.dense], groups, lr=lr,
                                            weight_decay=weight_decay, grad_clip=grad_clip,
                                            zero_stage=zero_stage, batch_size=batch_size)

    def forward_module(self):
        return self.engine if self.engine is not None else self.model

    def set_lr(self, lr: float) -> None:
        opts = [self.local] + ([self.engine.optimizer] if self.engine is not None else [])
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr

    def backward(self, loss: Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> Tensor:
        """Sync, clip and step; returns the gradient norm of the locally stepped parameters (a
        0-d tensor: reading it is the caller's host sync)."""
        self.sync()
        return self.update()

    def sync(self) -> None:
        """The gradient all-reduce of the locally stepped parameters (ZeRO's dense gradients are
        reduced inside `backward` and `engine.step`)."""
        sync_gradients(self.local_params, self.groups)

    def update(self) -> Tensor:
        """Clip the synced gradients and step; the clip factor stays a tensor (no host sync)."""
        norm = _global_grad_norm(self.local_params, self.groups)
        if self.grad_clip > 0:  # clip_grad_norm_'s factor, clamped at 1, on the global norm
            torch.nn.utils.clip_grads_with_norm_([p for _, p in self.local_params], self.grad_clip,
                                                 norm, foreach=True)
        self.local.step()
        self.local.zero_grad(set_to_none=True)
        if self.engine is not None:
            self.engine.step()  # DeepSpeed clips its own (dense) gradients
        return norm

    def state_dict(self) -> dict[str, Any]:
        """The local AdamW's state, with the names of its parameters in order (so that another
        layout can read it by name: `resharded_local_state`)."""
        return {"local": self.local.state_dict(), "names": [n for n, _ in self.local_params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The local AdamW from this rank's own state (`state_dict`, same rank and layout) or
        from {"reshard": the states of world rank 0's EP group of another layout, in EP-rank
        order}; under ZeRO, the dense moments from "zero_dense" (`dense_state`, any layout).
        Collective under ZeRO."""
        if "reshard" not in state:
            self.local.load_state_dict(state["local"])
        elif self.local_params:  # (none when no routed parameter trains in this stage)
            self.local.load_state_dict(resharded_local_state(state["reshard"], self.local_params,
                                                             self.groups.ep_rank))
        if self.engine is not None:
            if state.get("zero_dense") is None:
                raise ValueError("this checkpoint holds no ZeRO optimizer state: resume it with "
                                 "the zero_stage it was written with")
            self.load_dense_state(state["zero_dense"])

    def dense_state(self) -> dict[str, Any] | None:
        """Under ZeRO, on world rank 0 (the writer), every dense parameter's full AdamW moments
        by name and the step count; None on the other ranks and without ZeRO (the local AdamW
        holds them). Collective: every rank calls it, the moments gathered one parameter at a time
        (DeepSpeed's tensor-fragment API) and kept by rank 0 only, so any world size can read
        them back (`load_dense_state`)."""
        if self.engine is None:
            return None
        from deepspeed.utils import safe_get_full_optimizer_state  # deferred: heavy, ZeRO only

        keep = self.groups.rank == 0
        state: dict[str, dict[str, Tensor]] = {}
        for n, p in self.dense:
            for k in MOMENTS:
                full = safe_get_full_optimizer_state(p, k)  # on every rank: an all-reduce
                if keep:
                    state.setdefault(n, {})[k] = full.detach().to("cpu", copy=True)
        return {"state": state, "step": self._zero_step()} if keep else None

    def load_dense_state(self, saved: dict[str, Any]) -> None:
        """Set this rank's ZeRO partition of the dense moments from `dense_state`'s full ones
        (written at any world size) and the step count. Collective, as `dense_state`."""
        from deepspeed.utils import safe_set_full_optimizer_state  # deferred: heavy, ZeRO only

        missing = [n for n, _ in self.dense if n not in saved["state"]]
        if missing:
            raise ValueError(f"the checkpoint's ZeRO optimizer state lacks {missing[:3]}")
        # AdamW makes its state at its first step: make it now, as AdamW lays it out, over
        # this rank's fp32 partitions, and link every parameter's fragment of it (DeepSpeed
        # links lazily, at the first step)
        zero = self.engine.optimizer
        base = zero.optimizer
        for q in (q for g in base.param_groups for q in g["params"]):
            base.state[q] = {"step": torch.tensor(float(saved["step"])),
                             "exp_avg": torch.zeros_like(q), "exp_avg_sq": torch.zeros_like(q)}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
        for n, p in self.dense:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, saved["state"][n][k].to(p.device), k)

    def _zero_step(self) -> float:
        base = self.engine.optimizer.optimizer
        steps = [float(st["step"]) for st in base.state.values() if "step" in st]
        return max(steps, default=0.0)


def resharded_local_state(saved: list[dict[str, Any]], named_params: list[tuple[str, nn.Parameter]],
                          ep_rank: int) -> dict[str, Any]:
    """The local AdamW state of `named_params` (this rank's, in order) from the states that the
    ranks of world rank 0's EP group wrote under another layout (`saved`, in EP-rank order; each
    `Optimizers.state_dict()`). Those ranks hold every expert slice once and the replicated
    parameters alike: an expert weight's moments are stitched along the slot axis and this rank's
    slots cut out (slot offset `ep_rank` x its local slot count); every other parameter takes EP
    rank 0's. A parameter no saved rank has a state for (never stepped) starts without one."""
    if not saved or any("names" not in s for s in saved):
        raise ValueError("this checkpoint's optimizer state has no parameter names (written before "
                         "resharding was supported): resume it with the world size and EP degree "
                         "it was written with")
    by_name = [dict(zip(s["names"], (s["local"]["state"].get(i) for i in range(len(s["names"])))))
               for s in saved]
    out: dict[int, dict[str, Any]] = {}
    for i, (name, p) in enumerate(named_params):
        if is_expert_param(name):
            parts = [b.get(name) for b in by_name]
            if any(part is None for part in parts):
                continue
            rows = slice(ep_rank * p.shape[0], (ep_rank + 1) * p.shape[0])
            out[i] = {k: (torch.cat([part[k] for part in parts])[rows] if k != "step" else v)
                      for k, v in parts[0].items()}
            if out[i]["exp_avg"].shape != p.shape:
                raise ValueError(f"optimizer state of {name}: {tuple(out[i]['exp_avg'].shape)} "
                                 f"does not fit this rank's slice {tuple(p.shape)}")
        elif by_name[0].get(name) is not None:
            out[i] = dict(by_name[0][name])
    groups = [{**g, "params": list(range(len(named_params)))}
              for g in saved[0]["local"]["param_groups"][:1]]
    return {"state": out, "param_groups": groups}


def _global_grad_norm(named_params, groups: ParallelGroups) -> Tensor:
    """Norm of the synced gradients: replicated ones counted once, expert slices once per EP rank.
    A 0-d tensor, computed without a host sync (one multi-tensor norm per kind)."""
    zero = torch.zeros((), dtype=torch.float64, device=groups.device)

    def squared(expert: bool) -> Tensor:
        grads = [p.grad for n, p in named_params
                 if p.grad is not None and is_expert_param(n) == expert]
        if not grads:
            return zero
        return torch.nn.utils.get_total_norm(grads, foreach=True).double().pow(2)

    rep, exp = squared(False), squared(True)
    if groups.ep_group is not None:
        exp = exp.reshape(1)
        dist.all_reduce(exp, group=groups.ep_group)
        exp = exp.reshape(())
    return (rep + exp).sqrt()


def _deepspeed_engine(model, dense_params, groups: ParallelGroups, *, lr, weight_decay, grad_clip,
                      zero_stage, batch_size):
    """DeepSpeed ZeRO over the dense parameters (reuses Ray's process group: NCCL on GPUs, gloo
    on CPUs)."""
    devices.configure_deepspeed()
    import deepspeed  # deferred: heavy, and only ZeRO runs need it

    deepspeed.init_distributed(dist_backend=devices.backend(groups.device))
    # DeepSpeed broadcasts every module parameter from rank 0 at init: keep the expert slices.
    keep = {n: p.detach().clone() for n, p in model.named_parameters() if is_expert_param(n)}
    optimizer = torch.optim.AdamW(dense_params, lr=lr, weight_decay=weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=dense_params, config=ds_config)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, value in keep.items():
            params[n].copy_(value)
    return engine
