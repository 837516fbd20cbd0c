"""Our GPTModel's state dict <-> a Hugging Face Qwen3 (or Llama) checkpoint's, without Megatron-Bridge.

Megatron-Bridge (`AutoBridge`) is the conversion the production path uses (recipes/import_checkpoint.py,
recipes/export_checkpoint.py in the NeMo container), but it cannot be imported without Transformer
Engine: `megatron/bridge/peft/lora_layers.py` imports `transformer_engine.pytorch` at module level
(megatron-bridge 0.3.1), and Transformer Engine needs CUDA. This module is the stand-in for the dense
GPT family on every other machine (CPU development and CI, a GPU box without the container), so a
checkpoint can leave and enter this project anywhere. It is written by hand because no maintained
package maps megatron-core's layout to Hugging Face's without Megatron-Bridge; it is small and
checked against `transformers` logit for logit (tests/unit/test_hf_conversion.py).

What it maps, for one process's full (TP = 1, PP = 1) state dict:

| ours (local spec / Transformer Engine spec) | Hugging Face |
|---|---|
| `embedding.word_embeddings.weight` (rows: the padded vocabulary) | `model.embed_tokens.weight` |
| `decoder.layers.i.input_layernorm.weight` / `...self_attention.linear_qkv.layer_norm_weight` | `model.layers.i.input_layernorm.weight` |
| `decoder.layers.i.self_attention.linear_qkv.weight`: per query group g, its q heads, then its k head, then its v head (megatron's interleaving) | `...self_attn.q_proj`, `k_proj`, `v_proj` `.weight` |
| `decoder.layers.i.self_attention.q_layernorm.weight`, `k_layernorm` (Qwen3's per-head RMSNorm) | `...self_attn.q_norm.weight`, `k_norm` |
| `decoder.layers.i.self_attention.linear_proj.weight` | `...self_attn.o_proj.weight` |
| `decoder.layers.i.pre_mlp_layernorm.weight` / `...mlp.linear_fc1.layer_norm_weight` | `model.layers.i.post_attention_layernorm.weight` |
| `decoder.layers.i.mlp.linear_fc1.weight`: [gate; up] (SwiGLU) | `...mlp.gate_proj.weight`, `up_proj` |
| `decoder.layers.i.mlp.linear_fc2.weight` | `...mlp.down_proj.weight` |
| `decoder.final_layernorm.weight` | `model.norm.weight` |
| `output_layer.weight` (absent when tied) | `lm_head.weight` (absent when `tie_word_embeddings`) |

The model must be what both sides compute the same way: RoPE over the whole head (megatron's
non-interleaved rotation is Hugging Face's `rotate_half`), RMSNorm, SwiGLU, no biases. With
`qk_layernorm` the Hugging Face architecture is `Qwen3ForCausalLM`, without it `LlamaForCausalLM`
(the same layer otherwise). `check_convertible` refuses anything else by key.

Torch only: no megatron, no transformers (the callers write the files).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from nemo_rlp.models.spec import ModelConfigLike

QWEN3 = "Qwen3ForCausalLM"
LLAMA = "LlamaForCausalLM"
_MODEL_TYPES = {QWEN3: "qwen3", LLAMA: "llama"}

# Our per-layer names (the part after `decoder.layers.{i}.`) that are one tensor on both sides.
_SAME_PER_LAYER = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# The two pre-norms: the local spec's own modules, or fused into the next linear (Transformer Engine).
_NORMS = {
    "input_layernorm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "post_attention_layernorm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"model.{key}={value!r} has no Hugging Face Qwen3/Llama equivalent; allowed: {allowed}")


def check_convertible(cfg: ModelConfigLike) -> None:
    """Refuse, naming the key, a GPT config the conversion would silently get wrong."""
    if cfg.arch != "gpt":
        _fail("arch", cfg.arch, "'gpt' (the hybrid family converts through Megatron-Bridge only)")
    if cfg.position_embedding_type != "rope":
        _fail("position_embedding_type", cfg.position_embedding_type, "'rope'")
    if cfg.normalization != "RMSNorm":
        _fail("normalization", cfg.normalization, "'RMSNorm'")
    if not cfg.gated_linear_unit or cfg.activation != "silu":
        _fail("gated_linear_unit/activation", (cfg.gated_linear_unit, cfg.activation), "(true, 'silu'): SwiGLU")
    if cfg.add_bias_linear:
        _fail("add_bias_linear", cfg.add_bias_linear, "false")


def architecture(cfg: ModelConfigLike) -> str:
    """The Hugging Face class our GPT config is: Qwen3 with QK norms, Llama without."""
    return QWEN3 if cfg.qk_layernorm else LLAMA


def _head_dim(cfg: ModelConfigLike) -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def hf_config(cfg: ModelConfigLike, vocab_size: int, dtype: str = "float32") -> dict[str, Any]:
    """The Hugging Face `config.json` fields of a model built from `cfg` with `vocab_size` rows (the
    caller adds token ids). Every field that changes the computation is written, not left to the
    version of transformers that reads it."""
    check_convertible(cfg)
    arch = architecture(cfg)
    config = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads,
        "head_dim": _head_dim(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_sequence_length,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": float(cfg.rotary_base),
        "rope_scaling": None,
        "tie_word_embeddings": bool(cfg.share_embeddings_and_output_weights),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "torch_dtype": dtype,
    }
    if arch == QWEN3:
        config["use_sliding_window"] = False
    else:
        config["mlp_bias"] = False
    return config


def model_overrides(hf: Mapping[str, Any]) -> list[str]:
    """Hydra overrides (`++model.KEY=VALUE`) that make a GPT model config describe the Hugging Face
    config `hf` (a parsed config.json of a Qwen3 or Llama checkpoint): the CPU stand-in for
    Megatron-Bridge's `to_megatron_provider`, field for field the same mapping (its CONFIG_MAPPING).
    Anything the GPT family cannot compute like Hugging Face fails here, by key."""
    by_type = {model_type: name for name, model_type in _MODEL_TYPES.items()}
    arch = (hf.get("architectures") or [by_type.get(hf.get("model_type"))])[0]
    if arch not in _MODEL_TYPES:
        raise ValueError(f"the Hugging Face config's architectures={hf.get('architectures')!r} (model_type "
                         f"{hf.get('model_type')!r}): the dependency-free conversion knows {sorted(_MODEL_TYPES)}; "
                         "convert other models with Megatron-Bridge")
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False),
                    ("use_sliding_window", False), ("hidden_act", "silu")):
        if hf.get(key) is not None and hf[key] != ok:
            raise ValueError(f"the Hugging Face config's {key}={hf[key]!r} is not supported by the dependency-free "
                             f"conversion (it needs {ok!r}); convert this model with Megatron-Bridge")
    theta = float(hf.get("rope_theta", 10000.0))
    if not theta.is_integer():
        raise ValueError(f"the Hugging Face config's rope_theta={theta} is not an integer, as model.rotary_base must be")
    heads = hf["num_attention_heads"]
    values = {
        "arch": "gpt",
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "vocab_size": hf["vocab_size"],
        "max_sequence_length": hf["max_position_embeddings"],
        "position_embedding_type": "rope",
        "rotary_base": int(theta),
        "normalization": "RMSNorm",
        "layernorm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "gated_linear_unit": True,
        "activation": "silu",
        "qk_layernorm": arch == QWEN3,
        "add_bias_linear": False,
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
    }
    return [f"++model.{key}={_hydra_value(value)}" for key, value in values.items()]


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def _qkv_split(cfg: ModelConfigLike) -> tuple[int, int, int]:
    """(query groups, query heads per group, head dim) of megatron's fused QKV weight."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    return groups, cfg.num_attention_heads // groups, _head_dim(cfg)


def _layer_indices(names: Any) -> list[int]:
    return sorted({int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")})


def _fits_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` cut to `rows` rows, or padded with zero rows (megatron's padded vocabulary: the extra
    ids are never produced by the tokenizer)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfigLike, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face tensors from our model's full state dict (`model.state_dict()` at TP = PP = 1).
    `vocab_size`: the Hugging Face vocabulary (None: every row of ours); extra rows are dropped.
    Every tensor of `state` (but `_extra_state`) must be used, or this fails naming the leftovers."""
    check_convertible(cfg)
    groups, per_group, head_dim = _qkv_split(cfg)
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    rows = vocab_size or state["embedding.word_embeddings.weight"].shape[0]
    out = {"model.embed_tokens.weight": _fits_vocab(take("embedding.word_embeddings.weight"), rows),
           "model.norm.weight": take("decoder.final_layernorm.weight")}
    if not cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = _fits_vocab(take("output_layer.weight"), rows)
    for i in _layer_indices(state):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        for hf_name, candidates in _NORMS.items():
            name = next(ours + c for c in candidates if ours + c in state)
            out[f"{theirs}{hf_name}.weight"] = take(name)
        for mine, hf_name in _SAME_PER_LAYER.items():
            if ours + mine in state:
                out[theirs + hf_name] = take(ours + mine)
        qkv = take(ours + "self_attention.linear_qkv.weight").reshape(groups, per_group + 2, head_dim, -1)
        out[theirs + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(groups * per_group * head_dim, -1)
        out[theirs + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(groups * head_dim, -1)
        out[theirs + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(groups * head_dim, -1)
        gate, up = take(ours + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[theirs + "mlp.gate_proj.weight"], out[theirs + "mlp.up_proj.weight"] = gate, up
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"no Hugging Face name for {len(left)} tensor(s) of the model: {', '.join(left[:6])}")
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf: Mapping[str, torch.Tensor], cfg: ModelConfigLike,
            target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face tensors: for every tensor of `target` (the state dict of the
    model to load, so its naming, local or Transformer Engine, and its vocabulary rows are the
    model's), the converted Hugging Face tensor, in `target`'s dtype. Fails naming every tensor the
    checkpoint lacks or that has the wrong shape; Hugging Face tensors left unused fail too."""
    check_convertible(cfg)
    groups, per_group, head_dim = _qkv_split(cfg)
    used: set[str] = set()
    missing: list[str] = []

    def get(name: str) -> torch.Tensor | None:
        if name not in hf:
            missing.append(name)
            return None
        used.add(name)
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    for name, like in target.items():
        if name.endswith("_extra_state"):
            continue
        value = _from_hf_one(name, like, get, cfg, groups, per_group, head_dim)
        if value is not None:
            if value.shape != like.shape:
                raise ValueError(f"{name}: the Hugging Face tensors give shape {tuple(value.shape)}, the model has "
                                 f"{tuple(like.shape)}; the model config does not describe the checkpoint")
            out[name] = value.to(like.dtype)
    unused = set(hf) - used
    if cfg.share_embeddings_and_output_weights:
        unused.discard("lm_head.weight")  # a live tied model's state dict lists the shared matrix twice
    unused = sorted(unused)
    if missing or unused:
        raise ValueError("the Hugging Face checkpoint does not fit the model: "
                         + (f"missing {', '.join(missing[:6])}" if missing else "")
                         + ("; " if missing and unused else "")
                         + (f"unused {', '.join(unused[:6])}" if unused else ""))
    return out


def _from_hf_one(name: str, like: torch.Tensor, get, cfg, groups: int, per_group: int, head_dim: int):
    """One of our tensors from the Hugging Face ones (`get(hf_name)`; None when missing)."""
    if name == "embedding.word_embeddings.weight":
        value = get("model.embed_tokens.weight")
        return None if value is None else _fits_vocab(value, like.shape[0])
    if name == "output_layer.weight":
        value = get("model.embed_tokens.weight" if cfg.share_embeddings_and_output_weights else "lm_head.weight")
        return None if value is None else _fits_vocab(value, like.shape[0])
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise ValueError(f"{name}: no Hugging Face tensor maps to it")
    theirs, rest = f"model.layers.{parts[2]}.", ".".join(parts[3:])
    for hf_name, candidates in _NORMS.items():
        if rest in candidates:
            return get(f"{theirs}{hf_name}.weight")
    if rest in _SAME_PER_LAYER:
        return get(theirs + _SAME_PER_LAYER[rest])
    if rest == "self_attention.linear_qkv.weight":
        q, k, v = (get(f"{theirs}self_attn.{p}_proj.weight") for p in "qkv")
        if q is None or k is None or v is None:
            return None
        hidden = q.shape[-1]
        fused = torch.cat([q.reshape(groups, per_group, head_dim, hidden), k.reshape(groups, 1, head_dim, hidden),
                           v.reshape(groups, 1, head_dim, hidden)], dim=1)
        return fused.reshape(-1, hidden)
    if rest == "mlp.linear_fc1.weight":
        gate, up = get(theirs + "mlp.gate_proj.weight"), get(theirs + "mlp.up_proj.weight")
        return None if gate is None or up is None else torch.cat([gate, up], dim=0)
    raise ValueError(f"{name}: no Hugging Face tensor maps to it")
