"""The `rows` path's per-step decisions on vocabulary-sharded logits: each tensor-parallel rank keeps
its V/TP slice of the logits and the ranks exchange one value (and index) per row, instead of every
rank gathering and sampling on the full-vocabulary fp32 logits [rows, V].

The sample is the exponential race in log form, argmax(z / T - log E) over the whole vocabulary with
E ~ Exp(1) i.i.d. (the same draw as argmax(softmax(z / T) / E)); every rank draws the full noise
from the replica's shared generator and keeps its slice, so the sample does not depend on TP. Top-k
and top-p filtering need the whole distribution: with them the logits are gathered first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_rlp.rollout.thoughts import filter_logits


@dataclass(frozen=True)
class VocabShard:
    start: int  # first vocabulary id of this rank's slice
    vocab: int  # the full (padded) vocabulary
    group: Optional[object]  # the tensor-parallel group (None: one rank)

    @staticmethod
    def of(logits: torch.Tensor) -> "VocabShard":
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp == 1:
            return VocabShard(0, logits.shape[-1], None)
        rank = parallel_state.get_tensor_model_parallel_rank()
        return VocabShard(rank * logits.shape[-1], tp * logits.shape[-1], parallel_state.get_tensor_model_parallel_group())

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """[tp, ...] of every rank's `values`, in rank order."""
        parts = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size(self.group))]
        torch.distributed.all_gather(parts, values.contiguous(), group=self.group)
        return torch.stack(parts)

    def argmax(self, scores: torch.Tensor) -> torch.Tensor:
        """The global argmax over the vocabulary of each row (the first on ties, as torch's)."""
        value, index = scores.max(dim=-1)
        if self.group is None:
            return index
        values, indices = self._gather(value), self._gather(index + self.start)
        best = values.argmax(dim=0)  # the lowest rank among equal maxima: the lowest vocabulary id
        return indices.gather(0, best[None]).squeeze(0)

    def logsumexp(self, logits: torch.Tensor) -> torch.Tensor:
        local = torch.logsumexp(logits, dim=-1)
        return local if self.group is None else torch.logsumexp(self._gather(local), dim=0)

    def pick(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """logits[row, ids[row]] for global vocabulary ids, whichever rank holds them."""
        local = ids - self.start
        held = (local >= 0) & (local < logits.shape[-1])
        value = logits.gather(1, local.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(1)
        value = torch.where(held, value, torch.full_like(value, float("-inf")))
        return value if self.group is None else self._gather(value).max(dim=0).values

    def mask(self, logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """A copy with the given global vocabulary ids at -inf (those this rank holds)."""
        logits = logits.clone()
        for i in ids:
            if self.start <= i < self.start + logits.shape[-1]:
                logits[:, i - self.start] = float("-inf")
        return logits


def decide(logits: torch.Tensor, target: torch.Tensor, params, markers, noise: torch.Tensor) -> torch.Tensor:
    """From this rank's logits [rows, V/TP] and the full vocabulary's Exp(1) `noise` [rows, V] (the
    same on every rank of the replica): fp64 [4, rows] of the sampled token, its behaviour log-prob
    (temperature 1), log p(x_t) and the answer argmax (markers excluded), the same on every
    tensor-parallel rank."""
    shard = VocabShard.of(logits)
    logits = logits.float()
    if shard.group is not None and (params.top_k > 0 or params.top_p < 1.0):
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
        shard = VocabShard(0, logits.shape[-1], None)

    # The full vocabulary's noise on every rank (one draw sequence whatever the TP size), sliced.
    noise = noise[:, shard.start : shard.start + logits.shape[-1]]
    scores = filter_logits(logits / params.temperature, params.top_k, params.top_p) - torch.log(noise)
    new = shard.argmax(scores)
    normaliser = shard.logsumexp(logits)
    chosen = shard.pick(logits, new) - normaliser
    s_pred = shard.pick(logits, target) - normaliser
    predicted = shard.argmax(shard.mask(logits, [markers.think_start, markers.think_end]))
    return torch.stack([new.double(), chosen.double(), s_pred.double(), predicted.double()])
