"""Thought rollouts: G sampled thoughts per context, laid out as the rows the RLP step trains on.

This is the plain sampler: every new token re-runs the model over the whole row (no KV cache). It is
simple and exact, and it is the reference a cached sampler is checked against. Each context's row is
`prefix, <think>, c_1 .. c_n, </think>, x_t`: the start marker is inserted by the recipe; the thought
tokens (and the end marker when the policy emits it) are sampled; when a thought reaches L sampled
tokens without an end marker the recipe inserts one and flags the thought as truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_rlp.models.handle import ModelHandle


@dataclass(frozen=True)
class SamplingParams:
    group_size: int
    max_thought_len: int
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class Markers:
    think_start: int
    think_end: int
    pad: int


@dataclass
class ThoughtBatch:
    """B contexts x G thoughts as B*G right-padded rows (row b*G + g is thought g of context b)."""

    tokens: torch.Tensor  # long [B*G, S]: prefix, start, thought, end, x_t, pad...
    thought_start: torch.Tensor  # long [B*G]: index of the first sampled thought token
    thought_len: torch.Tensor  # long [B*G]: sampled tokens, a sampled end marker included
    end_sampled: torch.Tensor  # bool [B*G]: the policy emitted the end marker (else inserted at L)
    answer_index: torch.Tensor  # long [B*G]: index of x_t in the row
    group_size: int

    @property
    def num_contexts(self) -> int:
        return self.tokens.shape[0] // self.group_size

    def thought_token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices [B*G, U] of each sampled thought token in its row, and the mask of real ones."""
        max_len = int(self.thought_len.max())
        offsets = torch.arange(max_len, device=self.tokens.device).unsqueeze(0)
        mask = offsets < self.thought_len.unsqueeze(1)
        index = (self.thought_start.unsqueeze(1) + offsets).clamp(max=self.tokens.shape[1] - 1)
        return index, mask


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering; filtered entries become -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _pad_rows(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    out = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    return out, lengths


@torch.no_grad()
def sample_thoughts(
    handle: ModelHandle,
    prefixes: Sequence[Sequence[int]],
    targets: Sequence[int],
    params: SamplingParams,
    markers: Markers,
    generator: torch.Generator,
    device: torch.device,
) -> ThoughtBatch:
    """Sample G thoughts for each (prefix, x_t) and lay out the rows for scoring and training.

    The generator must be seeded identically on every tensor-parallel rank, so that all ranks of a
    model replica sample the same tokens from the same (gathered) distribution.
    """
    G, L = params.group_size, params.max_thought_len
    rows = [list(prefix) + [markers.think_start] for prefix in prefixes for _ in range(G)]
    thought_start = [len(r) for r in rows]
    thoughts: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)

    for _ in range(L):
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        batch, lengths = _pad_rows([rows[i] + thoughts[i] for i in active], markers.pad, device)
        logits = handle.next_token_logits(batch, lengths)
        new = sample_tokens(logits, params, generator).tolist()
        for i, token in zip(active, new):
            thoughts[i].append(token)
            done[i] = token == markers.think_end

    full_rows, end_sampled = [], []
    for row, thought, finished, target in zip(rows, thoughts, done, (t for t in targets for _ in range(G))):
        closing = [] if finished else [markers.think_end]
        full_rows.append(row + thought + closing + [target])
        end_sampled.append(finished)
    tokens, lengths = _pad_rows(full_rows, markers.pad, device)
    return ThoughtBatch(
        tokens=tokens,
        thought_start=torch.tensor(thought_start, dtype=torch.long, device=device),
        thought_len=torch.tensor([len(t) for t in thoughts], dtype=torch.long, device=device),
        end_sampled=torch.tensor(end_sampled, dtype=torch.bool, device=device),
        answer_index=lengths - 1,
        group_size=G,
    )
