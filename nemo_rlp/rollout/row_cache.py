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
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_rlp.parallel import pipeline


class RowCache:
    """KV (post-RoPE) and Mamba state cache for `rows` rows of up to `max_positions` tokens each."""

    def __init__(self, language_model: torch.nn.Module, rows: int, max_positions: int, device: torch.device):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.rows = rows  # rows currently in the batch (cache rows 0..rows-1)
        self.max_positions = max_positions
        self.device = device
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens cached per row
        self.max_len = 0  # a host-side bound on lengths.max(): no sync to size the attention
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # Mamba states live in megatron's own static context, kept in decode mode: the mixer then
        # runs its one-token state update on exactly the states stored here.
        self.mamba = StaticInferenceContext(max_batch_size=rows, max_sequence_length=max_positions)
        self.mamba.sequence_len_offset = 1
        self.mamba.seqlen_offset = 1  # what the mixer reads (MambaStack.forward sets it, mamba_block.py:287)
        self.mamba.enable_decode_mode()
        rotary = getattr(language_model, "rotary_pos_emb", None)
        self.freqs = None
        if getattr(language_model, "position_embedding_type", None) == "rope" and rotary is not None:
            self.freqs = rotary(max_positions)  # [positions, 1, 1, rot_dim]
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
        for layer, (conv, ssm) in list(self.mamba.key_value_memory_dict.items()):
            self.mamba.key_value_memory_dict[layer] = (conv[index].contiguous(), ssm[index].contiguous())
            self.compaction_bytes += (conv[index].numel() + ssm[index].numel()) * conv.element_size()
        self.lengths = self.lengths[index].clone()
        self.rows = kept

    def row_bytes(self) -> int:
        """Bytes of one row's cache (all layers, all positions allocated)."""
        total = sum(b[0].numel() * b.element_size() for store in (self.keys, self.values) for b in store.values())
        for conv, ssm in self.mamba.key_value_memory_dict.values():
            total += (conv[0].numel() + ssm[0].numel()) * conv.element_size()
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
        """RoPE at explicit positions: t [s, b, heads, dim], positions [s, b]."""
        if self.freqs is None:
            return t
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        freqs = self.freqs[positions.reshape(-1)].reshape(*positions.shape, 1, self.freqs.shape[-1])
        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=config.rotary_interleaved)

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


def _attention_layer(layer: torch.nn.Module, hidden: torch.Tensor, cache: RowCache, capacity: int):
    """megatron TransformerLayer._forward_attention + _forward_mlp, with the attention on `cache`."""
    residual = hidden
    normed = layer.input_layernorm(hidden)
    attention_out = cache.attend(layer.self_attention, normed, capacity)
    with layer.bias_dropout_add_exec_handler():
        hidden = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
            attention_out, residual, layer.hidden_dropout
        )
    return layer._forward_mlp(hidden)


def _run_layers(language_model: torch.nn.Module, hidden: torch.Tensor, cache: RowCache) -> torch.Tensor:
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    batch = hidden.shape[1]
    prefill = None
    if cache.prefill_rows is not None:
        from megatron.core.inference.contexts import StaticInferenceContext

        # The context's Mamba prefill runs at batch 1 in its own context; its states are then
        # written into the G rows.
        prefill = StaticInferenceContext(max_batch_size=batch, max_sequence_length=hidden.shape[0])
        prefill.seqlen_offset = 0
    for layer in language_model.decoder.layers:
        if isinstance(layer, TransformerLayer) and isinstance(layer.self_attention, Attention):
            hidden = _attention_layer(layer, hidden, cache, cache.mamba.max_batch_size)
        elif isinstance(layer, TransformerLayer):  # an MLP-only layer of a hybrid stack
            hidden, _ = layer(hidden_states=hidden, attention_mask=None)
        else:  # a Mamba layer
            mixer = layer.mixer
            if prefill is not None:
                hidden = layer(hidden, inference_context=prefill)
                _store_mamba_prefill(cache, mixer.layer_number, prefill.key_value_memory_dict[mixer.layer_number])
            else:
                mixer.cached_batch_size = batch  # megatron re-zeroes states when this differs
                hidden = layer(hidden, inference_context=cache.mamba)
    return hidden


def _store_mamba_prefill(cache: RowCache, layer: int, states: tuple) -> None:
    conv, ssm = states
    store = cache.mamba.key_value_memory_dict
    if layer not in store:
        capacity = cache.mamba.max_batch_size
        store[layer] = (conv.new_zeros(capacity, *conv.shape[1:]), ssm.new_zeros(capacity, *ssm.shape[1:]))
    store[layer][0][cache.prefill_rows] = conv
    store[layer][1][cache.prefill_rows] = ssm


@torch.no_grad()
def row_cached_logits(language_model: torch.nn.Module, tokens: torch.Tensor, cache: RowCache) -> Optional[torch.Tensor]:
    """Feed `tokens` [b, s] (a prefill of one context: b = 1; a decode step: s = 1 for the cache's
    first b rows) and return this replica's vocabulary-sharded logits [b, V/TP] for the token after
    the last one, on the last pipeline stage (None on the others)."""
    b, s = tokens.shape
    if cache.prefill_rows is None:
        positions = cache.lengths[:b].unsqueeze(1)
    else:
        positions = torch.arange(s, device=tokens.device).unsqueeze(0)
    hidden = _stage_input(language_model, tokens, positions)
    hidden = _run_layers(language_model, hidden, cache)
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
