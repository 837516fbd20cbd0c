"""The GPT family: megatron-core's GPTModel, every layer a transformer layer (attention + MLP).

A `ModelConfig` with `arch: gpt` in, a (possibly tensor-parallel) GPTModel out. On CPU the local
(non-Transformer-Engine) layer spec runs, with torch SDPA as its core attention
(`nemo_rlp.models.attention`); on GPU the Transformer Engine spec is used when Transformer Engine is
importable (`nemo_rlp.models.common.use_transformer_engine`; `build_model` chooses).

Everything the rest of the package asks of this architecture is in `SPEC`, registered under 'gpt'
(`nemo_rlp.models.spec`): the provider, its layer kinds for the planner (one 'T' per layer), the
inference-cache operations (keys and values only), the config keys it refuses, and its Hugging Face
conversion without Megatron-Bridge (`nemo_rlp.models.gpt.hf_conversion`: Qwen3 and Llama).

Still GPTModel on megatron-core 0.19, which logs that GPTModel is deprecated in favour of
`HybridModel`: Megatron-Bridge's Qwen3 and Llama providers (`Qwen3ModelProvider(GPTModelProvider)`),
our Hugging Face path, build GPTModel and map its weights by GPTModel's names (attention and MLP in
one `decoder.layers.N`); a HybridModel splits them into two layers, so its checkpoints would load in
neither Bridge nor our earlier GPT checkpoints. The hybrid family uses HybridModel from 0.18.
"""

from __future__ import annotations

import torch

from nemo_rlp.models.cache_ops import select_attention_rows
from nemo_rlp.models.gpt import hf_conversion
from nemo_rlp.models.common import pipeline_stage, transformer_config
from nemo_rlp.models.row_cache import RowCache, attention_on_rows
from nemo_rlp.models.spec import ArchitectureSpec, CacheOps, Fail, ModelConfigLike, register_architecture


def te_layer_spec(cfg: ModelConfigLike, config):
    """megatron's Transformer Engine GPT layer spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)


def local_layer_spec(cfg: ModelConfigLike, config):
    """megatron's local GPT layer spec as a block spec with our attention core and norms (below)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return local_block_spec(get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization),
                            config)


def local_block_spec(layer, config):
    """megatron's local layer spec, with torch SDPA as its core attention (instead of megatron's
    score-materialising DotProductAttention) and torch norms that allow sequence parallelism, as a
    block spec (megatron would build the block's final norm from its own `WrappedTorchNorm`)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    # Imported here, as megatron is: the package is imported (and the config validated) before
    # megatron-core is; `nemo_rlp.models.attention` imports it at module level.
    from nemo_rlp.models.attention import SDPAttention
    from nemo_rlp.models.norms import TorchNorm

    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    for holder, name in ((layer.submodules, "input_layernorm"), (layer.submodules, "pre_mlp_layernorm"),
                         (attention, "q_layernorm"), (attention, "k_layernorm")):
        if getattr(holder, name) is WrappedTorchNorm:
            setattr(holder, name, TorchNorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=TorchNorm)


def build_gpt(cfg: ModelConfigLike, vocab_size: int, tensor_parallel: int, device: torch.device,
              sequence_parallel: bool, layer_spec):
    """Build the GPTModel for this rank's shard (its pipeline stage's layers, its TP slice).
    `vocab_size` is the padded model vocabulary; `layer_spec(cfg, config)` the layer spec
    `build_model` chose (`te_layer_spec` or `local_layer_spec`, or a GPT variant's own). With the
    local spec the MLPs' SwiGLU keeps only its input for backward (`nemo_rlp.models.mlp`)."""
    from megatron.core.models.gpt import GPTModel

    first, last, _ = pipeline_stage()
    config = transformer_config(cfg, tensor_parallel, sequence_parallel=sequence_parallel)
    model = GPTModel(
        pre_process=first,
        post_process=last,
        config=config,
        transformer_layer_spec=layer_spec(cfg, config),
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        # Logits stay sharded over the vocabulary; log-probs use megatron's vocab-parallel
        # cross-entropy and sampling gathers explicitly (nemo_rlp.models.handle).
        parallel_output=True,
    )
    if layer_spec is local_layer_spec:
        from nemo_rlp.models.mlp import use_swiglu_mlp

        use_swiglu_mlp(model)
    return model.to(device)


def layer_kinds(cfg: ModelConfigLike) -> str:
    return "T" * cfg.num_layers


def attention_row_layers(language_model: torch.nn.Module, hidden: torch.Tensor, cache: RowCache) -> torch.Tensor:
    """The `rows` path through a stage whose layers are all attention + MLP layers."""
    for layer in language_model.decoder.layers:
        hidden = attention_on_rows(layer, hidden, cache)
    return hidden


def validate(cfg: ModelConfigLike, fail: Fail) -> dict[str, int]:
    """A GPT model has no layer pattern; its head counts are checked by config.validate for every
    architecture."""
    if cfg.hybrid_override_pattern is not None:
        fail("model.hybrid_override_pattern", cfg.hybrid_override_pattern, "null unless model.arch='hybrid'")
    return {}


def tiny_model(depth: int) -> list[str]:
    return ["model=tiny_gpt", f"model.num_layers={2 * depth}"]


ATTENTION_CACHE = CacheOps(select_rows=select_attention_rows, row_layers=attention_row_layers)

SPEC = register_architecture(ArchitectureSpec(
    name="gpt",
    build=build_gpt,
    te_layer_spec=te_layer_spec,
    local_layer_spec=local_layer_spec,
    layer_kinds=layer_kinds,
    cache=ATTENTION_CACHE,
    validate=validate,
    tiny_model=tiny_model,
    hf_conversion=hf_conversion,
))
