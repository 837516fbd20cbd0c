"""The `dynamic` rollout mode on a lent GPU: megatron's dynamic engine samples the thoughts of contexts
of very different lengths, and the rows' behaviour log-probs and S_pred equal a teacher-forced
forward of each row alone, as the CPU paths' do. Never run yet (written without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_dynamic_engine_rollouts_equal_teacher_forcing():
    from nemo_rlp.config import ParallelConfig, load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.parallel import distributed
    from nemo_rlp.rollout import dynamic_engine
    from nemo_rlp.rollout.sampler import Markers, RolloutStats, SamplingParams, sample_thoughts

    if not dynamic_engine.available():
        pytest.skip("needs CUDA and flash-attn >= 2.7.3")
    distributed.initialize(ParallelConfig(), seed=1)
    cfg = load_config(["model=tiny_gpt", "model.max_sequence_length=640", "model.params_dtype=bf16"]).model
    torch.manual_seed(0)
    device = torch.device("cuda")
    handle = ModelHandle(build_model(cfg, 512, 1, device))
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (8, 500)]
    params = SamplingParams(group_size=4, max_thought_len=32, temperature=1.0, mode="dynamic")
    markers = Markers(2, 3, 0)
    batch = sample_thoughts(handle, prefixes, [5, 6], params, markers, torch.Generator().manual_seed(1), device,
                            stats=RolloutStats())
    assert (batch.thought_len >= 1).all() and (batch.thought_len <= 32).all()
    for row in range(batch.tokens.shape[0]):
        n = int(batch.answer_index[row]) + 1
        with torch.no_grad():
            logprobs = handle.token_logprobs(batch.tokens[row : row + 1, :n])[0]
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        torch.testing.assert_close(batch.behaviour_logprobs[row, :length], logprobs[start - 1 : start - 1 + length],
                                   atol=2e-2, rtol=0)  # bf16
        assert int(batch.tokens[row, n - 2]) == markers.think_end
