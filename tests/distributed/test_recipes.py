"""Recipes through the real pipeline: GroundVTS's progressive stages train what they say (sampler
alone, then LoRA on attention, then all but vision) and plot token density into MLflow; D2VLM
batches carry evidence targets so L_gnd trains the evidence head; FPO after a stage raises the
chosen-vs-rejected margin against the frozen reference; FPO on two Ray Train workers equals a
single-process loop that averages the two ranks' gradients."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    from timeexpert.data import synth

    spec = synth.SynthSpec(name="mini", num_videos={"train": 4, "val": 2, "test": 1},
                           min_duration=8, max_duration=12, max_event_len=5)
    root = str(tmp_path_factory.mktemp("data") / "mini")
    synth.generate(spec, root, seed=0, workers=1)
    return root


def _config(**kw):
    from timeexpert.train.config import TrainConfig

    base = dict(preset="tiny_cpu", num_workers=1, cpus_per_worker=0.5, num_steps=2, batch_size=2,
                checkpoint_every=2, log_every=1, expert_update_every=0, eval_max_records=0,
                lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(uri):
    from timeexpert.models.expert_parallel import load_weights

    return load_weights(uri)


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.slow
def test_groundvts_recipe_trains_sampler_then_lora_then_all(ray_cluster, mini_data, tmp_path):
    from timeexpert import tracking
    from timeexpert.models.timeexpert import create_model
    from timeexpert.train.loop import load_tokenizer, model_config
    from timeexpert.train.stages import run_pipeline

    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _config(data_root=mini_data, storage_root=str(tmp_path / "runs"), name="gvts",
                  recipe="groundvts", lora_rank=2, tracking_uri=db,
                  model_overrides={"token_sampling": {"keep_ratio": 0.5, "rank": 8}},
                  eval_max_records=1)
    result = run_pipeline(cfg, steps={1: 2, 2: 2, 3: 1})
    tok_uri = result.tokenizer_uri

    torch.manual_seed(cfg.seed)  # the worker's fresh weights: the same seeded init
    model = create_model(model_config(cfg, load_tokenizer(tok_uri)))
    params = {n for n, _ in model.named_parameters()}  # buffers (routing rates) move in any stage
    fresh = {k: v for k, v in model.state_dict().items() if k in params}
    w1, w2, w3 = (_weights(result.stages[n].checkpoint_uri) for n in (1, 2, 3))
    assert set(w1) == set(w2) == set(w3) >= set(fresh)  # LoRA merged: plain keys only
    assert not any("lora_" in k or "base_layer" in k for k in w2)

    c1 = _changed(fresh, w1)
    assert c1 and all(k.startswith("token_sampler.") for k in c1), sorted(c1)[:5]
    c2 = _changed(w1, w2)
    # tiny_cpu's vision encoder is random (no vision_path): it trains wherever the projector does
    assert all(k.startswith(("token_sampler.", "projector.", "layers.", "frame_encoder."))
               for k in c2), sorted(c2)
    attn = sorted(k for k in c2 if ".attn." in k)
    assert attn, "LoRA adapters changed no attention weight in stage 2"
    for k in attn:  # a merged LoRA update: low rank (<= lora_rank)
        assert torch.linalg.matrix_rank((w2[k] - w1[k]).double(), rtol=1e-6) <= 2, k
    assert any(".ffn." in k for k in c2)  # grouped experts train in full
    c3 = _changed(w2, w3)
    assert any(k.startswith("lm_head.") for k in c3) and any(k.startswith("frame_encoder.") for k in c3)

    # stage 1's evaluation plotted the token density of each task's first video into its run
    run_id = result.stages[1].mlflow_run_id
    arts = [a.path for a in tracking.client(db).list_artifacts(run_id, "plots")]
    assert "plots/token_density_mr.png" in arts, arts


def test_d2vlm_batches_train_the_evidence_head():
    from timeexpert.events import Task
    from timeexpert.models.timeexpert import TimeExpertForGrounding
    from timeexpert.models.tokenizer import GroundingTokenizer
    from timeexpert.presets import get_preset
    from timeexpert.train.batches import tokenize_batch
    from timeexpert.train.recipes import set_trainable, stage_loss

    tok = GroundingTokenizer.train(["a man opens the door", "the red ball rolls"], vocab_size=400)
    cfg = get_preset("tiny_cpu").model
    cfg.evidence = {"temperature": 0.2}
    cfg = cfg.with_tokenizer(tok)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(cfg).train()
    rng = np.random.default_rng(0)
    T = 6
    batch = {
        "id": np.array(["a", "b"]),
        "task": np.array([Task.MR.value, Task.DVC.value]),
        "query": np.array(["a man opens the door", ""]),
        "timestamps": np.tile(np.arange(T, dtype=np.float64), (2, 1)),
        "frame_mask": np.ones((2, T), bool),
        "duration": np.array([6.0, 6.0]),
        "frames": rng.integers(0, 256, size=(2, T, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
        "events": np.array([
            json.dumps([{"start": 1.0, "end": 3.0, "score": 1.0, "caption": ""}]),
            json.dumps([{"start": 0.0, "end": 2.0, "score": 1.0, "caption": "a man opens the door"},
                        {"start": 3.0, "end": 5.0, "score": 1.0, "caption": "the red ball rolls"}]),
        ]),
    }
    inputs = tokenize_batch(batch, tok, cfg, model)
    assert inputs["evidence_frames"].shape == (2, 2, T)
    assert inputs["evidence_frames"][0, 0].tolist() == [0, 1, 1, 0, 0, 0]
    names = set_trainable(model, 1)  # TimeExpert stage 1 (task modules) includes the evidence head
    assert any(n.startswith("evidence_head.") for n in names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    grounding = []
    for _ in range(5):
        out = model(**inputs)
        assert out.loss_grounding is not None and out.loss_consistency is not None
        loss = stage_loss(out, 1, cfg)
        without = (out.loss_time + out.loss_score + out.loss_text).detach()
        assert float(loss.detach() - without) == pytest.approx(
            float((out.loss_grounding + out.loss_consistency).detach()), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if n.startswith("evidence_head.")]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
        grounding.append(float(out.loss_grounding))
    assert grounding[-1] < grounding[0], grounding


@pytest.mark.slow
def test_d2vlm_stage_then_fpo_raises_the_margin(ray_cluster, mini_data, tmp_path):
    from timeexpert.inference import GroundingModel
    from timeexpert.train.stages import run_pipeline

    cfg = _config(data_root=mini_data, storage_root=str(tmp_path / "runs"), name="d2vlm",
                  model_overrides={"evidence": {"temperature": 0.2}}, fpo_steps=18, fpo_beta=0.5,
                  lr=1e-3, log_every=1)
    result = run_pipeline(cfg, stages=(1,))
    m = result.stages[1].train_metrics
    assert m["loss_grounding"] > 0 and "loss_consistency" in m, m
    fpo = result.fpo
    assert fpo is not None and result.checkpoint_uri == fpo.checkpoint_uri
    # the first step: policy == reference, margin 0; 18 steps cycle the 2 batches of pairs (9
    # were enough before the GQA records joined the data: its batches now hold GQA pairs too)
    assert fpo.train_metrics["fpo/first_margin"] == pytest.approx(0.0, abs=1e-3)
    assert fpo.train_metrics["fpo/reward_margin"] > 0.1, fpo.train_metrics
    assert fpo.train_metrics["fpo/fpo_loss"] < 0.69
    gm = GroundingModel.load(fpo.checkpoint_uri)  # a loadable checkpoint
    assert gm.model.config.evidence is not None


@pytest.mark.slow
def test_fpo_on_two_workers_equals_averaging_the_ranks_gradients(ray_cluster, mini_data, tmp_path,
                                                                one_torch_thread):
    """FPO under Ray Train, 2 gloo workers: rank r takes the batches r, r + 2, ... of the train
    rows, and the run equals one process stepping on the mean of the two ranks' gradients, with
    the ranks' mean metrics; its checkpoint at output_uri loads."""
    from timeexpert import storage
    from timeexpert.data import formats
    from timeexpert.data.pipeline import build_dataset, decode_rows
    from timeexpert.inference import GroundingModel
    from timeexpert.models.timeexpert import create_model
    from timeexpert.train.fpo import FPOConfig, encode_pairs, fpo_step, train_fpo
    from timeexpert.train.batches import data_config
    from timeexpert.train.fit import train_tokenizer
    from timeexpert.train.loop import model_config
    from timeexpert.train.recipes import set_trainable

    cfg = _config(data_root=mini_data, storage_root=str(tmp_path / "runs"), name="fpo2",
                  num_workers=2, model_overrides={"evidence": {"temperature": 0.2}},
                  fpo_steps=2, fpo_beta=0.5, lr=1e-3)
    records = formats.read_manifest(storage.join_uri(mini_data, "manifests", "train.jsonl"))
    tokenizer = train_tokenizer(cfg, records)
    mconfig = model_config(cfg, tokenizer)
    torch.manual_seed(0)
    start = str(tmp_path / "start")
    GroundingModel(create_model(mconfig), tokenizer).save(start)
    output_uri = str(tmp_path / "runs" / "fpo2-fpo" / "checkpoint")

    metrics = train_fpo(start, cfg, output_uri=output_uri)

    # the reference: one process, the ranks' batches of each step in turn, their gradients averaged
    policy = GroundingModel.load(start).model.eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    set_trainable(policy, 3, cfg.recipe)
    params = [p for p in policy.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = data_config(cfg, mconfig)
    rows = build_dataset(data, split="train", shuffle=False, preserve_order=True).rows
    B, W = cfg.batch_size, cfg.num_workers
    for step in range(cfg.fpo_steps):
        grads, ranks = [torch.zeros_like(p) for p in params], []
        for n in range(step * W, step * W + W):  # batch n is rank n % W's
            batch = decode_rows(rows[n * B: (n + 1) * B], data)
            batch_rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))]
            pairs = encode_pairs(batch_rows, tokenizer, mconfig, policy, seed=cfg.seed + n)
            assert pairs is not None
            optim.zero_grad(set_to_none=True)
            loss, m = fpo_step(policy, reference, *pairs, FPOConfig(beta=cfg.fpo_beta))
            loss.backward()
            for g, p in zip(grads, params):  # no gradient counts as zeros (sync_gradients)
                g += 0 if p.grad is None else p.grad
            ranks.append(m)
        for g, p in zip(grads, params):
            p.grad = g / W
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()

    for key in ("fpo_loss", "reward_margin", "reward_accuracy"):
        assert metrics[f"fpo/{key}"] == pytest.approx(np.mean([m[key] for m in ranks]), abs=1e-6)
    assert metrics["step"] == cfg.fpo_steps
    assert metrics["fpo/first_margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert metrics["fpo/reward_margin"] > 0, metrics  # the margin moved up
    trained = _weights(output_uri)
    expected = policy.state_dict()
    for name, p in policy.named_parameters():
        if p.requires_grad:  # equal, bit for bit, with one torch thread as the workers have
            torch.testing.assert_close(trained[name], expected[name])
    gm = GroundingModel.load(output_uri)  # a loadable model directory
    assert gm.model.config.evidence is not None
    state = json.loads(storage.read_text(storage.join_uri(output_uri, "train_state.json")))
    assert state["state"] == {"stage": "fpo", "step": cfg.fpo_steps}
