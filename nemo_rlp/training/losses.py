"""Losses as small protocols over one microbatch: NTP and RLP, each normalised by a global count.

A loss sees the log-probs the model assigns to each next token of its microbatch's rows and
returns the microbatch's share of the global batch loss: its summed loss divided by the number of
units (NTP tokens, RLP thoughts) in the whole global batch, across data-parallel ranks. Summing the
shares over microbatches and ranks therefore gives exactly the single-process mean, whatever the
split, and megatron's DDP only has to sum gradients (see `nemo_rlp.training.steps`).

Each loss declares, by exact name, the metrics that carry its loss and rewards (`guarded_metrics`):
the optimizer step skips the update when one of them is not finite, and fails loudly when one is
missing from the step's metrics (`nemo_rlp.training.policy.nonfinite_metrics`), so renaming a metric
without its declaration cannot switch the guard off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol

import torch

from nemo_rlp.objective import (
    group_advantages, group_reward_std, rewards, rlp_metrics, thought_kl, thought_losses,
)


class MicrobatchLoss(Protocol):
    tokens: torch.Tensor  # long [b, s]: the rows fed to the model (inputs tokens[:, :-1])
    # The metrics (exact names) whose non-finite value skips the update: the loss and the rewards.
    guarded_metrics: ClassVar[tuple[str, ...]]

    def __call__(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """logprobs [b, s-1] (entry j scores token j+1) -> (share of the global loss, metrics,
        the number of units the metrics are averaged over)."""
        ...


@dataclass
class NTPLoss:
    tokens: torch.Tensor  # [b, s+1]
    global_tokens: int  # predicted tokens in the global batch
    guarded_metrics: ClassVar[tuple[str, ...]] = ("ntp_loss",)

    def __call__(self, logprobs):
        units = logprobs.numel()
        loss_sum = -logprobs.sum()
        return loss_sum / self.global_tokens, {"ntp_loss": loss_sum.detach() / units}, units


@dataclass
class RLPLoss:
    """The RLP loss of any rows of thoughts (the one RLP loss path): whole groups or rows of split
    groups alike. Rewards and group-relative advantages are computed over whole groups before the
    schedule (`RLPRows.from_groups`), so a microbatch may hold any rows; every thought's loss then
    depends on its own tokens and advantage only (`objective.thought_losses`)."""

    tokens: torch.Tensor  # [N, S]: context, <think>, thought, </think>, x_t, pad...
    thought_index: torch.Tensor  # [N, U]: position of each sampled thought token in its row
    thought_mask: torch.Tensor  # [N, U]
    answer_index: torch.Tensor  # [N]: position of x_t
    rows: "RLPRows"  # per-thought constants of these N rows
    global_thoughts: int  # thoughts in the global batch
    eps_low: float
    eps_high: float
    kl_beta: float = 0.0
    # θ_old's log-probs of the thought tokens. None: this forward is θ_old's (the first optimizer
    # step on these rollouts), so its own values, detached, are exact and the ratio is exactly 1.
    logp_old: Optional[torch.Tensor] = None  # [N, U]
    logp_ref: Optional[torch.Tensor] = None  # [N, U], with kl_beta > 0
    # The rollout pass's own values, compared with this forward's as a check (not used in the loss).
    sampler_logp: Optional[torch.Tensor] = None  # [N, U]
    sampler_s_pred: Optional[torch.Tensor] = None  # [N]
    # The loss terms and the rewards with what they are made of (`objective.rlp_metrics`'s names).
    guarded_metrics: ClassVar[tuple[str, ...]] = (
        "loss_pg", "kl", "reward_mean", "reward_std", "reward_group_std", "reward_pos_frac", "adv_std",
        "s_pred_mean", "s_ema_mean",
    )

    @property
    def row_lengths(self) -> torch.Tensor:
        """Real tokens per row (through x_t): what a packed microbatch holds of each row."""
        return self.answer_index + 1

    @property
    def scored_inputs(self) -> torch.Tensor:
        """[N, S-1]: the log-prob entries this loss reads (the thought tokens', x_t's), the only
        positions a packed microbatch computes logits for (`nemo_rlp.training.packing.logits_at`)."""
        scored = torch.zeros(self.tokens.shape[0], self.tokens.shape[1] - 1, dtype=torch.bool,
                             device=self.tokens.device)
        rows = torch.arange(self.tokens.shape[0], device=self.tokens.device)
        scored[rows[:, None].expand_as(self.thought_index)[self.thought_mask],
               (self.thought_index - 1)[self.thought_mask]] = True
        scored[rows, self.answer_index - 1] = True
        return scored

    def __call__(self, logprobs):
        mask = self.thought_mask
        logp_new = logprobs.gather(1, self.thought_index - 1)
        logp_old = logp_new.detach() if self.logp_old is None else self.logp_old
        rows = self.rows
        # Non-finite rewards (S_pred, S_ema) or thought log-probs make this microbatch's loss and
        # metrics NaN, so that the optimizer step is skipped (training/policy.py) instead of the
        # objective raising: the inputs are made finite for the objective, and the result poisoned.
        # The metrics keep their names (data-parallel ranks reduce them by name). No host sync.
        finite = torch.stack([
            torch.isfinite(rows.advantages).all(), torch.isfinite(rows.rewards).all(),
            (torch.isfinite(logp_new.detach()) | ~mask).all(), (torch.isfinite(logp_old) | ~mask).all(),
        ]).all()
        poison = torch.where(finite, 1.0, float("nan")).to(logp_new.dtype)
        finite_ = lambda t: torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
        logp_new, logp_old, advantages = finite_(logp_new), finite_(logp_old), finite_(rows.advantages)
        per_thought, ratio, unclipped, clipped = thought_losses(
            logp_new, logp_old, mask, advantages, self.eps_low, self.eps_high
        )
        per_thought_kl = torch.zeros_like(per_thought)
        loss_sum = per_thought.sum()
        if self.kl_beta > 0:
            per_thought_kl = thought_kl(logp_new, self.logp_ref, mask)
            loss_sum = loss_sum + self.kl_beta * per_thought_kl.sum()
        metrics = rlp_metrics(
            per_thought_loss=per_thought, per_thought_kl=per_thought_kl, ratio=ratio, unclipped=unclipped,
            clipped=clipped, thought_mask=mask, reward=rows.rewards, advantage=rows.advantages,
            s_pred=rows.s_pred, s_ema=rows.s_ema, reward_group_std=rows.reward_group_std,
        )
        metrics = {k: v * poison for k, v in metrics.items()}
        if self.sampler_logp is not None:
            gap = (logp_new.detach() - self.sampler_logp).abs().masked_fill(~mask, 0.0)
            metrics["logp_mismatch_max"] = gap.max()
        if self.sampler_s_pred is not None:
            here = logprobs[torch.arange(len(self.answer_index), device=logprobs.device), self.answer_index - 1]
            metrics["s_pred_mismatch_max"] = (here.detach() - self.sampler_s_pred).abs().max()
        # The summed per-thought losses over the global count: shares add up to the batch mean.
        units = self.tokens.shape[0]
        return loss_sum * poison / self.global_thoughts, metrics, units


@dataclass
class RLPRows:
    """Per-thought constants of the RLP loss, computed over whole groups before any split."""

    rewards: torch.Tensor  # [N] r = S_pred - S_ema
    advantages: torch.Tensor  # [N] A = G/(G-1) (r - group mean)
    s_pred: torch.Tensor  # [N]
    s_ema: torch.Tensor  # [N]: its context's
    reward_group_std: torch.Tensor  # [N]: its group's

    @staticmethod
    def from_groups(s_pred: torch.Tensor, s_ema: torch.Tensor) -> "RLPRows":
        """From S_pred [B, G] and S_ema [B] (docs/design.md section 1, steps 4-5), flattened to B*G rows."""
        reward = rewards(s_pred, s_ema)
        return RLPRows(
            rewards=reward.reshape(-1), advantages=group_advantages(reward).reshape(-1),
            s_pred=s_pred.detach().reshape(-1), s_ema=s_ema.detach()[:, None].expand_as(reward).reshape(-1),
            reward_group_std=group_reward_std(reward).reshape(-1),
        )

    def __getitem__(self, rows: slice) -> "RLPRows":
        return RLPRows(*(t[rows] for t in (self.rewards, self.advantages, self.s_pred, self.s_ema,
                                           self.reward_group_std)))
