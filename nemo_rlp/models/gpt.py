"""megatron-core GPTModel provider: a `ModelConfig` in, a (possibly tensor-parallel) GPTModel out.

On CPU the local (non-Transformer-Engine) layer spec runs, with torch SDPA as its core attention
(`nemo_rlp.models.attention`); on GPU the Transformer Engine spec is used when Transformer Engine is
importable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_rlp.config import ModelConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "squared_relu": lambda x: torch.pow(F.relu(x), 2),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(cfg: ModelConfig, tensor_parallel: int, **overrides):
    """megatron's TransformerConfig for `cfg`; `overrides` adds fields not set here (the hybrid
    provider adds the Mamba ones)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    pipeline_parallel = pipeline_stage()[2]
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=_ACTIVATIONS[cfg.activation],
        qk_layernorm=cfg.qk_layernorm,
        add_bias_linear=cfg.add_bias_linear,
        layernorm_epsilon=cfg.layernorm_epsilon,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        params_dtype=DTYPES[cfg.params_dtype],
        bf16=cfg.params_dtype == "bf16",
        # Initialise the full weights on CPU from one seed and then shard them: a model starts from
        # the same weights whatever its TP layout, which is what makes layouts comparable.
        use_cpu_initialization=True,
        # Losses arrive normalised by the global count of thoughts/tokens (training/steps.py): DDP
        # must sum gradients over data-parallel ranks, not average them.
        calculate_per_token_loss=True,
        # Pipeline stages exchange activations of rows whose width changes from batch to batch.
        pipeline_model_parallel_size=pipeline_parallel,
        pipeline_dtype=DTYPES[cfg.params_dtype],
        variable_seq_lengths=pipeline_parallel > 1,
        # megatron rejects variable sequence lengths with its default MoE dispatcher even in a dense
        # model (transformer_config.py:1827); the dispatcher is unused without experts.
        moe_token_dispatcher_type="alltoall",
        # p2p buffers are synchronised with torch.cuda.synchronize otherwise (CPU platform).
        batch_p2p_sync=torch.cuda.is_available(),
        **overrides,
    )


def _layer_spec(cfg: ModelConfig, config):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401

            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
        except ImportError:
            pass
    return _local_block_spec(get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization),
                             config)


def _local_block_spec(layer, config):
    """megatron's local layer spec, with torch SDPA as its core attention (instead of megatron's
    score-materialising DotProductAttention) and torch norms that allow sequence parallelism, as a
    block spec (megatron would build the block's final norm from its own `WrappedTorchNorm`)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from nemo_rlp.models.attention import SDPAttention
    from nemo_rlp.models.norms import TorchNorm

    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    for holder, name in ((layer.submodules, "input_layernorm"), (layer.submodules, "pre_mlp_layernorm"),
                         (attention, "q_layernorm"), (attention, "k_layernorm")):
        if getattr(holder, name) is WrappedTorchNorm:
            setattr(holder, name, TorchNorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=TorchNorm)


def pipeline_stage() -> tuple[bool, bool, int]:
    """(first stage, last stage, pipeline size) of this rank; one stage when megatron's parallel
    state is not initialised (e.g. counting parameters on the meta device)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True, True, 1
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def build_gpt(cfg: ModelConfig, vocab_size: int, tensor_parallel: int, device: torch.device,
              sequence_parallel: bool = False):
    """Build the GPTModel for this rank's shard (its pipeline stage's layers, its TP slice).
    `vocab_size` is the padded model vocabulary."""
    from megatron.core.models.gpt import GPTModel

    first, last, _ = pipeline_stage()
    config = transformer_config(cfg, tensor_parallel, sequence_parallel=sequence_parallel)
    model = GPTModel(
        pre_process=first,
        post_process=last,
        config=config,
        transformer_layer_spec=_layer_spec(cfg, config),
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        # Logits stay sharded over the vocabulary; log-probs use megatron's vocab-parallel
        # cross-entropy and sampling gathers explicitly (nemo_rlp.models.handle).
        parallel_output=True,
    )
    return model.to(device)
