"""EP=2 over NCCL on two GPUs equals EP=1 on one: outputs and gradients of a MoE layer, in bf16
experts with the fp32 router."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timeexpert.config import MoEConfig
from timeexpert.models.expert_parallel import gather_experts
from timeexpert.models.moe import MoELayer


def _worker(rank: int, store_path: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        device = torch.device("cuda", rank)
        torch.manual_seed(0)
        cfg = MoEConfig(dim=64, hidden_dim=128, gating="topk", num_experts=8, max_experts=8)
        full = MoELayer(cfg).to(device)
        ep = MoELayer(cfg, ep_group=dist.group.WORLD).to(device)
        ep.load_full_state_dict(full.state_dict())
        g = torch.Generator().manual_seed(1)
        x = torch.randn(96, 64, generator=g).to(device)
        types = torch.randint(0, 5, (96,), generator=g).to(device)
        rows = slice(0, 60) if rank == 0 else slice(60, 96)  # uneven on purpose
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_ref, _ = full(x, types)
            y_ep, _ = ep(x[rows], types[rows])
        torch.testing.assert_close(y_ep, y_ref[rows], rtol=2e-2, atol=2e-2)
        y_ep.sum().backward()
        y_ref[rows].sum().backward()
        grad = gather_experts(ep.w1_LFD.grad, dist.group.WORLD)
        ref = full.w1_LFD.grad.clone()
        dist.all_reduce(ref)  # each rank's reference saw only its rows' gradient
        torch.testing.assert_close(grad, ref, rtol=5e-2, atol=5e-3)
    finally:
        dist.destroy_process_group()


def test_ep2_over_nccl_equals_ep1(tmp_path, two_gpus):
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
