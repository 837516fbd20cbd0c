"""One optimizer step of each kind, through megatron-core's forward-backward schedules.

The RLP step, top to bottom (docs/design.md section 1):
  1. draw contexts from document windows; S_ema: one teacher-forced, no-think forward of the EMA
     teacher per window scores all its sampled positions (and an optional position filter);
  2. sample G thoughts per context with the current policy, one cached prefill per context shared
     by its G thoughts (`nemo_rlp.rollout.sampler`);
  3. θ_old's log-probs of the thought tokens and S_pred = log p_θold(x_t | x_<t, c), from
     `rlp.logprob_source`:
       - `recompute` (default): the training forward's own. With one optimizer step per rollout
         batch (the paper's setting) the first training forward *is* θ_old's, so its values,
         detached, cost nothing and make the first ratio exactly 1; with several minibatches one
         forward-only pass computes them before the first update. Training and scoring then use
         the same kernels, so a numerical gap between inference and training kernels (bf16, TE vs
         the inference path) cannot masquerade as policy change and trip the clip.
       - `sampler`: the rollout pass's values, which saves that forward when minibatches > 1.
     Either way the other source is logged as a check (`logp_mismatch_max`, `s_pred_mismatch_max`);
  4. per minibatch: reward, group-relative advantage and the clipped surrogate on the thought tokens
     only (`nemo_rlp.training.losses.RLPLoss`), backward, optimizer step, EMA update.

Normalisation. Every microbatch's loss is its summed loss divided by the number of units (RLP
thoughts, NTP tokens) in the *global* batch, counted over all data-parallel ranks before the
schedule runs. The model config sets `calculate_per_token_loss`, under which megatron's DDP sums
gradients over data-parallel ranks instead of averaging them, and the loss functions report zero
tokens, so `finalize_model_grads` applies no second scaling. The gradient is then exactly the
single-process gradient of the global mean, however the batch is split over ranks and microbatches.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import torch

from nemo_rlp.config import RLPConfig
from nemo_rlp.data.sampling import ContextSampler, RLPContext, teacher_scorer
from nemo_rlp.models.handle import next_token_logprobs, positions_like
from nemo_rlp.parallel.distributed import data_parallel_sum, reduce_metrics
from nemo_rlp.rollout.sampler import Markers, SamplingParams, ThoughtBatch, sample_thoughts
from nemo_rlp.objective import group_advantages, rewards
from nemo_rlp.training.losses import MicrobatchLoss, NTPLoss, RLPLoss, RLPRowLoss
from nemo_rlp.training.policy import PolicyWithTeacher


# ------------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------------


def run_schedule(model: PolicyWithTeacher, losses: Sequence[MicrobatchLoss], forward_only: bool = False) -> list:
    """Run megatron's forward-backward schedule over one microbatch per loss; returns what each
    loss reported (on the last pipeline stage): dicts with `metrics` and `units`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, module):
        loss = next(data_iterator)
        inputs = loss.tokens[:, :-1]
        output = module(inputs, positions_like(inputs), None)
        return output, partial(_loss_func, loss)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(losses),
        model=[model.ddp],
        num_microbatches=len(losses),
        # The largest microbatch (pipeline stages communicate the actual shapes: variable_seq_lengths).
        seq_length=max(loss.tokens.shape[1] for loss in losses) - 1,
        micro_batch_size=max(loss.tokens.shape[0] for loss in losses),
        forward_only=forward_only,
    )


def _loss_func(loss: MicrobatchLoss, output: torch.Tensor):
    logprobs = next_token_logprobs(output, loss.tokens)
    share, metrics, units = loss(logprobs)
    # Zero tokens: the share is already normalised by the global count (module docstring).
    return share, torch.zeros((), dtype=torch.int), {"metrics": metrics, "units": units}


@torch.no_grad()
def _scores(model: PolicyWithTeacher, batch: ThoughtBatch, micro_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ's log-probs of the thought tokens [R, U] and S_pred [R], forward-only, in training layout."""

    class _Score:
        def __init__(self, tokens):
            self.tokens = tokens

        def __call__(self, logprobs):
            return logprobs.sum() * 0.0, {"logprobs": logprobs.detach()}, 0

    outputs = run_schedule(model, [_Score(t) for t in batch.tokens.split(micro_rows)], forward_only=True)
    if not outputs:  # not the last pipeline stage: only the last one computes losses
        return None, None
    logprobs = torch.cat([o["metrics"]["logprobs"] for o in outputs])
    index, _ = batch.thought_token_index()
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    return logprobs.gather(1, index - 1), logprobs[rows, batch.answer_index - 1]


# ------------------------------------------------------------------------------------------------
# NTP
# ------------------------------------------------------------------------------------------------


def ntp_step(model: PolicyWithTeacher, tokens: torch.Tensor, micro_batch_size: int = 0) -> dict[str, float]:
    """One optimizer step on an NTP batch [b, s+1] (this rank's share of the global batch)."""
    (global_tokens,) = data_parallel_sum([tokens[:, 1:].numel()])
    losses = [NTPLoss(chunk, int(global_tokens)) for chunk in tokens.split(micro_batch_size or len(tokens))]
    model.policy.train()
    model.zero_grad()
    outputs = run_schedule(model, losses)
    metrics = reduce_metrics(outputs)
    result = model.optimizer_step(metrics)
    metrics.update(grad_norm=result.grad_norm, updated=float(result.updated))
    _note_skip(metrics, result)
    return metrics


def _note_skip(metrics: dict, result) -> None:
    """A skipped update (non-finite loss, rewards or gradients) is counted in the metrics, and its
    reason kept on the side (`SKIP_REASON`): metrics are numbers only."""
    metrics["skipped_updates"] = metrics.get("skipped_updates", 0.0) + float(result.skip_reason is not None)
    if result.skip_reason is not None:
        metrics[SKIP_REASON] = result.skip_reason


# The key under which a step's metrics carry why an update was skipped (a string: the loop pops it
# before logging).
SKIP_REASON = "_skip_reason"


# ------------------------------------------------------------------------------------------------
# RLP
# ------------------------------------------------------------------------------------------------


def sample_contexts(
    model: PolicyWithTeacher, sampler: ContextSampler, n: int, pad: int, device: torch.device,
    windows_per_forward: int = 0,
) -> tuple[list[RLPContext], torch.Tensor]:
    """Draw n contexts and their S_ema = log p̄_φ(x_t | x_<t) [n]: one teacher forward per document
    window scores every position sampled from it (and feeds the optional position filter); the
    teacher scores `windows_per_forward` windows at a time (0: all at once)."""
    scorer = teacher_scorer(model.teacher.token_logprobs, pad, device, max_rows=windows_per_forward or None)
    windows = sampler.sample_windows(n, scorer=scorer)
    contexts = [c for w in windows for c in w.contexts()]
    s_ema = torch.from_numpy(np.concatenate([w.s_ema() for w in windows])).to(device)
    return contexts, s_ema


def rlp_step(
    model: PolicyWithTeacher,
    sampler: ContextSampler,
    num_contexts: int,
    cfg: RLPConfig,
    markers: Markers,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[dict[str, float], ThoughtBatch, torch.Tensor]:
    """Roll out and train on `num_contexts` contexts of this rank. Returns the metrics, the rollouts
    and their rewards [B, G] by the sampler's S_pred (for logging)."""
    # φ ← θ at the first RLP batch, before the teacher scores anything.
    model.seed_teacher()
    contexts, s_ema = sample_contexts(model, sampler, num_contexts, markers.pad, device, cfg.score_batch_windows)
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
    metrics = rlp_update(model, batch, s_ema, cfg)
    metrics["end_marker_rate"] = float(batch.end_sampled.float().mean())
    metrics["thought_len_max"] = float(batch.thought_len.max())
    return metrics, batch, rewards(batch.s_pred.view(len(contexts), cfg.group_size), s_ema).cpu()


def rlp_update(model: PolicyWithTeacher, batch: ThoughtBatch, s_ema: torch.Tensor, cfg: RLPConfig) -> dict[str, float]:
    """Train on rollouts: `cfg.num_minibatches` optimizer steps (each followed by the EMA update),
    each on an equal share of the contexts, in microbatches of `cfg.micro_batch_contexts`."""
    G = batch.group_size
    B = batch.num_contexts
    if B < cfg.num_minibatches:
        raise ValueError(
            f"rlp.num_minibatches={cfg.num_minibatches} needs at least that many contexts on every "
            f"data-parallel rank; this rank has {B}. Raise rlp.contexts_per_step or lower num_minibatches."
        )
    index, mask = batch.thought_token_index()
    split_groups = cfg.micro_batch_rows > 0
    micro_rows = cfg.micro_batch_rows if split_groups else G * (cfg.micro_batch_contexts or B)

    logp_old = s_pred = advantages = row_rewards = None
    if cfg.logprob_source == "sampler":
        logp_old, s_pred = batch.behaviour_logprobs, batch.s_pred
    elif cfg.num_minibatches > 1 or split_groups:
        logp_old, s_pred = _scores(model, batch, micro_rows)
    if split_groups and s_pred is not None:
        # Over whole groups, before any microbatch: then a microbatch may hold any rows.
        reward = rewards(s_pred.view(B, G), s_ema)
        advantages, row_rewards = group_advantages(reward).reshape(-1), reward.reshape(-1)
    logp_ref = None
    if cfg.kl_beta > 0:
        with torch.no_grad():
            logp_ref = model.teacher.token_logprobs(batch.tokens).gather(1, index - 1)

    # Contiguous, equal shares of the contexts (whole groups) per minibatch.
    context_splits = np.array_split(np.arange(B), cfg.num_minibatches)
    global_thoughts = data_parallel_sum([len(c) * G for c in context_splits])

    model.policy.train()
    all_metrics: list[dict] = []
    reasons: list[str] = []
    for minibatch, (contexts_m, global_m) in enumerate(zip(context_splits, global_thoughts)):
        # The sampler check compares θ_old's values: only the first minibatch still runs at θ_old.
        check = minibatch == 0
        if split_groups:
            # Any rows: the advantages were computed over whole groups above.
            first_row, stop_row = int(contexts_m[0]) * G, (int(contexts_m[-1]) + 1) * G
            losses = [
                RLPRowLoss(
                    tokens=batch.tokens[rows], thought_index=index[rows], thought_mask=mask[rows],
                    advantages=_rows(advantages, rows), rewards=_rows(row_rewards, rows),
                    logp_old=_rows(logp_old, rows), global_thoughts=int(global_m),
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                )
                for rows in _row_slices(first_row, stop_row, micro_rows)
            ]
        else:
            # Whole groups: microbatches of as near equal numbers of contexts as micro_rows allows.
            groups = np.array_split(contexts_m, max(1, -(-len(contexts_m) * G // micro_rows)))
            losses = [
                RLPLoss(
                    tokens=batch.tokens[rows], thought_index=index[rows], thought_mask=mask[rows],
                    answer_index=batch.answer_index[rows], s_ema=s_ema[rows.start // G : rows.stop // G],
                    group_size=G, global_thoughts=int(global_m), eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    kl_beta=cfg.kl_beta, logp_old=_rows(logp_old, rows), s_pred=_rows(s_pred, rows),
                    logp_ref=_rows(logp_ref, rows),
                    sampler_logp=batch.behaviour_logprobs[rows] if check else None,
                    sampler_s_pred=batch.s_pred[rows] if check else None,
                )
                for rows in (slice(int(g[0]) * G, (int(g[-1]) + 1) * G) for g in groups)
            ]
        model.zero_grad()
        outputs = run_schedule(model, losses)
        step_metrics = reduce_metrics(outputs)
        result = model.optimizer_step(step_metrics, grad_scale=cfg.grad_scale)
        step_metrics.update(grad_norm=result.grad_norm, updated=float(result.updated))
        all_metrics.append(step_metrics)
        if result.skip_reason is not None:
            reasons.append(f"minibatch {minibatch}: {result.skip_reason}" if cfg.num_minibatches > 1 else result.skip_reason)
    # The last minibatch's optimizer figures; other figures averaged (maxima: the max) over minibatches.
    out = {}
    for key in {k for m in all_metrics for k in m}:
        values = [m[key] for m in all_metrics if key in m]
        out[key] = float(max(values) if key.endswith("_max") else np.mean(values))
    out["grad_norm"], out["updated"] = all_metrics[-1]["grad_norm"], all_metrics[-1]["updated"]
    out["skipped_updates"] = float(len(reasons))
    if reasons:
        out[SKIP_REASON] = "; ".join(reasons)
    return out


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def _row_slices(start: int, stop: int, size: int) -> list[slice]:
    """[start, stop) in consecutive slices of `size` rows (the last may be shorter)."""
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]
