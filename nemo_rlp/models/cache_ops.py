"""Row selection in megatron's `StaticInferenceContext`, by kind of layer state, for the families'
`CacheOps.select_rows` (`nemo_rlp.models.spec`).

The lockstep rollout modes (`cache`, `shared_prefill`; docs/design.md section 1, step 1) prefill a
context once and repeat its cache G times, then drop finished rows: cache row i becomes a copy of row
index[i]. How a row is copied depends on what a layer keeps, not on the architecture, so the two kinds
of state live here once and a family's `select_rows` says which of its layers keeps which.
"""

from __future__ import annotations

import torch


def select_kv_rows(cache, layer_number: int, index: torch.Tensor) -> int:
    """An attention layer's keys and values, [max_sequence, max_batch, ...]: rows beyond len(index)
    are left as they are. Returns the bytes copied."""
    key, value = cache.key_value_memory_dict[layer_number]
    rows = len(index)
    key[:, :rows] = key[:, index]
    value[:, :rows] = value[:, index]
    return 2 * key[:, :rows].numel() * key.element_size()


def select_state_rows(cache, layer_number: int, index: torch.Tensor) -> int:
    """A recurrent layer's states (a tuple of tensors with the row first, e.g. Mamba's conv and SSM
    states), sized to the live batch: the selected rows are stored in their place. Returns the
    bytes copied."""
    states = tuple(t[index].contiguous() for t in cache.key_value_memory_dict[layer_number])
    cache.key_value_memory_dict[layer_number] = states
    return sum(t.numel() * t.element_size() for t in states)


def select_attention_rows(language_model: torch.nn.Module, cache, index: torch.Tensor) -> int:
    """`select_kv_rows` for every attention module of the stage that has a cache entry."""
    from megatron.core.transformer.attention import Attention

    moved = 0
    for module in language_model.modules():
        if isinstance(module, Attention) and module.layer_number in cache.key_value_memory_dict:
            moved += select_kv_rows(cache, module.layer_number, index)
    return moved
