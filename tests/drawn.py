"""Test helper: the contexts a ContextSampler draws, in order, as the RLP step sees them."""

from __future__ import annotations

from nemo_rlp.data.sampling import ContextSampler, RLPContext


def drawn_contexts(sampler: ContextSampler, n: int) -> list[RLPContext]:
    """``n`` contexts of ``sampler.sample_windows(n)`` (no scorer), window by window in offset order."""
    return [c for w in sampler.sample_windows(n) for c in w.contexts()]
