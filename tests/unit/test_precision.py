"""bf16 autocast against fp32 on the tiny preset (CPU autocast), and the device / precision policy."""

from __future__ import annotations

import copy

import pytest
import torch

from timeexpert import devices
from timeexpert.events import Event, Task
from timeexpert.models.timeexpert import create_model
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import get_preset
from timeexpert.train.config import TrainConfig
from timeexpert.train.recipes import set_stage_trainable, stage_loss, stage_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a red square moves left", "a blue circle grows"]
# bf16 keeps 8 mantissa bits (rounding 2^-9 ~ 2e-3 relative per op); with fp32 accumulation,
# norms, router and cross-entropy, tiny's loss moves by 1.1e-4 relative and its gradient keeps
# its direction (cosine 0.99994), measured at seed 0: the bounds leave a 20x / 15x margin
LOSS_RTOL = 2e-3
GRAD_COSINE = 0.999


def tiny_inputs(seed: int = 0):
    tok = GroundingTokenizer.train(CAPTIONS * 4 + ["the cat"], vocab_size=400)
    config = get_preset("tiny_cpu").model.with_tokenizer(tok)
    times = [float(t) for t in range(config.num_frames)]
    examples = [
        tok.encode_example(Task.DVC, "", times, [Event(0.0, 2.0, 0.5, CAPTIONS[0]),
                                                 Event(3.0, 6.0, 0.9, CAPTIONS[1])],
                           tokens_per_frame=config.tokens_per_frame),
        tok.encode_example(Task.MR, "the cat", times, [Event(1.0, 2.5, 1.0)],
                           tokens_per_frame=config.tokens_per_frame),
    ]
    inputs = collate(examples)
    g = torch.Generator().manual_seed(seed)
    inputs["pixel_values"] = torch.rand(2 * config.num_frames, 3, config.image_size,
                                        config.image_size, generator=g)
    return config, inputs


def loss_and_grads(model, config, inputs, precision: str):
    model.zero_grad(set_to_none=True)
    with devices.autocast(torch.device("cpu"), precision):
        out = model(**inputs, return_logits=False)
        loss = stage_loss(out, 3, config)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, loss, grads


def test_bf16_autocast_loss_agrees_with_fp32_on_tiny():
    torch.manual_seed(0)
    config, inputs = tiny_inputs()
    model = create_model(config).train()
    set_stage_trainable(model, stage_spec("timeexpert", 3))
    out32, loss32, grads32 = loss_and_grads(copy.deepcopy(model), config, inputs, "fp32")
    out16, loss16, grads16 = loss_and_grads(model, config, inputs, "bf16")

    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert loss16.dtype == out16.aux_loss.dtype == out16.z_loss.dtype == torch.float32
    loss16, loss32 = loss16.detach(), loss32.detach()
    assert float(loss16) == pytest.approx(float(loss32), rel=LOSS_RTOL)
    # the router is fp32 in both runs: its losses differ only through the bf16 hidden states
    assert float(out16.z_loss) == pytest.approx(float(out32.z_loss), rel=LOSS_RTOL)
    assert float(loss16) != float(loss32)  # bf16 did compute something
    cosine = torch.nn.functional.cosine_similarity(grads16.double(), grads32.double(), dim=0)
    assert float(cosine) > GRAD_COSINE


def test_precision_policy_and_its_errors():
    cpu = torch.device("cpu")
    assert devices.compute_dtype(cpu, "auto") == torch.float32  # CPU stays fp32 by default
    assert devices.compute_dtype(torch.device("cuda", 0), "auto") == torch.bfloat16
    assert devices.compute_dtype(cpu, "bf16") == torch.bfloat16
    assert devices.backend(cpu) == "gloo" and devices.backend(torch.device("cuda", 1)) == "nccl"
    with devices.autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with devices.autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'"):
        devices.compute_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(data_root="x", precision="fp16")
    with pytest.raises(ValueError, match=r"fail_rank in \[0, num_workers = 2\), got 3 and 2"):
        TrainConfig(data_root="x", fail_at_step=3, fail_rank=2)
    with pytest.raises(ValueError, match=r"fail_after_part needs a checkpoint at fail_at_step: a "
                                         r"multiple of checkpoint_every \(10\) or num_steps"):
        TrainConfig(data_root="x", fail_at_step=3, fail_after_part="model.safetensors")
    with pytest.raises(ValueError, match="placement_strategy must be one of .*got 'spread'"):
        TrainConfig(data_root="x", placement_strategy="spread")
    with pytest.raises(ValueError, match="storage_wait_s must be >= 0, got -1"):
        TrainConfig(data_root="x", storage_wait_s=-1)


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "task": ["mr", "dvc"]}
    moved = devices.to_device(batch, devices.default_device())
    assert moved["input_ids"].device.type == devices.default_device().type
    assert moved["task"] == ["mr", "dvc"]
