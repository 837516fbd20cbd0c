"""The rollout schedule replay (nemo_rlp.rollout.schedule) against the sampler's own counters, and
the host work measured per decode step: the inputs of the planner's --time model."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config
from nemo_rlp.models import build_model
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.parallel import distributed
from nemo_rlp.rollout import schedule
from nemo_rlp.rollout.sampler import CHECK_EVERY, Markers, RolloutStats, SamplingParams, sample_thoughts

MARKERS = Markers(think_start=2, think_end=3, pad=0)
CONTEXTS = [5, 17, 9]
# G=4: thoughts of very different lengths, three of twelve past the first host check.
CAPS = [1, 3, 10, 2, 12, 1, 2, 4, 9, 2, 1, 12]


class _NoEnd(ModelHandle):
    """The end marker never sampled: every thought closes at its cap, as the replay assumes."""

    def cached_logits(self, tokens, cache):
        logits = super().cached_logits(tokens, cache).clone()
        logits[:, MARKERS.think_end] = float("-inf")
        return logits


@pytest.fixture(scope="module", params=["tiny_gpt", "tiny_hybrid"])
def handle(request):
    distributed.initialize(ParallelConfig(), seed=1)
    cfg = load_config([f"model={request.param}"]).model
    torch.manual_seed(0)
    return request.param, _NoEnd(build_model(cfg, 256, 1, torch.device("cpu")))


@pytest.mark.parametrize("mode", ["shared_prefill", "rows"])
def test_replay_equals_the_samplers_counters(handle, mode):
    name, model = handle
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(4, 256, (n,), generator=g).tolist() for n in CONTEXTS]
    stats = RolloutStats()
    batch = sample_thoughts(model, prefixes, [5, 6, 7], SamplingParams(group_size=4, max_thought_len=12, mode=mode),
                            MARKERS, torch.Generator().manual_seed(0), torch.device("cpu"), thought_caps=CAPS,
                            stats=stats)
    assert batch.thought_len.tolist() == CAPS
    replayed = schedule.replay(mode, CONTEXTS, CAPS, 4, 12)
    for key in ("decode_steps", "row_steps", "live_row_steps", "context_tokens_decoded", "host_syncs",
                "generated_tokens"):
        assert getattr(replayed, key) == getattr(stats, key), key
    assert (replayed.compaction_cells > 0) == (stats.compaction_bytes > 0)
    if name == "tiny_gpt":  # 2 layers x K and V x 2 groups x 16 dims x 4 bytes per cached position
        assert stats.compaction_bytes == replayed.compaction_cells * 2 * 2 * 2 * 16 * 4
    if mode == "rows":
        assert replayed.context_tokens_decoded == 0 and replayed.compaction_cells > 0


def test_replay_step_chunks_the_contexts():
    whole = schedule.replay_step("rows", CONTEXTS, CAPS, 4, 12, chunk=3)
    parts = schedule.replay_step("rows", CONTEXTS, CAPS, 4, 12, chunk=1)
    assert whole.generated_tokens == parts.generated_tokens == sum(CAPS)
    assert parts.decode_steps > whole.decode_steps  # three loops instead of one


@pytest.mark.parametrize("arch", ["gpt", "hybrid"])
def test_host_work_is_measured_per_layer_and_step(arch):
    lockstep = schedule.measure_host_work(arch, "shared_prefill")
    rows = schedule.measure_host_work(arch, "rows")
    for work in (lockstep, rows):
        assert work.ops_per_layer > 10 and work.ops_per_step > 0
    assert lockstep.syncs_per_step == 5
    assert rows.syncs_per_step == pytest.approx(1 / CHECK_EVERY)
