"""Losses as small protocols over one microbatch: NTP and RLP, each normalised by a global count.

A loss sees the log-probs the model assigns to each next token of its microbatch's rows and
returns the microbatch's share of the global batch loss: its summed loss divided by the number of
units (NTP tokens, RLP thoughts) in the whole global batch, across data-parallel ranks. Summing the
shares over microbatches and ranks therefore gives exactly the single-process mean, whatever the
split, and megatron's DDP only has to sum gradients (see `nemo_rlp.training.steps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from nemo_rlp.objective import rlp_loss, thought_losses


class MicrobatchLoss(Protocol):
    tokens: torch.Tensor  # long [b, s]: the rows fed to the model (inputs tokens[:, :-1])

    def __call__(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """logprobs [b, s-1] (entry j scores token j+1) -> (share of the global loss, metrics,
        the number of units the metrics are averaged over)."""
        ...


@dataclass
class NTPLoss:
    tokens: torch.Tensor  # [b, s+1]
    global_tokens: int  # predicted tokens in the global batch

    def __call__(self, logprobs):
        units = logprobs.numel()
        loss_sum = -logprobs.sum()
        return loss_sum / self.global_tokens, {"ntp_loss": loss_sum.detach() / units}, units


@dataclass
class RLPLoss:
    """The RLP loss of whole groups: rows b*G .. b*G+G-1 are the G thoughts of context b."""

    tokens: torch.Tensor  # [B*G, S]: context, <think>, thought, </think>, x_t, pad...
    thought_index: torch.Tensor  # [B*G, U]: position of each sampled thought token in its row
    thought_mask: torch.Tensor  # [B*G, U]
    answer_index: torch.Tensor  # [B*G]: position of x_t
    s_ema: torch.Tensor  # [B]
    group_size: int
    global_thoughts: int  # thoughts in the global batch
    eps_low: float
    eps_high: float
    kl_beta: float = 0.0
    # θ_old's log-probs of the thought tokens and S_pred. None: this forward is θ_old's (the first
    # optimizer step on these rollouts), so its own values, detached, are exact.
    logp_old: Optional[torch.Tensor] = None  # [B*G, U]
    s_pred: Optional[torch.Tensor] = None  # [B*G]
    logp_ref: Optional[torch.Tensor] = None  # [B*G, U], with kl_beta > 0
    # The rollout pass's own values, compared with this forward's as a check (not used in the loss).
    sampler_logp: Optional[torch.Tensor] = None  # [B*G, U]
    sampler_s_pred: Optional[torch.Tensor] = None  # [B*G]

    def __call__(self, logprobs):
        rows = torch.arange(self.tokens.shape[0], device=logprobs.device)
        logp_new = logprobs.gather(1, self.thought_index - 1)
        s_pred_here = logprobs[rows, self.answer_index - 1].detach()
        s_pred = s_pred_here if self.s_pred is None else self.s_pred
        logp_old = logp_new.detach() if self.logp_old is None else self.logp_old
        B, G = self.s_ema.shape[0], self.group_size
        shaped = lambda t: t.reshape(B, G, -1)  # noqa: E731
        # Non-finite rewards (S_pred, S_ema) or thought log-probs make this microbatch's loss and
        # metrics NaN, so that the optimizer step is skipped (training/policy.py) instead of the
        # objective raising: the inputs are made finite for the objective, and the result poisoned.
        # The metrics keep their names (data-parallel ranks reduce them by name). No host sync.
        s_ema, logp_ref = self.s_ema, self.logp_ref
        mask = self.thought_mask
        finite = torch.stack([
            torch.isfinite(s_pred).all(), torch.isfinite(s_ema).all(),
            (torch.isfinite(logp_new.detach()) | ~mask).all(), (torch.isfinite(logp_old) | ~mask).all(),
        ]).all()
        poison = torch.where(finite, 1.0, float("nan")).to(logp_new.dtype)
        s_pred, s_ema, logp_new, logp_old = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
                                              for t in (s_pred, s_ema, logp_new, logp_old))
        loss, metrics = rlp_loss(
            shaped(logp_new), shaped(logp_old), shaped(mask), s_pred.reshape(B, G), s_ema,
            self.eps_low, self.eps_high, kl_beta=self.kl_beta,
            logp_ref=None if logp_ref is None else shaped(logp_ref),
        )
        loss = loss * poison
        metrics = {k: v * poison for k, v in metrics.items()}
        units = B * G
        if self.sampler_logp is not None:
            gap = (logp_new.detach() - self.sampler_logp).abs().masked_fill(~self.thought_mask, 0.0)
            metrics["logp_mismatch_max"] = gap.max()
            metrics["s_pred_mismatch_max"] = (s_pred_here - self.sampler_s_pred).abs().max()
        # rlp_loss is the mean over this microbatch's B*G thoughts.
        return loss * (units / self.global_thoughts), metrics, units


@dataclass
class RLPRowLoss:
    """The RLP loss of any rows of thoughts, whose advantages were computed over whole groups before
    the schedule (`rlp.micro_batch_rows`): a microbatch need not hold a whole group, which is what
    lets a large model train on long thoughts in small microbatches."""

    tokens: torch.Tensor  # [N, S]
    thought_index: torch.Tensor  # [N, U]
    thought_mask: torch.Tensor  # [N, U]
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N] (metrics only)
    logp_old: torch.Tensor  # [N, U]: θ_old's, computed before the schedule
    global_thoughts: int
    eps_low: float
    eps_high: float

    def __call__(self, logprobs):
        logp_new = logprobs.gather(1, self.thought_index - 1)
        per_thought, ratio, unclipped, clipped = thought_losses(
            logp_new, self.logp_old, self.thought_mask, self.advantages, self.eps_low, self.eps_high
        )
        units = self.tokens.shape[0]
        mask = self.thought_mask
        with torch.no_grad():
            n_tokens = mask.sum().clamp(min=1)
            clip_active = mask & (clipped < unclipped)
            metrics = {
                "loss_pg": per_thought.detach().mean(),
                "reward_mean": self.rewards.mean(),
                "reward_pos_frac": (self.rewards > 0).float().mean(),
                "adv_std": self.advantages.std(correction=0),
                "clip_frac": clip_active.sum() / n_tokens,
                "clip_frac_low": (clip_active & (ratio < 1)).sum() / n_tokens,
                "clip_frac_high": (clip_active & (ratio > 1)).sum() / n_tokens,
                "ratio_mean": ratio[mask].mean(),
                "ratio_max": ratio[mask].max(),
                "thought_len_mean": mask.sum(dim=-1).float().mean(),
            }
        # Non-finite inputs make the loss NaN, and the optimizer step is then skipped (policy.py).
        return per_thought.sum() / self.global_thoughts, metrics, units
