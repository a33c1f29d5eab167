"""EP=2 over 2 gloo processes equals EP=1 on the same weights: outputs, gradients, add/prune."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timeexpert.config import MoEConfig
from timeexpert.models.expert_parallel import EXPERT_PARAM_NAMES, gather_experts
from timeexpert.models.moe import MoELayer

N_ALL, SPLIT = 72, 44  # rank 0 holds 44 tokens, rank 1 holds 28: uneven on purpose


def _compare(full: MoELayer, ep: MoELayer, x_all, types_all, r_all, rank: int, tag: str) -> None:
    sl = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N_ALL)
    full.zero_grad(), ep.zero_grad()
    x_ref = x_all.clone().requires_grad_(True)
    y_ref, loss_ref = full(x_ref, types_all)
    (y_ref * r_all).sum().backward()
    x_ep = x_all[sl].clone().requires_grad_(True)
    y_ep, _ = ep(x_ep, types_all[sl])
    (y_ep * r_all[sl]).sum().backward()

    torch.testing.assert_close(y_ep, y_ref[sl].detach(), msg=f"{tag}: output")
    torch.testing.assert_close(x_ep.grad, x_ref.grad[sl], msg=f"{tag}: token grad")
    ref_params = dict(full.named_parameters())
    for name, p in ep.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name in EXPERT_PARAM_NAMES:
            g = gather_experts(g, dist.group.WORLD)
            torch.testing.assert_close(
                gather_experts(p.detach(), dist.group.WORLD), ref_params[name].detach()
            )
        else:  # replicated: each rank holds the gradient of its own tokens
            g = g.clone()
            dist.all_reduce(g)
        ref = ref_params[name].grad
        torch.testing.assert_close(g, torch.zeros_like(g) if ref is None else ref, msg=f"{tag}: {name}")
    for name in ("active_E", "task_rate_TE"):
        if hasattr(full, name):
            torch.testing.assert_close(getattr(ep, name), getattr(full, name), msg=f"{tag}: {name}")


def _worker(rank: int, store_path: str, gating: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        cfg = MoEConfig(
            dim=16, hidden_dim=24, gating=gating, num_experts=6, max_experts=8,
            num_experts_per_token=2, tau_min=0.05, add_threshold=0.0, rate_momentum=0.5,
        )
        full = MoELayer(cfg).double()
        if gating == "dynamic":  # slot 1 never fires (pruned); some tokens fire nothing (add)
            full.threshold_E.data = torch.tensor([0.1, 50, 0.1, 0.12, 0.1, 0.1, 0, 0], dtype=torch.float64)
        ep = MoELayer(cfg, ep_group=dist.group.WORLD).double()
        assert ep.w1_LFD.shape[0] == 4
        ep.load_full_state_dict(full.state_dict())
        g = torch.Generator().manual_seed(1)
        x_all = torch.randn(N_ALL, 16, generator=g, dtype=torch.float64)
        types_all = torch.randint(0, 5, (N_ALL,), generator=g)
        r_all = torch.randn(N_ALL, 16, generator=g, dtype=torch.float64)

        _compare(full, ep, x_all, types_all, r_all, rank, "step 1")
        u_full, u_ep = full.update_experts(), ep.update_experts()
        assert u_full == u_ep, (u_full, u_ep)
        if gating == "dynamic":
            assert u_full.pruned == [1] and len(u_full.added) == 1, u_full
        _compare(full, ep, x_all, types_all, r_all, rank, "after update")
        ep.eval(), full.eval()
        _compare(full, ep, x_all * 0.5, types_all, r_all, rank, "eval")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("gating", ["topk", "dynamic"])
def test_ep2_equals_ep1(tmp_path, gating):
    mp.spawn(_worker, args=(str(tmp_path / "store"), gating), nprocs=2, join=True)
