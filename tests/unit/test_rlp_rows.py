"""The training loss path (nemo_rlp.training.losses.RLPLoss over rows, advantages from whole groups)
is the objective's `rlp_loss`: the same loss, gradient and metrics, whether a microbatch holds whole
groups or rows cut anywhere. Plain torch, no model."""

from __future__ import annotations

import torch

from nemo_rlp.objective import rlp_loss
from nemo_rlp.training.losses import RLPLoss, RLPRows

B, G, U = 3, 4, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp_new = (-torch.rand(B, G, U, generator=g) * 3).requires_grad_()
    logp_old = logp_new.detach() + 0.3 * torch.randn(B, G, U, generator=g)  # ratios on both sides of the clip
    logp_ref = logp_new.detach() + 0.2 * torch.randn(B, G, U, generator=g)
    lengths = torch.randint(1, U + 1, (B, G), generator=g)
    mask = torch.arange(U) < lengths[..., None]
    s_pred = -torch.rand(B, G, generator=g) * 4
    s_ema = -torch.rand(B, generator=g) * 4
    return logp_new, logp_old, logp_ref, mask, s_pred, s_ema


def _row_losses(logp_new, logp_old, logp_ref, mask, s_pred, s_ema, splits, kl_beta):
    """RLPLoss microbatches over rows [a, b) for consecutive splits, fed log-probs laid out as the
    schedule does: entry j scores token j+1 (thought tokens at 1..U, x_t at U+1)."""
    N = B * G
    rows = RLPRows.from_groups(s_pred, s_ema)
    logprobs = torch.cat([logp_new.reshape(N, U), s_pred.reshape(N, 1)], dim=1)  # [N, S-1], S = U + 2
    index = torch.arange(1, U + 1).expand(N, U)
    shares, metrics = [], []
    for a, b in zip(splits[:-1], splits[1:]):
        loss = RLPLoss(
            tokens=torch.zeros(b - a, U + 2, dtype=torch.long), thought_index=index[a:b],
            thought_mask=mask.reshape(N, U)[a:b], answer_index=torch.full((b - a,), U + 1), rows=rows[a:b],
            global_thoughts=N, eps_low=0.2, eps_high=0.28, kl_beta=kl_beta,
            logp_old=logp_old.reshape(N, U)[a:b], logp_ref=logp_ref.reshape(N, U)[a:b],
        )
        share, m, units = loss(logprobs[a:b])
        shares.append(share)
        metrics.append((m, units))
    return torch.stack(shares).sum(), metrics


def test_rows_cut_anywhere_give_the_objectives_loss_gradient_and_metrics():
    for kl_beta in (0.0, 0.05):
        logp_new, logp_old, logp_ref, mask, s_pred, s_ema = _data()
        want, want_metrics = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28, kl_beta=kl_beta,
                                      logp_ref=logp_ref)
        (want_grad,) = torch.autograd.grad(want, logp_new)
        for splits in ([0, B * G], [0, 5, 7, B * G]):  # one microbatch; rows cutting through groups
            got, metrics = _row_losses(logp_new, logp_old, logp_ref, mask, s_pred, s_ema, splits, kl_beta)
            (got_grad,) = torch.autograd.grad(got, logp_new)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=0)
            assert metrics[0][0].keys() == want_metrics.keys()
            # Means over thoughts combine exactly, weighted by rows (as reduce_metrics does).
            units = sum(u for _, u in metrics)
            for key in ("loss_pg", "kl", "reward_mean", "reward_group_std", "reward_pos_frac", "thought_len_mean",
                        "s_pred_mean", "s_ema_mean"):
                combined = sum(m[key] * u for m, u in metrics) / units
                torch.testing.assert_close(combined, want_metrics[key], atol=1e-6, rtol=0, msg=key)
            if len(splits) == 2:
                for key, value in want_metrics.items():
                    torch.testing.assert_close(metrics[0][0][key], value, atol=1e-6, rtol=0, msg=key)
    assert want_metrics["clip_frac"] > 0 and want_metrics["kl"] > 0  # the comparison covers both terms
