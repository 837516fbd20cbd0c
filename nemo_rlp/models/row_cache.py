"""A per-row decoding cache and the model forward that uses it: the `rows` rollout path on CPU.

megatron's `StaticInferenceContext` keeps one sequence offset for the whole batch, so rows must be
aligned at position 0 and a longer context is fed one token per decode step. It also keeps keys
before RoPE (every decode step re-rotates the whole cached prefix) and expands key/value groups with
a copy of the cache. The dynamic engine, which has per-request lengths, needs flash-attn and does
not run on CPU (`nemo_rlp.rollout.dynamic_engine`).

`RowCache` gives every row its own length instead:
- attention layers keep keys *after* RoPE, [rows, groups, positions, head_dim], written at each
  row's own position; attention is `scaled_dot_product_attention` with `enable_gqa` (no expansion
  copy) over the columns every row may need, with a mask of each row's real length;
- Mamba layers keep their conv/SSM states per row in a `StaticInferenceContext` held in decode mode
  (Mamba has no positions, so per-row lengths need nothing more);
- a prefill writes one context's tokens into the cache rows of its G thoughts: the context is run
  through the model once, at its own length (contexts of any length mix in a batch, none is fed
  through decode);
- rows whose thought is finished stay in the batch, masked by the sampler; the cache is compacted
  only when the sampler asks (occupancy below a threshold), and the bytes moved are counted.

`row_cached_logits` walks the stage's layers itself (megatron's layer modules, norms, MLPs, Mamba
mixers and TP linears; only the attention core is ours), so TP and PP work as in megatron's forward.
Which layer keeps which state is the architecture's to say: its spec's `CacheOps.row_layers`
(`nemo_rlp.models.spec`) walks the layers with the helpers here (`attention_on_rows`, and
`prefill_states` / `store_prefill_states` for recurrent layers); this module names no architecture.
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_rlp.models.cache_ops import cached_forward
from nemo_rlp.models.spec import architecture_of
from nemo_rlp.parallel import pipeline


class RowCache:
    """KV (post-RoPE) and recurrent-state cache for `rows` rows of up to `max_positions` tokens each."""

    def __init__(self, language_model: torch.nn.Module, rows: int, max_positions: int, device: torch.device):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.rows = rows  # rows currently in the batch (cache rows 0..rows-1)
        self.max_positions = max_positions
        self.device = device
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens cached per row
        self.max_len = 0  # a host-side bound on lengths.max(): no sync to size the attention
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.capacity = rows  # cache rows allocated (rows may shrink below it by compaction)
        # Recurrent states (Mamba's conv and SSM states) live in megatron's own static context, keyed
        # by layer number, one tuple of tensors with the row first per layer; kept in decode mode, so
        # a Mamba mixer runs its one-token state update on exactly the states stored here.
        self.states = StaticInferenceContext(max_batch_size=rows, max_sequence_length=max_positions)
        self.states.sequence_len_offset = 1
        self.states.seqlen_offset = 1  # what the mixer reads (MambaStack.forward sets it, mamba_block.py:287)
        self.states.enable_decode_mode()
        rotary = getattr(language_model, "rotary_pos_emb", None)
        self.freqs = None
        if getattr(language_model, "position_embedding_type", None) == "rope" and rotary is not None:
            self.freqs = rotary(max_positions)  # [positions, 1, 1, rot_dim]
        # cos and sin of every position, computed once (megatron's RoPE takes them of the gathered
        # freqs at every call: per layer, for queries and keys, at every decode step), and those of
        # the current call's positions, shared by all its layers (`_rotate`).
        self.cos_sin = None if self.freqs is None else (torch.cos(self.freqs), torch.sin(self.freqs))
        self._rope_at: Optional[tuple] = None
        self.prefill_rows: Optional[torch.Tensor] = None  # set by `prefill_into`
        self.compaction_bytes = 0

    def prefill_into(self, rows: torch.Tensor) -> "RowCache":
        """The next `cached_logits` call is a prefill of one context into cache `rows` (its G rows)."""
        self.prefill_rows = rows
        return self

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """Compact: cache row i becomes row index[i]; rows beyond len(index) leave the batch."""
        kept = len(index)
        for store in (self.keys, self.values):
            for layer, buffer in store.items():
                moved = buffer[index, :, : self.max_len]
                buffer[:kept, :, : self.max_len] = moved
                self.compaction_bytes += moved.numel() * moved.element_size()
        for layer, states in list(self.states.key_value_memory_dict.items()):
            kept_states = tuple(t[index].contiguous() for t in states)
            self.states.key_value_memory_dict[layer] = kept_states
            self.compaction_bytes += sum(t.numel() * t.element_size() for t in kept_states)
        self.lengths = self.lengths[index].clone()
        self.rows = kept

    def row_bytes(self) -> int:
        """Bytes of one row's cache (all layers, all positions allocated)."""
        total = sum(b[0].numel() * b.element_size() for store in (self.keys, self.values) for b in store.values())
        for states in self.states.key_value_memory_dict.values():
            total += sum(t[0].numel() * t.element_size() for t in states)
        return total

    # ---- attention ------------------------------------------------------------------------------

    def _buffers(self, layer: int, key: torch.Tensor, capacity: int):
        if layer not in self.keys:
            groups, dim = key.shape[2], key.shape[3]
            shape = (capacity, groups, self.max_positions, dim)
            self.keys[layer] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.values[layer] = torch.zeros(shape, dtype=key.dtype, device=key.device)
        return self.keys[layer], self.values[layer]

    def _rotate(self, t: torch.Tensor, positions: torch.Tensor, config) -> torch.Tensor:
        """RoPE at explicit positions: t [s, b, heads, dim], positions [s, b] (the same positions for
        every layer of one `row_cached_logits` call)."""
        if self.freqs is None:
            return t
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd, _rotate_half

        rot_dim = self.freqs.shape[-1]
        if config.rotary_interleaved or rot_dim != t.shape[-1] or getattr(config, "multi_latent_attention", False):
            freqs = self.freqs[positions.reshape(-1)].reshape(*positions.shape, 1, rot_dim)
            return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=config.rotary_interleaved)
        if self._rope_at is None or self._rope_at[0].shape != positions.shape:
            index = positions.reshape(-1)
            cos, sin = (table[index].reshape(*positions.shape, 1, rot_dim).to(t.dtype) for table in self.cos_sin)
            self._rope_at = (positions, cos, sin)
        _, cos, sin = self._rope_at
        # megatron's `_apply_rotary_pos_emb_bshd` (mscale 1, the whole head rotated): the same floats.
        return (t * cos) + (_rotate_half(t, False) * sin)

    def attend(self, attention: torch.nn.Module, hidden: torch.Tensor, capacity: int) -> tuple:
        """megatron SelfAttention's computation on this cache: (output, bias) like its forward."""
        query, key, value = attention.get_query_key_value_tensors(hidden, None)  # [s, b, heads, dim]
        config = attention.config
        if config.attention_output_gate:
            raise NotImplementedError("the rows rollout path does not implement attention output gates")
        # megatron's DotProductAttention keeps its scale; elsewhere (TE) the config's, None meaning
        # 1/sqrt(head_dim), which is also scaled_dot_product_attention's default.
        scale = getattr(attention.core_attention, "softmax_scale", None) or config.softmax_scale
        keys, values = self._buffers(attention.layer_number, key, capacity)
        s, b = query.shape[0], query.shape[1]
        if self.prefill_rows is not None:
            positions = torch.arange(s, device=query.device).unsqueeze(1)  # [s, 1]: one context
            query, key = self._rotate(query, positions, config), self._rotate(key, positions, config)
            keys[self.prefill_rows, :, :s] = key.permute(1, 2, 0, 3)
            values[self.prefill_rows, :, :s] = value.permute(1, 2, 0, 3)
            out = torch.nn.functional.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                is_causal=True, scale=scale, enable_gqa=True,
            )
        else:
            positions = self.lengths[:b]  # each row's next position
            query = self._rotate(query, positions.unsqueeze(0), config)
            key = self._rotate(key, positions.unsqueeze(0), config)
            batch = torch.arange(b, device=query.device)
            keys[batch, :, positions] = key[0]
            values[batch, :, positions] = value[0]
            width = self.max_len + 1
            visible = torch.arange(width, device=query.device).unsqueeze(0) <= positions.unsqueeze(1)
            out = torch.nn.functional.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), keys[:b, :, :width], values[:b, :, :width],
                attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True,
            )
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads * dim]
        return attention.linear_proj(out)


def attention_on_rows(layer: torch.nn.Module, hidden: torch.Tensor, cache: RowCache) -> torch.Tensor:
    """megatron TransformerLayer._forward_attention + _forward_mlp, with the attention on `cache`
    (a family's `CacheOps.row_layers` calls it for each of its attention layers)."""
    residual = hidden
    normed = layer.input_layernorm(hidden)
    attention_out = cache.attend(layer.self_attention, normed, cache.capacity)
    with layer.bias_dropout_add_exec_handler():
        hidden = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
            attention_out, residual, layer.hidden_dropout
        )
    return layer._forward_mlp(hidden)


def prefill_states(cache: RowCache, hidden: torch.Tensor):
    """The context a prefill's recurrent layers run in (None in a decode step): the context is run at
    batch 1 in a context of its own, whose states `store_prefill_states` then writes into its G rows."""
    if cache.prefill_rows is None:
        return None
    from megatron.core.inference.contexts import StaticInferenceContext

    prefill = StaticInferenceContext(max_batch_size=hidden.shape[1], max_sequence_length=hidden.shape[0])
    prefill.seqlen_offset = 0
    return prefill


def store_prefill_states(cache: RowCache, layer: int, states: tuple) -> None:
    """Write one layer's prefill states (tensors with the row first) into the prefilled rows."""
    store = cache.states.key_value_memory_dict
    if layer not in store:
        store[layer] = tuple(t.new_zeros(cache.capacity, *t.shape[1:]) for t in states)
    for buffer, state in zip(store[layer], states):
        buffer[cache.prefill_rows] = state


@torch.no_grad()
def row_cached_logits(language_model: torch.nn.Module, tokens: torch.Tensor, cache: RowCache) -> Optional[torch.Tensor]:
    """Feed `tokens` [b, s] (a prefill of one context: b = 1; a decode step: s = 1 for the cache's
    first b rows) and return this replica's vocabulary-sharded logits [b, V/TP] for the token after
    the last one, on the last pipeline stage (None on the others)."""
    b, s = tokens.shape
    cache._rope_at = None  # this call's positions: RoPE's cos and sin are taken once for its layers
    if cache.prefill_rows is None:
        positions = cache.lengths[:b].unsqueeze(1)
    else:
        positions = torch.arange(s, device=tokens.device).unsqueeze(0)
    hidden = _stage_input(language_model, tokens, positions)
    # The stage's layers, each on its own kind of state: the architecture's walk (nemo_rlp.models.spec).
    with cached_forward(language_model, fresh=cache.prefill_rows is not None):
        hidden = architecture_of(language_model).cache.row_layers(language_model, hidden, cache)
    if cache.prefill_rows is None:
        cache.lengths[:b] += 1
        cache.max_len += 1
    else:
        cache.lengths[cache.prefill_rows] = s
        cache.max_len = max(cache.max_len, s)
        cache.prefill_rows = None
    if not pipeline.is_last_stage_or_single():
        pipeline.send_hidden(hidden)
        return None
    decoder = language_model.decoder
    norm = getattr(decoder, "final_layernorm", None) or getattr(decoder, "final_norm", None)
    last = hidden[-1:]
    if norm is not None and getattr(decoder, "post_layer_norm", True):
        last = norm(last)
    weight = language_model.shared_embedding_or_output_weight() if language_model.share_embeddings_and_output_weights else None
    logits, _ = language_model.output_layer(last, weight=weight, runtime_gather_output=False)
    return logits[0]


def _stage_input(language_model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The hidden states [s, b, h] this stage starts from: embeddings, or the previous stage's."""
    if pipeline.is_first_stage_or_single():
        return language_model.embedding(input_ids=tokens, position_ids=positions)
    config = language_model.config
    shape = (tokens.shape[1], tokens.shape[0], config.hidden_size)
    return pipeline.recv_hidden(shape, config.pipeline_dtype or config.params_dtype, tokens.device)
