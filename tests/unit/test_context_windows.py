"""RLP context windows: k positions per document window, windowing of long documents, one teacher
forward per window for S_ema, the optional log-prob band filter, determinism and resumption."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_rlp.data.sampling import ContextSampler, ContextWindow, LogProbBand
from nemo_rlp.training.steps import teacher_scorer
from tests.drawn import drawn_contexts

PAD = 0


def _docs(lengths: list[int]) -> list[list[int]]:
    # Token values encode (document, position), so a window crossing a boundary would be caught.
    return [[1000 * d + i for i in range(n)] for d, n in enumerate(lengths)]


class ToyCausalLM(torch.nn.Module):
    """Causal by construction: position j sees the running mean of the embeddings of tokens[:j+1]."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vocab = vocab
        self.emb, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens % self.vocab
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=torch.float32).view(1, -1, 1)
        hidden = self.emb(tokens).cumsum(1) / steps
        logp = torch.log_softmax(self.out(hidden[:, :-1]), dim=-1)
        return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def toy() -> ToyCausalLM:
    return ToyCausalLM()


def _check_windows(docs, windows: list[ContextWindow], n: int, k: int, min_context: int, max_context: int) -> None:
    assert sum(len(w.offsets) for w in windows) == n
    for w in windows:
        doc = docs[w.doc_index]
        assert w.tokens == list(doc[w.start : w.start + len(w.tokens)])  # inside one document
        assert 1 <= len(w.offsets) <= k and w.offsets == sorted(set(w.offsets))
        assert min_context <= w.offsets[0] and w.offsets[-1] == len(w.tokens) - 1 <= max_context
        for c, j in zip(w.contexts(), w.offsets):
            assert c.doc_index == w.doc_index and c.position == w.start + j
            assert c.target == doc[c.position] and c.prefix == list(doc[c.position - len(c.prefix) : c.position])
            assert min_context <= len(c.prefix) <= max_context


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    min_context=st.integers(1, 8),
    extra=st.integers(0, 12),
    k=st.integers(1, 6),
    n=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_windows_stay_inside_documents_and_limits(lengths, min_context, extra, k, n, seed) -> None:
    if not any(length > min_context for length in lengths):
        return  # no eligible document: covered by test_data.py
    docs = _docs(lengths)
    sampler = ContextSampler(docs, min_context=min_context, max_context=min_context + extra, seed=seed,
                             positions_per_document=k)
    windows = sampler.sample_windows(n)
    _check_windows(docs, windows, n, k, min_context, min_context + extra)
    assert sampler.num_sampled == n and sampler.num_windows == len(windows)


def test_one_position_per_document_is_the_plain_stream() -> None:
    docs = _docs([5, 40, 200, 3, 90])
    a = ContextSampler(docs, min_context=4, max_context=16, seed=7)
    windows = a.sample_windows(300)
    contexts = [c for w in windows for c in w.contexts()]
    assert len(contexts) == 300 and all(c.prefix == docs[c.doc_index][max(0, c.position - 16):c.position]
                                        and c.target == docs[c.doc_index][c.position] for c in contexts)
    # The prefix is as long as allowed: the window ends at the single position.
    assert all(len(w.offsets) == 1 and w.start == max(0, w.start + w.offsets[0] - 16) for w in windows)


def test_long_documents_are_windowed() -> None:
    docs = _docs([5000, 30])
    sampler = ContextSampler(docs, min_context=4, max_context=16, seed=1, positions_per_document=4)
    windows = sampler.sample_windows(2000)
    _check_windows(docs, windows, 2000, 4, 4, 16)
    starts = [w.start for w in windows if w.doc_index == 0]
    assert max(starts) > 4900 and min(starts) < 100  # the whole document is reachable
    assert sum(len(w.offsets) == 4 for w in windows) >= len(windows) - 1  # full windows hold k positions


def test_positions_uniform_in_a_short_document() -> None:
    docs = _docs([20])
    sampler = ContextSampler(docs, min_context=2, max_context=64, seed=3, positions_per_document=3)
    counts = np.bincount([c.position for c in drawn_contexts(sampler, 18_000)], minlength=20)
    assert counts[:2].sum() == 0
    assert np.allclose(counts[2:] / 1000, 1.0, atol=0.1)  # 18 positions, 1000 expected each


def test_one_teacher_forward_per_window_gives_s_ema(toy: ToyCausalLM) -> None:
    docs = [[(7 * d + 3 * i) % 61 + 1 for i in range(n)] for d, n in enumerate([12, 70, 33, 9])]
    sampler = ContextSampler(docs, min_context=3, max_context=24, seed=2, positions_per_document=5)
    calls = []

    def scorer(windows):
        calls.append(len(windows))
        return teacher_scorer(toy.token_logprobs, PAD)(windows)

    windows = sampler.sample_windows(40, scorer=scorer)
    assert sum(calls) == len(windows) < 40  # one batched call, one row per window, fewer rows than contexts
    for w in windows:
        assert w.teacher_logprobs.shape == (len(w.tokens) - 1,)
        for c, s in zip(w.contexts(), w.s_ema()):  # the same value a per-context forward gives
            row = torch.tensor([c.prefix + [c.target]])
            with torch.no_grad():
                assert s == pytest.approx(float(toy.token_logprobs(row)[0, -1]), abs=1e-5)
    with pytest.raises(ValueError, match="not scored"):
        sampler.sample_windows(3)[0].s_ema()
    # Scoring in chunks of rows gives the same values.
    tokens = [w.tokens for w in windows]
    whole = teacher_scorer(toy.token_logprobs, PAD)(tokens)
    for a, b in zip(whole, teacher_scorer(toy.token_logprobs, PAD, max_rows=3)(tokens)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_seed_same_windows_and_restore_continues() -> None:
    docs = _docs([300, 17, 80, 999, 45])

    def make(seed: int) -> ContextSampler:
        return ContextSampler(docs, min_context=4, max_context=32, seed=seed, positions_per_document=3)

    assert make(3).sample_windows(100) == make(3).sample_windows(100)
    assert drawn_contexts(make(3), 100) != drawn_contexts(make(4), 100)
    sampler = make(11)
    drawn_contexts(sampler, 37)  # ends inside a window: the rest of it is not carried over, the stream is
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = drawn_contexts(sampler, 10) + drawn_contexts(sampler, 25)
    restored = make(999)
    restored.load_state_dict(state)
    assert drawn_contexts(restored, 10) + drawn_contexts(restored, 25) == expected
    assert restored.state_dict() == sampler.state_dict()
    other_k = ContextSampler(docs, min_context=4, max_context=32, seed=11, positions_per_document=2)
    with pytest.raises(ValueError, match="positions_per_document=3.*same data and settings"):
        other_k.load_state_dict(state)


def test_logprob_band_keeps_only_positions_in_the_band(toy: ToyCausalLM) -> None:
    docs = [[(5 * d + 11 * i) % 63 + 1 for i in range(n)] for d, n in enumerate([40, 25, 90, 14])]
    scorer = teacher_scorer(toy.token_logprobs, PAD)
    band = LogProbBand(-4.3, -4.0)

    def make(seed: int, k: int) -> ContextSampler:
        return ContextSampler(docs, min_context=2, max_context=20, seed=seed, positions_per_document=k,
                              position_filter=band)

    for k in (1, 4):
        sampler = make(5, k)
        windows = sampler.sample_windows(60, scorer=scorer)
        _check_windows(docs, windows, 60, k, 2, 20)
        assert all(band.low <= s <= band.high for w in windows for s in w.s_ema())
        stats = sampler.stats()
        assert 0 < stats["filter_pass_frac"] < 1
        assert (stats["filter_rejected_windows"] > 0) == (k == 1)  # k = 1: one candidate per window
        # Deterministic given the scores, and resumable.
        again = make(5, k)
        assert again.sample_windows(60, scorer=scorer) == windows
        state = json.loads(json.dumps(sampler.state_dict()))
        expected = sampler.sample_windows(30, scorer=scorer)
        restored = make(0, k)
        restored.load_state_dict(state)
        assert restored.sample_windows(30, scorer=scorer) == expected


def test_position_filter_errors(toy: ToyCausalLM) -> None:
    docs = _docs([30, 40])
    sampler = ContextSampler(docs, min_context=2, max_context=8, seed=0, position_filter=LogProbBand(-1.0, 0.0))
    with pytest.raises(ValueError, match="pass scorer="):
        sampler.sample_windows(4)
    never = ContextSampler(docs, min_context=2, max_context=8, seed=0, positions_per_document=2,
                           position_filter=LogProbBand(1.0, 2.0))  # log-probs are <= 0
    with pytest.raises(RuntimeError, match=r"passed 0 of \d+ candidate positions.*Widen data.logprob_band"):
        never.sample_windows(4, scorer=teacher_scorer(toy.token_logprobs, PAD))
    with pytest.raises(ValueError, match="low < high"):
        LogProbBand(-1.0, -2.0)
    bad = ContextSampler(docs, min_context=2, max_context=8, seed=0)
    with pytest.raises(ValueError, match=r"scorer returned \(3,\) log-probs for a window of \d+ tokens"):
        bad.sample_windows(2, scorer=lambda windows: [np.zeros(3)] * len(windows))
    with pytest.raises(ValueError, match="positions_per_document must be >= 1"):
        ContextSampler(docs, min_context=2, max_context=8, seed=0, positions_per_document=0)


def test_from_config() -> None:
    cfg = SimpleNamespace(min_context=3, max_context=12, positions_per_document=4, logprob_band=[-6.0, -0.5])
    sampler = ContextSampler.from_config(_docs([50]), cfg, seed=1)
    assert (sampler.min_context, sampler.max_context, sampler.positions_per_document) == (3, 12, 4)
    assert sampler.position_filter == LogProbBand(-6.0, -0.5)
    cfg.logprob_band = None
    assert ContextSampler.from_config(_docs([50]), cfg, seed=1).position_filter is None
