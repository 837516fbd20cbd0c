"""The RLP objective: rewards, group-relative advantages, the clipped surrogate and its metrics.

Plain torch, no megatron import (docs/design.md section 2). The math is docs/design.md section 1, steps 4-8
(arXiv 2510.01265). Shapes throughout:

    B  contexts in the batch (one observed next token x_t each)
    G  thoughts sampled per context (the group; G >= 2)
    U  thought length, padded to the longest thought of the batch

Everything is vectorised over [B, G, U]: the loss is a handful of elementwise ops and two reductions,
so its cost is negligible next to the rollouts and the forward/backward that produce its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "rewards", "group_advantages", "group_reward_std", "rlp_loss", "thought_losses", "thought_kl", "rlp_metrics",
]


# --------------------------------------------------------------------------------------------------
# Rewards and advantages (steps 4 and 5)
# --------------------------------------------------------------------------------------------------


def rewards(s_pred: Tensor, s_ema: Tensor) -> Tensor:
    """Information-gain reward ``r = S_pred - S_ema`` (docs/design.md section 1, step 4).

    Args:
        s_pred: [B, G] ``log p_theta(x_t | x_<t, c)`` for each thought (step 2).
        s_ema:  [B]    ``log pbar_phi(x_t | x_<t)`` from the EMA teacher (step 3).

    Returns:
        [B, G] rewards, detached: the reward is a constant of the policy-gradient objective, so no
        gradient may reach the predictor or the teacher through it.
    """
    return s_pred.detach() - s_ema.detach()[:, None]


def group_advantages(rewards: Tensor) -> Tensor:
    """Group-relative advantage ``A_i = G/(G-1) * (r_i - mean_j r_j)`` (docs/design.md section 1, step 5).

    The factor G/(G-1) corrects the bias of subtracting an inclusive mean (r_i is part of its own
    baseline); with it, A_i equals r_i minus the mean of the *other* G-1 rewards. Advantages sum to
    zero within each group, so a constant added to all rewards of a group changes nothing.

    Args:
        rewards: [B, G] rewards (detached here regardless: no gradient flows through the baseline).

    Returns:
        [B, G] advantages.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape [B, G], got {tuple(rewards.shape)}")
    _check_group_size(rewards.shape[1])
    r = rewards.detach()
    group_size = r.shape[1]
    return group_size / (group_size - 1) * (r - r.mean(dim=1, keepdim=True))


def group_reward_std(rewards: Tensor) -> Tensor:
    """The population std of the rewards within each group, repeated for each thought: [B, G].

    The advantage sees only this within-group spread (a constant added to a group's rewards changes
    nothing, step 5); the mean over thoughts of it is the metric ``reward_group_std``. Given per
    thought, it survives any later split of the batch into rows.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape [B, G], got {tuple(rewards.shape)}")
    r = rewards.detach()
    return r.std(dim=1, correction=0, keepdim=True).expand_as(r)


# --------------------------------------------------------------------------------------------------
# The loss (steps 6-8, plus the optional KL anchor of the paper's ablation)
# --------------------------------------------------------------------------------------------------


def rlp_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    thought_mask: Tensor,
    s_pred: Tensor,
    s_ema: Tensor,
    eps_low: float,
    eps_high: float,
    *,
    kl_beta: float = 0.0,
    logp_ref: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLP clipped-surrogate loss over a batch of B contexts with G thoughts each (docs/design.md section 1).

    Args:
        logp_new:     float [B, G, U] ``log pi_theta`` of each sampled thought token; the gradient
                      flows through it (step 6).
        logp_old:     float [B, G, U] ``log pi_theta_old`` of the same tokens (constant).
        thought_mask: bool  [B, G, U] True on sampled thought tokens; False on padding and on markers
                      that the recipe inserts (step 8: only sampled thought tokens carry gradient).
        s_pred:       float [B, G] ``log p_theta(x_t | x_<t, c)`` for each thought (constant, step 2).
        s_ema:        float [B]    ``log pbar_phi(x_t | x_<t)`` from the EMA teacher (constant, step 3).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio (step 7).
        kl_beta:      weight of a k3 KL penalty toward ``logp_ref`` (paper ablation; 0 = off, the
                      paper's default). When 0, ``logp_ref`` is ignored and nothing extra is computed.
        logp_ref:     float [B, G, U] ``log pi_ref`` of the thought tokens; required when kl_beta > 0.

    Returns:
        ``(loss, metrics)``: a scalar loss (mean over the B*G thoughts of the per-thought,
        length-normalised clipped surrogate, plus ``kl_beta * kl``) and detached scalar metrics.

    Values at masked-out positions (padding) never matter: they are removed with ``torch.where``
    before any arithmetic, so -inf or nan there yields neither a non-finite loss nor a gradient.
    """
    use_kl = kl_beta != 0.0
    _validate(logp_new, logp_old, thought_mask, s_pred, s_ema, eps_low, eps_high, kl_beta, logp_ref)

    # Compute in at least fp32: exp() of a bf16 log-ratio is too coarse for a clip range of ~0.2.
    dtype = torch.promote_types(logp_new.dtype, torch.float32)
    mask = thought_mask

    reward = rewards(s_pred, s_ema).to(dtype)
    advantage = group_advantages(reward)

    per_thought, ratio, unclipped, clipped = thought_losses(
        logp_new.to(dtype), logp_old.to(dtype), mask, advantage, eps_low, eps_high
    )
    pg_loss = per_thought.mean()

    per_thought_kl = torch.zeros_like(per_thought)
    if use_kl:
        assert logp_ref is not None  # _validate guarantees it
        per_thought_kl = thought_kl(logp_new.to(dtype), logp_ref.to(dtype), mask)
        loss = pg_loss + kl_beta * per_thought_kl.mean()
    else:
        loss = pg_loss

    metrics = rlp_metrics(
        per_thought_loss=per_thought,
        per_thought_kl=per_thought_kl,
        ratio=ratio,
        unclipped=unclipped,
        clipped=clipped,
        thought_mask=mask,
        reward=reward,
        advantage=advantage,
        s_pred=s_pred,
        s_ema=s_ema[:, None].expand_as(reward),
        reward_group_std=group_reward_std(reward),
    )
    return loss, metrics


def thought_losses(
    logp_new: Tensor, logp_old: Tensor, thought_mask: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 6-7 for thoughts whose advantages are already known: shapes [..., U] for the tokens and
    [...] for the advantages (e.g. [B, G] groups, or any [N] rows of them).

    Returns the per-thought clipped surrogate loss ``L_i = -(1/|c_i|) sum_u min(rho A, clip(rho) A)``
    [...], and the token-level ratio and both surrogate branches (for metrics). Every thought's loss
    depends on its own tokens and advantage only, so a batch of thoughts can be split anywhere once
    the advantages are computed over whole groups: the mean over all thoughts is the RLP loss.
    """
    thought_len = thought_mask.sum(dim=-1).to(logp_new.dtype)
    ratio = _importance_ratio(logp_new, logp_old, thought_mask)
    surrogate, unclipped, clipped = _clipped_surrogate(ratio, advantages[..., None], eps_low, eps_high)
    return -_per_thought_mean(surrogate, thought_mask, thought_len), ratio, unclipped, clipped


def thought_kl(logp_new: Tensor, logp_ref: Tensor, thought_mask: Tensor) -> Tensor:
    """Per-thought mean of the k3 KL estimator toward ``logp_ref``: shapes [..., U] -> [...].

    The paper's KL ablation (beta * KL added to the loss); like the clipped surrogate, each thought
    is normalised by its own length, so rows of thoughts can be split anywhere.
    """
    thought_len = thought_mask.sum(dim=-1).to(logp_new.dtype)
    return _per_thought_mean(_k3_kl(logp_new, logp_ref, thought_mask), thought_mask, thought_len)


def _importance_ratio(logp_new: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """Per-token ratio ``rho_u = exp(logp_new - logp_old)`` (step 6), exactly 1 at masked-out positions.

    ``torch.where`` (not multiplication by the mask) keeps nan/inf at padding out of both the value
    and the gradient: the backward of where sends exactly 0 to the unselected branch.
    """
    log_ratio = torch.where(mask, logp_new - logp_old.detach(), torch.zeros_like(logp_new))
    return torch.exp(log_ratio)


def _clipped_surrogate(
    ratio: Tensor, advantage: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-style pessimistic surrogate ``min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)`` (step 7).

    Returns the surrogate and both branches (the metrics need them to say which branch is active).
    Where the clipped branch is the smaller one, its clamp is saturated and the gradient is zero:
    the update stops pushing a token whose probability has already moved past the trust region.
    """
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantage
    return torch.minimum(unclipped, clipped), unclipped, clipped


def _per_thought_mean(per_token: Tensor, mask: Tensor, thought_len: Tensor) -> Tensor:
    """``(1/|c_i|) * sum_u mask * x_u`` -> [B, G] (step 7's length normalisation).

    Each thought weighs the same in the batch mean whatever its length.
    """
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    return masked.sum(dim=-1) / thought_len


def _k3_kl(logp_new: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): ``exp(d) - d - 1`` with ``d = ref - new``.

    Unbiased under samples from pi_theta, always >= 0, and exactly 0 where the two policies agree.
    Masked-out positions are set to d = 0 (so 0 KL and 0 gradient) before exp().
    """
    d = torch.where(mask, logp_ref.detach() - logp_new, torch.zeros_like(logp_new))
    return torch.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------------
# Metrics (the hazards listed at the end of docs/design.md section 1 must be visible)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def rlp_metrics(
    *,
    per_thought_loss: Tensor,
    per_thought_kl: Tensor,
    ratio: Tensor,
    unclipped: Tensor,
    clipped: Tensor,
    thought_mask: Tensor,
    reward: Tensor,
    advantage: Tensor,
    s_pred: Tensor,
    s_ema: Tensor,
    reward_group_std: Tensor,
) -> dict[str, Tensor]:
    """Detached scalar metrics over any set of thoughts: [...] per thought, [..., U] per token.

    The one metrics function of every RLP configuration (whole groups or rows of split groups), so
    all log the same keys. Per-thought inputs are what the thoughts at hand know: their reward,
    advantage, S_pred, their context's S_ema and their group's reward std (`group_reward_std`),
    all computed over whole groups before any split. Means over thoughts are exact under any split
    weighted by thoughts; ``reward_std`` and ``adv_std`` are the spread over the thoughts given.

    Clip fractions count masked tokens where the clipped branch is strictly smaller than the
    unclipped one, i.e. where the clip is what the min picks and the token's gradient is cut. With
    A > 0 that happens only above 1 + eps_high, with A < 0 only below 1 - eps_low, so
    ``clip_frac == clip_frac_low + clip_frac_high``.
    """
    mask = thought_mask
    dtype = torch.promote_types(reward.dtype, torch.float32)
    reward = reward.detach().to(dtype)
    ratio = ratio.detach()
    n_tokens = mask.sum().to(dtype)
    clip_active = mask & (clipped.detach() < unclipped.detach())
    clip_low = clip_active & (ratio < 1.0)
    clip_high = clip_active & (ratio > 1.0)
    masked_ratio = ratio[mask]
    return {
        "loss_pg": per_thought_loss.detach().to(dtype).mean(),
        "kl": per_thought_kl.detach().to(dtype).mean(),
        "reward_mean": reward.mean(),
        "reward_std": reward.std(correction=0),
        # Mean within-group spread: the only part of the reward the advantage can see.
        "reward_group_std": reward_group_std.detach().to(dtype).mean(),
        "reward_pos_frac": (reward > 0).to(dtype).mean(),
        "adv_std": advantage.detach().to(dtype).std(correction=0),
        "clip_frac": clip_active.sum() / n_tokens,
        "clip_frac_low": clip_low.sum() / n_tokens,
        "clip_frac_high": clip_high.sum() / n_tokens,
        "ratio_mean": masked_ratio.mean(),
        "ratio_max": masked_ratio.max(),
        "thought_len_mean": mask.sum(dim=-1).to(dtype).mean(),
        "s_pred_mean": s_pred.detach().to(dtype).mean(),
        "s_ema_mean": s_ema.detach().to(dtype).mean(),
    }


# --------------------------------------------------------------------------------------------------
# Validation: vectorised checks, one host sync for all data checks, index formatting only on failure
# --------------------------------------------------------------------------------------------------


def _check_group_size(group_size: int) -> None:
    # Step 5: with G = 1 the baseline is the reward itself and G/(G-1) divides by zero.
    if group_size < 2:
        raise ValueError(f"group size G must be >= 2 (got G={group_size}): step 5 needs a group baseline")


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], dims: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {dims} = {expected}, got {tuple(tensor.shape)}")


def _validate(
    logp_new: Tensor,
    logp_old: Tensor,
    thought_mask: Tensor,
    s_pred: Tensor,
    s_ema: Tensor,
    eps_low: float,
    eps_high: float,
    kl_beta: float,
    logp_ref: Tensor | None,
) -> None:
    """Raise a ValueError naming the argument (and the first offending index) for bad inputs."""
    if logp_new.dim() != 3:
        raise ValueError(f"logp_new: expected shape [B, G, U], got {tuple(logp_new.shape)}")
    batch, group, length = logp_new.shape
    _check_group_size(group)
    token_shape = (batch, group, length)
    _check_shape("logp_old", logp_old, token_shape, "[B, G, U]")
    _check_shape("thought_mask", thought_mask, token_shape, "[B, G, U]")
    _check_shape("s_pred", s_pred, (batch, group), "[B, G]")
    _check_shape("s_ema", s_ema, (batch,), "[B]")
    if thought_mask.dtype != torch.bool:
        raise ValueError(f"thought_mask: expected dtype torch.bool, got {thought_mask.dtype}")
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1) (got {eps_low}): the clip floor 1 - eps_low must be > 0")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0 (got {eps_high})")
    if not kl_beta >= 0.0:
        raise ValueError(f"kl_beta must be >= 0 (got {kl_beta})")
    if kl_beta != 0.0:
        if logp_ref is None:
            raise ValueError(f"logp_ref is required when kl_beta > 0 (got kl_beta={kl_beta})")
        _check_shape("logp_ref", logp_ref, token_shape, "[B, G, U]")

    at_masked = "is non-finite at a masked token"
    # (argument, index names, bad-entry mask, what is wrong, the values to quote in the message)
    checks = [
        ("thought_mask", "[b, g]", ~thought_mask.any(dim=-1), "has no masked token (needs >= 1)", None),
        ("s_pred", "[b, g]", ~torch.isfinite(s_pred), "is non-finite", s_pred),
        ("s_ema", "[b]", ~torch.isfinite(s_ema), "is non-finite", s_ema),
        ("logp_old", "[b, g, u]", thought_mask & ~torch.isfinite(logp_old), at_masked, logp_old),
        ("logp_new", "[b, g, u]", thought_mask & ~torch.isfinite(logp_new), at_masked, logp_new),
    ]
    if logp_ref is not None and kl_beta != 0.0:
        bad_ref = thought_mask & ~torch.isfinite(logp_ref)
        checks.append(("logp_ref", "[b, g, u]", bad_ref, at_masked, logp_ref))
    # One device->host transfer for all checks (each .any() alone would be a separate sync on GPU).
    failed = torch.stack([bad.any() for _, _, bad, _, _ in checks]).tolist()
    for (name, dims, bad, what, values), has_failure in zip(checks, failed):
        if has_failure:
            _raise_first(name, dims, bad, what, values)


def _raise_first(name: str, dims: str, bad: Tensor, what: str, values: Tensor | None) -> None:
    """Format the first offending index (the only Python-level work, and only on failure)."""
    index = tuple(int(i) for i in bad.nonzero()[0])
    value = "" if values is None else f" ({values[index].item()})"
    raise ValueError(f"{name}: entry at {dims} = {list(index)} {what}{value}")
