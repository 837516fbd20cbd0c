"""One optimizer step of each kind, through megatron-core's forward-backward schedules.

The RLP step, top to bottom (docs/design.md section 1):
  1. draw contexts from document windows; S_ema: one teacher-forced, no-think forward of the EMA
     teacher per window scores all its sampled positions (and an optional position filter);
  2. sample G thoughts per context with the current policy, one cached prefill per context shared
     by its G thoughts (`nemo_rlp.rollout.sampler`);
  3. S_pred = log p_θold(x_t | x_<t, c) comes from the rollout pass, which computes it anyway (one
     more decoding step per thought); rewards and group-relative advantages are computed from it
     over whole groups before any microbatch, so a microbatch may hold any rows (whole groups, or
     `rlp.micro_batch_rows` rows of split groups) and no forward pass is spent on S_pred.
     θ_old's log-probs of the thought tokens come from `rlp.logprob_source`:
       - `recompute` (default): the training forward's own. With one optimizer step per rollout
         batch (the paper's setting) the first training forward *is* θ_old's, so its values,
         detached, cost nothing and make the first ratio exactly 1; with several minibatches one
         forward-only pass over the rows of minibatches 2.. computes them before the first update.
         The ratio then compares training kernels with training kernels, so a numerical gap
         between inference and training kernels (bf16, TE vs the inference path) cannot
         masquerade as policy change and trip the clip.
       - `sampler`: the rollout pass's values, which saves that forward when minibatches > 1.
     The training forward's own values are logged against the rollout's on the first minibatch,
     in every configuration (`logp_mismatch_max`, `s_pred_mismatch_max`);
  4. per minibatch: the clipped surrogate on the thought tokens only, one loss path for every
     configuration (`nemo_rlp.training.losses.RLPLoss`, which calls `objective.thought_losses` and
     `objective.rlp_metrics`: every configuration logs the same keys), backward, optimizer step,
     EMA update.

Normalisation. Every microbatch's loss is its summed loss divided by the number of units (RLP
thoughts, NTP tokens) in the *global* batch, counted over all data-parallel ranks before the
schedule runs. The model config sets `calculate_per_token_loss`, under which megatron's DDP sums
gradients over data-parallel ranks instead of averaging them, and the loss functions report zero
tokens, so `finalize_model_grads` applies no second scaling. The gradient is then exactly the
single-process gradient of the global mean, however the batch is split over ranks and microbatches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from nemo_rlp.config import RLPConfig
from nemo_rlp.data.sampling import ContextSampler, RLPContext, Scorer
from nemo_rlp.models.handle import labelled_logprobs, next_token_logprobs, positions_like
from nemo_rlp.parallel.distributed import data_parallel_sum, reduce_metrics
from nemo_rlp.rollout.sampler import Markers, SamplingParams, ThoughtBatch, sample_thoughts
from nemo_rlp.objective import rewards
from nemo_rlp.training.losses import MicrobatchLoss, NTPLoss, RLPLoss, RLPRows
from nemo_rlp.training.packing import PackedRows, logits_at, pack_alignment, pack_rows, unpack_logprobs
from nemo_rlp.training.policy import PolicyWithTeacher
from nemo_rlp.training.schedule import NTP, RLP


@dataclass
class StepOutput:
    """What one training step of either kind returns (`ntp_step`, `rlp_step`)."""

    kind: str  # NTP or RLP (nemo_rlp.training.schedule)
    metrics: dict[str, float]  # numbers only; `skipped_updates` counts the skipped optimizer steps
    skip_reason: Optional[str] = None  # why an update was skipped (None: none was)
    batch: Optional[ThoughtBatch] = None  # RLP: the rollouts
    rewards: Optional[torch.Tensor] = None  # RLP: their rewards [B, G] by the sampler's S_pred (for logging)


def guarded_metrics(losses: Sequence[MicrobatchLoss]) -> tuple[str, ...]:
    """The metrics that the non-finite guard watches in a step over `losses` (their declarations)."""
    return tuple(sorted({name for loss in losses for name in loss.guarded_metrics}))


# ------------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------------


def run_schedule(model: PolicyWithTeacher, losses: Sequence[MicrobatchLoss], forward_only: bool = False,
                 pack: bool = False) -> list:
    """Run megatron's forward-backward schedule over one microbatch per loss; returns what each
    loss reported (on the last pipeline stage): dicts with `metrics` and `units`.

    `pack`: the rows of a loss that says how long each row is (`row_lengths`) run packed, without
    padding (`nemo_rlp.training.packing`); the loss still reads log-probs in the padded layout."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model.language_model.config
    # Sequence parallelism splits the sequence dimension over tensor-parallel ranks.
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    align = pack_alignment(model.language_model) if pack else 1
    packs = [
        pack_rows(loss.tokens, loss.row_lengths, multiple, align=align, scored=getattr(loss, "scored_inputs", None))
        if pack and getattr(loss, "row_lengths", None) is not None else None
        for loss in losses
    ]
    work = iter(zip(losses, packs))

    def forward_step(data_iterator, module):
        loss, packed = next(data_iterator)
        if packed is None:
            inputs = _pad_columns(loss.tokens[:, :-1], multiple)
            output = module(inputs, positions_like(inputs), None)
            output = output[:, : loss.tokens.shape[1] - 1]  # the end padding predicts nothing
        else:
            with logits_at(model.language_model, packed.where if packed.selected else None):
                output = module(packed.input_ids, packed.position_ids, None, packed_seq_params=packed.packed_seq_params())
        return output, partial(_loss_func, loss, packed)

    # Shapes of the largest microbatch (pipeline stages communicate the actual ones:
    # variable_seq_lengths); a pack is one sequence of all its rows' tokens.
    shapes = [(1, p.num_tokens) if p is not None else (l.tokens.shape[0], -(-(l.tokens.shape[1] - 1) // multiple) * multiple)
              for l, p in zip(losses, packs)]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=work,
        model=[model.ddp],
        num_microbatches=len(losses),
        seq_length=max(s for _, s in shapes),
        micro_batch_size=max(b for b, _ in shapes),
        forward_only=forward_only,
    )


def _pad_columns(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad rows [b, s] to a multiple of `multiple` columns (sequence parallelism splits the
    sequence over TP ranks); the pad follows every real token, so no real token sees it."""
    extra = -rows.shape[1] % multiple
    return torch.nn.functional.pad(rows, (0, extra)) if extra else rows


def _loss_func(loss: MicrobatchLoss, packed: PackedRows | None, output: torch.Tensor):
    if packed is None:
        logprobs = next_token_logprobs(output, loss.tokens)
    else:
        shape = (loss.tokens.shape[0], loss.tokens.shape[1] - 1)
        logprobs = unpack_logprobs(labelled_logprobs(packed.real_tokens(output[0]), packed.labels), packed, shape)
    share, metrics, units = loss(logprobs)
    # Zero tokens: the share is already normalised by the global count (module docstring).
    return share, torch.zeros((), dtype=torch.int), {"metrics": metrics, "units": units}


@torch.no_grad()
def _scores(model: PolicyWithTeacher, batch: ThoughtBatch, micro_rows: int, first_row: int = 0, pack: bool = False):
    """θ's log-probs of the thought tokens [R, U] and S_pred [R], forward-only, in training layout,
    for rows first_row.. (earlier rows are left at 0: their forward is θ_old's own)."""

    class _Score:
        def __init__(self, tokens, row_lengths):
            self.tokens = tokens
            self.row_lengths = row_lengths

        def __call__(self, logprobs):
            return logprobs.sum() * 0.0, {"_logprobs": logprobs.detach()}, 0

    index, _ = batch.thought_token_index()
    R = batch.tokens.shape[0]
    logp = torch.zeros(index.shape, dtype=torch.float32, device=index.device)
    s_pred = torch.zeros(R, dtype=torch.float32, device=index.device)
    if first_row < R:
        scored = [_Score(t, n) for t, n in zip(batch.tokens[first_row:].split(micro_rows),
                                                (batch.answer_index[first_row:] + 1).split(micro_rows))]
        outputs = run_schedule(model, scored, forward_only=True, pack=pack)
        if not outputs:  # not the last pipeline stage: only the last one evaluates losses
            return logp, s_pred
        logprobs = torch.cat([o["metrics"]["_logprobs"] for o in outputs])
        rows = torch.arange(first_row, R, device=index.device)
        logp[first_row:] = logprobs.gather(1, index[first_row:] - 1)
        s_pred[first_row:] = logprobs[rows - first_row, batch.answer_index[first_row:] - 1]
    return logp, s_pred


# ------------------------------------------------------------------------------------------------
# NTP
# ------------------------------------------------------------------------------------------------


def ntp_step(model: PolicyWithTeacher, tokens: torch.Tensor, micro_batch_size: int = 0) -> StepOutput:
    """One optimizer step on an NTP batch [b, s+1] (this rank's share of the global batch)."""
    (global_tokens,) = data_parallel_sum([tokens[:, 1:].numel()])
    losses = [NTPLoss(chunk, int(global_tokens)) for chunk in tokens.split(micro_batch_size or len(tokens))]
    model.policy.train()
    model.zero_grad()
    outputs = run_schedule(model, losses)
    metrics = reduce_metrics(outputs)
    result = model.optimizer_step(metrics, guarded=guarded_metrics(losses))
    metrics.update(grad_norm=result.grad_norm, updated=float(result.updated), trained_tokens=float(global_tokens))
    metrics["skipped_updates"] = float(result.skip_reason is not None)
    return StepOutput(NTP, metrics, result.skip_reason)


# ------------------------------------------------------------------------------------------------
# RLP
# ------------------------------------------------------------------------------------------------


def teacher_scorer(
    token_logprobs: Callable[[torch.Tensor], torch.Tensor],
    pad_id: int,
    device: Any = "cpu",
    max_rows: int | None = None,
) -> Scorer:
    """Step 3's S_ema as the context sampler's :data:`~nemo_rlp.data.sampling.Scorer`: a model's
    ``token_logprobs`` ([b, s] ids -> [b, s-1] log-probs, e.g. ``ModelHandle.token_logprobs`` of the EMA
    teacher, in eval mode) over windows right-padded into no-grad forwards of at most ``max_rows`` rows
    (None: all in one). It lives with the RLP step, not with the data, because it runs the teacher: the
    sampler only calls it. Right padding is safe for a causal model: no real token attends to a pad."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")

    def score(windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        step = max_rows or max(len(windows), 1)
        for first in range(0, len(windows), step):
            chunk = windows[first : first + step]
            lengths = [len(w) for w in chunk]
            tokens = torch.full((len(chunk), max(lengths)), int(pad_id), dtype=torch.long)
            for i, w in enumerate(chunk):
                tokens[i, : len(w)] = torch.as_tensor(np.asarray(w, dtype=np.int64), dtype=torch.long)
            with torch.no_grad():
                logprobs = token_logprobs(tokens.to(device)).float().cpu().numpy()
            out.extend(logprobs[i, : n - 1] for i, n in enumerate(lengths))
        return out

    return score


def sample_contexts(
    model: PolicyWithTeacher, sampler: ContextSampler, n: int, pad: int, device: torch.device,
    windows_per_forward: int = 0, counts: dict | None = None,
) -> tuple[list[RLPContext], torch.Tensor]:
    """Draw n contexts and their S_ema = log p̄_φ(x_t | x_<t) [n]: one teacher forward per document
    window scores every position sampled from it (and feeds the optional position filter); the
    teacher scores `windows_per_forward` windows at a time (0: all at once). `counts`, when given,
    gets the teacher-scored tokens (`teacher_tokens`, for the step's FLOPs)."""
    scorer = teacher_scorer(model.teacher.token_logprobs, pad, device, max_rows=windows_per_forward or None)
    windows = sampler.sample_windows(n, scorer=scorer)
    contexts = [c for w in windows for c in w.contexts()]
    s_ema = torch.from_numpy(np.concatenate([w.s_ema() for w in windows])).to(device)
    if counts is not None:
        counts["teacher_tokens"] = sum(len(w.tokens) for w in windows)
    return contexts, s_ema


@torch.no_grad()
def marker_term(model: PolicyWithTeacher, contexts: list[RLPContext], markers: Markers,
                device: torch.device) -> torch.Tensor:
    """-log(1 - p̄_φ(<think> | x_<t)) per context [n]: how much S_ema = log p̄_φ(x_t | x_<t) is lowered
    by the no-think teacher's mass on the start marker, i.e. the part of every reward of the context
    that comes from the marker alone (a teacher renormalised without it would give S_ema + log(1 - p̄)).
    """
    lengths = torch.tensor([len(c.prefix) for c in contexts], device=device)
    tokens = torch.full((len(contexts), int(lengths.max())), markers.pad, dtype=torch.long, device=device)
    for i, c in enumerate(contexts):
        tokens[i, : len(c.prefix)] = torch.as_tensor(c.prefix, dtype=torch.long, device=device)
    logp_start = torch.log_softmax(model.teacher.next_token_logits(tokens, lengths).float(), dim=-1)[:, markers.think_start]
    return -torch.log1p(-logp_start.exp().clamp(max=1 - 1e-6))


def _clock(device: torch.device) -> float:
    """Now, once the device has finished the work queued so far (a phase's time is its own)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def rlp_step(
    model: PolicyWithTeacher,
    sampler: ContextSampler,
    num_contexts: int,
    cfg: RLPConfig,
    markers: Markers,
    generator: torch.Generator,
    device: torch.device,
) -> StepOutput:
    """Roll out and train on `num_contexts` contexts of this rank. Returns the metrics, why updates
    were skipped if any were, the rollouts and their rewards [B, G] by the sampler's S_pred (for logging).

    The metrics carry the step's time split in seconds (`time_teacher_s`: drawing contexts and the
    teacher's scoring; `time_rollout_s`; `time_update_s`: the optimizer steps and their forward and
    backward passes) and its token counts over all data-parallel ranks (`thought_tokens` sampled,
    `trained_tokens` in the trained rows, `forward_tokens` run forward only: teacher, rollout
    prefill and decoding, extra forwards; counted as `nemo_rlp.planning` counts them for the plan)."""
    start = _clock(device)
    # φ ← θ at the first RLP batch, before the teacher scores anything.
    model.seed_teacher()
    counts: dict = {}
    contexts, s_ema = sample_contexts(model, sampler, num_contexts, markers.pad, device, cfg.score_batch_windows,
                                      counts=counts)
    scored = _clock(device)
    params = SamplingParams(
        group_size=cfg.group_size,
        max_thought_len=cfg.max_thought_len,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        mode=cfg.rollout_mode,
    )
    # Contexts roll out `rlp.rollout_batch_contexts` at a time (0: all): the KV/SSM cache holds
    # that many contexts' G rows.
    chunk = cfg.rollout_batch_contexts or len(contexts)
    batch = ThoughtBatch.concat(
        [
            sample_thoughts(model.policy, [c.prefix for c in part], [c.target for c in part], params, markers,
                            generator, device)
            for part in (contexts[i : i + chunk] for i in range(0, len(contexts), chunk))
        ],
        pad=markers.pad,
    )
    rolled_out = _clock(device)
    output = rlp_update(model, batch, s_ema, cfg)
    metrics = output.metrics
    updated = _clock(device)
    if cfg.log_marker_term:
        term_sum, count = data_parallel_sum([float(marker_term(model, contexts, markers, device).sum()), len(contexts)])
        metrics["reward_marker_term"] = term_sum / count
        metrics["reward_mean_without_marker"] = metrics["reward_mean"] - metrics["reward_marker_term"]
    metrics["end_marker_rate"] = float(batch.end_sampled.float().mean())
    metrics["thought_len_max"] = float(batch.thought_len.max())
    metrics.update(time_teacher_s=scored - start, time_rollout_s=rolled_out - scored, time_update_s=updated - rolled_out)
    metrics.update(_token_counts(batch, cfg, counts.get("teacher_tokens", 0)))
    output.batch = batch
    output.rewards = rewards(batch.s_pred.view(len(contexts), cfg.group_size), s_ema).cpu()
    return output


def _token_counts(batch: ThoughtBatch, cfg: RLPConfig, teacher_tokens: int) -> dict[str, float]:
    """The step's tokens over all data-parallel ranks (`rlp_step`'s docstring), by
    `nemo_rlp.planning`'s accounting fed with the rows this step actually ran."""
    from nemo_rlp.planning import extra_forward_tokens, rollout_tokens

    G = batch.group_size
    thought = batch.thought_len.cpu()
    prefill, decode = rollout_tokens(cfg.rollout_mode, G, batch.thought_start[::G].cpu(), thought)
    trained = float((batch.answer_index + 1).sum())
    forward = teacher_tokens + prefill + decode + extra_forward_tokens(cfg, trained)
    thoughts, trained, forward = data_parallel_sum([float(thought.sum()), trained, forward])
    return {"thought_tokens": float(thoughts), "trained_tokens": float(trained), "forward_tokens": float(forward)}


def rlp_update(model: PolicyWithTeacher, batch: ThoughtBatch, s_ema: torch.Tensor, cfg: RLPConfig) -> StepOutput:
    """Train on rollouts: `cfg.num_minibatches` optimizer steps (each followed by the EMA update),
    each on an equal share of the contexts, in microbatches of `cfg.micro_batch_contexts` whole
    groups or `cfg.micro_batch_rows` rows. One loss path (`RLPLoss`) for every configuration: the
    advantages are computed over whole groups first, from the rollout's S_pred, so no microbatch
    needs a whole group and no forward pass is spent on S_pred. Returns the RLP step's output
    without its `batch` and `rewards` (`rlp_step` adds them)."""
    G = batch.group_size
    B = batch.num_contexts
    if B < cfg.num_minibatches:
        raise ValueError(
            f"rlp.num_minibatches={cfg.num_minibatches} needs at least that many contexts on every "
            f"data-parallel rank; this rank has {B}. Raise rlp.contexts_per_step or lower num_minibatches."
        )
    index, mask = batch.thought_token_index()
    micro_rows = cfg.micro_batch_rows or G * (cfg.micro_batch_contexts or B)
    # Contiguous, equal shares of the contexts (whole groups) per minibatch.
    context_splits = np.array_split(np.arange(B), cfg.num_minibatches)
    global_thoughts = data_parallel_sum([len(c) * G for c in context_splits])

    s_pred = batch.s_pred
    logp_old = None  # None: minibatch 0's own forward is θ_old's
    if cfg.logprob_source == "sampler":
        logp_old = batch.behaviour_logprobs
    elif cfg.num_minibatches > 1 or s_pred is None:
        # θ_old's log-probs for the rows trained after the first update (and S_pred for rows not
        # built by the sampler): one forward-only pass, the only one `recompute` ever needs.
        first = len(context_splits[0]) * G if s_pred is not None else 0
        logp_old, scored_s_pred = _scores(model, batch, micro_rows, first, cfg.pack_rows)
        s_pred = s_pred if s_pred is not None else scored_s_pred
    rows = RLPRows.from_groups(s_pred.view(B, G), s_ema)
    logp_ref = _reference_logprobs(model, batch, index, micro_rows) if cfg.kl_beta > 0 else None

    model.policy.train()
    all_metrics: list[dict] = []
    reasons: list[str] = []
    for minibatch, (contexts_m, global_m) in enumerate(zip(context_splits, global_thoughts)):
        # The sampler check compares θ_old's values: only the first minibatch still runs at θ_old.
        at_old = minibatch == 0
        if cfg.micro_batch_rows:
            slices = _row_slices(int(contexts_m[0]) * G, (int(contexts_m[-1]) + 1) * G, micro_rows)
        else:  # whole groups: as near equal numbers of contexts per microbatch as micro_rows allows
            groups = np.array_split(contexts_m, max(1, -(-len(contexts_m) * G // micro_rows)))
            slices = [slice(int(g[0]) * G, (int(g[-1]) + 1) * G) for g in groups]
        losses = [
            RLPLoss(
                tokens=batch.tokens[r], thought_index=index[r], thought_mask=mask[r],
                answer_index=batch.answer_index[r], rows=rows[r], global_thoughts=int(global_m),
                eps_low=cfg.eps_low, eps_high=cfg.eps_high, kl_beta=cfg.kl_beta,
                logp_old=None if logp_old is None or (at_old and cfg.logprob_source == "recompute") else logp_old[r],
                logp_ref=_rows(logp_ref, r),
                sampler_logp=_rows(batch.behaviour_logprobs, r) if at_old else None,
                sampler_s_pred=_rows(batch.s_pred, r) if at_old else None,
            )
            for r in slices
        ]
        model.zero_grad()
        outputs = run_schedule(model, losses, pack=cfg.pack_rows)
        step_metrics = reduce_metrics(outputs)
        result = model.optimizer_step(step_metrics, guarded=guarded_metrics(losses), grad_scale=cfg.grad_scale)
        step_metrics.update(grad_norm=result.grad_norm, updated=float(result.updated))
        all_metrics.append(step_metrics)
        if result.skip_reason is not None:
            reasons.append(f"minibatch {minibatch}: {result.skip_reason}" if cfg.num_minibatches > 1 else result.skip_reason)
    return _combine_minibatches(all_metrics, reasons)


def _combine_minibatches(all_metrics: list[dict], reasons: list[str]) -> StepOutput:
    """The last minibatch's optimizer figures; other figures averaged (maxima: the max) over minibatches."""
    out = {}
    for key in {k for m in all_metrics for k in m}:
        values = [m[key] for m in all_metrics if key in m]
        out[key] = float(max(values) if key.endswith("_max") else np.mean(values))
    out["grad_norm"], out["updated"] = all_metrics[-1]["grad_norm"], all_metrics[-1]["updated"]
    out["skipped_updates"] = float(len(reasons))
    return StepOutput(RLP, out, "; ".join(reasons) if reasons else None)


@torch.no_grad()
def _reference_logprobs(model: PolicyWithTeacher, batch: ThoughtBatch, index: torch.Tensor, micro_rows: int):
    """The EMA teacher's log-probs of the thought tokens [R, U] (the KL anchor), micro_rows rows at a time."""
    return torch.cat([
        model.teacher.token_logprobs(tokens).gather(1, idx - 1)
        for tokens, idx in zip(batch.tokens.split(micro_rows), index.split(micro_rows))
    ])


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def _row_slices(start: int, stop: int, size: int) -> list[slice]:
    """[start, stop) in consecutive slices of `size` rows (the last may be shorter)."""
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]
