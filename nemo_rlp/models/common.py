"""What every architecture's provider shares: megatron's TransformerConfig from a `ModelConfig`,
this rank's pipeline stage, and whether Transformer Engine layer specs can be used.

One copy of each, so a family module (`nemo_rlp/models/gpt/`, `nemo_rlp/models/hybrid/`) depends on
this module and never on another family (`nemo_rlp.models.spec` lists what a family declares).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_rlp.models.spec import ModelConfigLike

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "squared_relu": lambda x: torch.pow(F.relu(x), 2),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(cfg: ModelConfigLike, tensor_parallel: int, **overrides):
    """megatron's TransformerConfig for `cfg`; `overrides` adds fields not set here (a family's own,
    e.g. the hybrid provider's Mamba ones)."""
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


def use_transformer_engine() -> bool:
    """Transformer Engine layer specs need CUDA and an importable `transformer_engine`; otherwise
    every family builds its local spec (megatron-core modules, torch SDPA core attention from
    `nemo_rlp.models.attention`, torch norms), which also runs on CPU (docs/design.md section 3)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
