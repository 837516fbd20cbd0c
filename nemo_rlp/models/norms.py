"""Torch norms for the local (non-Transformer-Engine) layer specs, sequence parallelism allowed.

megatron's `WrappedTorchNorm` refuses `sequence_parallel` (torch_norm.py:32 in megatron-core 0.16.1)
although a norm needs nothing from it but one thing: under sequence parallelism each tensor-parallel
rank normalises its own 1/TP of the tokens, so the norm's weight gradient is a partial sum that must
be summed over the TP group. megatron's `finalize_model_grads` does exactly that for every parameter
marked `sequence_parallel` (finalize_model_grads.py:354), as Transformer Engine's norms are marked.
`TorchNorm` builds megatron's torch norm and marks its parameters so.
"""

from __future__ import annotations

import copy


class TorchNorm:
    """megatron's `WrappedTorchNorm` (same arguments, same module) that also works with sequence
    parallelism: its parameters are marked `sequence_parallel` for the TP reduction of their grads."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)
        plain.sequence_parallel = False  # only WrappedTorchNorm's check reads it
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
