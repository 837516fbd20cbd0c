"""The hybrid family: megatron-core's HybridModel (MambaModel before 0.18), Mamba-2 mixers with attention and MLP layers
(Nemotron-H class); the provider is `nemo_rlp.models.hybrid.provider`.

Everything the rest of the package asks of this architecture is in `SPEC`, registered under
'hybrid' (`nemo_rlp.models.spec`):
- layer kinds: the layer pattern itself (`model.hybrid_override_pattern`, one symbol per layer:
  'M' a Mamba-2 mixer, '*' self-attention, '-' an MLP), which is also the planner's alphabet;
- inference caches: attention layers keep keys and values, Mamba layers their conv and SSM states,
  MLP layers nothing; megatron's mixer re-zeroes its states whenever the batch it was last run at
  (`cached_batch_size`) differs from the live one, so every row selection sets it;
- packed training rows start at a multiple of the SSD chunk size, so the chunked scan cuts a packed
  row into the same chunks as the row alone (`nemo_rlp.training.packing`);
- the dynamic engine needs the per-request shapes of the Mamba states.
"""

from __future__ import annotations

import torch

from nemo_rlp.models.cache_ops import select_attention_rows, select_state_rows
from nemo_rlp.models.hybrid.provider import build_hybrid, local_stack_spec, te_stack_spec
from nemo_rlp.models.row_cache import RowCache, attention_on_rows, prefill_states, store_prefill_states
from nemo_rlp.models.spec import ArchitectureSpec, CacheOps, Fail, ModelConfigLike, register_architecture


def layer_kinds(cfg: ModelConfigLike) -> str:
    return cfg.hybrid_override_pattern


def validate(cfg: ModelConfigLike, fail: Fail) -> dict[str, int]:
    """The layer pattern and the Mamba dimensions; returns the Mamba head and group counts, which the
    tensor-parallel size must divide."""
    pattern = cfg.hybrid_override_pattern
    if not pattern or set(pattern) - set("M*-"):
        fail("model.hybrid_override_pattern", pattern,
             "a string of 'M' (Mamba), '*' (attention) and '-' (MLP), one symbol per layer")
    if len(pattern) != cfg.num_layers:
        fail("model.hybrid_override_pattern", pattern, f"one symbol per layer: {cfg.num_layers} (model.num_layers)")
    for key in ("mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "mamba_chunk_size"):
        if getattr(cfg, key) < 1:
            fail(f"model.{key}", getattr(cfg, key), "an integer >= 1")
    if cfg.mamba_num_heads is not None and cfg.mamba_num_heads < 1:
        fail("model.mamba_num_heads", cfg.mamba_num_heads, "null (2 * hidden_size / mamba_head_dim) or >= 1")
    if cfg.mamba_num_heads is None and (2 * cfg.hidden_size) % cfg.mamba_head_dim:
        fail("model.mamba_head_dim", cfg.mamba_head_dim, f"a divisor of 2 * model.hidden_size={2 * cfg.hidden_size}")
    heads = cfg.mamba_num_heads or 2 * cfg.hidden_size // cfg.mamba_head_dim
    if heads % cfg.mamba_num_groups:
        fail("model.mamba_num_groups", cfg.mamba_num_groups, f"a divisor of the Mamba head count {heads}")
    return {"mamba_num_heads": heads, "mamba_num_groups": cfg.mamba_num_groups}


def _is_mamba_mixer(module: torch.nn.Module) -> bool:
    # Duck-typed: importing megatron's MambaMixer needs triton (or the CPU kernels' stand-ins).
    return hasattr(module, "cached_batch_size") and hasattr(module, "mamba_state_shapes_per_request")


def select_rows(language_model: torch.nn.Module, cache, index: torch.Tensor) -> int:
    """Attention rows as for any attention layer; each mixer's states, with its batch size."""
    moved = select_attention_rows(language_model, cache, index)
    for module in language_model.modules():
        if _is_mamba_mixer(module) and module.layer_number in cache.key_value_memory_dict:
            moved += select_state_rows(cache, module.layer_number, index)
            module.cached_batch_size = len(index)
    return moved


def row_layers(language_model: torch.nn.Module, hidden: torch.Tensor, cache: RowCache) -> torch.Tensor:
    """The `rows` path through a hybrid stage: attention on the row cache, MLP layers as they are,
    Mamba layers on their per-row states (a prefill at batch 1 in a context of its own)."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    batch = hidden.shape[1]
    prefill = prefill_states(cache, hidden)
    for layer in language_model.decoder.layers:
        if isinstance(layer, TransformerLayer) and isinstance(layer.self_attention, Attention):
            hidden = attention_on_rows(layer, hidden, cache)
        elif isinstance(layer, TransformerLayer):  # an MLP-only layer
            hidden, _ = layer(hidden_states=hidden, attention_mask=None)
        else:  # a Mamba layer
            mixer = layer.mixer
            if prefill is not None:
                hidden = layer(hidden, inference_context=prefill)
                store_prefill_states(cache, mixer.layer_number, prefill.key_value_memory_dict[mixer.layer_number])
            else:
                mixer.cached_batch_size = batch  # megatron re-zeroes states when this differs
                hidden = layer(hidden, inference_context=cache.states)
    return hidden


def dynamic_state(language_model: torch.nn.Module):
    """Per-request Mamba state shapes for megatron's dynamic engine (`MambaInferenceStateConfig`)."""
    mixers = [m for m in language_model.modules() if _is_mamba_mixer(m)]
    if not mixers:  # a pipeline stage of attention and MLP layers only
        return None
    from megatron.core.inference.contexts.attention_context.mamba_metadata import MambaInferenceStateConfig

    conv_shape, ssm_shape = mixers[0].mamba_state_shapes_per_request()
    return MambaInferenceStateConfig(list(language_model.decoder.layer_type_list), conv_shape, ssm_shape)


def pack_alignment(language_model: torch.nn.Module) -> int:
    """The mixers' SSD chunk size (1 for a stage without mixers)."""
    return max((m.chunk_size for m in language_model.modules() if _is_mamba_mixer(m)), default=1)


# Mamba mixer parameters that megatron-core sizes per tensor-parallel rank without marking them
# `tensor_model_parallel` (mamba_mixer.py in megatron-core 0.16.1). The conv is an nn.Conv1d
# (`conv1d.weight`) up to 0.18 and bare parameters (`conv1d_weight`) from 0.19: both names.
MIXER_TP_LOCAL = ("mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.conv1d.weight", "mixer.conv1d.bias",
                  "mixer.conv1d_weight", "mixer.conv1d_bias", "mixer.norm.weight")


def tiny_model(depth: int) -> list[str]:
    return ["model=tiny_hybrid", f"model.num_layers={4 * depth}", f"model.hybrid_override_pattern={'M*M-' * depth}"]


SPEC = register_architecture(ArchitectureSpec(
    name="hybrid",
    build=build_hybrid,
    te_layer_spec=te_stack_spec,
    local_layer_spec=local_stack_spec,
    layer_kinds=layer_kinds,
    cache=CacheOps(select_rows=select_rows, row_layers=row_layers, dynamic_state=dynamic_state),
    validate=validate,
    tp_local_parameters=MIXER_TP_LOCAL,
    pack_alignment=pack_alignment,
    tiny_model=tiny_model,
))
