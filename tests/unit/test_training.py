"""The walking skeleton end to end, in one process: the interleaved steps, the EMA teacher, the
gradient path of the RLP loss, and validation of bad overrides (the entry point itself, in a
subprocess: tests/integration/test_train_entry_point.py)."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ConfigError, load_config, lr_cooldown_updates
from nemo_rlp.rollout.sampler import SamplingParams, sample_thoughts
from nemo_rlp.training.losses import RLPLoss, RLPRows
from nemo_rlp.training.loop import Trainer
from nemo_rlp.training.schedule import NTP, RLP, step_kind
from nemo_rlp.training.steps import rlp_step, run_schedule, sample_contexts

from nemo_rlp.training.report import read_metrics
from tests.tiny_run import TINY_RUN
from tests.drawn import drawn_contexts


# Small and fast: 4 contexts x G=3 thoughts of at most 6 tokens, RLP from the first step on.
FAST = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=0"]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().float() for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    cfg = load_config(FAST + ["trainer.steps=100"])
    return Trainer(cfg, tmp_path_factory.mktemp("run"))


def test_schedule_interleaves_after_warmup():
    cfg = load_config(["trainer.schedule.ntp_warmup_steps=2", "trainer.schedule.ntp_per_cycle=1",
                       "trainer.schedule.rlp_per_cycle=2"]).trainer.schedule
    assert [step_kind(i, cfg) for i in range(8)] == [NTP, NTP, NTP, RLP, RLP, NTP, RLP, RLP]


def test_parameters_change_over_ntp_and_rlp_steps(trainer):
    before = _snapshot(trainer.model.language_model)
    kinds = []
    for _ in range(4):
        output = trainer.train_step()
        kind, metrics = output.kind, output.metrics
        kinds.append(kind)
        assert metrics["updated"] == 1.0
    assert sorted(kinds) == [NTP, NTP, RLP, RLP]
    after = _snapshot(trainer.model.language_model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"


def test_ema_teacher_is_tau_mix_after_a_step(tmp_path):
    cfg = load_config(FAST + ["trainer.steps=4", "trainer.schedule.ntp_per_cycle=0"])
    fresh = Trainer(cfg, tmp_path)
    assert not fresh.model.ema.initialized  # lazy: not seeded at construction
    theta0 = _snapshot(fresh.model.language_model)
    kind = fresh.train_step().kind
    assert kind == RLP and fresh.model.ema.initialized
    theta1 = _snapshot(fresh.model.language_model)
    phi = _snapshot(fresh.model.ema.teacher)
    tau = cfg.rlp.ema_decay
    moved = 0
    for name in theta0:
        expected = tau * theta0[name].double() + (1 - tau) * theta1[name].double()
        torch.testing.assert_close(phi[name].double(), expected, atol=1e-7, rtol=1e-6)
        moved += int(not torch.equal(phi[name], theta1[name]))
    assert moved == len(theta0), "the teacher must differ from the policy after a step"
    assert all(p.dtype == torch.float32 for p in fresh.model.ema.teacher.parameters())


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    # megatron's DDP accumulates gradients into `main_grad` buffers.
    return {n: p.main_grad.detach().clone() for n, p in trainer.model.language_model.named_parameters()}


def _rlp_backward(trainer: Trainer, s_pred_fn) -> dict[str, torch.Tensor]:
    """Rollouts, then one forward-backward through megatron's schedule with the RLP loss, its
    S_pred replaced by `s_pred_fn(S_pred [B, G])`; returns the finalised gradients (no step)."""
    cfg, model = trainer.cfg, trainer.model
    model.seed_teacher()
    contexts, _ = sample_contexts(model, trainer.context_sampler, cfg.rlp.contexts_per_step,
                                  trainer.markers.pad, trainer.layout.device)
    params = SamplingParams(cfg.rlp.group_size, cfg.rlp.max_thought_len, cfg.rlp.temperature)
    batch = sample_thoughts(model.policy, [c.prefix for c in contexts], [c.target for c in contexts],
                            params, trainer.markers, trainer.generator, trainer.layout.device)
    B, G = len(contexts), cfg.rlp.group_size
    index, mask = batch.thought_token_index()
    rows = RLPRows.from_groups(s_pred_fn(batch.s_pred.view(B, G)), torch.zeros(B))
    loss = RLPLoss(tokens=batch.tokens, thought_index=index, thought_mask=mask, answer_index=batch.answer_index,
                   rows=rows, global_thoughts=B * G, eps_low=cfg.rlp.eps_low, eps_high=cfg.rlp.eps_high)
    model.policy.train()
    model.zero_grad()
    run_schedule(model, [loss])
    return _grads(trainer)


def test_zero_advantages_give_zero_gradients(trainer):
    # Every thought of a group equally good: A = 0, so nothing may move, on any parameter.
    grads = _rlp_backward(trainer, lambda s: torch.full_like(s, -1.5))
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    # The same batch shape with unequal rewards does produce gradients (the test can fail).
    grads = _rlp_backward(trainer, lambda s: torch.arange(s.numel(), dtype=s.dtype).view_as(s))
    assert sum(int(torch.count_nonzero(g)) for g in grads.values()) > 0
    trainer.model.zero_grad()


def test_rlp_step_metrics_are_consistent(trainer):
    state = trainer.context_sampler.state_dict()
    contexts = drawn_contexts(trainer.context_sampler, trainer.cfg.rlp.contexts_per_step)
    trainer.context_sampler.load_state_dict(state)  # the step draws these same contexts
    output = rlp_step(trainer.model, trainer.context_sampler, trainer.cfg.rlp.contexts_per_step,
                      trainer.cfg.rlp, trainer.markers, trainer.generator, trainer.layout.device)
    assert output.kind == RLP and output.skip_reason is None
    metrics, batch, rewards = output.metrics, output.batch, output.rewards
    assert set(RLPLoss.guarded_metrics) <= set(metrics)  # the guard watched these very names
    G = trainer.cfg.rlp.group_size
    assert batch.tokens.shape[0] == len(contexts) * G
    assert rewards.shape == (len(contexts), G)
    assert metrics["reward_mean"] == pytest.approx(float(rewards.mean()), abs=1e-5)
    assert metrics["reward_pos_frac"] == pytest.approx(float((rewards > 0).float().mean()), abs=1e-6)
    assert 1 <= metrics["thought_len_mean"] <= trainer.cfg.rlp.max_thought_len
    # Each row ends with its context's real next token x_t.
    for b, ctx in enumerate(contexts):
        for g in range(G):
            row = b * G + g
            assert int(batch.tokens[row, batch.answer_index[row]]) == ctx.target
            assert batch.tokens[row, : len(ctx.prefix)].tolist() == list(ctx.prefix)
            assert int(batch.tokens[row, len(ctx.prefix)]) == trainer.markers.think_start
    # On-policy single update: every ratio is exactly 1, so nothing is clipped.
    assert metrics["ratio_max"] == pytest.approx(1.0) and metrics["clip_frac"] == 0.0
    # The sampler's own behaviour log-probs and S_pred agree with the training forward.
    assert metrics["logp_mismatch_max"] < 1e-4 and metrics["s_pred_mismatch_max"] < 1e-4


@pytest.mark.parametrize(
    "override, key",
    [
        ("rlp.group_size=1", "rlp.group_size"),
        ("rlp.max_thought_len=-5", "rlp.max_thought_len"),
        ("rlp.ema_decay=1.0", "rlp.ema_decay"),
        ("rlp.temperature=0", "rlp.temperature"),
        ("data.max_context=2", "data.max_context"),
        ("trainer.steps=0", "trainer.steps"),
        ("trainer.schedule.rlp_per_cycle=0", "trainer.schedule"),
        ("model.max_sequence_length=16", "model.max_sequence_length"),
        ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size"),
        ("+rlp.group_sise=4", "group_sise"),
        ("rlp.group_sise=4", "group_sise"),
        ("rlp.group_size=four", "rlp.group_size"),
    ],
)
def test_bad_override_is_rejected_naming_the_key(override, key):
    extra = ["trainer.schedule.ntp_per_cycle=0"] if "rlp_per_cycle" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([override, *extra])


def test_rlp_steps_with_windows_and_a_position_filter(tmp_path):
    """k positions per document window, scored by one teacher forward, and the log-prob band."""
    cfg = load_config(FAST + ["trainer.steps=2", "trainer.schedule.ntp_per_cycle=0",
                              "data.positions_per_document=2", "data.logprob_band=[-7.0,-0.5]",
                              "data.rlp_positions=uniform"])
    run = Trainer(cfg, tmp_path)
    for _ in range(2):
        output = run.train_step()
        kind, metrics = output.kind, output.metrics
        assert kind == RLP and metrics["updated"] == 1.0
    assert metrics["data_contexts"] == 2 * cfg.rlp.contexts_per_step
    assert metrics["data_windows"] <= metrics["data_contexts"] / 2 + 2
    assert 0.0 < metrics["data_filter_pass_frac"] <= 1.0


@pytest.mark.parametrize("source", ["recompute", "sampler"])
def test_several_minibatches_per_rollout_batch(tmp_path, source):
    """Two optimizer steps on one rollout batch: the second sees a moved policy (ratio != 1)."""
    cfg = load_config(FAST + ["trainer.steps=1", "trainer.schedule.ntp_per_cycle=0", "rlp.num_minibatches=2",
                              f"rlp.logprob_source={source}", "rlp.micro_batch_contexts=1"])
    run = Trainer(cfg, tmp_path)
    output = run.train_step()
    kind, metrics = output.kind, output.metrics
    assert kind == RLP and metrics["updated"] == 1.0
    assert run.model.ema.num_updates == 2  # one EMA update per optimizer step
    # Ratios are 1 on the first minibatch (theta_old) and move on the second: their max over both is > 1.
    assert metrics["ratio_max"] > 1.0 + 1e-6
    # The sampler's log-probs and the training forward's agree (CPU, fp32).
    assert metrics["logp_mismatch_max"] < 1e-4


def test_num_minibatches_beyond_contexts_is_rejected():
    with pytest.raises(ConfigError, match=r"rlp\.num_minibatches"):
        load_config(["rlp.contexts_per_step=2", "rlp.num_minibatches=3"])


@pytest.mark.parametrize("source", ["sampler", "recompute"])
def test_microbatches_that_split_groups_train_like_whole_groups(tmp_path, source):
    """rlp.micro_batch_rows=2 with G=3: microbatches cut through groups, and the update is the one
    whole-group microbatches give (advantages come from whole groups either way)."""
    common = FAST + ["trainer.steps=1", "trainer.schedule.ntp_per_cycle=0", f"rlp.logprob_source={source}",
                     "checkpoint.resume=never"]
    runs = {}
    for rows in (0, 2):
        run = Trainer(load_config(common + [f"rlp.micro_batch_rows={rows}"]), tmp_path / f"rows{rows}")
        output = run.train_step()
        kind, metrics = output.kind, output.metrics
        assert kind == RLP and metrics["updated"] == 1.0
        runs[rows] = (_snapshot(run.model.language_model), metrics)
    (whole, m_whole), (split, m_split) = runs[0], runs[2]
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=0, msg=name)
    assert m_split["reward_mean"] == pytest.approx(m_whole["reward_mean"], abs=1e-6)
    assert m_split["loss_pg"] == pytest.approx(m_whole["loss_pg"], abs=1e-6)


RLP_METRIC_KEYS = {
    "loss_pg", "kl", "reward_mean", "reward_std", "reward_group_std", "reward_pos_frac", "adv_std", "clip_frac",
    "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "thought_len_mean", "s_pred_mean", "s_ema_mean",
    "logp_mismatch_max", "s_pred_mismatch_max",
}


def test_every_rlp_configuration_logs_the_same_metric_keys(tmp_path):
    """Whole groups, split groups, several minibatches (both log-prob sources) and the KL anchor:
    one loss path, so one set of keys, the diagnostics and the sampler check included."""
    common = FAST + ["trainer.steps=1", "trainer.schedule.ntp_per_cycle=0", "checkpoint.resume=never"]
    configurations = {
        "whole groups": [],
        "split groups": ["rlp.micro_batch_rows=2"],
        "minibatches": ["rlp.num_minibatches=2", "rlp.micro_batch_contexts=1"],
        "minibatches, sampler": ["rlp.num_minibatches=2", "rlp.logprob_source=sampler", "rlp.micro_batch_rows=2"],
        "kl, split groups": ["rlp.kl_beta=0.01", "rlp.micro_batch_rows=2", "trainer.steps=2"],
    }
    keys = {}
    for name, extra in configurations.items():
        run = Trainer(load_config(common + extra), tmp_path / name.replace(", ", "_").replace(" ", "_"))
        for _ in range(run.cfg.trainer.steps):  # with KL: a second step, once the teacher lags the policy
            output = run.train_step()
            kind, metrics = output.kind, output.metrics
            assert kind == RLP and metrics["updated"] == 1.0, name
        keys[name] = {k for k in metrics if k in RLP_METRIC_KEYS or k.startswith(("reward", "s_pred", "s_ema", "kl",
                                                                                      "clip", "ratio", "adv", "loss"))}
        if "kl" in name:
            assert metrics["kl"] > 0.0  # the anchor is on, and the teacher lags the policy after one update
    for name, found in keys.items():
        assert found == RLP_METRIC_KEYS, f"{name}: missing {RLP_METRIC_KEYS - found}, extra {found - RLP_METRIC_KEYS}"


def test_split_groups_need_no_extra_forward(tmp_path, monkeypatch):
    """Split groups with one minibatch: advantages from the rollout's S_pred, no scoring pass, and
    the first (only) update's ratio is exactly 1."""
    import nemo_rlp.training.steps as steps

    calls = []
    monkeypatch.setattr(steps, "_scores", lambda *a, **k: calls.append(a) or pytest.fail("extra forward"))
    cfg = load_config(FAST + ["trainer.steps=1", "trainer.schedule.ntp_per_cycle=0", "rlp.micro_batch_rows=2",
                              "checkpoint.resume=never"])
    output = Trainer(cfg, tmp_path).train_step()
    kind, metrics = output.kind, output.metrics
    assert kind == RLP and not calls
    assert metrics["ratio_max"] == 1.0 and metrics["clip_frac"] == 0.0
    assert metrics["s_pred_mismatch_max"] < 1e-4


def test_chunked_rollouts_scoring_and_row_microbatches_run(tmp_path):
    cfg = load_config(FAST + ["trainer.steps=2", "trainer.schedule.ntp_per_cycle=0", "rlp.rollout_batch_contexts=1",
                              "rlp.score_batch_windows=1", "rlp.micro_batch_rows=2", "checkpoint.resume=never"])
    run = Trainer(cfg, tmp_path)
    for _ in range(2):
        output = run.train_step()
        kind, metrics = output.kind, output.metrics
        assert kind == RLP and metrics["updated"] == 1.0 and metrics["thought_len_mean"] >= 1


def test_grad_scale_scales_rlp_gradients_before_the_optimizer(trainer):
    """rlp.grad_scale multiplies the gradients the optimizer (and its clipping) sees, not just a
    learning rate: it is RLP's weight in the moments Adam shares with NTP."""
    grads = _rlp_backward(trainer, lambda s: torch.arange(s.numel(), dtype=s.dtype).view_as(s))
    result = trainer.model.optimizer_step({}, guarded=(), grad_scale=0.25)
    assert result.updated
    after = _grads(trainer)
    assert any(torch.count_nonzero(g) for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(after[name], 0.25 * g, msg=name)
    trainer.model.zero_grad()


def test_final_evaluation_is_redone_only_when_the_run_goes_on(tmp_path):
    """A rerun of a finished run keeps its final evaluation; raising trainer.steps evaluates again at
    the new end; the evaluation after the warm-up survives the resume."""
    with_eval = [o for o in FAST if o != "eval=none"] + [
        "eval=heldout", "eval.num_positions=4", "eval.batch_contexts=4", "trainer.schedule.ntp_warmup_steps=1",
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=0",
    ]
    first = Trainer(load_config(with_eval + ["trainer.steps=2"]), tmp_path / "a").train()
    assert first.evaluations["final"]["step"] == 2 and first.evaluations["after_warmup"]["step"] == 1
    again = Trainer(load_config(with_eval + ["trainer.steps=2"]), tmp_path / "b").train()
    assert again.evaluations["final"] == first.evaluations["final"]
    longer = Trainer(load_config(with_eval + ["trainer.steps=3"]), tmp_path / "c").train()
    assert longer.evaluations["final"]["step"] == 3 and longer.evaluations["after_warmup"]["step"] == 1


def test_periodic_evaluation_is_logged_and_leaves_training_alone(tmp_path):
    """eval.every_steps=2 over 5 steps: held-out figures logged as kind "eval" after steps 2 and 4
    (not at the end, which has the final evaluation); the one after step 4 is the final evaluation of
    a 4-step run, and the run's training records are those of a run without periodic evaluations (the
    evaluation draws from its own seed, not the training's generators)."""
    base = [o for o in FAST if o != "eval=none"] + [
        "eval=heldout", "eval.num_positions=4", "eval.batch_contexts=4", "eval.thought_seeds=1",
        "eval.after_warmup=false", "checkpoint.every_steps=0", "checkpoint.keep_steps=[]",
    ]

    def run(name, *more):
        summary = Trainer(load_config(base + [f"checkpoint.dir={tmp_path / name / 'ckpt'}", *more]),
                          tmp_path / name).train()
        return summary, read_metrics(tmp_path / name / "metrics.jsonl")

    summary, records = run("periodic", "eval.every_steps=2", "trainer.steps=5")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 3]  # 0-based like every record: after steps 2 and 4
    assert sorted(summary.evaluations) == ["final"]  # the periodic figures are in the metrics only
    four, _ = run("four", "trainer.steps=4")
    final4 = four.evaluations["final"]
    assert evals[1]["heldout_logprob_no_think"] == pytest.approx(final4["no_think"]["logprob"], abs=1e-6)
    assert evals[1]["heldout_accuracy_with_thought"] == pytest.approx(final4["with_thought"]["accuracy"])
    _, plain = run("plain", "trainer.steps=5")
    losses = lambda rs: [(r["kind"], r.get("ntp_loss"), r.get("reward_mean")) for r in rs if r["kind"] != "eval"]
    assert losses(records) == losses(plain) and len(losses(plain)) == 5
    with pytest.raises(ConfigError, match="eval.every_steps"):
        load_config(base + ["eval.every_steps=-1"])


def test_lr_cooldown_anneals_the_last_share_of_the_updates_after_the_warmup(tmp_path):
    """trainer.lr_cooldown_fraction=0.5 with 2 warm-up and 6 later steps: the last 3 updates get 3/3,
    2/3 and 1/3 of the lr; a run resumed inside the anneal continues it."""
    overrides = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=2", "trainer.steps=8", "trainer.lr=1e-3",
                 "trainer.lr_decay_style=constant", "trainer.lr_cooldown_fraction=0.5", "checkpoint.every_steps=0",
                 "checkpoint.keep_steps=[]"]
    cfg = load_config(overrides)
    assert lr_cooldown_updates(cfg) == (8, 3)
    Trainer(cfg, tmp_path / "run").train()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3] * 6 + [2e-3 / 3, 1e-3 / 3])
    first = Trainer(cfg, tmp_path / "resumed")
    for _ in range(7):
        first.train_step()
    first.save()
    first.checkpointer.wait()
    resumed = Trainer(cfg, tmp_path / "resumed")
    assert resumed.step == 7 and resumed.model.learning_rate == pytest.approx(1e-3 / 3)
    with pytest.raises(ConfigError, match="trainer.lr_cooldown_fraction"):
        load_config(overrides + ["trainer.lr_cooldown_fraction=1.5"])
