"""Memory that shards: over 2 gloo processes with EP=2, each rank builds (fresh, or from a
checkpoint read as its slice only) a model holding only its expert slots, equal to the slices of
an EP=1 build at the same seed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset
from timeexpert.models.expert_parallel import load_weights
from timeexpert.train import parallel


def expert_numel(tensors) -> int:
    return sum(v.numel() for k, v in tensors if parallel.is_expert_param(k))


def _worker(rank: int, store_path: str, config, ckpt_dir: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        groups = parallel.init_groups(2)
        torch.manual_seed(0)
        full = create_model(config)  # the EP=1 reference, same seed
        full_state = full.state_dict()
        total = expert_numel(full_state.items())
        L = config.moe["max_experts"] // 2
        rows = slice(rank * L, (rank + 1) * L)

        torch.manual_seed(0)
        fresh = parallel.fresh_model(config, groups)
        assert expert_numel(fresh.named_parameters()) == total // 2  # never all the experts
        for name, value in fresh.state_dict().items():
            want = full_state[name][rows] if parallel.is_expert_param(name) else full_state[name]
            torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)

        if rank == 0:
            full.save_pretrained(ckpt_dir, safe_serialization=True)
        dist.barrier()
        shard = load_weights(ckpt_dir, groups.ep_rank, groups.ep_size)
        assert expert_numel(shard.items()) == total // 2  # read as this rank's slice only
        model = parallel.materialize(TimeExpertForGrounding, config, groups, shard)
        assert not any(p.is_meta for p in model.parameters())
        assert expert_numel(model.named_parameters()) == total // 2
        for name, value in model.state_dict().items():
            want = full_state[name][rows] if parallel.is_expert_param(name) else full_state[name]
            torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)
        layer = model.layers[0].ffn
        assert layer.tel_tokens_T.abs().sum() == 0 and layer.expert_offset == rank * L
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_ranks_build_and_load_only_their_experts(tmp_path):
    tok = GroundingTokenizer.train(["a red square moves left", "a blue circle grows"] * 4,
                                   vocab_size=400)
    config = get_preset("tiny_cpu").model.with_tokenizer(tok)
    mp.spawn(_worker, args=(str(tmp_path / "store"), config, str(tmp_path / "ckpt")),
             nprocs=2, join=True)
