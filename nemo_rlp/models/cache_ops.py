"""Row selection in megatron's `StaticInferenceContext`, by kind of layer state, for the families'
`CacheOps.select_rows` (`nemo_rlp.models.spec`).

The lockstep rollout modes (`cache`, `shared_prefill`; docs/design.md section 1, step 1) prefill a
context once and repeat its cache G times, then drop finished rows: cache row i becomes a copy of row
index[i]. How a row is copied depends on what a layer keeps, not on the architecture, so the two kinds
of state live here once and a family's `select_rows` says which of its layers keeps which.
"""

from __future__ import annotations

import contextlib

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


# megatron-core 0.18 on: the Mamba mixer reads and writes the static inference cache only while
# `megatron.core.inference.utils.InferenceMode` is active (mamba_mixer.py `forward`), a process-wide
# flag megatron's inference engines set; without it a cached forward silently recomputes from zero
# states. Before 0.18 the mixer keyed on `inference_context is not None and not self.training`, and
# the flag does not exist. (first version, first version not covered, the flag is needed)
INFERENCE_MODE_BY_VERSION = (
    ("0.16", "0.18", False),
    ("0.18", "0.20", True),
)


@contextlib.contextmanager
def cached_forward(language_model: torch.nn.Module, fresh: bool):
    """Run a cached forward (a prefill when `fresh`, else a decode step) as megatron's own
    inference engines do: with `InferenceMode` active where the installed megatron-core reads it,
    restored afterwards to what it was. On a prefill, every Mamba mixer's cached -exp(A_log)
    (megatron-core 0.19's `_get_decode_A_neg_exp`, refreshed only on a switch to training mode) is
    marked stale, so weights changed in eval mode (a loaded checkpoint, an EMA update) are used."""
    from nemo_rlp.megatron_version import rows_for

    if fresh:
        for module in language_model.modules():
            if hasattr(module, "_A_neg_exp_cache_stale"):
                module._A_neg_exp_cache_stale = True
    if not any(rows_for(INFERENCE_MODE_BY_VERSION)):
        yield
        return
    from megatron.core.inference.utils import InferenceMode

    was_active = InferenceMode.is_active()
    InferenceMode.set_active()
    try:
        yield
    finally:
        if not was_active:
            InferenceMode.unset_active()


@contextlib.contextmanager
def engine_steps():
    """Around the steps of megatron's dynamic engine: `InferenceMode` active (where the version has
    it) during them and inactive after, whatever it was before. The engine sets the flag when it is
    built and clears it only in `suspend()`; left set, the training and scoring forwards that follow a
    rollout would run megatron's inference paths (from 0.18)."""
    from nemo_rlp.megatron_version import rows_for

    if not any(rows_for(INFERENCE_MODE_BY_VERSION)):
        yield
        return
    from megatron.core.inference.utils import InferenceMode

    InferenceMode.set_active()
    try:
        yield
    finally:
        InferenceMode.unset_active()
