"""The SDPA core attention of the local layer specs (nemo_rlp.models.attention) computes what
megatron's DotProductAttention computes: outputs and gradients to 1e-5, with grouped queries, for
training (causal), cached decoding (fewer queries than keys) and packed sequences (THD)."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config

SEED = 1234
ATOL = 1e-5


@pytest.fixture(scope="module")
def modules():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_rlp.models.attention import SDPAttention
    from nemo_rlp.models.common import transformer_config
    from nemo_rlp.parallel import distributed

    distributed.initialize(ParallelConfig(), SEED)
    config = transformer_config(load_config(["model=tiny_gpt"]).model, 1)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**args), SDPAttention(**args), config


def _qkv(config, sq: int, sk: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = config.kv_channels
    q = torch.randn(sq, b, config.num_attention_heads, d, generator=g, requires_grad=True)
    k = torch.randn(sk, b, config.num_query_groups, d, generator=g, requires_grad=True)
    v = torch.randn(sk, b, config.num_query_groups, d, generator=g, requires_grad=True)
    return q, k, v


def _out_and_grads(module, q, k, v, **kwargs):
    out = module(q, k, v, None, **kwargs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    return out.detach(), grads


def test_causal_training_attention_equals_megatron(modules):
    reference, fused, config = modules
    assert config.num_attention_heads != config.num_query_groups  # grouped queries are exercised
    q, k, v = _qkv(config, 24, 24, 3)
    out_ref, grads_ref = _out_and_grads(reference, q, k, v)
    out, grads = _out_and_grads(fused, q, k, v)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_one_query_against_a_cache_attends_to_every_key(modules):
    reference, fused, config = modules
    q, k, v = _qkv(config, 1, 17, 2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(fused(q, k, v, None), reference(q, k, v, None), atol=ATOL, rtol=0)


def test_packed_sequences_equal_each_sequence_alone(modules):
    """THD: three sequences end to end attend only to themselves, causally, as each would alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    reference, fused, config = modules
    lengths = [5, 11, 3]
    q, k, v = _qkv(config, sum(lengths), sum(lengths), 1, seed=2)
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    out, grads = _out_and_grads(fused, q.squeeze(1), k.squeeze(1), v.squeeze(1), packed_seq_params=packed)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    expected = []
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected.append(reference(q[start:stop], k[start:stop], v[start:stop], None)[:, 0])
    expected = torch.cat(expected)
    grads_ref = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, expected.detach(), atol=ATOL, rtol=0)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want.squeeze(1), atol=ATOL, rtol=0)


def test_an_explicit_mask_falls_back_to_megatron(modules):
    reference, fused, config = modules
    q, k, v = _qkv(config, 6, 6, 1, seed=3)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 0] = True  # megatron's convention: True is masked out
    with torch.no_grad():
        torch.testing.assert_close(fused(q, k, v, mask), reference(q, k, v, mask), atol=ATOL, rtol=0)
