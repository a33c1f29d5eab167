"""The TimeExpert grounding model: forward/backward per gating mode, per-head overfit, HF
save/load with routing state, mismatching checkpoints, sparse upcycling, SigLIP, presets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from timeexpert.events import Event, Task, TokenType
from timeexpert.models.configuration_timeexpert import REMOVED_AFTER, AnswerChoice, TimeExpertConfig
from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model
from timeexpert.models.tokenizer import GroundingTokenizer, collate
from timeexpert.presets import PRESETS, get_preset, list_presets

GATINGS = ["dense", "topk", "dynamic"]
CAPTIONS = ["a person opens the door", "the cat jumps on the sofa", "a red ball rolls away"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    return GroundingTokenizer.train(CAPTIONS + ["the cat", "a door"], vocab_size=400)


def tiny_config(tok, gating: str = "dynamic", **overrides) -> TimeExpertConfig:
    cfg = get_preset("tiny_cpu").model
    cfg.moe = {**cfg.moe, "gating": gating}
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg.with_tokenizer(tok)


def tiny_batch(tok, cfg, seed: int = 0):
    """Three examples (MR, VHD, DVC) with frames; the answers use all three heads."""
    rng = np.random.default_rng(seed)
    ts = [0.0, 1.0, 2.0, 3.0]
    examples = [
        tok.encode_example(
            Task.MR, "the cat", ts, [Event(1.0, 2.5, 1.0)], tokens_per_frame=cfg.tokens_per_frame
        ),
        tok.encode_example(
            Task.VHD,
            "a door",
            ts[:3],
            [Event(0.0, 1.0, 3.5), Event(2.0, 3.0, 1.0)],
            tokens_per_frame=cfg.tokens_per_frame,
        ),
        tok.encode_example(
            Task.DVC,
            "",
            ts,
            [Event(0.0, 2.0, 0.5, CAPTIONS[0]), Event(2.0, 4.0, 0.9, CAPTIONS[1])],
            tokens_per_frame=cfg.tokens_per_frame,
        ),
    ]
    frames = rng.integers(0, 256, size=(11, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    batch = collate(examples)
    return batch, frames


def make(cfg, seed=0) -> TimeExpertForGrounding:
    torch.manual_seed(seed)
    return TimeExpertForGrounding(cfg)


@pytest.mark.parametrize("gating", GATINGS)
def test_forward_backward_each_gating_mode(tok, gating):
    cfg = tiny_config(tok, gating)
    model = make(cfg)
    batch, frames = tiny_batch(tok, cfg)
    out = model(**batch, pixel_values=model.preprocess_frames(frames))
    B, N = batch["input_ids"].shape
    assert out.time_logits.shape == (B, N, 13) and out.score_logits.shape == (B, N, 13)
    assert out.text_logits.shape == (B, N, cfg.text_vocab_size)
    for name in ("loss_time", "loss_score", "loss_text"):
        assert torch.isfinite(getattr(out, name)) and getattr(out, name) > 0
    if gating == "dense":
        assert out.aux_loss == 0 and out.z_loss == 0
    else:
        assert out.aux_loss > 0 and out.z_loss > 0
    expected = out.loss_time + out.loss_score + out.loss_text + out.aux_loss + out.z_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    # gradients reach every stage: vision, compression, encoders, decoder experts, the heads
    for name in (
        "frame_encoder.patch_embed.weight",
        "compressor.slots_SV",
        "projector.net.0.weight",
        "time_encoder.embed.weight",
        "score_encoder.embed.weight",
        "text_embed.weight",
        "layers.0.attn.q_proj.weight",
        "time_head.proj.weight",
        "score_head.proj.weight",
        "lm_head.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    ffn = model.layers[0].ffn
    expert_w = ffn.w1_FD if gating == "dense" else ffn.w1_LFD
    assert expert_w.grad.abs().sum() > 0
    if gating != "dense":
        assert ffn.w_gate_ED.grad.abs().sum() > 0


def test_padding_and_explicit_positions_do_not_change_real_tokens(tok):
    cfg = tiny_config(tok, "topk")
    model = make(cfg).eval()
    batch, frames = tiny_batch(tok, cfg)
    pixels = model.preprocess_frames(frames)
    full = model(**batch, pixel_values=pixels)
    # the MR example alone (its 4 frames), unpadded
    n = int(batch["attention_mask"][0].sum())
    alone = model(batch["input_ids"][:1, :n], batch["token_types"][:1, :n], pixel_values=pixels[:4])
    torch.testing.assert_close(alone.text_logits[0], full.text_logits[0, :n], atol=1e-5, rtol=1e-5)
    # left padding with counted positions gives the same logits as right padding
    left = collate(
        [
            tok.encode_prompt(Task.MR, "the cat", [0.0, 1.0], tokens_per_frame=8),
            tok.encode_prompt(Task.MR, "the cat sofa door", [0.0, 1.0, 2.0], tokens_per_frame=8),
        ],
        padding_side="left",
    )
    right = collate(
        [
            tok.encode_prompt(Task.MR, "the cat", [0.0, 1.0], tokens_per_frame=8),
            tok.encode_prompt(Task.MR, "the cat sofa door", [0.0, 1.0, 2.0], tokens_per_frame=8),
        ]
    )
    px = pixels[:5]
    ol = model(**{k: v for k, v in left.items() if k != "labels"}, pixel_values=px)
    orr = model(**{k: v for k, v in right.items() if k != "labels"}, pixel_values=px)
    m_l, m_r = left["attention_mask"][0].bool(), right["attention_mask"][0].bool()
    torch.testing.assert_close(
        ol.text_logits[0][m_l], orr.text_logits[0][m_r], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("gating", GATINGS)
def test_overfit_fixed_batch_every_head_loss_decreases(tok, gating):
    cfg = tiny_config(tok, gating)
    model = make(cfg)
    batch, frames = tiny_batch(tok, cfg)
    pixels = model.preprocess_frames(frames)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(**batch, pixel_values=pixels)
        if first is None:
            first = {k: getattr(out, k).item() for k in ("loss_time", "loss_score", "loss_text")}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = {k: getattr(out, k).item() for k in first}
    for k in first:
        assert last[k] < 0.5 * first[k], (k, first[k], last[k])


def _routing_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if any(
            s in k
            for s in ("active_E", "task_rate_TE", "threshold_E", "fired_count_E", "w_gate_ED")
        )
    }


def test_save_load_identical_outputs_and_routing_state(tok, tmp_path):
    from transformers import AutoConfig, AutoModel

    cfg = tiny_config(tok, "dynamic")
    model = make(cfg)
    batch, frames = tiny_batch(tok, cfg)
    pixels = model.preprocess_frames(frames)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # training moves A_t and the statistics
        out = model(**batch, pixel_values=pixels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():  # a routing decision: expert 1 of layer 0 pruned
        model.layers[0].ffn.active_E[1] = False
    state = _routing_state(model)
    assert model.layers[0].ffn.task_rate_TE.abs().sum() > 0
    model.eval()
    ref = model(**batch, pixel_values=pixels)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "timeexpert"
    for loaded in (
        TimeExpertForGrounding.from_pretrained(tmp_path),
        AutoModel.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, TimeExpertForGrounding)
        loaded.eval()
        for k, v in _routing_state(loaded).items():
            assert torch.equal(v, state[k]), k
        assert not loaded.layers[0].ffn.active_E[1]
        again = loaded(**batch, pixel_values=pixels)
        # same weights bit for bit (above); outputs to float rounding (a freshly loaded tensor's
        # memory alignment can pick another SIMD kernel path)
        for k in ("loss", "text_logits", "time_logits", "score_logits"):
            torch.testing.assert_close(getattr(again, k), getattr(ref, k), rtol=1e-6, atol=1e-6)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), k


def test_mismatching_checkpoint_is_a_value_error(tok, tmp_path):
    cfg = tiny_config(tok, "topk")
    make(cfg).save_pretrained(tmp_path)
    other = tiny_config(tok, "topk", hidden_size=96)
    with pytest.raises(ValueError, match="hidden_size: config 96 vs checkpoint 64"):
        TimeExpertForGrounding.from_pretrained(tmp_path, config=other)
    other = tiny_config(tok, "topk")
    other.moe = {**other.moe, "max_experts": 6}
    with pytest.raises(ValueError, match="moe"):
        TimeExpertForGrounding.from_pretrained(tmp_path, config=other)
    # config.json edited so that the weights no longer fit
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path, broken, ignore=shutil.ignore_patterns("broken"))
    d = json.loads((broken / "config.json").read_text())
    d["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="missing_keys"):
        TimeExpertForGrounding.from_pretrained(broken)
    d["num_hidden_layers"], d["intermediate_size"] = 2, 100
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="does not match"):
        TimeExpertForGrounding.from_pretrained(broken)
    with pytest.raises(ValueError, match="no config.json"):
        TimeExpertForGrounding.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_raise_value_errors(tok):
    cfg = tiny_config(tok, "topk")
    model = make(cfg)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        model.preprocess_frames(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="zero frames"):
        model.preprocess_frames(np.zeros((0, 32, 32, 3), np.uint8))
    batch, frames = tiny_batch(tok, cfg)
    with pytest.raises(ValueError, match="VISUAL tokens"):
        model(**batch, pixel_values=model.preprocess_frames(frames[:3]))
    long = torch.zeros(1, cfg.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(long, torch.full_like(long, int(TokenType.TEXT)))
    # frames at another size are resized like an image processor would
    assert model.preprocess_frames(np.zeros((2, 48, 40, 3), np.uint8)).shape == (2, 3, 32, 32)


# --- sparse upcycling ----------------------------------------------------------------------------


def _dense_checkpoint(kind: str, vocab: int, path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False))
    model.save_pretrained(path)


@pytest.mark.parametrize(
    "kind,gating", [("qwen2", "topk"), ("llama", "dynamic"), ("qwen2", "dense")]
)
def test_upcycled_moe_reproduces_the_dense_model(tok, tmp_path, kind, gating):
    from timeexpert.models.upcycle import decoder_fields_from_dense
    from transformers import AutoModelForCausalLM

    dense_vocab = tok.text_vocab_size - 3  # the dense tokenizer lacks our 3 added tokens
    _dense_checkpoint(kind, dense_vocab, tmp_path / "dense")
    fields = decoder_fields_from_dense(str(tmp_path / "dense"))
    cfg = tiny_config(tok, gating, upcycle_noise_std=0.0, **fields)
    model = create_model(cfg).eval()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    if gating == "topk":  # uniform gating: every expert gets the same weight
        for layer in model.layers:
            with torch.no_grad():
                layer.ffn.w_gate_ED.zero_()
    # one FFN: identical experts + uniform gating == the dense FFN
    x_ND = torch.randn(10, 64)
    types_N = torch.randint(0, 5, (10,))
    y_ND, _ = model.layers[0].ffn(x_ND, types_N)
    torch.testing.assert_close(y_ND, dense.model.layers[0].mlp(x_ND), atol=1e-5, rtol=1e-5)
    # the whole decoder on text tokens: same hidden states and logits over the shared vocab
    ids = torch.randint(0, dense_vocab, (2, 12))
    ours = model(ids, torch.full_like(ids, int(TokenType.TEXT)))
    theirs = dense(ids, output_hidden_states=True)
    torch.testing.assert_close(ours.hidden_states, theirs.hidden_states[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ours.text_logits[..., :dense_vocab], theirs.logits, atol=1e-4, rtol=1e-4
    )


def test_upcycling_perturbs_each_expert_and_checks_shapes(tok, tmp_path):
    from timeexpert.models.upcycle import decoder_fields_from_dense

    _dense_checkpoint("qwen2", tok.text_vocab_size, tmp_path / "dense")
    fields = decoder_fields_from_dense(str(tmp_path / "dense"))
    model = create_model(tiny_config(tok, "topk", upcycle_noise_std=0.01, **fields))
    w = model.layers[0].ffn.w1_LFD.detach()
    assert not torch.equal(w[0], w[1])  # experts can diverge
    assert (w[0] - w[1]).abs().max() < 0.1 * w[0].abs().max()  # but start close to the dense FFN
    bad = tiny_config(tok, "topk", **{**fields, "intermediate_size": 96})
    with pytest.raises(ValueError, match="intermediate_size: ours 96 vs dense 128"):
        create_model(bad)


# --- SigLIP vision tower -------------------------------------------------------------------------


def test_siglip_checkpoint_through_transformers(tok, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(2)
    sig_cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    SiglipVisionModel(sig_cfg).save_pretrained(tmp_path / "siglip")
    cfg = tiny_config(
        tok,
        "topk",
        vision_encoder="siglip",
        vision_path=str(tmp_path / "siglip"),
        compressor_num_heads=2,
    )
    cfg = TimeExpertConfig(**cfg.to_dict())  # re-run validation: reads the SigLIP config
    assert cfg.vision_width == 32 and cfg.vision_siglip["hidden_size"] == 32
    model = create_model(cfg).eval()
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pixels = model.preprocess_frames(frames)
    reference = SiglipVisionModel.from_pretrained(tmp_path / "siglip").eval()
    torch.testing.assert_close(
        model.frame_encoder(pixels), reference(pixel_values=pixels).last_hidden_state
    )
    assert model.encode_frames(pixels).shape == (3, cfg.tokens_per_frame, cfg.hidden_size)
    # the saved model no longer needs the SigLIP directory
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(tmp_path / "siglip")
    loaded = TimeExpertForGrounding.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(loaded.encode_frames(pixels), model.encode_frames(pixels))


# --- presets -------------------------------------------------------------------------------------


def test_presets_registry():
    assert list_presets() == list(PRESETS) and {"tiny_cpu", "small_cpu", "paper_gpu"} <= set(
        PRESETS
    )
    for name in list_presets():
        preset = get_preset(name)
        assert preset.name == name and isinstance(preset.model, TimeExpertConfig)
    tiny = get_preset("tiny_cpu").model
    assert (tiny.num_hidden_layers, tiny.moe["num_experts"], tiny.hidden_size, tiny.num_frames) == (
        2,
        4,
        64,
        8,
    )
    paper = get_preset("paper_gpu").model
    assert (
        paper.num_frames,
        paper.tokens_per_frame,
        paper.moe["max_experts"],
        paper.vision_encoder,
    ) == (128, 8, 64, "siglip")
    # the demo's model: frame relevance trained in one stage, its settings a valid config
    grounding = get_preset("grounding_cpu")
    assert grounding.stages == (3,) and get_preset("small_cpu").stages == (1, 2, 3)
    cfg = TimeExpertConfig.from_dict(grounding.model.to_dict())
    assert (cfg.frame_relevance, cfg.bidirectional_frames, cfg.image_size,
            cfg.loss_weight_time, cfg.patch_relevance) == (True, True, 96, 0.0, False)
    assert cfg.answer_choice() == AnswerChoice(mr="frames", vhd="frames", dvc="frames",
                                               gqa="frames")
    binding = get_preset("binding_cpu")  # the same reading the query
    cfg = TimeExpertConfig.from_dict(binding.model.to_dict())
    assert (cfg.patch_relevance, cfg.captions_every_row, cfg.dvc_candidates,
            cfg.bidirectional_frames) == (True, True, 64, True)
    assert cfg.answer_choice() == AnswerChoice(mr="frames", vhd="frames", dvc="captions",
                                               gqa="options")
    assert binding.stages == (3,) and binding.train["num_steps"] == 2000
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_answer_choice_is_validated_and_old_configs_convert(tmp_path):
    """`answer` over the defaults of the model's heads; an unknown task or choice, or a choice
    the heads cannot read, is refused at construction; a config.json with the old answer
    booleans loads as the same choice, and one that turns a removed formulation on names the
    last commit that has it."""
    relevance = {"query_first": True, "frame_relevance": True}
    assert TimeExpertConfig().answer_choice() == AnswerChoice(
        mr="generated", vhd="generated", dvc="generated", gqa="generated")
    assert TimeExpertConfig(**relevance, answer={"gqa": "options"}).answer_choice() == (
        AnswerChoice(mr="frames", vhd="frames", dvc="generated", gqa="options"))
    for answer, message in (({"asr": "frames"}, "unknown task 'asr'"),
                            ({"mr": "captions"}, "must be one of frames, generated"),
                            ({"dvc": "captions"}, "needs patch_relevance")):
        with pytest.raises(ValueError, match=message):
            TimeExpertConfig(**relevance, answer=answer)
    with pytest.raises(ValueError, match="needs frame_relevance=True"):
        TimeExpertConfig(answer={"mr": "frames"})
    # the four answer booleans of older checkpoints (binding_cpu's, grounding_cpu's, a plain one)
    old = {"model_type": "timeexpert", **relevance, "patch_relevance": True}
    cases = [({"answer_from_frames": True, "dvc_from_frames": True, "dvc_from_captions": True},
              AnswerChoice(mr="frames", vhd="frames", dvc="captions", gqa="options")),
             ({"dvc_from_frames": True, "windows_from_frames": True},
              AnswerChoice(mr="frames", vhd="frames", dvc="frames", gqa="frames")),
             ({"windows_from_frames": False},
              AnswerChoice(mr="generated", vhd="generated", dvc="generated", gqa="generated"))]
    for legacy, expected in cases:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**old, **legacy, "frame_words": False, "caption_negatives": 0,
                                    "loss_weight_words": 0.1}))
        cfg = TimeExpertConfig.from_pretrained(str(tmp_path))
        assert cfg.answer_choice() == expected
        assert not any(hasattr(cfg, k) for k in (*legacy, "frame_words", "loss_weight_words"))
    path.write_text(json.dumps({**old, "patch_motion": True}))
    with pytest.raises(ValueError, match=f"patch_motion.*after commit {REMOVED_AFTER}"):
        TimeExpertConfig.from_pretrained(str(tmp_path))


def test_paper_preset_builds_on_the_meta_device():
    cfg = get_preset("paper_gpu").model
    cfg.text_vocab_size = 32003
    with torch.device("meta"):
        model = TimeExpertForGrounding(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert 10e9 < total < 20e9, total  # 64 experts x 24 layers of a 2048-wide decoder
    assert cfg.num_frames * (cfg.tokens_per_frame + 6) < cfg.max_position_embeddings


def test_read_only_frames_preprocess_without_a_numpy_warning():
    """Frames from Ray's object store / Arrow are read-only arrays: preprocessing them must not
    hand torch a non-writable buffer (its warning, once per process, is why this runs apart)."""
    code = (
        "import warnings, numpy as np, torch\n"
        "warnings.simplefilter('error')\n"
        "from timeexpert.models.vision import FrameProcessor\n"
        "fp = FrameProcessor(image_size=16, mean=[0.5] * 3, std=[0.5] * 3)\n"
        "frames = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)\n"
        "ro = frames.copy(); ro.flags.writeable = False\n"
        "assert torch.equal(fp(ro), fp(frames))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
