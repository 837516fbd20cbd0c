"""Thought rollouts: G sampled thoughts per context, laid out as the rows the RLP step trains on.

Each row is `prefix, <think>, c_1 .. c_n, </think>, x_t`. The start marker is inserted by the recipe.
The thought tokens, and the end marker when the policy emits it, are sampled. When a thought reaches
L sampled tokens without an end marker, the recipe inserts one and flags the thought as truncated.

Two paths, behind the same call:

`rows` (nemo_rlp.models.row_cache): every context is prefilled once, at its own length, into the
cache rows of its G thoughts; each row then decodes from its own position, so thought token u of
every row is decided at decode step u and contexts of any length mix with none of their tokens fed
through decode. Finished rows stay in the batch, masked, until fewer than COMPACT_BELOW of them are
live (then one compaction); the loop reads the device only every CHECK_EVERY steps.

The lockstep modes: all rows advance one position per step, aligned at position 0 (the scheme of
megatron's static engine). A row whose context is longer than the shortest one is fed its own
context tokens until its thought begins, so contexts of different lengths share a batch with no
padding inside any row and no attention mask: every row attends exactly to its own tokens.

Three lockstep modes, the same tokens (they draw the same noise) and log-probs equal to float rounding
(`rows` draws its noise per decode step, so its samples differ from theirs but not in distribution:
handed the same noise per row and thought token, `TableNoise`, all paths write the same thoughts):
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
from nemo_rlp.parallel import pipeline
from nemo_rlp.rollout import dynamic_engine
from nemo_rlp.rollout.modes import GPU_MODES, LOCKSTEP_MODES, MODES
from nemo_rlp.rollout.thoughts import (
    Markers,
    RolloutStats,
    SamplingParams,
    ThoughtBatch,
    answer_argmax,
    filter_logits,
    layout_rows,
    row_buffers,
    sample_tokens,
)
from nemo_rlp.rollout.vocab_shard import VocabShard, decide

__all__ = [
    "GPU_MODES",
    "LOCKSTEP_MODES",
    "MODES",
    "Markers",
    "RolloutNoise",
    "RolloutStats",
    "SamplingParams",
    "TableNoise",
    "ThoughtBatch",
    "answer_argmax",
    "filter_logits",
    "sample_thoughts",
    "sample_tokens",
]


# The `rows` path checks on the host (one sync) only every this many decode steps, for the end of
# the loop and for compaction; in between, finished rows ride along masked.
CHECK_EVERY = 8
# Compact the cache when fewer than this fraction of the batch's rows are still unfinished: a
# compaction copies every surviving row's cache, so doing it at every finished row (the lockstep
# path) costs O(rows * positions) per event.
COMPACT_BELOW = 0.5


class RolloutNoise:
    """The Exp(1) noise the samplers decide with: one value per (row, vocabulary entry) for each
    sampled token, the full vocabulary on every tensor-parallel rank. Drawn from the replica's
    generator on the generator's device (the trainer's is a CPU generator, which a CUDA tensor cannot
    draw from), then moved: the same noise, so the same thoughts, on any device.
    TODO(scale): an H2D copy of [rows, V] per step; a generator on the logits' device avoids it."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def draw(self, rows: torch.Tensor, thought_index, vocab: int, device: torch.device) -> torch.Tensor:
        """[len(rows), vocab] for thought token `thought_index` (a tensor, one per row, or an int for
        all) of the batch's rows `rows`; the generator's draws depend only on the shape."""
        noise = torch.empty(len(rows), vocab, device=self.generator.device).exponential_(generator=self.generator)
        return noise.to(device)

    def follow_last_stage(self) -> None:
        """Give every pipeline stage of the replica the last stage's generator state. A path that
        decides where the logits are (`rows`) draws on the last stage only; without this the other
        stages' generators fall behind, so a checkpoint (saved from the first stage) resumes other
        thoughts and anything else drawn from the generator differs between stages."""
        from nemo_rlp.parallel import pipeline

        if pipeline.size() > 1:
            self.generator.set_state(pipeline.broadcast_object_from_last_stage(self.generator.get_state()))


class TableNoise(RolloutNoise):
    """Noise looked up by (row, thought token): `table` [rows, tokens, vocab]. Two paths handed the
    same table decide every thought token with the same values, whatever they draw in between, so
    they must write the same thoughts (tests/unit/test_rollout.py)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def follow_last_stage(self) -> None:
        pass  # no generator

    def draw(self, rows, thought_index, vocab, device):
        last = self.table.shape[1] - 1
        index = min(thought_index, last) if isinstance(thought_index, int) else thought_index.clamp(max=last)
        return self.table[rows, index, :vocab].to(device)


def sample_thoughts(
    handle: ModelHandle,
    prefixes: Sequence[Sequence[int]],
    targets: Sequence[int],
    params: SamplingParams,
    markers: Markers,
    generator: torch.Generator,
    device: torch.device,
    *,
    thought_caps: Optional[Sequence[int]] = None,
    stats: Optional[RolloutStats] = None,
    noise: Optional[RolloutNoise] = None,
) -> ThoughtBatch:
    """Sample G thoughts for each (prefix, x_t) and lay out the rows for scoring and training.

    `generator` must be seeded identically on every tensor-parallel rank of a model replica.
    The model runs in eval mode (megatron's cached attention requires it; there is no dropout in
    a rollout) and is returned to the mode it was in. `thought_caps` (one per row, each <= L) closes
    a row's thought after that many sampled tokens, as L does (benchmarks force thought lengths so);
    `stats`, when given, accumulates the rollout's counters; `noise` replaces the draws from
    `generator` (the `rows` and lockstep paths; `TableNoise` in tests).
    """
    if params.mode not in MODES + GPU_MODES:
        raise ValueError(f"rollout mode {params.mode!r} is not one of {MODES + GPU_MODES}")
    if params.mode == "dynamic":
        if not dynamic_engine.available():
            raise RuntimeError("rollout mode 'dynamic' needs CUDA and flash-attn >= 2.7.3 (megatron's dynamic "
                               "inference engine); use 'rows' on this machine")
    was_training = handle.module.training
    handle.eval()
    stats = RolloutStats() if stats is None else stats
    noise = RolloutNoise(generator) if noise is None else noise
    try:
        with torch.no_grad():
            if params.mode == "dynamic":
                return dynamic_engine.sample_thoughts_dynamic(handle, prefixes, targets, params, markers, generator,
                                                              device, thought_caps, stats)
            if params.mode == "rows":
                from nemo_rlp.parallel.cpu_platform import device_mode_suspended

                with device_mode_suspended():
                    return _sample_rows(handle, prefixes, targets, params, markers, noise, device,
                                        thought_caps, stats)
            return _sample(handle, prefixes, targets, params, markers, noise, device, thought_caps, stats)
    finally:
        handle.train(was_training)


def _sample(handle, prefixes, targets, params, markers, noise_source, device, thought_caps, stats) -> ThoughtBatch:
    """The lockstep paths: rows aligned at position 0, longer contexts fed through decode steps."""
    G, L = params.group_size, params.max_thought_len
    B = len(prefixes)
    R = B * G
    prompts, prompt_len, max_positions, tokens, target, caps = row_buffers(
        prefixes, targets, params, markers, device, thought_caps)
    p_min = int(prompt_len.min())

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
    context_fed = torch.zeros((), dtype=torch.long, device=device)
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
        pending_end = ~in_prompt & ~closed[rows] & (thought_len[rows] == caps[rows])
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
            noise = noise_source.draw(r, thought_len[r], logits.shape[-1], device)
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
                stats.compaction_bytes += handle.select_cache_rows(cache, still.nonzero().squeeze(1))
        # Counted, not changed (this is the baseline): the .any()/.all() reads above, one each.
        stats.host_syncs += 5
        stats.decode_steps += 1
        stats.row_steps += len(live)
        stats.live_row_steps += len(live)
        context_fed += (pos < prompt_len[live]).sum()  # read once at the end: no extra sync per step
        if cache is not None:
            logits = handle.cached_logits(tokens[live, pos : pos + 1], cache)
        else:
            logits = handle.next_token_logits(
                tokens[live, : pos + 1], torch.full((len(live),), pos + 1, device=device)
            )

    stats.context_tokens_decoded += int(context_fed)
    stats.generated_tokens += int(thought_len.sum())
    batch = layout_rows(tokens, prompt_len, thought_len, end_sampled, close_pos, target, behaviour, s_pred, G, markers)
    batch.predicted = predicted
    return batch


def _sample_rows(handle, prefixes, targets, params, markers, noise, device, thought_caps, stats) -> ThoughtBatch:
    """The `rows` path: each context is prefilled once at its own length into the cache rows of its
    G thoughts; then every row decodes its thought from its own position, so thought token u of
    every row is decided at decode step u. Finished rows stay in the batch, masked, until fewer
    than COMPACT_BELOW of the rows are live; the host reads the device once every CHECK_EVERY steps.
    """
    G = params.group_size
    R = len(prefixes) * G
    prompts, prompt_len, max_positions, tokens, target, caps = row_buffers(
        prefixes, targets, params, markers, device, thought_caps)
    state = _RowState(R, params.max_thought_len, device)
    cache = handle.new_row_cache(R, max_positions, device)
    logits = []  # on the last pipeline stage only (None elsewhere)
    for b, prompt in enumerate(prompts):
        rows = torch.arange(b * G, (b + 1) * G, device=device)
        logits.append(handle.cached_logits(tokens[b * G : b * G + 1, : len(prompt)], cache.prefill_into(rows)))
    logits = None if logits[0] is None else torch.cat(logits).repeat_interleave(G, dim=0)

    live = torch.arange(R, device=device)  # cache row i holds row live[i]
    last_step = (int(caps.max()) if thought_caps is not None else params.max_thought_len) + 1
    for step in range(last_step + 1):
        decided = None if logits is None else state.decisions(live, step, logits, target, params, markers, noise)
        decided = pipeline.broadcast_from_last_stage(decided, (4, len(live)), torch.float64)
        state.apply(step, live, decided, tokens, prompt_len, caps, markers)
        if step == last_step:
            break  # every row has answered by now: its end marker came at thought index <= cap
        if (step + 1) % CHECK_EVERY == 0:
            live_now = ~state.done[live]
            n_live = int(live_now.sum())
            stats.host_syncs += 1
            if n_live == 0:
                break
            if n_live < COMPACT_BELOW * len(live):
                keep = live_now.nonzero().squeeze(1)
                before = cache.compaction_bytes
                cache.keep(keep)
                stats.compaction_bytes += cache.compaction_bytes - before
                live = live[keep]
        fed = tokens[live, prompt_len[live] + step]
        state.count_live(live, stats)
        logits = handle.cached_logits(fed.unsqueeze(1), cache)
        stats.decode_steps += 1
    noise.follow_last_stage()
    stats.live_row_steps += int(state.live_rows)
    stats.generated_tokens += int(state.thought_len.sum())
    batch = layout_rows(tokens, prompt_len, state.thought_len, state.end_sampled, state.close_pos, target,
                         state.behaviour, state.s_pred, G, markers)
    batch.predicted = state.predicted
    return batch


class _RowState:
    """Per-row decoding state of the `rows` path, updated with tensor ops only (no host reads)."""

    def __init__(self, rows: int, max_len: int, device: torch.device):
        self.thought_len = torch.zeros(rows, dtype=torch.long, device=device)
        self.end_sampled = torch.zeros(rows, dtype=torch.bool, device=device)
        self.closed = torch.zeros(rows, dtype=torch.bool, device=device)  # end marker decided
        self.close_pos = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.behaviour = torch.zeros(rows, max_len, dtype=torch.float32, device=device)
        self.s_pred = torch.zeros(rows, dtype=torch.float32, device=device)
        self.predicted = torch.zeros(rows, dtype=torch.long, device=device)
        self.live_rows = torch.zeros((), dtype=torch.long, device=device)

    def decisions(self, rows, step, logits, target, params, markers, noise: RolloutNoise) -> torch.Tensor:
        """What this TP rank's vocabulary shard of the logits decides for each row, as one fp64
        [4, rows] tensor (exact for token ids and fp32 log-probs): the sampled token, its behaviour
        log-prob, log p(x_t) and the answer argmax (nemo_rlp.rollout.vocab_shard). Computed where the
        logits are (the last pipeline stage); only this crosses stages. Noise is drawn for every row
        of the batch, finished or not: the draw depends only on the batch's size, which every rank
        of a replica decides identically. Thought token `step` of every row is decided here."""
        vocab = VocabShard.of(logits).vocab
        drawn = noise.draw(rows, step, vocab, logits.device)  # an int: no tensor made per decode step
        return decide(logits, target[rows], params, markers, drawn)

    def apply(self, step, rows, decided, tokens, prompt_len, caps, markers) -> None:
        """Step `step` of rows `rows` with the `decisions` of their logits (thought token `step`)."""
        new, chosen, s_pred, predicted = decided[0].long(), decided[1].float(), decided[2].float(), decided[3].long()
        closed, done = self.closed[rows], self.done[rows]
        answering = closed & ~done  # the step after the end marker scores x_t
        pending_end = ~closed & (self.thought_len[rows] == caps[rows])
        thinking = ~closed & ~pending_end
        self.s_pred[rows] = torch.where(answering, s_pred, self.s_pred[rows])
        self.predicted[rows] = torch.where(answering, predicted, self.predicted[rows])
        column = min(step, self.behaviour.shape[1] - 1)
        self.behaviour[rows, column] = torch.where(thinking, chosen, self.behaviour[rows, column])
        position = prompt_len[rows] + step
        token = torch.where(pending_end, torch.full_like(new, markers.think_end), new)
        writes = thinking | pending_end
        tokens[rows, position] = torch.where(writes, token, tokens[rows, position])
        self.thought_len[rows] += thinking.long()
        is_end = thinking & (new == markers.think_end)
        self.end_sampled[rows] |= is_end
        newly_closed = is_end | pending_end
        self.closed[rows] = closed | newly_closed
        self.close_pos[rows] = torch.where(newly_closed, position, self.close_pos[rows])
        self.done[rows] = done | answering

    def count_live(self, rows: torch.Tensor, stats: RolloutStats) -> None:
        self.live_rows += (~self.done[rows]).sum()
        stats.row_steps += len(rows)


