"""MoELayer against a naive per-expert reference, hand-computed losses, add/prune and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from timeexpert.config import MoEConfig
from timeexpert.events import NUM_TOKEN_TYPES, TokenType
from timeexpert.models.moe import (
    ExpertUpdate,
    MoELayer,
    MoELosses,
    grouped_swiglu,
    grouped_swiglu_autograd,
    grouped_swiglu_gemm,
)

D, FF = 16, 24


def make(gating: str, seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=D, hidden_dim=FF, gating=gating, **{"num_experts": 4, "max_experts": 8, **kw})
    return MoELayer(cfg).double()


def batch(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    types = torch.randint(0, NUM_TOKEN_TYPES, (n,), generator=g)
    return x, types


def ffn(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def reference(layer: MoELayer, x, types, *, straight_through: bool = True):
    """Gating written out from the equations, then a naive loop over experts (masks, no sorting)."""
    cfg = layer.cfg
    if cfg.gating == "dense":
        return ffn(x, layer.w1_FD, layer.w3_FD, layer.w2_DF)
    E, active = cfg.max_experts, layer.active_E
    if cfg.gating == "topk":
        logits = (x @ layer.w_gate_ED.T).masked_fill(~active, float("-inf"))
        probs = logits.softmax(-1)
        top, idx = probs.topk(cfg.num_experts_per_token, dim=-1)
        weight = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
        chosen = weight > 0
    else:
        cos = (x / x.norm(dim=-1, keepdim=True)) @ (
            layer.w_gate_ED / layer.w_gate_ED.norm(dim=-1, keepdim=True)
        ).T
        score = cos + cfg.alpha * layer.task_rate_TE[types]
        pre = torch.sigmoid(score) - torch.sigmoid(layer.threshold_E)
        pre = torch.where(active, pre, torch.full_like(pre, -2.0))
        chosen = pre > 0
        none = ~chosen.any(-1)
        chosen[none, pre[none].argmax(-1)] = True
        gate = 1 + pre - pre.detach() if straight_through else torch.ones_like(pre)
        weight = torch.where(chosen, gate, torch.zeros_like(pre)) / chosen.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for e in range(E):
        rows = chosen[:, e].nonzero().flatten()
        if len(rows):
            out = ffn(x[rows], layer.w1_LFD[e], layer.w3_LFD[e], layer.w2_LDF[e])
            y = y.index_add(0, rows, weight[rows, e, None] * out)
    return y


def grads(layer, x, fn):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = fn(x)
    r = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * r).sum().backward()
    named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), named


@pytest.mark.parametrize("gating", ["dense", "topk", "dynamic"])
def test_grouped_equals_naive_reference(gating):
    layer = make(gating).eval()  # eval: A_t must not move between the two runs
    x, types = batch()
    if gating == "dynamic":  # non-trivial A_t, a pruned slot, a mix of fired counts
        layer.task_rate_TE.uniform_(0, 1)
        layer.active_E[2] = False
        layer.active_E[5] = True
        layer.threshold_E.data = torch.linspace(-0.3, 0.3, 8, dtype=torch.float64)
    y, gx, gp = grads(layer, x, lambda x: layer(x, types)[0])
    y_ref, gx_ref, gp_ref = grads(layer, x, lambda x: reference(layer, x, types))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    assert gp.keys() == gp_ref.keys()
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], msg=name)


@pytest.mark.parametrize("counts", [[5, 0, 3, 7], [0, 0, 0, 0], [0, 15, 0, 0]])
def test_hand_written_grouped_backward_equals_autograd(counts):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(counts), D, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(4, *shape, generator=g, dtype=torch.float64, requires_grad=True)
          for shape in ((FF, D), (FF, D), (D, FF))]
    gy = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    outs = []
    for fn in (grouped_swiglu, grouped_swiglu_autograd):
        y = fn(x, counts, *ws)
        got = torch.autograd.grad(y, [x, *ws], gy, allow_unused=True)
        outs.append([y] + [torch.zeros_like(w) if t is None else t for t, w in zip(got, [x, *ws])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="counts"):
        grouped_swiglu(x, counts[:3], *ws)


@pytest.mark.parametrize("counts", [[5, 0, 3, 7], [0, 15, 0, 0], [4, 4, 4, 4]])
def test_grouped_gemm_equals_per_expert_reference_in_bf16(counts):
    """torch's grouped-mm path (the CUDA path's op; torch runs it on the CPU too) against the
    naive per-expert SwiGLU in fp64: outputs and every gradient within bf16 rounding (inputs and
    weights rounded to bf16, products accumulated in bf16: 3e-2 relative to each tensor's scale)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    ws = [torch.randn(4, *shape, generator=g, dtype=torch.float64) * 0.3
          for shape in ((FF, D), (FF, D), (D, FF))]
    gy = torch.randn(sum(counts), D, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_(True) for t in [x, *ws]]
    rows = torch.split(ref_in[0], counts)
    y_ref = torch.cat([ffn(rows[e], ref_in[1][e], ref_in[2][e], ref_in[3][e]) for e in range(4)])
    ref = [y_ref] + list(torch.autograd.grad(y_ref, ref_in, gy))
    bf = [t.to(torch.bfloat16).requires_grad_(True) for t in [x, *ws]]
    y = grouped_swiglu_gemm(bf[0], counts, *bf[1:])
    got = [y] + list(torch.autograd.grad(y, bf, gy.to(torch.bfloat16)))
    for name, a, b in zip(("y", "x", "w1", "w3", "w2"), got, ref):
        scale = b.abs().max().clamp_min(1e-6)
        assert float((a.detach().double() - b).abs().max() / scale) < 3e-2, name
    with pytest.raises(ValueError, match="counts"):
        grouped_swiglu_gemm(bf[0], counts[:3], *bf[1:])


@pytest.mark.parametrize("gating", ["topk", "dynamic"])
def test_router_stays_fp32_under_bf16_autocast(gating):
    """Under CPU bf16 autocast the experts compute in bf16 but the routing decision, the aux and
    z-losses are the fp32 ones: the same experts chosen, the losses equal to fp32 rounding."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, hidden_dim=FF, gating=gating, num_experts=4, max_experts=8)
    layer = MoELayer(cfg).eval()
    x, types = batch()
    x = x.float()
    y32, losses32 = layer(x, types)
    pairs32 = layer.tel_pairs_TE.clone()
    layer.reset_telemetry()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, losses16 = layer(x, types)
    assert y16.dtype == torch.float32 and losses16.aux.dtype == losses16.z.dtype == torch.float32
    torch.testing.assert_close(layer.tel_pairs_TE, pairs32)  # identical routing
    torch.testing.assert_close(losses16.aux, losses32.aux, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses16.z, losses32.z, rtol=1e-6, atol=1e-7)
    assert float((y16 - y32).abs().max() / y32.abs().max()) < 3e-2  # experts in bf16


def test_dynamic_routes_any_number_and_falls_back_to_best_expert():
    layer = make("dynamic")
    x, types = batch(64)
    layer.threshold_E.data[:] = 0.02  # some tokens fire several experts, some none
    y, _ = layer(x, types)
    tel = layer.telemetry()
    assert sum(tel["unrouted"].values()) > 0
    per_token = sum(sum(c) for c in tel["expert_counts"].values()) / 64
    assert 1.0 < per_token < 4.0
    # with every threshold unreachable, each token gets exactly its best expert's FFN
    layer.threshold_E.data[:] = 50.0
    layer.reset_telemetry()
    y, _ = layer(x, types)
    assert layer.telemetry()["mean_active_experts"] == 1.0
    cos = F.normalize(x, dim=-1) @ F.normalize(layer.w_gate_ED[:4], dim=-1).T
    best = cos.argmax(-1)  # A_t is zero here
    expect = torch.stack(
        [ffn(x[n], layer.w1_LFD[b], layer.w3_LFD[b], layer.w2_LDF[b]) for n, b in enumerate(best)]
    )
    torch.testing.assert_close(y, expect)


def test_straight_through_gradient_reaches_gate_threshold_and_token():
    layer = make("dynamic").eval()
    x, types = batch()
    _, gx, gp = grads(layer, x, lambda x: layer(x, types)[0])
    active = layer.active_E
    assert gp["threshold_E"][active].abs().min() > 0
    assert gp["w_gate_ED"][active].abs().sum(-1).min() > 0
    assert not gp["threshold_E"][~active].any()
    # the token's gradient includes the gating path: it differs from the one without ST
    _, gx_plain, _ = grads(layer, x, lambda x: reference(layer, x, types, straight_through=False))
    assert (gx - gx_plain).abs().max() > 1e-6
    _, gx_ref, _ = grads(layer, x, lambda x: reference(layer, x, types))
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize("gating", ["topk", "dynamic"])
def test_aux_and_z_loss_equal_hand_computed(gating):
    torch.manual_seed(3)
    cfg = MoEConfig(dim=4, hidden_dim=4, gating=gating, num_experts=3, max_experts=4,
                    num_experts_per_token=1, lambda_1=0.5, lambda_2=0.25, z_loss_weight=0.1)
    layer = MoELayer(cfg).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    types = torch.tensor([0, 0, 1, 2, 2, 2])
    _, losses = layer(x, types)
    W = layer.w_gate_ED.detach()
    act = [0, 1, 2]
    # by hand, token by token
    logits, soft, hard = [], [], []
    for n in range(6):
        if gating == "topk":
            l = [float(x[n] @ W[e]) for e in act]
            p = torch.tensor(l, dtype=torch.float64).softmax(0).tolist()
            h = [1.0 if e == max(range(3), key=lambda i: p[i]) else 0.0 for e in range(3)]
        else:
            l = [float(x[n] @ W[e] / (x[n].norm() * W[e].norm())) for e in act]
            p = [1 / (1 + math.exp(-v)) for v in l]
            h = [1.0 if p[e] > 0.5 else 0.0 for e in range(3)]
            if not any(h):
                h[max(range(3), key=lambda i: p[i])] = 1.0
        logits.append(l), soft.append(p), hard.append(h)
    load = 0.0
    for t in (0, 1, 2):
        rows = [n for n in range(6) if int(types[n]) == t]
        a = [sum(soft[n][e] for n in rows) for e in range(3)]
        m = [sum(hard[n][e] for n in rows) for e in range(3)]
        load += len(rows) / 6 * sum((a[e] / sum(a) - m[e] / sum(m)) ** 2 for e in range(3))
    norm = sum(float(W[e] @ W[e]) for e in act)
    aux = 0.5 * load + 0.25 * norm
    z = 0.1 * sum(math.log(sum(math.exp(v) for v in l)) ** 2 for l in logits) / 6
    assert losses.aux.item() == pytest.approx(aux, rel=1e-9)
    assert losses.z.item() == pytest.approx(z, rel=1e-9)
    assert losses.aux.requires_grad and losses.z.requires_grad


def test_dense_mode_is_one_ffn_with_zero_losses():
    layer = make("dense")
    x, types = batch()
    y, losses = layer(x, types)
    torch.testing.assert_close(y, ffn(x, layer.w1_FD, layer.w3_FD, layer.w2_DF))
    assert isinstance(losses, MoELosses) and losses.aux.item() == 0 and losses.z.item() == 0
    assert layer.update_experts() == ExpertUpdate(added=[], pruned=[])


def test_add_initialises_new_expert_from_normalised_unrouted_mean():
    layer = make("dynamic", add_threshold=0.5, tau_min=0.0)
    x, types = batch(32)
    layer.threshold_E.data[:] = 50.0  # nothing fires: every token is unrouted
    layer.train()
    layer(x, types)
    layer(x[:8], types[:8])
    before = int(layer.active_E.sum())
    update = layer.update_experts()
    assert update.added == [4] and update.pruned == []
    assert int(layer.active_E.sum()) == before + 1
    mean = torch.cat([x, x[:8]]).mean(0)
    torch.testing.assert_close(layer.w_gate_ED[4].detach(), mean / mean.norm())
    assert layer.threshold_E[4].item() == 0.0
    assert layer.token_count.item() == 0 and layer.unrouted_count.item() == 0


def test_update_prunes_experts_under_tau_min_with_forced_statistics():
    layer = make("dynamic", tau_min=0.01, num_experts=5)
    layer.token_count.fill_(1000.0)
    layer.fired_count_E.copy_(torch.tensor([500, 9, 10, 300, 0, 0, 0, 0], dtype=torch.float64))
    update = layer.update_experts()
    assert update.pruned == [1, 4] and update.added == []  # 9/1000 and 0/1000 < 0.01 <= 10/1000
    assert layer.active_E.tolist() == [True, False, True, True] + [False] * 4


def test_prune_keeps_the_most_used_expert_when_all_fall_under_tau_min():
    layer = make("dynamic", tau_min=0.5)
    layer.token_count.fill_(100.0)
    layer.fired_count_E.copy_(torch.tensor([1, 3, 2, 0, 0, 0, 0, 0], dtype=torch.float64))
    assert layer.update_experts() == ExpertUpdate(added=[], pruned=[0, 2, 3])
    assert layer.active_E.nonzero().flatten().tolist() == [1]


def test_update_prunes_an_expert_that_never_fires_in_training():
    layer = make("dynamic", tau_min=0.05)
    layer.threshold_E.data = torch.tensor([-5.0, 50.0, -5.0, -5.0, 0, 0, 0, 0], dtype=torch.float64)
    layer.train()
    x, types = batch(32)
    layer(x, types)
    assert layer.update_experts() == ExpertUpdate(added=[], pruned=[1])
    assert layer.active_E.nonzero().flatten().tolist() == [0, 2, 3]
    assert not layer.task_rate_TE[:, 1].any()
    layer.reset_telemetry()
    layer.threshold_E.data[:] = -50.0  # everything would fire, but the pruned slot is masked
    layer(x, types)
    assert all(c[1] == 0 and c[0] > 0 for c in layer.telemetry()["expert_counts"].values())


def test_topk_update_is_noop_and_telemetry_counts_pairs():
    layer = make("topk", num_experts_per_token=2)
    x, types = batch(50)
    layer(x, types)
    tel = layer.telemetry()
    assert tel["mean_active_experts"] == 2.0
    assert sum(tel["tokens"].values()) == 50
    assert sum(sum(c) for c in tel["expert_counts"].values()) == 100
    assert all(c[4:] == [0, 0, 0, 0] for c in tel["expert_counts"].values())
    assert layer.update_experts() == ExpertUpdate(added=[], pruned=[])
    layer.reset_telemetry()
    assert layer.telemetry()["mean_active_experts"] == 0.0


def test_task_rate_tracks_per_type_activation_rate():
    layer = make("dynamic", rate_momentum=0.5)
    x, _ = batch(20)
    types = torch.full((20,), int(TokenType.TIME))
    layer.threshold_E.data = torch.tensor([-50.0, 50.0, -50.0, 50.0, 0, 0, 0, 0], dtype=torch.float64)
    layer.train()
    layer(x, types)
    assert layer.task_rate_TE[TokenType.TIME].tolist() == [0.5, 0, 0.5, 0, 0, 0, 0, 0]
    assert not layer.task_rate_TE[TokenType.SCORE].any()  # absent type keeps its rate
    layer.eval()
    layer(x, types)  # no statistics at inference
    assert layer.task_rate_TE[TokenType.TIME, 0].item() == 0.5


def test_state_dict_round_trips_mask_and_statistics(tmp_path):
    layer = make("dynamic", add_threshold=0.0, tau_min=0.3)
    x, types = batch(48)
    layer.train()
    layer(x, types)
    update = layer.update_experts()
    layer(x, types)  # fresh statistics after the update
    assert update.added or update.pruned
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "moe.safetensors")
    fresh = make("dynamic", seed=7, add_threshold=0.0, tau_min=0.3)
    fresh.load_state_dict(load_file(tmp_path / "moe.safetensors"))
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, msg=name)
    for name in ("active_E", "task_rate_TE", "fired_count_E", "unrouted_sum_D", "threshold_E"):
        assert name in fresh.state_dict()
    layer.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x, types)[0], layer(x, types)[0])


def test_bad_inputs_raise_value_errors():
    layer = make("topk")
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 3, D, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_N"):
        layer(torch.randn(4, D, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_experts"):
        MoEConfig(dim=D, hidden_dim=FF, num_experts=9, max_experts=8)
