"""The meta-device build behind `benchmarks.memory_plan`: real shapes, no memory; the plan's
arithmetic and its errors."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_plan import (
    DS_REDUCE_BUCKET,
    ParamCounts,
    count_params,
    meta_model,
    peak_allocated,
    plan,
    preset_config,
)
from timeexpert.models.timeexpert import create_model
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config():
    tok = GroundingTokenizer.train(["a red square moves left", "a blue circle grows"] * 4,
                                   vocab_size=400)
    return get_preset("tiny_cpu").model.with_tokenizer(tok)


def test_meta_build_has_the_real_shapes_of_tiny():
    config = tiny_config()
    meta = meta_model(config)
    real = create_model(config)
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == \
        {n: p.shape for n, p in real.named_parameters()}
    assert {n: b.shape for n, b in meta.named_buffers()} == \
        {n: b.shape for n, b in real.named_buffers()}


def test_meta_build_of_paper_scale_allocates_no_parameter_memory():
    config = preset_config("paper_gpu")
    holder = {}
    peak = peak_allocated(lambda: holder.setdefault("model", meta_model(config)))
    counts = count_params(holder["model"])
    total = counts.expert + counts.gate + counts.dense + counts.frozen
    assert total > 13e9  # 13 B parameters, 55 GB in fp32 ...
    assert peak < 64 * 2**20, peak  # ... built in under 64 MB (Python objects, small buffers)


def test_plan_shards_experts_over_ep_and_dense_state_over_zero():
    config = preset_config("paper_gpu")
    counts = ParamCounts(expert=8_000, gate=80, dense=1_000, frozen=100)
    kw = dict(batch=1, seq_len=16, target_tokens=4, precision="fp32")
    p8 = plan(counts, config, gpus=8, ep=8, zero=2, **kw)
    p1 = plan(counts, config, gpus=8, ep=1, zero=0, **kw)
    assert p8.parameters == 4 * (1_000 + 80 + 1_000 + 100)  # expert / 8, the rest replicated
    assert p1.parameters == 4 * (8_000 + 80 + 1_000 + 100)
    assert p8.optimizer == 8 * 1_080 + 12 * 1_000 // 8  # AdamW moments; ZeRO: partitions / W
    assert p8.gradients == 4 * 1_080 + 4 * 1_000 // 8 + 4 * DS_REDUCE_BUCKET
    assert p1.activations == p8.activations > 0
    with pytest.raises(ValueError, match=r"--ep \(3\) must divide --gpus \(8\)"):
        plan(counts, config, gpus=8, ep=3, zero=2, **kw)
    with pytest.raises(ValueError, match="--zero must be 0, 1 or 2, got 3"):
        plan(counts, config, gpus=8, ep=8, zero=3, **kw)


def test_peak_allocated_sees_a_tensor_allocated_and_freed():
    peak = peak_allocated(lambda: torch.ones(2**20).sum())  # 4 MiB
    assert 4 * 2**20 <= peak < 6 * 2**20
