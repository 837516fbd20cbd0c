"""The `dynamic` rollout mode (megatron's dynamic engine, GPU only): refused clearly on CPU, and its
layout and scoring (everything but the engine) checked on CPU with a stand-in engine that replays
given thoughts: the rows equal what teacher forcing says, as on the CPU paths."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config
from nemo_rlp.models import build_model
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.parallel import distributed
from nemo_rlp.rollout import dynamic_engine
from nemo_rlp.rollout.sampler import Markers, SamplingParams, sample_thoughts

MARKERS = Markers(think_start=2, think_end=3, pad=0)


class _ReplayEngine:
    """Finishes every request at once with the thought given for it (the engine's output format)."""

    def __init__(self, thoughts):
        self.thoughts, self.pending = thoughts, []

    def add_request(self, request_id, prompt, sampling_params):
        assert prompt[-1] == MARKERS.think_start and sampling_params.termination_id == MARKERS.think_end
        self.pending.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step_modern(self):
        records = [type("Request", (), dict(request_id=i, generated_tokens=self.thoughts[i])) for i in self.pending]
        self.pending = []
        return {"finished_request_records": records}


@pytest.fixture(scope="module")
def handle():
    distributed.initialize(ParallelConfig(), seed=1)
    cfg = load_config(["model=tiny_gpt"]).model
    torch.manual_seed(0)
    return ModelHandle(build_model(cfg, 256, 1, torch.device("cpu")))


def test_dynamic_mode_is_refused_without_cuda(handle):
    if dynamic_engine.available():
        pytest.skip("a GPU with flash-attn: the gpu test runs the engine")
    with pytest.raises(RuntimeError, match="flash-attn"):
        sample_thoughts(handle, [[5, 6, 7]], [8], SamplingParams(group_size=2, max_thought_len=4, mode="dynamic"),
                        MARKERS, torch.Generator().manual_seed(0), torch.device("cpu"))


def test_dynamic_layout_and_scores_equal_teacher_forcing(handle):
    prefixes, targets = [[5, 6, 7, 8], list(range(10, 30))], [40, 41]
    # Row 1 samples the end marker; rows 0, 2, 3 stop at L=4 and get it inserted.
    thoughts = [[11, 12, 13, 14], [15, MARKERS.think_end], [16, 17, 18, 19], [20, 21, 22, 23]]
    params = SamplingParams(group_size=2, max_thought_len=4, mode="dynamic")
    batch = dynamic_engine.sample_thoughts_dynamic(handle, prefixes, targets, params, MARKERS,
                                                   torch.Generator().manual_seed(0), torch.device("cpu"),
                                                   engine=_ReplayEngine(thoughts))
    assert batch.thought_len.tolist() == [4, 2, 4, 4]
    assert batch.end_sampled.tolist() == [False, True, False, False]
    for row in range(4):
        n = int(batch.answer_index[row]) + 1
        alone = batch.tokens[row : row + 1, :n]
        context = prefixes[row // 2] + [MARKERS.think_start]
        sampled = thoughts[row] if thoughts[row][-1] == MARKERS.think_end else thoughts[row] + [MARKERS.think_end]
        assert alone[0].tolist() == context + sampled + [targets[row // 2]]
        with torch.no_grad():
            logprobs = handle.token_logprobs(alone)[0]
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        torch.testing.assert_close(batch.behaviour_logprobs[row, :length], logprobs[start - 1 : start - 1 + length],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.s_pred[row], logprobs[n - 2], atol=1e-4, rtol=0)
