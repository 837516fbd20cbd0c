"""Tests for nemo_rlp.objective (docs/design.md section 1, steps 4-8).

Hand-worked cases spell out the arithmetic so a reader can check it without running anything.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_rlp.objective import group_advantages, rewards, rlp_loss

NAN = float("nan")
INF = float("inf")
HYPOTHESIS = settings(max_examples=50, deadline=None)


def logps_from_ratios(ratios: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (logp_new, logp_old, mask) in float64 so that exp(new - old) equals the given ratios.

    NaN in ``ratios`` marks padding: mask False there, and logp_new is set to -inf (garbage that the
    loss must ignore). logp_old is an arbitrary negative log-prob, different per token.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    mask = ~torch.isnan(r)
    logp_old = -1.0 - 0.1 * torch.arange(r.numel(), dtype=torch.float64).reshape(r.shape)
    logp_new = torch.where(mask, logp_old + torch.log(torch.where(mask, r, 1.0)), -INF)
    return logp_new.requires_grad_(True), logp_old, mask


# --------------------------------------------------------------------------------------------------
# Hand-worked values
# --------------------------------------------------------------------------------------------------


def test_hand_value_group_of_two_uneven_lengths_both_clips():
    # B = 1, G = 2, U = 3; eps_low = 0.2, eps_high = 0.28 -> clip range [0.8, 1.28].
    # s_pred = [-1, -3], s_ema = -2  ->  r = [1, -1], mean 0, A = 2/1 * [1, -1] = [2, -2].
    #
    # thought 0, A = +2, |c| = 3, ratios [1.0, 1.5, 0.5]:
    #   rho 1.0: min(2.0, 1.0*2)          = 2.0
    #   rho 1.5: min(3.0, 1.28*2 = 2.56)  = 2.56   <- clipped branch active (high side)
    #   rho 0.5: min(1.0, 0.8*2 = 1.6)    = 1.0    (clip would be larger: not active)
    #   L_0 = -(2.0 + 2.56 + 1.0) / 3 = -5.56 / 3
    # thought 1, A = -2, |c| = 2, ratios [0.5, 1.1, pad]:
    #   rho 0.5: min(-1.0, 0.8*-2 = -1.6) = -1.6   <- clipped branch active (low side)
    #   rho 1.1: min(-2.2, 1.1*-2 = -2.2) = -2.2
    #   L_1 = -(-1.6 - 2.2) / 2 = 1.9 = 5.7 / 3
    # loss = (L_0 + L_1) / 2 = (5.7 - 5.56) / 3 / 2 = 0.07 / 3
    logp_new, logp_old, mask = logps_from_ratios([[[1.0, 1.5, 0.5], [0.5, 1.1, NAN]]])
    s_pred = torch.tensor([[-1.0, -3.0]], dtype=torch.float64)
    s_ema = torch.tensor([-2.0], dtype=torch.float64)

    loss, metrics = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28)

    assert loss.item() == pytest.approx(0.07 / 3, abs=1e-6)
    # 5 masked tokens, one clipped on each side.
    assert metrics["clip_frac"].item() == pytest.approx(2 / 5)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert metrics["reward_mean"].item() == pytest.approx(0.0)
    assert metrics["reward_std"].item() == pytest.approx(1.0)  # population std of [1, -1]
    assert metrics["reward_pos_frac"].item() == pytest.approx(0.5)
    assert metrics["adv_std"].item() == pytest.approx(2.0)
    assert metrics["thought_len_mean"].item() == pytest.approx(2.5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 0.5 + 1.1) / 5)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert metrics["s_pred_mean"].item() == pytest.approx(-2.0)
    assert metrics["s_ema_mean"].item() == pytest.approx(-2.0)
    assert metrics["kl"].item() == 0.0


def test_hand_value_group_of_three_negative_advantages():
    # B = 2, G = 3, U = 3; eps_low = eps_high = 0.2 -> clip range [0.8, 1.2].
    # context 0: s_pred = [-1, -2, -3], s_ema = 0  -> r = [-1, -2, -3], mean -2,
    #            r - mean = [1, 0, -1],  A = 3/2 * that = [1.5, 0, -1.5]
    # context 1: s_pred = [-1, -1, 2],  s_ema = -1 -> r = [0, 0, 3],    mean 1,
    #            r - mean = [-1, -1, 2], A = 3/2 * that = [-1.5, -1.5, 3]
    #
    # [0,0] A = 1.5,  ratios [2.0]:           min(3.0, 1.2*1.5 = 1.8) = 1.8 (high clip)
    #        L = -1.8
    # [0,1] A = 0,    ratios [1.3, 0.7]:      every term 0 (never counted as clipped)
    #        L = 0
    # [0,2] A = -1.5, ratios [0.5, 1.0, 1.5]: min(-0.75, 0.8*-1.5 = -1.2) = -1.2 (low clip)
    #                                         min(-1.5, -1.5)             = -1.5
    #                                         min(-2.25, 1.2*-1.5 = -1.8) = -2.25 (not clipped)
    #        L = -(-1.2 - 1.5 - 2.25) / 3 = 4.95 / 3 = 1.65
    # [1,0] A = -1.5, ratios [0.9, 0.6]:      min(-1.35, -1.35)           = -1.35
    #                                         min(-0.9, 0.8*-1.5 = -1.2)  = -1.2 (low clip)
    #        L = -(-1.35 - 1.2) / 2 = 1.275
    # [1,1] A = -1.5, ratios [1.0]:           -1.5, L = 1.5
    # [1,2] A = 3,    ratios [1.25, 1.0, 0.5]: min(3.75, 1.2*3 = 3.6) = 3.6 (high clip)
    #                                          min(3, 3)              = 3
    #                                          min(1.5, 0.8*3 = 2.4)  = 1.5
    #        L = -(3.6 + 3 + 1.5) / 3 = -2.7
    # loss = (-1.8 + 0 + 1.65 + 1.275 + 1.5 - 2.7) / 6 = -0.075 / 6 = -0.0125
    logp_new, logp_old, mask = logps_from_ratios(
        [
            [[2.0, NAN, NAN], [1.3, 0.7, NAN], [0.5, 1.0, 1.5]],
            [[0.9, 0.6, NAN], [1.0, NAN, NAN], [1.25, 1.0, 0.5]],
        ]
    )
    s_pred = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 2.0]], dtype=torch.float64)
    s_ema = torch.tensor([0.0, -1.0], dtype=torch.float64)

    loss, metrics = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.2)

    assert loss.item() == pytest.approx(-0.0125, abs=1e-6)
    # 12 masked tokens; clipped: [0,0,0] high, [0,2,0] low, [1,0,1] low, [1,2,0] high.
    assert metrics["clip_frac"].item() == pytest.approx(4 / 12)
    assert metrics["clip_frac_low"].item() == pytest.approx(2 / 12)
    assert metrics["clip_frac_high"].item() == pytest.approx(2 / 12)
    # r = [-1, -2, -3, 0, 0, 3]: mean -0.5, one positive.
    assert metrics["reward_mean"].item() == pytest.approx(-0.5)
    assert metrics["reward_pos_frac"].item() == pytest.approx(1 / 6)
    assert metrics["thought_len_mean"].item() == pytest.approx(12 / 6)

    # Gradient spot checks. d loss / d logp_new = -(1/(B*G)) * (1/|c|) * A * rho where the unclipped
    # branch is active, and exactly 0 where the clip is active.
    loss.backward()
    grad = logp_new.grad
    assert grad[0, 0, 0].item() == 0.0  # high clip
    assert grad[0, 2, 0].item() == 0.0  # low clip
    assert grad[0, 2, 2].item() == pytest.approx(-(1 / 6) * (1 / 3) * -1.5 * 1.5)
    assert grad[1, 2, 2].item() == pytest.approx(-(1 / 6) * (1 / 3) * 3.0 * 0.5)
    assert torch.all(grad[0, 1] == 0.0)  # A = 0
    assert torch.all(grad[~mask] == 0.0)


def test_group_advantages_hand_value():
    # r = [1, 2, 6]: mean 3, r - mean = [-2, -1, 3], A = 3/2 * that = [-3, -1.5, 4.5].
    # Equivalently r_i minus the mean of the others: 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5.
    adv = group_advantages(torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([[-3.0, -1.5, 4.5]], dtype=torch.float64))


def test_rewards_are_detached_and_broadcast_over_the_group():
    s_pred = torch.tensor([[-1.0, -2.0], [0.5, -0.5]], requires_grad=True)
    s_ema = torch.tensor([-1.5, 0.0], requires_grad=True)
    r = rewards(s_pred, s_ema)
    assert not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([[0.5, -0.5], [0.5, -0.5]]))


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@st.composite
def rlp_batches(draw, max_ratio_log: float = 0.5):
    """A random float64 batch: mask with >= 1 token per thought (not necessarily a prefix, since
    inserted markers can sit inside a thought), and log-ratios in [-max_ratio_log, max_ratio_log]."""
    b = draw(st.integers(1, 4))
    g = draw(st.integers(2, 5))
    u = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, g, u, generator=gen) < 0.7
    mask[..., 0] |= ~mask.any(dim=-1)  # every thought keeps at least one token
    logp_old = -3.0 * torch.rand(b, g, u, generator=gen, dtype=torch.float64)
    log_ratio = max_ratio_log * (2 * torch.rand(b, g, u, generator=gen, dtype=torch.float64) - 1)
    logp_new = torch.where(mask, logp_old + log_ratio, -INF)
    s_pred = -5.0 * torch.rand(b, g, generator=gen, dtype=torch.float64)
    s_ema = -5.0 * torch.rand(b, generator=gen, dtype=torch.float64)
    return logp_new, logp_old, mask, s_pred, s_ema


def loss_and_grad(logp_new, logp_old, mask, s_pred, s_ema, eps_low=0.2, eps_high=0.28):
    logp_new = logp_new.detach().clone().requires_grad_(True)
    loss, _ = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, eps_low, eps_high)
    loss.backward()
    return loss.detach(), logp_new.grad


@HYPOTHESIS
@given(
    st.integers(2, 8).flatmap(
        lambda g: st.lists(
            st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=g, max_size=g), min_size=1, max_size=4
        )
    )
)
def test_advantages_sum_to_zero_per_group(reward_rows):
    r = torch.tensor(reward_rows, dtype=torch.float64)
    adv = group_advantages(r)
    scale = max(1.0, r.abs().max().item())
    zeros = torch.zeros(r.shape[0], dtype=torch.float64)
    torch.testing.assert_close(adv.sum(dim=1), zeros, atol=1e-9 * scale, rtol=0)


@HYPOTHESIS
@given(rlp_batches(), st.floats(-100, 100), st.lists(st.floats(-100, 100), min_size=4, max_size=4))
def test_loss_and_grad_invariant_to_group_reward_shift(batch, ema_shift, group_shifts):
    logp_new, logp_old, mask, s_pred, s_ema = batch
    base_loss, base_grad = loss_and_grad(logp_new, logp_old, mask, s_pred, s_ema)

    # Shift every reward of every group by the same constant via the teacher's score ...
    loss_a, grad_a = loss_and_grad(logp_new, logp_old, mask, s_pred, s_ema + ema_shift)
    # ... or by a different constant per group via the predictor's scores.
    per_group = torch.tensor(group_shifts[: s_pred.shape[0]], dtype=torch.float64)[:, None]
    loss_b, grad_b = loss_and_grad(logp_new, logp_old, mask, s_pred + per_group, s_ema)

    for loss, grad in ((loss_a, grad_a), (loss_b, grad_b)):
        torch.testing.assert_close(loss, base_loss, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(grad, base_grad, atol=1e-9, rtol=1e-9)


@HYPOTHESIS
@given(rlp_batches())
def test_on_policy_gradient_is_minus_advantage_over_length(batch):
    # With logp_new == logp_old every ratio is 1 (inside the clip range), so
    # d loss / d logp_new[b,g,u] = -A[b,g] / (|c_bg| * B * G) on masked tokens, 0 elsewhere.
    _, logp_old, mask, s_pred, s_ema = batch
    logp_new = torch.where(mask, logp_old, NAN)  # garbage at padding must not matter
    _, grad = loss_and_grad(logp_new, logp_old, mask, s_pred, s_ema)

    b, g, _ = mask.shape
    adv = group_advantages(rewards(s_pred, s_ema))
    length = mask.sum(dim=-1).to(torch.float64)
    expected = (-adv / (length * b * g))[..., None].expand_as(grad)
    torch.testing.assert_close(grad[mask], expected[mask], atol=1e-12, rtol=1e-9)
    assert torch.all(grad[~mask] == 0.0)


# --------------------------------------------------------------------------------------------------
# Padding and gradient isolation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [-INF, INF, NAN])
def test_garbage_at_padding_gives_finite_loss_and_zero_grad(garbage):
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[[True, True, False, False], [True, False, True, False]]] * 2)
    logp_old = -torch.rand(2, 2, 4, generator=gen)
    logp_old = torch.where(mask, logp_old, garbage)  # the old policy's padding too
    logp_new = torch.where(mask, logp_old + 0.1, garbage).requires_grad_(True)
    s_pred = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    s_ema = torch.tensor([-1.5, -1.0])

    loss, metrics = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28)
    loss.backward()

    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.all(logp_new.grad[~mask] == 0.0)
    assert torch.all(torch.isfinite(logp_new.grad))


def test_no_gradient_reaches_rewards_or_old_policy():
    logp_new, logp_old, mask = logps_from_ratios([[[1.1, 0.9], [1.0, NAN]]])
    logp_old = logp_old.requires_grad_(True)
    s_pred = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    s_ema = torch.tensor([-1.5], dtype=torch.float64, requires_grad=True)
    loss, _ = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.2)
    loss.backward()
    assert s_pred.grad is None and s_ema.grad is None and logp_old.grad is None
    assert logp_new.grad is not None


# --------------------------------------------------------------------------------------------------
# KL anchor (paper ablation, off by default)
# --------------------------------------------------------------------------------------------------


def small_batch():
    logp_new, logp_old, mask = logps_from_ratios([[[1.1, 0.7, NAN], [1.4, 1.0, 0.9]]])
    s_pred = torch.tensor([[-1.0, -2.5]], dtype=torch.float64)
    s_ema = torch.tensor([-2.0], dtype=torch.float64)
    return logp_new, logp_old, mask, s_pred, s_ema


def test_kl_off_by_default():
    logp_new, logp_old, mask, s_pred, s_ema = small_batch()
    loss_default, metrics = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28)
    # logp_ref is ignored when kl_beta == 0, even if it is garbage.
    garbage_ref = torch.full_like(logp_old, NAN)
    loss_zero, _ = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28, kl_beta=0.0, logp_ref=garbage_ref)
    assert metrics["kl"].item() == 0.0
    assert loss_default.item() == loss_zero.item()


def test_kl_is_zero_when_reference_equals_policy():
    logp_new, logp_old, mask, s_pred, s_ema = small_batch()
    loss_off, _ = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28)
    loss_on, metrics = rlp_loss(
        logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28, kl_beta=1e-3, logp_ref=logp_new.detach()
    )
    assert metrics["kl"].item() == 0.0
    assert loss_on.item() == loss_off.item()


def test_kl_hand_value():
    # One thought per context would need G = 1, so use G = 2 with equal rewards: A = 0 and the
    # surrogate is 0, leaving only beta * KL.
    # thought 0: d = ref - new = [ln 2, 0]  -> k3 = [2 - ln 2 - 1, 0] -> mean over 2 tokens (1 - ln 2)/2
    # thought 1: d = [0]                     -> k3 = [0]              -> 0
    # kl = mean over the 2 thoughts = (1 - ln 2) / 4; loss = beta * kl with beta = 0.5.
    logp_new = torch.tensor([[[-1.0, -2.0], [-0.5, -INF]]], dtype=torch.float64, requires_grad=True)
    logp_ref = logp_new.detach() + torch.tensor([[[math.log(2.0), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True], [True, False]]])
    s_pred = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    s_ema = torch.tensor([-2.0], dtype=torch.float64)
    logp_old = logp_new.detach()
    loss, metrics = rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.2, kl_beta=0.5, logp_ref=logp_ref)
    assert metrics["kl"].item() == pytest.approx((1 - math.log(2.0)) / 4, abs=1e-9)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2.0)) / 4, abs=1e-9)
    # d k3 / d new = 1 - exp(d); at [0,0,0]: (1 - 2) * beta / (|c| * B * G) = -1 * 0.5 / (2 * 2).
    loss.backward()
    assert logp_new.grad[0, 0, 0].item() == pytest.approx(-0.5 / 4)
    assert torch.all(logp_new.grad[~mask] == 0.0)


def test_kl_requires_reference():
    logp_new, logp_old, mask, s_pred, s_ema = small_batch()
    with pytest.raises(ValueError, match=r"logp_ref is required when kl_beta > 0"):
        rlp_loss(logp_new, logp_old, mask, s_pred, s_ema, 0.2, 0.28, kl_beta=1e-3)


# --------------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------------


def valid_args():
    """A valid [B=2, G=3, U=4] batch as a mutable dict of rlp_loss arguments."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = False
    logp_old = -torch.rand(2, 3, 4, generator=gen)
    return dict(
        logp_new=logp_old + 0.05,
        logp_old=logp_old,
        thought_mask=mask,
        s_pred=-torch.rand(2, 3, generator=gen),
        s_ema=-torch.rand(2, generator=gen),
        eps_low=0.2,
        eps_high=0.28,
    )


def test_valid_args_pass():
    loss, _ = rlp_loss(**valid_args())
    assert torch.isfinite(loss)


def test_group_of_one_rejected():
    args = valid_args()
    for key in ("logp_new", "logp_old", "thought_mask"):
        args[key] = args[key][:, :1]
    args["s_pred"] = args["s_pred"][:, :1]
    with pytest.raises(ValueError, match=r"group size G must be >= 2 \(got G=1\)"):
        rlp_loss(**args)
    with pytest.raises(ValueError, match=r"G must be >= 2 \(got G=1\)"):
        group_advantages(torch.zeros(3, 1))


def test_thought_without_tokens_rejected():
    args = valid_args()
    args["thought_mask"][1, 2] = False
    with pytest.raises(ValueError, match=r"thought_mask: entry at \[b, g\] = \[1, 2\] has no masked token"):
        rlp_loss(**args)


@pytest.mark.parametrize(
    ("name", "bad_shape", "expected"),
    [
        ("logp_old", (2, 3, 5), r"logp_old: expected shape \[B, G, U\] = \(2, 3, 4\), got \(2, 3, 5\)"),
        ("thought_mask", (2, 2, 4), r"thought_mask: expected shape \[B, G, U\] = \(2, 3, 4\), got \(2, 2, 4"),
        ("s_pred", (2, 4), r"s_pred: expected shape \[B, G\] = \(2, 3\), got \(2, 4\)"),
        ("s_ema", (3,), r"s_ema: expected shape \[B\] = \(2,\), got \(3,\)"),
        ("logp_new", (2, 3), r"logp_new: expected shape \[B, G, U\], got \(2, 3\)"),
    ],
)
def test_shape_mismatch_rejected(name, bad_shape, expected):
    args = valid_args()
    args[name] = torch.zeros(bad_shape, dtype=args[name].dtype)
    with pytest.raises(ValueError, match=expected):
        rlp_loss(**args)


def test_logp_ref_shape_checked_when_kl_on():
    args = valid_args()
    with pytest.raises(ValueError, match=r"logp_ref: expected shape \[B, G, U\] = \(2, 3, 4\), got \(2, 3\)"):
        rlp_loss(**args, kl_beta=1e-3, logp_ref=torch.zeros(2, 3))


def test_non_bool_mask_rejected():
    args = valid_args()
    args["thought_mask"] = args["thought_mask"].float()
    with pytest.raises(ValueError, match=r"thought_mask: expected dtype torch.bool"):
        rlp_loss(**args)


@pytest.mark.parametrize(
    ("name", "index", "value", "expected"),
    [
        ("s_pred", (1, 2), NAN, r"s_pred: entry at \[b, g\] = \[1, 2\] is non-finite \(nan\)"),
        ("s_pred", (0, 1), -INF, r"s_pred: entry at \[b, g\] = \[0, 1\] is non-finite \(-inf\)"),
        ("s_ema", (1,), INF, r"s_ema: entry at \[b\] = \[1\] is non-finite \(inf\)"),
        ("logp_old", (1, 0, 2), NAN, r"logp_old: entry at \[b, g, u\] = \[1, 0, 2\] is non-finite at a mask"),
        ("logp_new", (0, 2, 1), -INF, r"logp_new: entry at \[b, g, u\] = \[0, 2, 1\] is non-finite at a mask"),
    ],
)
def test_non_finite_inputs_rejected(name, index, value, expected):
    args = valid_args()
    args[name] = args[name].clone()
    args[name][index] = value
    with pytest.raises(ValueError, match=expected):
        rlp_loss(**args)


def test_first_bad_index_is_reported():
    args = valid_args()
    args["s_pred"][0, 2] = NAN
    args["s_pred"][1, 0] = NAN
    with pytest.raises(ValueError, match=r"\[b, g\] = \[0, 2\]"):
        rlp_loss(**args)


@pytest.mark.parametrize(
    ("eps_low", "eps_high", "expected"),
    [
        (-0.1, 0.2, r"eps_low must be in \[0, 1\) \(got -0.1\)"),
        (1.0, 0.2, r"eps_low must be in \[0, 1\) \(got 1.0\)"),
        (0.2, -0.01, r"eps_high must be >= 0 \(got -0.01\)"),
    ],
)
def test_bad_clip_range_rejected(eps_low, eps_high, expected):
    args = valid_args()
    args.update(eps_low=eps_low, eps_high=eps_high)
    with pytest.raises(ValueError, match=expected):
        rlp_loss(**args)


def test_negative_kl_beta_rejected():
    with pytest.raises(ValueError, match=r"kl_beta must be >= 0 \(got -1.0\)"):
        rlp_loss(**valid_args(), kl_beta=-1.0, logp_ref=valid_args()["logp_old"])
