"""Core attention for the local (non-Transformer-Engine) layer specs: torch's fused
`scaled_dot_product_attention` instead of megatron's `DotProductAttention`.

megatron's local `DotProductAttention` materialises the [rows * heads, S, S] score matrix and its
softmax, and keeps both for backward: at context 1024 that alone made a tiny model's RLP step 2-3x
slower, and its memory 2-3x larger, than a plain PyTorch implementation of the same model. SDPA
computes the same softmax(q k^T * scale) v without keeping the scores (flash / memory-efficient
kernels on CPU and GPU). On a GPU with Transformer Engine the TE spec is used and none of this runs.

`SDPAttention` is a drop-in `core_attention` submodule (same constructor, same parameters, same
state dict: it is a `DotProductAttention`) that takes the fused path where it computes exactly what
megatron's module computes, and falls back to megatron's module otherwise:
- no explicit `attention_mask` (megatron's causal or no-mask types), vanilla softmax, no sliding
  window, no attention dropout in training, no query-key layer scaling;
- causal with as many queries as keys (training, prefill) is SDPA's `is_causal`; fewer queries than
  keys (cached decoding) attend to every key before them (bottom-right causal alignment, what
  megatron's cached path computes: one new token sees the whole cache);
- packed sequences (`PackedSeqParams`, qkv_format `thd`: tokens of several sequences laid end to
  end, `cu_seqlens_q` their boundaries): each sequence attends causally to itself only. This is
  computed with SDPA per run of equal-length sequences (a view of the pack as a batch), which is
  exact: each sequence's attention is the ordinary causal attention of that sequence, the same
  kernel as the padded rows. A block-diagonal mask over the whole pack would be exact too but costs
  (tokens)^2 memory, which is what packing is meant to avoid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron's `DotProductAttention` computed by `torch.nn.functional.scaled_dot_product_attention`."""

    def _fused_path_applies(self, attention_mask, attn_mask_type, attention_bias) -> bool:
        config = self.config
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        dropout = self.attention_dropout.p if self.training else 0.0
        return (
            attention_mask is None
            and attention_bias is None
            and mask_type in (AttnMaskType.causal, AttnMaskType.no_mask)
            and config.softmax_type == "vanilla"
            and config.window_size is None
            and not config.apply_query_key_layer_scaling
            and dropout == 0.0
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if not self._fused_path_applies(attention_mask, attn_mask_type, attention_bias):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        causal = (self.attn_mask_type if attn_mask_type is None else attn_mask_type) == AttnMaskType.causal
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, causal)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v, causal)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q [b, heads, sq, d], k and v [b, groups, sk, d] -> [b, heads, sq, d]."""
        sq, sk = q.shape[-2], k.shape[-2]
        # Keys and values arrive as strided views ([b, s, groups, d] transposed, or slices of the fused
        # qkv projection). CPU's flash kernel takes any strides, but forward + backward over such views
        # took ~20% longer than over contiguous [b, groups, s, d] copies (median 945 against 760 ms
        # for one layer at the bench's 32 rows x 1090 tokens, 4 heads, 2 groups, one thread); the
        # copies are groups/heads of the query's size. Only where a backward follows (what was
        # measured): a cached decoding step would copy the whole cache at every step. Queries are left
        # as they are (copying them too was no faster).
        if k.requires_grad or v.requires_grad:
            k, v = k.contiguous(), v.contiguous()
        # One query (a decoding step) sees every key: no mask needed.
        mask = None
        if causal and 1 < sq != sk:
            # Bottom-right alignment: query i is key sk - sq + i.
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and sq == sk, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )

    def _packed(self, query, key, value, packed_seq_params, causal: bool) -> torch.Tensor:
        """THD: query [t, heads, d], key and value [t, groups, d] -> [t, heads * d].

        Consecutive sequences of one length are one batched SDPA call over a view of the pack (no
        copy); outputs are concatenated once. (Slicing the pack per sequence and writing into an
        output buffer would cost a pack-sized gradient buffer per sequence in backward.)"""
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences: qkv_format {packed_seq_params.qkv_format!r}, expected 'thd'")
        cu_q = _boundaries(packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_q)
        cu_kv = _boundaries(packed_seq_params.cu_seqlens_kv_padded, packed_seq_params.cu_seqlens_kv)
        if cu_q != cu_kv:
            raise ValueError("packed self-attention: query and key boundaries differ")
        if cu_q[-1] != query.shape[0]:
            raise ValueError(f"packed sequences end at {cu_q[-1]}, the pack has {query.shape[0]} tokens")
        outputs = []
        for start, count, length in _equal_length_runs(cu_q):
            stop = start + count * length
            # [count * length, heads, d] -> [count, heads, length, d]
            q, k, v = (t[start:stop].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (query, key, value))
            out = self._sdpa(q, k, v, causal)  # [count, heads, length, d]
            outputs.append(out.transpose(1, 2).reshape(count * length, self.hidden_size_per_partition))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _equal_length_runs(cu: list[int]) -> list[tuple[int, int, int]]:
    """(start, number of sequences, length) of each run of consecutive equal-length sequences."""
    runs: list[tuple[int, int, int]] = []
    for start, stop in zip(cu[:-1], cu[1:]):
        length = stop - start
        if length == 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        else:
            runs.append((start, 1, length))
    return runs


def _boundaries(padded: Optional[torch.Tensor], plain: Optional[torch.Tensor]) -> list[int]:
    """Sequence boundaries in the pack, as Python ints (one host sync per layer call, not per sequence).
    The padded boundaries win, as in megatron's THD rotary embedding: they say where each sequence
    sits in the packed tensor."""
    cu = padded if padded is not None else plain
    return [int(x) for x in cu.tolist()]
