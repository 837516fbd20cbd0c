"""Tests for nemo_rlp.ema.EMATeacher (docs/design.md section 1, steps 3 and 9)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nemo_rlp.ema import EMATeacher


def make_model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(dtype)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@torch.no_grad()
def perturb(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def assert_params_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, rtol: float = 0.0
) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


# --------------------------------------------------------------------------------------------------
# Construction and lazy seeding
# --------------------------------------------------------------------------------------------------


def test_teacher_is_fp32_frozen_and_in_eval_mode():
    ema = EMATeacher(make_model(0, torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in ema.teacher.parameters())
    assert not any(p.requires_grad for p in ema.teacher.parameters())
    assert not ema.teacher.training


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_open_unit_interval_rejected(decay):
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        EMATeacher(make_model(0), decay=decay)


def test_lazy_seeding():
    policy, teacher = make_model(0), make_model(1)
    random_init = params(teacher)
    ema = EMATeacher(teacher)
    assert not ema.initialized and ema.num_updates == 0

    # Before seeding, update is a no-op: phi stays at its (random) construction value.
    assert ema.update(policy) is False
    assert ema.num_updates == 0
    assert_params_close(params(ema.teacher), random_init, atol=0)

    # The first maybe_seed copies theta.
    assert ema.maybe_seed(policy) is True
    assert ema.initialized
    assert_params_close(params(ema.teacher), params(policy), atol=0)

    # A later call neither re-seeds nor copies: the teacher keeps its own value.
    perturb(policy, seed=5)
    assert ema.maybe_seed(policy) is False
    assert_params_close(params(ema.teacher), params(make_model(0)), atol=0)


def test_seeding_upcasts_a_bf16_policy():
    policy = make_model(0, torch.bfloat16)
    ema = EMATeacher(make_model(1))
    ema.maybe_seed(policy)
    expected = {name: p.float() for name, p in params(policy).items()}
    assert_params_close(params(ema.teacher), expected, atol=0)


# --------------------------------------------------------------------------------------------------
# The update rule
# --------------------------------------------------------------------------------------------------


def test_update_is_tau_phi_plus_one_minus_tau_theta():
    tau = 0.9  # large step so the check is sensitive
    policy = make_model(0)
    ema = EMATeacher(make_model(1), decay=tau)
    ema.maybe_seed(policy)
    perturb(policy, seed=3)
    phi_before, theta = params(ema.teacher), params(policy)

    assert ema.update(policy) is True
    assert ema.num_updates == 1

    # Reference in float64; 1e-7 absolute plus 1e-7 relative allows the one fp32 rounding of the
    # result (an fp32 ulp is 1.2e-7 for values in [1, 2), e.g. LayerNorm weights near 1).
    phi_after = {name: p.double() for name, p in params(ema.teacher).items()}
    expected = {name: tau * phi_before[name].double() + (1 - tau) * theta[name].double() for name in theta}
    assert_params_close(phi_after, expected, atol=1e-7, rtol=1e-7)
    assert all(not torch.equal(phi_after[name], theta[name].double()) for name in theta)


def test_fp32_ema_tracks_a_bf16_policy_where_a_bf16_ema_stalls():
    # Seed at theta0, then hold the bf16 policy at theta* for 1000 updates with tau = 0.999.
    # phi_n - theta* = tau^n (theta0 - theta*), so phi has covered 1 - 0.999^1000 ~= 0.632 of the gap.
    tau, steps = 0.999, 1000
    expected_fraction = 1 - tau**steps
    policy = nn.Linear(32, 16).to(torch.bfloat16)
    with torch.no_grad():
        policy.weight.copy_(0.1 * torch.randn(16, 32))
        policy.bias.copy_(0.1 * torch.randn(16))
    theta0 = {name: p.double() for name, p in params(policy).items()}
    ema = EMATeacher(nn.Linear(32, 16), decay=tau)
    ema.maybe_seed(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # theta* = theta0 + ~1, rounded to bf16
    theta_star = {name: p.double() for name, p in params(policy).items()}

    def fraction_error(phi: dict[str, torch.Tensor]) -> float:
        """Worst relative error of the fraction of the gap covered, over all elements."""
        worst = 0.0
        for name, gap in ((n, theta_star[n] - theta0[n]) for n in theta0):
            fraction = (phi[name].double() - theta0[name]) / gap
            worst = max(worst, ((fraction - expected_fraction).abs() / expected_fraction).max().item())
        return worst

    for _ in range(steps):
        ema.update(policy)
    assert fraction_error(params(ema.teacher)) < 1e-3

    # The same EMA kept in bf16: each step of 1e-3 * gap is below half a bf16 ulp once phi has moved
    # a little, so it rounds away and phi stalls far short of the target.
    naive = {name: theta0[name].to(torch.bfloat16) for name in theta0}
    with torch.no_grad():
        for _ in range(steps):
            for name, p in policy.named_parameters():
                naive[name].lerp_(p, 1 - tau)
    assert fraction_error(naive) > 1e-3


def test_sharded_teachers_match_slices_of_the_unsharded_ema():
    # Tensor parallel in miniature: a Linear(4 -> 6) split by output rows across two "ranks", each
    # with its own policy shard and teacher shard, updated independently with no communication.
    full_policy = nn.Linear(4, 6)
    shards = [slice(0, 3), slice(3, 6)]
    shard_policies = [nn.Linear(4, 3) for _ in shards]

    @torch.no_grad()
    def copy_shards() -> None:
        for rows, shard in zip(shards, shard_policies):
            shard.weight.copy_(full_policy.weight[rows])
            shard.bias.copy_(full_policy.bias[rows])

    copy_shards()
    full_ema = EMATeacher(nn.Linear(4, 6), decay=0.9)
    shard_emas = [EMATeacher(nn.Linear(4, 3), decay=0.9) for _ in shards]
    full_ema.maybe_seed(full_policy)
    for ema, shard in zip(shard_emas, shard_policies):
        ema.maybe_seed(shard)

    for step in range(5):
        perturb(full_policy, seed=step)
        copy_shards()
        full_ema.update(full_policy)
        for ema, shard in zip(shard_emas, shard_policies):
            ema.update(shard)

    for rows, ema in zip(shards, shard_emas):
        torch.testing.assert_close(ema.teacher.weight, full_ema.teacher.weight[rows], atol=1e-7, rtol=0)
        torch.testing.assert_close(ema.teacher.bias, full_ema.teacher.bias[rows], atol=1e-7, rtol=0)


# --------------------------------------------------------------------------------------------------
# Pairing errors
# --------------------------------------------------------------------------------------------------


def test_mismatched_parameter_names_rejected():
    ema = EMATeacher(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"parameter 'weight' is in the teacher but not in the policy"):
        ema.maybe_seed(nn.Sequential(nn.Linear(3, 2)))


def test_extra_policy_parameter_rejected():
    ema = EMATeacher(nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match=r"parameter 'bias' is in the policy but not in the teacher"):
        ema.maybe_seed(nn.Linear(3, 2))


def test_mismatched_parameter_shapes_rejected():
    ema = EMATeacher(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"parameter 'weight': teacher shape \(2, 3\) != policy shape \(2, 4"):
        ema.maybe_seed(nn.Linear(4, 2))


# --------------------------------------------------------------------------------------------------
# Checkpointing
# --------------------------------------------------------------------------------------------------


def trained_ema() -> tuple[EMATeacher, nn.Module]:
    policy = make_model(0)
    ema = EMATeacher(make_model(1), decay=0.95)
    ema.maybe_seed(policy)
    for step in range(3):
        perturb(policy, seed=step)
        ema.update(policy)
    return ema, policy


def test_state_dict_is_the_counters_and_round_trips():
    """state_dict() is the small part a checkpoint keeps in its common part; the parameters are the
    teacher module's tensors (saved sharded by the checkpointer, or teacher.state_dict() here)."""
    ema, policy = trained_ema()
    buffer = io.BytesIO()
    torch.save({"counters": ema.state_dict(), "params": ema.teacher.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert saved["counters"] == {"decay": 0.95, "initialized": True, "num_updates": 3}
    assert all(t.dtype == torch.float32 for t in saved["params"].values())

    fresh = EMATeacher(make_model(2), decay=0.95)  # different random init
    fresh.load_state_dict(saved["counters"])
    fresh.teacher.load_state_dict(saved["params"])

    assert fresh.state_dict() == ema.state_dict()
    assert_params_close(params(fresh.teacher), params(ema.teacher), atol=0)
    # And it keeps going identically.
    perturb(policy, seed=10)
    ema.update(policy)
    fresh.update(policy)
    assert_params_close(params(fresh.teacher), params(ema.teacher), atol=0)


def test_load_keeps_this_runs_decay_and_warns(caplog):
    """The decay is a hyper-parameter of the run (its config), not progress: a checkpoint's differs,
    the teacher keeps its own and says so."""
    ema, _ = trained_ema()
    target = EMATeacher(make_model(2), decay=0.99)
    with caplog.at_level("WARNING", logger="nemo_rlp"):
        target.load_state_dict(ema.state_dict())
    assert target.decay == 0.99 and target.initialized and target.num_updates == 3
    assert "the checkpoint used 0.95, this run uses 0.99" in caplog.text


def test_load_with_missing_key_rejected_and_leaves_counters_untouched():
    ema, _ = trained_ema()
    state = ema.state_dict()
    del state["num_updates"]
    target = EMATeacher(make_model(2))
    with pytest.raises(ValueError, match=r"missing key 'num_updates'"):
        target.load_state_dict(state)
    assert not target.initialized and target.num_updates == 0
