"""One GPU: tiny's training steps in bf16 (fp32 master weights and router), the grouped-GEMM
experts against the per-expert reference, and inference on CUDA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from timeexpert import devices
from timeexpert.config import MoEConfig
from timeexpert.inference import GroundingModel
from timeexpert.models import moe
from timeexpert.models.moe import MoELayer, grouped_swiglu, grouped_swiglu_gemm
from timeexpert.models.timeexpert import create_model
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset
from timeexpert.train.recipes import set_stage_trainable, stage_loss, stage_spec

from tests.unit.test_precision import CAPTIONS, LOSS_RTOL, tiny_inputs

CUDA = torch.device("cuda", 0)


def test_grouped_gemm_on_cuda_matches_the_per_expert_loop():
    g = torch.Generator().manual_seed(0)
    counts = [37, 0, 5, 90, 1, 0, 64, 3]  # empty and odd-sized groups
    x = torch.randn(sum(counts), 64, generator=g)
    ws = [torch.randn(8, *s, generator=g) * 0.1 for s in ((128, 64), (128, 64), (64, 128))]
    gy = torch.randn(sum(counts), 64, generator=g)
    ref_in = [t.double().requires_grad_(True) for t in [x, *ws]]
    y_ref = grouped_swiglu(ref_in[0], counts, *ref_in[1:])
    ref = [y_ref] + list(torch.autograd.grad(y_ref, ref_in, gy.double()))
    bf = [t.to(CUDA, torch.bfloat16).requires_grad_(True) for t in [x, *ws]]
    y = grouped_swiglu_gemm(bf[0], counts, *bf[1:])
    got = [y] + list(torch.autograd.grad(y, bf, gy.to(CUDA, torch.bfloat16)))
    for name, a, b in zip(("y", "x", "w1", "w3", "w2"), got, ref):
        err = float((a.double().cpu() - b).abs().max() / b.abs().max())
        assert err < 3e-2, (name, err)


def test_moe_layer_takes_the_grouped_path_under_cuda_autocast(monkeypatch):
    calls = []
    monkeypatch.setattr(moe, "grouped_swiglu_gemm",
                        lambda *a: calls.append(1) or grouped_swiglu_gemm(*a))
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=64, hidden_dim=128, gating="topk", num_experts=8,
                               max_experts=8)).eval()
    x = torch.randn(300, 64)
    types = torch.randint(0, 5, (300,))
    y_cpu, losses_cpu = layer(x, types)
    layer = layer.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, losses = layer(x.to(CUDA), types.to(CUDA))
    assert calls and y.dtype == torch.float32 and losses.z.dtype == torch.float32
    assert float((y.cpu() - y_cpu).abs().max() / y_cpu.abs().max()) < 3e-2
    torch.testing.assert_close(losses.z.cpu(), losses_cpu.z, rtol=1e-4, atol=1e-6)


def test_tiny_trains_on_one_gpu_in_bf16():
    torch.manual_seed(0)
    config, inputs = tiny_inputs()
    model = create_model(config).to(CUDA).train()
    set_stage_trainable(model, stage_spec("timeexpert", 3))
    inputs = devices.to_device(inputs, CUDA)
    reference = copy.deepcopy(model)
    with devices.autocast(CUDA, "fp32"):
        loss32 = stage_loss(reference(**inputs, return_logits=False), 3, config)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(8):
        with devices.autocast(CUDA, "auto"):  # auto: bf16 on CUDA
            out = model(**inputs, return_logits=False)
            loss = stage_loss(out, 3, config)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(float(loss32.detach()), rel=LOSS_RTOL)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    assert np.isfinite(losses).all()


def test_inference_on_cuda_under_bf16(tmp_path):
    torch.manual_seed(0)
    tok = GroundingTokenizer.train(CAPTIONS * 4 + ["the cat"], vocab_size=400)  # tiny_inputs'
    config = get_preset("tiny_cpu").model.with_tokenizer(tok)
    GroundingModel(create_model(config), tok).save(str(tmp_path / "ckpt"))
    gm = GroundingModel.load(str(tmp_path / "ckpt"), device="cuda")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (config.num_frames, config.image_size, config.image_size, 3),
                          dtype=np.uint8)
    times = np.arange(config.num_frames, dtype=np.float32)
    with devices.autocast(CUDA, "bf16"):
        pred = gm.predict(frames, times, "mr", "the cat", duration=float(config.num_frames))
    assert next(gm.model.parameters()).is_cuda
    assert all(0.0 <= e.start <= e.end for e in pred.events)
