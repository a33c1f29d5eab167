"""Checkpoints written by expert-parallel ranks: each EP rank's expert slice in its own file,
read back whole or as any EP degree's slice, loaded by `from_pretrained` / `GroundingModel.load`,
and exported as one plain model directory (jobs/export.py). Written here by hand as the ranks of
an EP=2 run write them; the training run that writes them is tests/distributed/test_train.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from timeexpert.inference import GroundingModel
from timeexpert.models.expert_parallel import (
    expert_shard_file,
    expert_shards,
    is_expert_param,
    load_weights,
    shard_state_dict,
)
from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(checkpoint dir written as EP=2 ranks write it, the EP=1 state dict, the tokenizer)."""
    tok = GroundingTokenizer.train(["the red circle grows", "the blue square blinks"] * 3,
                                   vocab_size=400)
    torch.manual_seed(0)
    model = create_model(get_preset("tiny_cpu").model.with_tokenizer(tok))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    d = tmp_path_factory.mktemp("ckpt")
    for rank in range(2):  # each EP rank's expert slice, as `write_checkpoint` writes it
        shard = shard_state_dict(full, rank, 2)
        path = d / expert_shard_file(rank, 2)
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in shard.items() if is_expert_param(k)}, str(path))
    model.save_pretrained(str(d), state_dict={k: v for k, v in full.items()
                                               if not is_expert_param(k)})
    GroundingModel(model, tok).processor.save_pretrained(str(d))
    return str(d), full, tok


def test_the_slices_read_back_whole_or_at_any_ep_degree(written):
    d, full, _ = written
    assert [os.path.basename(p) for p in expert_shards(d)] == [
        "ep_00000-of-00002.safetensors", "ep_00001-of-00002.safetensors"]
    whole = load_weights(d)
    assert whole.keys() == full.keys()
    for name, value in full.items():
        torch.testing.assert_close(whole[name], value, rtol=0, atol=0, msg=name)
    for ep_size in (2, 4):  # the degree that wrote them, and another one
        for rank in range(ep_size):
            want = shard_state_dict(full, rank, ep_size)
            got = load_weights(d, rank, ep_size)
            for name, value in want.items():
                torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_from_pretrained_and_export_give_the_same_model(written, tmp_path):
    d, full, _ = written
    loaded = TimeExpertForGrounding.from_pretrained(d)
    for name, value in loaded.state_dict().items():
        if name in full:
            torch.testing.assert_close(value, full[name], rtol=0, atol=0, msg=name)
    out = tmp_path / "exported"
    run = subprocess.run([sys.executable, "jobs/export.py", "--checkpoint", d, "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (out / "experts").exists() and (out / "model.safetensors").is_file()
    exported = GroundingModel.load(str(out)).model
    for name, value in exported.state_dict().items():
        if name in full:
            torch.testing.assert_close(value, full[name], rtol=0, atol=0, msg=name)
    again = subprocess.run([sys.executable, "jobs/export.py", "--checkpoint", d, "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a model" in again.stderr


def test_a_missing_shard_is_a_clear_error(written, tmp_path):
    d, _, _ = written
    broken = tmp_path / "broken"
    (broken / "experts").mkdir(parents=True)
    for name in os.listdir(d):
        if os.path.isfile(os.path.join(d, name)):
            (broken / name).write_bytes(open(os.path.join(d, name), "rb").read())
    (broken / expert_shard_file(1, 2)).write_bytes(open(os.path.join(d, expert_shard_file(1, 2)), "rb").read())
    with pytest.raises(ValueError, match="incomplete set of expert shards"):
        load_weights(str(broken))


def _adam_state(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], steps: int = 2):
    """`Optimizers.state_dict()` of a local AdamW over `params` after `steps` steps on `grads`."""
    named = [(n, torch.nn.Parameter(v.clone())) for n, v in params.items()]
    opt = torch.optim.AdamW([p for _, p in named], lr=0.1)
    for _ in range(steps):
        for n, p in named:
            p.grad = grads[n].clone()
        opt.step()
    return {"local": opt.state_dict(), "names": [n for n, _ in named]}, named


def test_optimizer_state_reshards_to_another_ep_degree():
    """A run resumed at another EP degree: the moments of each expert slot follow the slot,
    replicated parameters keep theirs (`parallel.resharded_local_state`)."""
    from timeexpert.train.parallel import resharded_local_state

    g = torch.Generator().manual_seed(0)
    expert, dense = "layers.0.ffn.w1_LFD", "embed.weight"
    params = {expert: torch.randn(4, 3, 2, generator=g), dense: torch.randn(5, 2, generator=g)}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    whole, _ = _adam_state(params, grads)  # what an EP=1 rank wrote
    halves = [_adam_state({expert: params[expert][2 * r: 2 * r + 2], dense: params[dense]},
                          {expert: grads[expert][2 * r: 2 * r + 2], dense: grads[dense]})[0]
              for r in range(2)]  # what the two ranks of an EP=2 group wrote
    # EP=2 -> EP=1: the slices stitched
    target = [(expert, torch.nn.Parameter(params[expert].clone())),
              (dense, torch.nn.Parameter(params[dense].clone()))]
    stitched = resharded_local_state(halves, target, ep_rank=0)
    for i in range(2):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(stitched["state"][i][key], whole["local"]["state"][i][key])
    opt = torch.optim.AdamW([p for _, p in target], lr=0.1)
    opt.load_state_dict(stitched)  # and a fresh optimizer takes it
    # EP=1 -> EP=2, rank 1: its two slots' moments; the parameter order of the new rank may differ
    target = [(dense, torch.nn.Parameter(params[dense].clone())),
              (expert, torch.nn.Parameter(params[expert][2:].clone()))]
    cut = resharded_local_state([whole], target, ep_rank=1)
    torch.testing.assert_close(cut["state"][1]["exp_avg"], whole["local"]["state"][0]["exp_avg"][2:])
    torch.testing.assert_close(cut["state"][0]["exp_avg_sq"],
                               whole["local"]["state"][1]["exp_avg_sq"])
    # a slice that does not fit, and a state without names, are clear errors
    with pytest.raises(ValueError, match="does not fit"):
        resharded_local_state(halves, [(expert, torch.nn.Parameter(params[expert][:3]))], 1)
    with pytest.raises(ValueError, match="no parameter names"):
        resharded_local_state([{"local": whole["local"]}], target, 0)
