"""What a rollout is made of, below the samplers: the thought batch and its row layout, the sampling
parameters and markers, and the token decisions every rollout path shares.

`nemo_rlp.rollout.sampler` (the CPU and lockstep paths), `nemo_rlp.rollout.dynamic_engine` (megatron's
dynamic engine) and `nemo_rlp.rollout.vocab_shard` (decisions over a TP rank's vocabulary shard) all
build on this module and on nothing of each other's, so the rollout package imports one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RolloutStats:
    """Counters of one or more rollouts, filled when a `RolloutStats` is passed to sample_thoughts."""

    decode_steps: int = 0  # model calls that feed one token per row
    context_tokens_decoded: int = 0  # context tokens fed through decode steps rather than a prefill
    row_steps: int = 0  # rows computed, summed over decode steps
    live_row_steps: int = 0  # of those, rows whose thought was not finished
    compaction_bytes: int = 0  # cache bytes copied to drop finished rows
    host_syncs: int = 0  # device-to-host reads inside the decode loop
    generated_tokens: int = 0  # sampled thought tokens

    @property
    def mean_occupancy(self) -> float:
        return self.live_row_steps / max(1, self.row_steps)

    @property
    def syncs_per_step(self) -> float:
        return self.host_syncs / max(1, self.decode_steps)


@dataclass(frozen=True)
class SamplingParams:
    group_size: int
    max_thought_len: int
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    mode: str = "shared_prefill"


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
    # From the sampler's own pass (absent when rows were built otherwise):
    behaviour_logprobs: Optional[torch.Tensor] = None  # fp32 [B*G, U], 0 where not sampled
    s_pred: Optional[torch.Tensor] = None  # fp32 [B*G]: log p(x_t | context, thought)
    predicted: Optional[torch.Tensor] = None  # long [B*G]: argmax of p(· | context, thought), markers excluded

    @property
    def num_contexts(self) -> int:
        return self.tokens.shape[0] // self.group_size

    @staticmethod
    def concat(parts: list["ThoughtBatch"], pad: int) -> "ThoughtBatch":
        """One batch of the contexts of `parts`, in order (rows right-padded to the widest)."""
        if len(parts) == 1:
            return parts[0]

        def widen(t: torch.Tensor, width: int, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        width = max(p.tokens.shape[1] for p in parts)
        u = max(p.behaviour_logprobs.shape[1] for p in parts)
        return ThoughtBatch(
            tokens=torch.cat([widen(p.tokens, width, pad) for p in parts]),
            thought_start=torch.cat([p.thought_start for p in parts]),
            thought_len=torch.cat([p.thought_len for p in parts]),
            end_sampled=torch.cat([p.end_sampled for p in parts]),
            answer_index=torch.cat([p.answer_index for p in parts]),
            group_size=parts[0].group_size,
            behaviour_logprobs=torch.cat([widen(p.behaviour_logprobs, u, 0.0) for p in parts]),
            s_pred=torch.cat([p.s_pred for p in parts]),
            predicted=torch.cat([p.predicted for p in parts]),
        )

    def thought_token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices [B*G, U] of each sampled thought token in its row, and the mask of real ones."""
        max_len = int(self.thought_len.max())
        offsets = torch.arange(max_len, device=self.tokens.device).unsqueeze(0)
        mask = offsets < self.thought_len.unsqueeze(1)
        index = (self.thought_start.unsqueeze(1) + offsets).clamp(max=self.tokens.shape[1] - 1)
        return index, mask


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering; filtered entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row. `noise` holds i.i.d. Exp(1) draws shaped like `logits`:
    argmax(p / noise) is a draw from p (the exponential race), and a fixed noise makes the draw a
    deterministic function of the logits, the same on every rank and in every mode."""
    probs = torch.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)
    return torch.argmax(probs / noise, dim=-1)


def answer_argmax(logits: torch.Tensor, markers: Markers) -> torch.Tensor:
    """The most likely token that is not a thought marker: a model that would rather think first is
    asked for its answer now (a marker can never be the answer token)."""
    logits = logits.clone()
    logits[:, [markers.think_start, markers.think_end]] = float("-inf")
    return logits.argmax(dim=-1)


def row_buffers(prefixes, targets, params, markers, device, thought_caps):
    """Prompts written into the token buffer, and the per-row tensors every path starts from."""
    G, L = params.group_size, params.max_thought_len
    R = len(prefixes) * G
    prompts = [list(p) + [markers.think_start] for p in prefixes]
    prompt_len = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(G)
    max_positions = max(len(p) for p in prompts) + L + 1  # the last token fed is an end marker at most there
    # Every row's tokens as they are decided; prompts are written up front.
    # One column more than is ever fed: x_t goes there when a thought runs to L.
    tokens = torch.full((R, max_positions + 1), markers.pad, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        tokens[b * G : (b + 1) * G, : len(prompt)] = torch.tensor(prompt, device=device)
    target = torch.tensor(list(targets), device=device).repeat_interleave(G)
    caps = torch.full((R,), L, dtype=torch.long, device=device)
    if thought_caps is not None:
        caps = torch.tensor(list(thought_caps), dtype=torch.long, device=device).clamp(1, L)
    return prompts, prompt_len, max_positions, tokens, target, caps


def layout_rows(tokens, prompt_len, thought_len, end_sampled, close_pos, target, behaviour, s_pred, G, markers):
    """Cut the decoded buffer down to `prefix, <think>, c, </think>, x_t` rows, right-padded."""
    answer_index = close_pos + 1
    width = int(answer_index.max()) + 1
    rows = tokens[:, :width].clone()
    columns = torch.arange(width, device=tokens.device).unsqueeze(0)
    rows = rows.masked_fill(columns > answer_index.unsqueeze(1), markers.pad)
    rows[torch.arange(rows.shape[0], device=tokens.device), answer_index] = target
    return ThoughtBatch(
        tokens=rows,
        thought_start=prompt_len.clone(),
        thought_len=thought_len,
        end_sampled=end_sampled,
        answer_index=answer_index,
        group_size=G,
        behaviour_logprobs=behaviour[:, : max(1, int(thought_len.max()))],
        s_pred=s_pred,
    )
