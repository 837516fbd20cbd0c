"""Thought rollouts: the three lockstep decoding modes agree, log-probs and S_pred equal teacher
forcing in every mode (the `rows` path included), contexts of different lengths share a batch exactly,
thoughts that hit L are closed and flagged; the `rows` path feeds no context token through decode,
compacts its cache only below the occupancy threshold and reads the host rarely."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config
from nemo_rlp.models import build_model
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.parallel import distributed
from nemo_rlp.rollout.sampler import (
    CHECK_EVERY,
    MODES,
    Markers,
    RolloutStats,
    SamplingParams,
    TableNoise,
    filter_logits,
    sample_thoughts,
)

VOCAB = 512
MARKERS = Markers(think_start=2, think_end=3, pad=0)
CPU = torch.device("cpu")


# Both architectures: attention layers share a prefill through their KV cache, Mamba layers through
# their conv and SSM states.
@pytest.fixture(scope="module", params=["tiny_gpt", "tiny_hybrid"])
def handle(request) -> ModelHandle:
    distributed.initialize(ParallelConfig(), seed=1)
    cfg = load_config([f"model={request.param}", "model.max_sequence_length=512"]).model
    torch.manual_seed(0)
    return ModelHandle(build_model(cfg, VOCAB, 1, CPU))


def _prefixes(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _sample(handle, prefixes, mode, G=4, L=12, seed=0, temperature=1.0, **kw):
    params = SamplingParams(group_size=G, max_thought_len=L, temperature=temperature, mode=mode, **kw)
    targets = [5 + i for i in range(len(prefixes))]
    return sample_thoughts(handle, prefixes, targets, params, MARKERS, torch.Generator().manual_seed(seed), CPU)


@pytest.fixture(scope="module")
def batches(handle):
    prefixes = _prefixes([5, 17, 9])  # contexts of different lengths in one batch
    return prefixes, {mode: _sample(handle, prefixes, mode) for mode in MODES}


def test_modes_agree(batches):
    _, out = batches
    ref = out["recompute"]
    for mode in ("cache", "shared_prefill"):
        assert torch.equal(out[mode].tokens, ref.tokens), mode
        assert torch.equal(out[mode].thought_len, ref.thought_len)
        torch.testing.assert_close(out[mode].behaviour_logprobs, ref.behaviour_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(out[mode].s_pred, ref.s_pred, atol=1e-4, rtol=0)


def test_lockstep_and_rows_paths_write_the_same_thoughts_from_the_same_noise(handle):
    """The `rows` path draws noise for every row at every step, the lockstep paths only for the rows
    still thinking, so from one seed they write different thoughts. Handed the same noise per (row,
    thought token) they must write the same ones: the two are then one sampler, whatever their cache
    layouts, and differ between runs only as two seeds do."""
    prefixes = _prefixes([5, 40, 9, 23])
    G, L = 4, 12
    R = len(prefixes) * G
    g = torch.Generator().manual_seed(3)
    table = torch.empty(R, L + 1, VOCAB).exponential_(generator=g)
    ends = torch.randint(1, L + 4, (R,), generator=g)
    for row, end in enumerate(ends.tolist()):
        if end <= L:  # the end marker wins this row's thought token end - 1; the others close at L
            table[row, end - 1, MARKERS.think_end] = 1e-30
    params = {mode: SamplingParams(group_size=G, max_thought_len=L, temperature=1.0, mode=mode)
              for mode in ("recompute", "shared_prefill", "rows")}
    targets = [5 + i for i in range(len(prefixes))]
    out = {mode: sample_thoughts(handle, prefixes, targets, p, MARKERS, torch.Generator().manual_seed(0), CPU,
                                 noise=TableNoise(table))
           for mode, p in params.items()}
    ref = out["recompute"]
    assert torch.equal(ref.thought_len, ends.clamp(max=L))  # the table decided every row's length
    for mode in ("shared_prefill", "rows"):
        assert torch.equal(out[mode].tokens, ref.tokens), mode
        assert torch.equal(out[mode].thought_len, ref.thought_len), mode
        assert torch.equal(out[mode].end_sampled, ref.end_sampled), mode
        torch.testing.assert_close(out[mode].behaviour_logprobs, ref.behaviour_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(out[mode].s_pred, ref.s_pred, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_and_s_pred_equal_teacher_forcing_without_padding(handle, batches, mode):
    """Each row scored alone (no other row, no padding) gives the sampler's log-probs and S_pred."""
    prefixes, out = batches
    batch = out[mode]
    for row in range(batch.tokens.shape[0]):
        n = int(batch.answer_index[row]) + 1
        alone = batch.tokens[row : row + 1, :n]
        with torch.no_grad():
            logprobs = handle.token_logprobs(alone)[0]
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        expected = logprobs[start - 1 : start - 1 + length]
        torch.testing.assert_close(batch.behaviour_logprobs[row, :length], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.s_pred[row], logprobs[n - 2], atol=1e-4, rtol=0)
        b = row // batch.group_size
        assert alone[0, : len(prefixes[b])].tolist() == prefixes[b]
        assert int(alone[0, len(prefixes[b])]) == MARKERS.think_start
        assert int(alone[0, n - 2]) == MARKERS.think_end
        assert int(alone[0, n - 1]) == 5 + b
    # Padding after a row's x_t does not change its scores either: score the padded batch at once.
    with torch.no_grad():
        padded = handle.token_logprobs(batch.tokens)
    index, mask = batch.thought_token_index()
    torch.testing.assert_close(padded.gather(1, index - 1)[mask], batch.behaviour_logprobs[mask], atol=1e-4, rtol=0)


def test_groups_sample_different_thoughts_and_seed_reproduces(handle):
    prefixes = _prefixes([8, 8])
    a = _sample(handle, prefixes, "shared_prefill", seed=3)
    b = _sample(handle, prefixes, "shared_prefill", seed=3)
    c = _sample(handle, prefixes, "shared_prefill", seed=4)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    # The G rows of one context share its prefix but are independent samples.
    first = a.tokens[: a.group_size]
    assert len({tuple(r.tolist()) for r in first}) > 1


class _Steered(ModelHandle):
    """The tiny model with the end marker's logit forced: never (bias=-inf) or always (+1e4)."""

    def __init__(self, inner: ModelHandle, bias: float):
        super().__init__(inner.module)
        self.bias = bias

    def _steer(self, logits):
        logits = logits.clone()
        logits[:, MARKERS.think_end] = self.bias
        return logits

    def next_token_logits(self, tokens, lengths):
        return self._steer(super().next_token_logits(tokens, lengths))

    def cached_logits(self, tokens, cache):
        return self._steer(super().cached_logits(tokens, cache))


@pytest.mark.parametrize("mode", MODES)
def test_thought_without_end_marker_is_closed_at_L_and_flagged(handle, mode):
    L = 7
    batch = _sample(_Steered(handle, float("-inf")), _prefixes([4, 11]), mode, L=L)
    assert (batch.thought_len == L).all()
    assert not batch.end_sampled.any()
    rows = torch.arange(batch.tokens.shape[0])
    # The recipe inserted the end marker right after the L sampled tokens, then x_t.
    assert (batch.answer_index == batch.thought_start + L + 1).all()
    assert (batch.tokens[rows, batch.answer_index - 1] == MARKERS.think_end).all()
    assert (batch.tokens[rows, batch.answer_index] == torch.tensor([5, 5, 5, 5, 6, 6, 6, 6])).all()
    # The inserted marker is not a sampled token: the thought mask covers exactly L tokens.
    _, mask = batch.thought_token_index()
    assert (mask.sum(1) == L).all()


def test_sampled_end_marker_counts_as_a_thought_token(handle):
    batch = _sample(_Steered(handle, 1.0e4), _prefixes([6]), "shared_prefill", L=5)
    assert (batch.thought_len == 1).all() and batch.end_sampled.all()
    assert (batch.tokens[:, batch.thought_start[0]] == MARKERS.think_end).all()


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, 2, 1.0)[0, :2]).any()
    probs = torch.softmax(logits, -1)[0]
    # top_p just above p0 keeps the two most likely tokens; at most p0, one.
    kept = ~torch.isinf(filter_logits(logits, 0, float(probs[0]) + 1e-3))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = ~torch.isinf(filter_logits(logits, 0, float(probs[0]) - 1e-3))
    assert kept.tolist() == [[True, False, False, False, False]]


def test_sampling_follows_the_tempered_distribution():
    """The exponential-race draw is a draw from softmax(logits / T)."""
    from nemo_rlp.rollout.sampler import sample_tokens

    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(40000, 3)
    params = SamplingParams(group_size=2, max_thought_len=1, temperature=0.7)
    noise = torch.empty(40000, 3).exponential_(generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(sample_tokens(logits, params, noise), minlength=3).float() / 40000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.01, rtol=0)


def _assert_equal_to_teacher_forcing(handle, batch, prefixes, targets):
    """Each row scored alone gives the sampler's behaviour log-probs and S_pred, and holds its
    context, the start marker, the thought, the end marker and x_t in place."""
    for row in range(batch.tokens.shape[0]):
        n = int(batch.answer_index[row]) + 1
        alone = batch.tokens[row : row + 1, :n]
        with torch.no_grad():
            logprobs = handle.token_logprobs(alone)[0]
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        torch.testing.assert_close(batch.behaviour_logprobs[row, :length], logprobs[start - 1 : start - 1 + length],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.s_pred[row], logprobs[n - 2], atol=1e-4, rtol=0)
        b = row // batch.group_size
        assert alone[0, : len(prefixes[b])].tolist() == prefixes[b]
        assert int(alone[0, len(prefixes[b])]) == MARKERS.think_start
        assert int(alone[0, n - 2]) == MARKERS.think_end and int(alone[0, n - 1]) == targets[b]


def test_rows_path_mixes_contexts_of_8_and_500_tokens_exactly(handle):
    """Both contexts are prefilled at their own length in one batch; no context token is decoded."""
    prefixes, targets = _prefixes([8, 500], seed=5), [5, 6]
    stats = RolloutStats()
    params = SamplingParams(group_size=3, max_thought_len=6, temperature=1.0, mode="rows")
    batch = sample_thoughts(handle, prefixes, targets, params, MARKERS, torch.Generator().manual_seed(2), CPU,
                            stats=stats)
    _assert_equal_to_teacher_forcing(handle, batch, prefixes, targets)
    assert stats.context_tokens_decoded == 0
    assert stats.decode_steps <= 6 + 1  # thought tokens 0..L-1 and the end marker, from the prefill on
    # (The lockstep path would feed 3 x 492 context tokens through decode here:
    # tests/unit/test_rollout_schedule.py checks its counters.)


def test_rows_path_with_forced_lengths_compacts_below_threshold_and_stays_exact(handle):
    """Thought caps (the benchmark's forced lengths) end most rows early: finished rows ride along
    masked, one compaction drops them, and every row still equals teacher forcing."""
    prefixes, targets = _prefixes([7, 30], seed=6), [5, 6]
    caps = [1, 2, 2, 3, 20, 2, 1, 3, 2, 20]  # G=5: 8 of 10 rows finish within 4 steps
    params = SamplingParams(group_size=5, max_thought_len=20, temperature=1.0, mode="rows")
    stats = RolloutStats()
    batch = sample_thoughts(handle, prefixes, targets, params, MARKERS,
                            torch.Generator().manual_seed(3), CPU, thought_caps=caps, stats=stats)
    caps = torch.tensor(caps)
    # A thought ends at its cap, or earlier when the policy samples the end marker.
    assert ((batch.thought_len == caps) | (batch.end_sampled & (batch.thought_len <= caps))).all()
    assert (batch.thought_len == caps).sum() >= 8
    _assert_equal_to_teacher_forcing(handle, batch, prefixes, targets)
    assert stats.compaction_bytes > 0  # 2 of 10 rows live at the first check: compacted once
    assert stats.mean_occupancy < 1.0
    assert stats.host_syncs <= stats.decode_steps // CHECK_EVERY + 1
    assert stats.generated_tokens == int(batch.thought_len.sum())
