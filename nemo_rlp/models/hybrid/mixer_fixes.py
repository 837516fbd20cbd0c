"""A fix to megatron-core's MambaMixer, keyed by version, applied on every platform (CPU and GPU).

From megatron-core 0.17, `MambaMixer._ssm_decode` takes its input batch-first, (batch, tokens, ...),
so that its own Triton decode ops (`megatron.core.ssm.ops`) can step several tokens per row; the
dynamic-batching caller transposes into that layout, but the static-batching one
(`StaticInferenceContext`, `MambaMixer._decode`) still passes the sequence-first (1, batch, ...)
tensor. With more than one row, the rows are then taken for tokens of ONE sequence: every row is
decoded on row 0's conv and SSM states (the ops index states by batch). megatron's own engines use
dynamic batching and do not meet it; nemo-rlp's lockstep rollouts and the `rows` path decode
through the static context, so `install()` replaces `_decode` with the same computation in the
layout `_ssm_decode` expects (transpose in, transpose out), for static batching only.

The cached-vs-recompute tests (tests/unit/test_hybrid_model.py, tests/unit/test_rollout.py) fail
without it on 0.17-0.19, at any batch above 1.
"""

from __future__ import annotations

import functools

from nemo_rlp.megatron_version import rows_for

# (first version, first version not covered, the static decode needs the batch-first layout)
STATIC_DECODE_BATCH_FIRST_BY_VERSION = (
    ("0.16", "0.17", False),
    ("0.17", "0.20", True),
)

_installed = False


def needs_fix(version: str | None = None) -> bool:
    return any(rows_for(STATIC_DECODE_BATCH_FIRST_BY_VERSION, version))


def install() -> bool:
    """Patch `MambaMixer._decode` where the installed version needs it; True when patched (now or before)."""
    global _installed
    if _installed:
        return True
    if not needs_fix():
        return False
    from megatron.core.ssm.mamba_mixer import MambaMixer

    original = MambaMixer._decode

    @functools.wraps(original)
    def _decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
        if batch_indices is not None:  # dynamic batching: megatron's own layout handling
            return original(self, hidden_states, conv_state, ssm_state, batch_indices=batch_indices)
        assert hidden_states.shape[0] == 1, "Only support decoding with 1 token at a time for now"
        zxBCdt, _ = self.in_proj(hidden_states)  # (1, b, proj)
        y = self._ssm_decode(zxBCdt.transpose(0, 1), conv_state=conv_state, ssm_state=ssm_state)
        return self.out_proj(y.transpose(0, 1))  # (1, b, d_inner) in, as megatron's

    _decode.nemo_rlp_static_batch_first = True
    MambaMixer._decode = _decode
    _installed = True
    return True
