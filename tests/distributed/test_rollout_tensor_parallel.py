"""Rollouts under tensor and pipeline parallelism: TP=2 and PP=2 sample the same thoughts, with the
same behaviour log-probs and S_pred, as TP=1 from the same seed (gloo, CPU).

Every lockstep mode and the `rows` path (each against its own TP=1 reference).
One launch of two processes: as one TP=2 replica, then, after re-initialising megatron's parallel
state, as one PP=2 replica, then as two TP=1 replicas (DP=2) that are the reference. All layouts
start from the same weights (full weights initialised on CPU from one seed and sharded; pipeline
stages copy their layers from the one-stage model, tests/distributed/layouts.py).
"""

from __future__ import annotations

import pytest
import torch

from .launch import run_distributed
from .layouts import load_one_stage_weights, one_stage_weights

pytestmark = pytest.mark.distributed

SEED = 77
VOCAB = 256


def _rollout(tensor_parallel: int, mode: str, model: str, weights=None, top_k: int = 0):
    from nemo_rlp.config import load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.rollout.sampler import Markers, SamplingParams, sample_thoughts

    cfg = load_config([f"model={model}", "model.max_sequence_length=128"]).model
    torch.manual_seed(SEED)
    module = build_model(cfg, VOCAB, tensor_parallel, torch.device("cpu"))
    if weights is not None:
        load_one_stage_weights(module, weights)
    handle = ModelHandle(module)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (6, 13, 9)]
    params = SamplingParams(group_size=4, max_thought_len=10, temperature=1.0, mode=mode, top_k=top_k)
    generator = torch.Generator().manual_seed(SEED)
    batch = sample_thoughts(handle, prefixes, [5, 6, 7], params, Markers(2, 3, 0), generator, torch.device("cpu"))
    return {"tokens": batch.tokens, "behaviour": batch.behaviour_logprobs, "s_pred": batch.s_pred,
            "thought_len": batch.thought_len, "generator": generator.get_state()}


def _worker(model: str) -> dict:
    from megatron.core import parallel_state

    from nemo_rlp.config import ParallelConfig, load_config
    from nemo_rlp.parallel import distributed

    out = {}
    distributed.initialize(ParallelConfig(tensor_model_parallel_size=2), SEED)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    for mode in ("shared_prefill", "recompute", "rows"):
        out[("tp2", mode)] = _rollout(2, mode, model)
    # The rows path samples on vocabulary shards; with top-k it gathers them first.
    out[("tp2", "rows_top_k")] = _rollout(2, "rows", model, top_k=20)
    parallel_state.destroy_model_parallel()
    distributed.initialize(ParallelConfig(tensor_model_parallel_size=1), SEED)
    torch.manual_seed(SEED)
    weights = one_stage_weights(load_config([f"model={model}", "model.max_sequence_length=128"]).model, VOCAB, 1)
    parallel_state.destroy_model_parallel()
    distributed.initialize(ParallelConfig(pipeline_model_parallel_size=2), SEED)
    assert parallel_state.get_pipeline_model_parallel_world_size() == 2
    for mode in ("shared_prefill", "cache", "recompute", "rows"):
        out[("pp2", mode)] = _rollout(1, mode, model, weights)
    parallel_state.destroy_model_parallel()
    distributed.initialize(ParallelConfig(tensor_model_parallel_size=1), SEED)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    for mode in ("shared_prefill", "rows"):
        out[("tp1", mode)] = _rollout(1, mode, model)
    out[("tp1", "rows_top_k")] = _rollout(1, "rows", model, top_k=20)
    return out


@pytest.mark.parametrize("model", ["tiny_gpt", "tiny_hybrid"])
def test_tp2_and_pp2_rollouts_equal_tp1(model):
    results = run_distributed(_worker, world_size=2, args=(model,), timeout=240)
    # The `rows` path draws its noise per decode step rather than per position, so it has its own
    # TP=1 reference; the lockstep modes share one.
    refs = {mode: results[0][("tp1", mode)] for mode in ("shared_prefill", "rows", "rows_top_k")}
    ref = refs["shared_prefill"]
    for rank, result in enumerate(results):
        # Both TP=1 replicas (a DP pair) and both TP=2 ranks agree with the reference.
        for key, got in result.items():
            ref = refs[key[1] if key[1].startswith("rows") else "shared_prefill"]
            assert torch.equal(got["tokens"], ref["tokens"]), (rank, key)
            assert torch.equal(got["thought_len"], ref["thought_len"]), (rank, key)
            torch.testing.assert_close(got["behaviour"], ref["behaviour"], atol=1e-4, rtol=0)
            torch.testing.assert_close(got["s_pred"], ref["s_pred"], atol=1e-4, rtol=0)
            # Every stage and rank leaves the rollout with the reference's generator state: the first
            # pipeline stage, which never holds the logits, too (checkpoints save its state).
            assert torch.equal(got["generator"], ref["generator"]), (rank, key)
    # The thoughts are real samples, not a degenerate constant.
    for ref in refs.values():
        assert len({tuple(r.tolist()) for r in ref["tokens"]}) > 3
