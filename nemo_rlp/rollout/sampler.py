"""Thought rollouts: G sampled thoughts per context, laid out as the rows the RLP step trains on.

Each row is `prefix, <think>, c_1 .. c_n, </think>, x_t`. The start marker is inserted by the recipe.
The thought tokens, and the end marker when the policy emits it, are sampled. When a thought reaches
L sampled tokens without an end marker, the recipe inserts one and flags the thought as truncated.

All rows advance in lockstep, one position per step, aligned at position 0 (the scheme of
megatron's static engine). A row whose context is longer than the shortest one is fed its own
context tokens until its thought begins, so contexts of different lengths share a batch with no
padding inside any row and no attention mask: every row attends exactly to its own tokens.

Three modes, the same tokens (they draw the same noise) and log-probs equal to float rounding:
- `recompute`: no cache; every step runs the model over each row's whole prefix. The reference.
- `cache`: a KV/SSM cache; each of the B·G rows prefills its own copy of the context.
- `shared_prefill` (default): one prefill per context, whose cache is copied to its G rows.
Rows whose thought is finished are dropped from the batch as they finish (in the cached modes, by
selecting the surviving cache rows), so long thoughts do not make short ones pay.

Each thought also gets, in the same pass, the behaviour log-prob (temperature 1) of every sampled
token and S_pred = log p(x_t | x_<t, <think>, c, </think>): feeding the end marker yields the
distribution of x_t, so scoring costs one more step, not a second forward over the thought.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nemo_rlp.models.handle import ModelHandle

MODES = ("recompute", "cache", "shared_prefill")


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

    def select_contexts(self, start: int, stop: int) -> "ThoughtBatch":
        """The rows of contexts [start, stop): a data-parallel rank's share of a global batch."""
        rows = slice(start * self.group_size, stop * self.group_size)
        width = max(1, int(self.thought_len[rows].max()))  # U of these rows, as thought_token_index
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return ThoughtBatch(
            tokens=self.tokens[rows], thought_start=self.thought_start[rows], thought_len=self.thought_len[rows],
            end_sampled=self.end_sampled[rows], answer_index=self.answer_index[rows], group_size=self.group_size,
            behaviour_logprobs=None if self.behaviour_logprobs is None else self.behaviour_logprobs[rows, :width],
            s_pred=pick(self.s_pred), predicted=pick(self.predicted),
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

    `generator` must be seeded identically on every tensor-parallel rank of a model replica.
    The model runs in eval mode (megatron's cached attention requires it; there is no dropout in
    a rollout) and is returned to the mode it was in.
    """
    was_training = handle.module.training
    handle.eval()
    try:
        with torch.no_grad():
            return _sample(handle, prefixes, targets, params, markers, generator, device)
    finally:
        handle.train(was_training)


def _sample(handle, prefixes, targets, params, markers, generator, device) -> ThoughtBatch:
    if params.mode not in MODES:
        raise ValueError(f"rollout mode {params.mode!r} is not one of {MODES}")
    G, L = params.group_size, params.max_thought_len
    B = len(prefixes)
    R = B * G
    prompts = [list(p) + [markers.think_start] for p in prefixes]
    prompt_len = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(G)
    p_min, p_max = int(prompt_len.min()), int(prompt_len.max())
    max_positions = p_max + L + 1  # the last token fed is an end marker at most at p_max + L

    # Every row's tokens as they are decided; prompts are written up front.
    # One column more than is ever fed: x_t goes there when a thought runs to L.
    tokens = torch.full((R, max_positions + 1), markers.pad, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        tokens[b * G : (b + 1) * G, : len(prompt)] = torch.tensor(prompt, device=device)
    target = torch.tensor(list(targets), device=device).repeat_interleave(G)

    thought_len = torch.zeros(R, dtype=torch.long, device=device)
    end_sampled = torch.zeros(R, dtype=torch.bool, device=device)
    closed = torch.zeros(R, dtype=torch.bool, device=device)  # end marker decided
    close_pos = torch.full((R,), -1, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    behaviour = torch.zeros(R, L, dtype=torch.float32, device=device)
    s_pred = torch.zeros(R, dtype=torch.float32, device=device)
    predicted = torch.zeros(R, dtype=torch.long, device=device)

    # The rows still being decoded, as indices into the R rows; the cache holds exactly these.
    live = torch.arange(R, device=device)
    cache = None
    if params.mode == "shared_prefill":
        cache = handle.new_cache(R, max_positions)
        context_rows = torch.arange(B, device=device) * G
        logits = handle.cached_logits(tokens[context_rows, :p_min], cache)
        handle.select_cache_rows(cache, torch.arange(B, device=device).repeat_interleave(G))
        logits = logits.repeat_interleave(G, dim=0)
    elif params.mode == "cache":
        cache = handle.new_cache(R, max_positions)
        logits = handle.cached_logits(tokens[:, :p_min], cache)
    else:
        logits = handle.next_token_logits(tokens[:, :p_min], torch.full((R,), p_min, device=device))

    for pos in range(p_min, max_positions + 1):
        # `logits` [live] predict the token at `pos` of each live row.
        rows = live
        in_prompt = pos < prompt_len[rows]
        answering = closed[rows] & (close_pos[rows] == pos - 1)
        pending_end = ~in_prompt & ~closed[rows] & (thought_len[rows] == L)
        thinking = ~in_prompt & ~closed[rows] & ~pending_end

        # x_t: the step after the end marker scores the real next token.
        if answering.any():
            r = rows[answering]
            s_pred[r] = torch.log_softmax(logits[answering], dim=-1).gather(1, target[r, None]).squeeze(1)
            predicted[r] = answer_argmax(logits[answering], markers)
            done[r] = True
        if thinking.any():
            r = rows[thinking]
            # Which rows think at `pos` depends only on tokens already sampled, never on the mode
            # or the layout, so this draw is the same everywhere.
            # Drawn on the generator's device (the trainer's is a CPU generator, and a CUDA tensor
            # cannot draw from it), then moved: the same noise, so the same thoughts, on any device.
            # TODO(scale): an H2D copy of [rows, V] per step; a CUDA generator would avoid it.
            noise = torch.empty(len(r), logits.shape[-1], device=generator.device)
            noise = noise.exponential_(generator=generator).to(device)
            new = sample_tokens(logits[thinking], params, noise)
            logp = torch.log_softmax(logits[thinking], dim=-1).gather(1, new[:, None]).squeeze(1)
            behaviour[r, thought_len[r]] = logp
            thought_len[r] += 1
            tokens[r, pos] = new
            is_end = new == markers.think_end
            end_sampled[r] |= is_end
            closed[r] |= is_end
            close_pos[r] = torch.where(is_end, torch.full_like(new, pos), close_pos[r])
        if pending_end.any():
            r = rows[pending_end]
            tokens[r, pos] = markers.think_end
            closed[r] = True
            close_pos[r] = pos

        still = ~done[rows]
        if not still.any():
            break
        if not still.all():
            live = rows[still]
            if cache is not None:
                handle.select_cache_rows(cache, still.nonzero().squeeze(1))
        if cache is not None:
            logits = handle.cached_logits(tokens[live, pos : pos + 1], cache)
        else:
            logits = handle.next_token_logits(
                tokens[live, : pos + 1], torch.full((len(live),), pos + 1, device=device)
            )

    batch = _layout_rows(tokens, prompt_len, thought_len, end_sampled, close_pos, target, behaviour, s_pred, G, markers)
    batch.predicted = predicted
    return batch


def _layout_rows(tokens, prompt_len, thought_len, end_sampled, close_pos, target, behaviour, s_pred, G, markers):
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
