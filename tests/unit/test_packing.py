"""Packed training rows (nemo_rlp.training.packing): the RLP microbatch's rows end to end, without
padding, give the padded computation's loss, metrics and gradients to 1e-5, on both tiny models
(attention with RoPE in tiny_gpt; Mamba mixers, attention and MLP layers in tiny_hybrid)."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config
from nemo_rlp.training.packing import pack_rows

SEED = 99
VOCAB = 256
ATOL = 1e-5


def test_pack_rows_lays_real_tokens_end_to_end():
    tokens = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]])
    packed = pack_rows(tokens, torch.tensor([3, 5, 2]), multiple=4)
    assert packed.input_ids[0].tolist() == [5, 6, 8, 9, 10, 11, 13, 0]  # padded to a multiple of 4
    assert packed.labels.tolist() == [6, 7, 9, 10, 11, 12, 14]
    assert packed.position_ids[0, :7].tolist() == [0, 1, 0, 1, 2, 3, 0]
    assert packed.cu_seqlens.tolist() == [0, 2, 6, 7, 8]
    # Rows aligned to 3 tokens (a Mamba chunk size): each starts at a multiple of 3.
    aligned = pack_rows(tokens, torch.tensor([3, 5, 2]), align=3)
    assert aligned.input_ids[0].tolist() == [5, 6, 0, 8, 9, 10, 11, 0, 0, 13, 0, 0]
    assert aligned.cu_seqlens.tolist() == [0, 3, 9, 12]
    assert aligned.where.tolist() == [0, 1, 3, 4, 5, 6, 9]
    assert aligned.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    from nemo_rlp.parallel import distributed

    distributed.initialize(ParallelConfig(), SEED)


def _loss_and_grads(model, batch, pack: bool, advantages: torch.Tensor):
    from nemo_rlp.training.losses import RLPLoss, RLPRows
    from nemo_rlp.training.steps import run_schedule

    B, G = batch.num_contexts, batch.group_size
    index, mask = batch.thought_token_index()
    rows = RLPRows.from_groups(advantages.view(B, G), torch.zeros(B))
    # Two microbatches that split a group, and logp_old away from logp_new so that ratios and clips vary.
    half = B * G // 2
    losses = [
        RLPLoss(tokens=batch.tokens[r], thought_index=index[r], thought_mask=mask[r],
                answer_index=batch.answer_index[r], rows=rows[r], global_thoughts=B * G, eps_low=0.2, eps_high=0.2,
                logp_old=batch.behaviour_logprobs[r] + 0.1 * torch.randn(mask[r].shape, generator=torch.Generator().manual_seed(1)),
                sampler_s_pred=batch.s_pred[r])
        for r in (slice(0, half), slice(half, B * G))
    ]
    model.policy.train()
    model.zero_grad()
    outputs = run_schedule(model, losses, pack=pack)
    grads = {n: p.main_grad.detach().clone() for n, p in model.language_model.named_parameters()}
    return [o["metrics"] for o in outputs], grads


@pytest.mark.parametrize("model_name", ["tiny_gpt", "tiny_hybrid"])
def test_packed_rows_give_the_padded_loss_and_gradients(model_name):
    from nemo_rlp.parallel.distributed import ParallelLayout
    from nemo_rlp.rollout.sampler import Markers, SamplingParams, sample_thoughts
    from nemo_rlp.training.policy import PolicyWithTeacher

    cfg = load_config([f"model={model_name}", "rlp.group_size=3", "rlp.max_thought_len=9", "rlp.temperature=1.0"])
    layout = ParallelLayout(world_size=1, rank=0, tensor_parallel=1, pipeline_parallel=1, data_parallel=1,
                            device=torch.device("cpu"))
    torch.manual_seed(SEED)
    model = PolicyWithTeacher(cfg, VOCAB, layout)
    g = torch.Generator().manual_seed(SEED)
    # Contexts of very different lengths: most of a padded microbatch is padding.
    prefixes = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (3, 40, 17, 9)]
    targets = torch.randint(4, VOCAB, (4,), generator=g).tolist()
    batch = sample_thoughts(model.policy, prefixes, targets, SamplingParams(3, 9, 1.0), Markers(2, 3, 0),
                            torch.Generator().manual_seed(SEED), torch.device("cpu"))
    assert batch.answer_index.min() + 30 < batch.answer_index.max()  # rows of very different lengths
    advantages = torch.randn(batch.tokens.shape[0], generator=g)
    metrics_padded, grads_padded = _loss_and_grads(model, batch, False, advantages)
    metrics_packed, grads_packed = _loss_and_grads(model, batch, True, advantages)
    for padded, packed in zip(metrics_padded, metrics_packed):
        for key, value in padded.items():
            torch.testing.assert_close(packed[key], value, atol=ATOL, rtol=0, msg=key)
    assert metrics_padded[0]["clip_frac"] > 0  # the comparison covers clipped tokens too
    assert sum(float(g.abs().sum()) for g in grads_padded.values()) > 0
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=ATOL, rtol=0, msg=name)
