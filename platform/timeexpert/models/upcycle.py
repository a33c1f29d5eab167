"""Sparse upcycling: initialise the TimeExpert decoder from a local dense causal LM.

Komatsuzaki et al. 2023 ("Sparse Upcycling"), as TimeExpert sec. 3.5 starts its MoE decoder from
a dense LLM: attention, norms and embeddings are copied where shapes fit; the dense SwiGLU FFN
(gate/up/down) is copied into every expert with a small relative perturbation so experts can
diverge; gates stay freshly initialised. Works for Llama-layout checkpoints (Llama, Qwen2,
Mistral: `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`).

Shape letters: V vocab rows, D width, F FFN width, E expert slots.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

# decoder fields of TimeExpertConfig and where a dense HF config keeps them
_DENSE_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "rms_norm_eps": "rms_norm_eps",
}


def decoder_fields_from_dense(path: str) -> dict[str, Any]:
    """TimeExpertConfig decoder fields matching a local dense causal-LM checkpoint."""
    from transformers import AutoConfig

    dense = AutoConfig.from_pretrained(path)
    fields = {ours: getattr(dense, theirs) for ours, theirs in _DENSE_FIELDS.items()}
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    rope = getattr(dense, "rope_parameters", None) or {}
    fields["rope_theta"] = float(rope.get("rope_theta", getattr(dense, "rope_theta", 10000.0)))
    fields["attention_bias"] = dense.model_type == "qwen2" or bool(
        getattr(dense, "attention_bias", False)
    )
    fields["upcycle_from"] = path
    return fields


@torch.no_grad()
def upcycle_decoder(
    model, path: str, *, noise_std: float = 0.01, seed: int = 0
) -> dict[str, list[str]]:
    """Copy a dense causal LM into `model` (a TimeExpertForGrounding). Returns what was copied
    and what was left freshly initialised. Raises ValueError when the decoders do not fit."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dcfg = dense.config
    expected = decoder_fields_from_dense(path)
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
    sd = dense.state_dict()
    copied: list[str] = []
    fresh: list[str] = []
    gen = torch.Generator().manual_seed(seed)

    def copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        assert dst.shape == src.shape, (name, dst.shape, src.shape)
        dst.copy_(src.to(dst.dtype))
        copied.append(name)

    # embeddings and LM head: the rows both vocabularies share (same tokenizer prefix)
    for ours, theirs in (
        (model.text_embed.weight, "model.embed_tokens.weight"),
        (model.lm_head.weight, "lm_head.weight"),
    ):
        src = sd.get(theirs, sd["model.embed_tokens.weight"])  # tied heads share the embedding
        rows = min(ours.shape[0], src.shape[0])
        ours[:rows] = src[:rows].to(ours.dtype)
        copied.append(f"{theirs}[:{rows}]")
        if rows < ours.shape[0]:
            fresh.append(f"{theirs}[{rows}:{ours.shape[0]}] (tokens the dense vocab lacks)")
    copy(model.norm.weight, sd["model.norm.weight"], "model.norm.weight")

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        copy(layer.attn_norm.weight, sd[p + "input_layernorm.weight"], p + "input_layernorm")
        copy(
            layer.ffn_norm.weight,
            sd[p + "post_attention_layernorm.weight"],
            p + "post_attention_layernorm",
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mine = getattr(layer.attn, proj)
            copy(mine.weight, sd[p + f"self_attn.{proj}.weight"], p + f"self_attn.{proj}")
            if mine.bias is not None:
                copy(mine.bias, sd[p + f"self_attn.{proj}.bias"], p + f"self_attn.{proj}.bias")
        gate_FD, up_FD, down_DF = (
            sd[p + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")
        )
        ffn = layer.ffn
        if ffn.cfg.gating == "dense":
            copy(ffn.w1_FD, gate_FD, p + "mlp.gate_proj")
            copy(ffn.w3_FD, up_FD, p + "mlp.up_proj")
            copy(ffn.w2_DF, down_DF, p + "mlp.down_proj")
            continue
        # every expert slot (active or not) gets the dense FFN plus its own small perturbation
        for w_LXY, src in ((ffn.w1_LFD, gate_FD), (ffn.w3_LFD, up_FD), (ffn.w2_LDF, down_DF)):
            noise = torch.randn(w_LXY.shape, generator=gen) * (noise_std * src.std())
            w_LXY.copy_((src[None] + noise).to(w_LXY.dtype))
        copied.append(p + "mlp -> every expert")
        fresh.append(p + "router (fresh gate)")
    extra = {k for k in sd if ".mlp." not in k and "rotary" not in k} - {
        k
        for k in sd
        if k.startswith("model.layers.")
        or k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    }
    if extra:
        warnings.warn(f"upcycling ignored dense weights {sorted(extra)[:5]}", stacklevel=2)
    return {"copied": copied, "fresh": fresh}
