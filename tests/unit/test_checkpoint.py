"""Checkpoints, resume, preemption and the non-finite guard (nemo_rlp.training.checkpoint,
preemption, policy, loop), in one process; SIGTERM to a running job is in
tests/integration/test_train_entry_point.py, the SIGKILL/TP tests in tests/distributed/test_resume.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.training import checkpoint as ckpt
from nemo_rlp.training import steps as steps_module
from nemo_rlp.training.loop import Trainer, TrainingHalted
from nemo_rlp.training.losses import NTPLoss
from nemo_rlp.training.preemption import PreemptionHandler

from tests.tiny_run import TINY_RUN


FAST = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=1"]
COMPARED = ("ntp_loss", "reward_mean", "s_pred_mean", "s_ema_mean", "grad_norm", "thought_len_mean", "lr")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _fake_checkpoint(root: Path, name: str, marker_step: int | None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if marker_step is not None:
        (path / ckpt.MARKER).write_text(json.dumps({"step": marker_step}))
    return path


# --------------------------------------------------------------------------------------------------
# Discovery, atomicity, keep-last-k, the default directory
# --------------------------------------------------------------------------------------------------


def test_only_complete_checkpoints_are_picked(tmp_path):
    _fake_checkpoint(tmp_path, "step_0000002", 2)
    _fake_checkpoint(tmp_path, "step_0000004", None)  # no marker: the save did not finish
    _fake_checkpoint(tmp_path, "step_0000006.tmp", 6)  # marker written, rename never happened
    _fake_checkpoint(tmp_path, "step_0000007.tmp", None)  # interrupted mid-write
    _fake_checkpoint(tmp_path, "step_0000008", 3)  # a marker that names another step
    (tmp_path / "step_0000009").write_text("not a directory")
    _fake_checkpoint(tmp_path, "latest", 10)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_0000002"
    assert ckpt.find_latest(tmp_path / "absent") is None
    (tmp_path / "step_0000004" / ckpt.MARKER).write_text("{\"step\": 4")  # torn JSON
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_0000002"


def test_keep_last_k_deletes_the_oldest_complete_ones_only(tmp_path):
    for step in (1, 2, 3, 10, 20):
        _fake_checkpoint(tmp_path, ckpt.step_dir_name(step), step)
    _fake_checkpoint(tmp_path, "step_0000030.tmp", None)
    deleted = ckpt.keep_last(tmp_path, 2)
    assert [p.name for p in deleted] == ["step_0000001", "step_0000002", "step_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000010", "step_0000020", "step_0000030.tmp"]


def test_resume_path_resolves_a_step_or_a_directory(tmp_path):
    _fake_checkpoint(tmp_path, "step_0000002", 2)
    _fake_checkpoint(tmp_path, "step_0000005", 5)
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step_0000005"
    assert ckpt.resolve_checkpoint(tmp_path / "step_0000002") == tmp_path / "step_0000002"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint\.resume="):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_default_directory_is_the_same_for_the_same_command(tmp_path):
    base = load_config(["trainer.steps=5"])
    # Keys that change between invocations of one run do not change the directory ...
    same = load_config(["trainer.steps=50", "logging.log_every=5", "checkpoint.every_steps=7",
                        "parallel.tensor_model_parallel_size=2"])
    assert ckpt.run_id(base) == ckpt.run_id(same)
    assert ckpt.run_id(base).startswith(f"{base.model.name}-") and base.model.name == "demo_hybrid"
    # ... a change to what is trained does.
    assert ckpt.run_id(base) != ckpt.run_id(load_config(["rlp.group_size=8"]))
    assert ckpt.default_output_dir(base, cwd=tmp_path) == tmp_path / "outputs" / ckpt.run_id(base)
    assert ckpt.checkpoint_dir(base, cwd=tmp_path) == tmp_path / "outputs" / ckpt.run_id(base) / "checkpoints"
    assert ckpt.checkpoint_dir(load_config([f"logging.output_dir={tmp_path}/run"])) == tmp_path / "run" / "checkpoints"
    explicit = load_config([f"logging.output_dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ck"])
    assert ckpt.checkpoint_dir(explicit) == tmp_path / "ck"


# --------------------------------------------------------------------------------------------------
# Save and resume in one process
# --------------------------------------------------------------------------------------------------


def test_resume_auto_continues_exactly_and_metrics_hold_one_history(tmp_path):
    overrides = FAST + ["checkpoint.every_steps=2", "trainer.lr_decay_style=cosine", "trainer.lr_warmup_steps=2"]
    reference = Trainer(load_config(overrides + ["trainer.steps=6"]), tmp_path / "reference").train()
    assert reference.steps == 6
    ref = _records(tmp_path / "reference" / "metrics.jsonl")

    out = tmp_path / "run"
    first = Trainer(load_config(overrides + ["trainer.steps=6"]), out)
    first.train_step()
    first.train_step()
    first.save()  # step 2
    first.train_step()
    first.train_step()
    first.save()  # step 4
    # A save that crashed after writing everything but before its rename: never picked.
    real_replace = os.replace
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash before the rename")))
        first.train_step()
        with pytest.raises(OSError, match="crash before the rename"):
            first.save()  # step 5
    assert os.replace is real_replace
    assert (out / "checkpoints" / "step_0000005.tmp" / ckpt.MARKER).is_file()
    assert ckpt.find_latest(out / "checkpoints") == out / "checkpoints" / "step_0000004"
    # The interrupted invocation had logged steps past its last checkpoint.
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref[:5]) + '{"step": 5, "kin')

    resumed = Trainer(load_config(overrides + ["trainer.steps=6"]), out)
    assert resumed.resumed_from == out / "checkpoints" / "step_0000004" and resumed.step == 4
    assert resumed.model.scheduler.num_steps == 4 and resumed.model.ema.num_updates == 2
    summary = resumed.train()
    assert summary.steps == 6 and summary.ntp_steps == reference.ntp_steps
    got = _records(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(6))
    for r, g in zip(ref, got):
        assert {k: r[k] for k in COMPARED if k in r} == {k: g[k] for k in COMPARED if k in r}, r["step"]
    # The stale .tmp went with the next save; keep_last=2 keeps steps 4 and 6 ... of this run.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    saved_config = json.loads((out / "checkpoints" / "step_0000006" / ckpt.CONFIG_FILE).read_text())
    assert saved_config["trainer"]["lr_decay_style"] == "cosine"


def test_resume_never_starts_fresh_and_a_finished_run_does_nothing(tmp_path):
    cfg = load_config(FAST + ["trainer.steps=2"])
    Trainer(cfg, tmp_path).train()
    again = Trainer(cfg, tmp_path)
    assert again.step == 2
    assert again.train().steps == 2  # nothing left to do
    fresh = Trainer(load_config(FAST + ["trainer.steps=2", "checkpoint.resume=never"]), tmp_path)
    assert fresh.step == 0 and fresh.resumed_from is None


def test_a_checkpoint_of_another_model_is_rejected_clearly(tmp_path):
    Trainer(load_config(FAST + ["trainer.steps=1"]), tmp_path / "a").train()
    with pytest.raises(ConfigError, match="does not fit this model"):
        Trainer(load_config(FAST + ["trainer.steps=1", "model=tiny_gpt",
                                    f"checkpoint.resume={tmp_path / 'a' / 'checkpoints'}"]), tmp_path / "b")


# --------------------------------------------------------------------------------------------------
# A checkpoint writer that dies or hangs cannot hang training
# --------------------------------------------------------------------------------------------------


def _no_live_writers(before: set[int]) -> bool:
    """No process that a save forked is still running (killed ones may wait to be reaped)."""
    import psutil

    for pid in ckpt.child_pids() - before:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _trainer_with_a_checkpoint(tmp_path, *overrides):
    trainer = Trainer(load_config(FAST + ["trainer.steps=6", *overrides]), tmp_path)
    trainer.train_step()
    trainer.save()  # step 1: the previous complete checkpoint
    trainer.train_step()
    return trainer


def test_a_writer_process_that_dies_fails_the_save_at_once(tmp_path, monkeypatch):
    """The hang of a fresh machine without psutil, reproduced: megatron's writer worker raises
    outside its own error handling (in `_process_memory`) and never reports; the save used to wait
    on its queue forever."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    trainer = _trainer_with_a_checkpoint(tmp_path)
    before = ckpt.child_pids()

    def no_psutil():
        raise RuntimeError("psutil is not installed, please install it with `pip install psutil`")

    monkeypatch.setattr(filesystem_async, "_process_memory", no_psutil)
    start = time.monotonic()
    # megatron-core up to 0.18: the worker dies unreported and the watchdog sees it end; 0.19 catches
    # the worker's error itself and reports it. Either way the save fails at once, naming why.
    with pytest.raises(ckpt.CheckpointWriteError,
                       match=r"writer process \d+ ended \(exit status 1\)|Worker failure: .*psutil is not installed"):
        trainer.save()  # step 2
    assert time.monotonic() - start < 30
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]  # the failed save's .tmp is gone
    assert _no_live_writers(before)
    monkeypatch.undo()
    resumed = Trainer(load_config(FAST + ["trainer.steps=6"]), tmp_path)
    assert resumed.resumed_from == root / "step_0000001" and resumed.step == 1


def test_a_stuck_writer_fails_the_save_at_its_deadline(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    trainer = _trainer_with_a_checkpoint(tmp_path, "checkpoint.save_timeout_s=3")
    before = ckpt.child_pids()
    monkeypatch.setattr(filesystem_async, "_process_memory", lambda: time.sleep(3600))
    start = time.monotonic()
    with pytest.raises(ckpt.CheckpointWriteError, match=r"did not finish within checkpoint.save_timeout_s=3 s"):
        trainer.save()
    assert 3 <= time.monotonic() - start < 30
    assert _no_live_writers(before)
    assert ckpt.find_latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_0000001"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


# --------------------------------------------------------------------------------------------------
# Preemption in one process
# --------------------------------------------------------------------------------------------------


def test_preemption_handler_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(["SIGUSR1"]) as handler:
        assert not handler.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested() and handler.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_saves_at_the_next_step_boundary_and_stops(tmp_path, monkeypatch):
    trainer = Trainer(load_config(FAST + ["trainer.steps=50", "checkpoint.every_steps=0"]), tmp_path)
    real_step = trainer.train_step

    def step_then_signal():
        out = real_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    summary = trainer.train()
    assert summary.preempted == "SIGUSR1" and summary.steps == 3
    assert ckpt.find_latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_0000003"


# --------------------------------------------------------------------------------------------------
# Non-finite loss, rewards and gradients
# --------------------------------------------------------------------------------------------------


def _state(trainer: Trainer) -> tuple[dict, dict, int, int]:
    params = {n: p.detach().clone() for n, p in trainer.model.language_model.named_parameters()}
    teacher = {n: p.detach().clone() for n, p in trainer.model.ema.teacher.named_parameters()}
    adam_steps = [int(s["step"]) for s in trainer.model.optimizer.optimizer.state.values() if "step" in s]
    return params, teacher, trainer.model.scheduler.num_steps, max(adam_steps, default=0)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_skips_the_update_and_stops_after_n_in_a_row(tmp_path, monkeypatch):
    cfg = load_config(FAST + ["trainer.steps=20", "trainer.schedule.rlp_per_cycle=0", "trainer.max_consecutive_skips=3"])
    trainer = Trainer(cfg, tmp_path)
    trainer.train_step()
    before = _state(trainer)
    real_call = NTPLoss.__call__

    def nan_loss(self, logprobs):
        share, metrics, units = real_call(self, logprobs)
        return share * float("nan"), {k: v * float("nan") for k, v in metrics.items()}, units

    monkeypatch.setattr(NTPLoss, "__call__", nan_loss)
    for expected in (1, 2):
        output = trainer.train_step()
        metrics = output.metrics
        assert metrics["updated"] == 0.0 and metrics["skipped_updates"] == 1.0
        assert output.skip_reason == "non-finite ntp_loss=nan"
        assert all(isinstance(v, float) for v in metrics.values())  # the reason is not among the numbers
        assert trainer.consecutive_skips == expected
    after = _state(trainer)
    assert _same(before[0], after[0]) and _same(before[1], after[1]) and before[2:] == after[2:]
    # A good step in between resets the count.
    monkeypatch.setattr(NTPLoss, "__call__", real_call)
    output = trainer.train_step()
    assert output.metrics["updated"] == 1.0 and output.skip_reason is None and trainer.consecutive_skips == 0
    monkeypatch.setattr(NTPLoss, "__call__", nan_loss)
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(TrainingHalted) as err:
        trainer.train_step()
    message = str(err.value)
    assert "3 consecutive steps" in message and "trainer.max_consecutive_skips=3" in message
    assert "ntp_loss=nan" in message
    assert trainer.summary.skipped_steps == 5


def test_nonfinite_gradients_skip_the_update(tmp_path, monkeypatch):
    trainer = Trainer(load_config(FAST + ["trainer.steps=20"]), tmp_path)
    before = _state(trainer)
    real_schedule = steps_module.run_schedule

    def poisoned(model, losses, forward_only=False):
        out = real_schedule(model, losses, forward_only)
        if not forward_only:
            next(model.language_model.parameters()).main_grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(steps_module, "run_schedule", poisoned)
    output = trainer.train_step()
    kind, metrics = output.kind, output.metrics
    assert kind == "ntp" and metrics["updated"] == 0.0 and metrics["ntp_loss"] == metrics["ntp_loss"]
    assert output.skip_reason.startswith("non-finite gradients")
    assert _same(before[0], _state(trainer)[0])
    assert trainer.consecutive_skips == 1


def test_nonfinite_rewards_skip_the_rlp_update_and_the_ema(tmp_path, monkeypatch):
    trainer = Trainer(load_config(FAST + ["trainer.steps=20", "trainer.schedule.ntp_warmup_steps=0",
                                          "trainer.schedule.ntp_per_cycle=0"]), tmp_path)
    real_contexts = steps_module.sample_contexts

    def nan_teacher(*args, **kwargs):
        contexts, s_ema = real_contexts(*args, **kwargs)
        return contexts, s_ema * float("nan")

    monkeypatch.setattr(steps_module, "sample_contexts", nan_teacher)
    trainer.model.seed_teacher()
    before = _state(trainer)
    output = trainer.train_step()
    kind, metrics = output.kind, output.metrics
    assert kind == "rlp" and metrics["updated"] == 0.0 and metrics["reward_mean"] != metrics["reward_mean"]
    assert "reward_mean=nan" in output.skip_reason and "s_ema_mean=nan" in output.skip_reason
    after = _state(trainer)
    assert _same(before[0], after[0]) and _same(before[1], after[1])
    assert trainer.model.ema.num_updates == 0


def test_the_guard_watches_exactly_the_declared_metrics(tmp_path, monkeypatch):
    """Each loss declares the metrics the non-finite guard watches, by exact name: a non-finite one
    skips the update, and one the metrics lack (a renamed metric) fails loudly instead of leaving
    the guard blind. An undeclared metric is not watched."""
    from nemo_rlp.training.policy import nonfinite_metrics

    assert nonfinite_metrics({"ntp_loss": 1.0, "other": float("nan")}, NTPLoss.guarded_metrics) == []
    assert nonfinite_metrics({"ntp_loss": float("inf")}, NTPLoss.guarded_metrics) == ["ntp_loss=inf"]
    with pytest.raises(KeyError, match=r"watches \['ntp_loss'\], which the step's metrics lack"):
        nonfinite_metrics({"ntp_loss_renamed": 1.0}, NTPLoss.guarded_metrics)

    trainer = Trainer(load_config(FAST + ["trainer.steps=20", "trainer.schedule.rlp_per_cycle=0"]), tmp_path)
    real_call = NTPLoss.__call__

    def renamed(self, logprobs):
        share, metrics, units = real_call(self, logprobs)
        return share, {"token_loss": metrics["ntp_loss"]}, units

    monkeypatch.setattr(NTPLoss, "__call__", renamed)
    before = _state(trainer)
    with pytest.raises(KeyError, match="ntp_loss"):
        trainer.train_step()
    assert _same(before[0], _state(trainer)[0])  # nothing was stepped

    def nan_declared(self, logprobs):
        share, metrics, units = real_call(self, logprobs)
        return share, {"ntp_loss": metrics["ntp_loss"] * float("nan")}, units

    monkeypatch.setattr(NTPLoss, "__call__", nan_declared)
    output = trainer.train_step()  # a finite loss share, a non-finite declared metric: skipped
    assert output.metrics["updated"] == 0.0 and output.skip_reason == "non-finite ntp_loss=nan"
    assert _same(before[0], _state(trainer)[0]) and before[2:] == _state(trainer)[2:]


def _equal(a, b) -> bool:
    """Deep equality of state dicts: nested dicts, sequences, tensors, numpy arrays, plain values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def test_every_stateful_component_round_trips(tmp_path):
    """What a checkpoint holds besides the sharded tensors is a dict of Stateful components, under the
    keys of the on-disk format; each one's state_dict() loads into a fresh one and gives it the
    same state."""
    overrides = FAST + ["trainer.steps=6", "checkpoint.resume=never"]
    trained = Trainer(load_config(overrides), tmp_path / "a")
    for _ in range(3):  # NTP, then RLP: the teacher is seeded and counted, the streams have moved
        trained.train_step()
    assert trained.summary.rlp_steps >= 1 and trained.model.ema.num_updates >= 1
    fresh = Trainer(load_config(overrides), tmp_path / "b")
    components, fresh_components = trained.stateful_components(), fresh.stateful_components()
    ranks, fresh_ranks = trained.rank_components(), fresh.rank_components()
    assert list(components) == ["scheduler", "ema", "trainer"]  # the common part's keys on disk
    assert list(ranks) == ["ntp_batches", "context_sampler", "generator"]
    for key in [*components, *ranks]:
        component = components[key] if key in components else ranks[key]
        target = fresh_components[key] if key in components else fresh_ranks[key]
        assert not _equal(target.state_dict(), component.state_dict()), key  # the test can fail
        target.load_state_dict(component.state_dict())
        assert _equal(target.state_dict(), component.state_dict()), key
    assert fresh.step == 3 and fresh.model.ema.initialized and fresh.model.scheduler.num_steps == 3


def test_init_weights_starts_the_policy_from_a_checkpoint_and_nothing_else(tmp_path):
    first = Trainer(load_config(FAST + ["trainer.steps=2"]), tmp_path / "a")
    first.train()
    trained = {n: p.detach().clone() for n, p in first.model.language_model.named_parameters()}
    step_dir = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))[-1]
    run = Trainer(load_config(FAST + ["trainer.steps=2", f"checkpoint.init_weights={step_dir}"]), tmp_path / "b")
    # The weights, and only the weights: a fresh run at step 0, its EMA teacher not yet seeded.
    assert run.step == 0 and run.resumed_from is None and not run.model.ema.initialized
    for name, param in run.model.language_model.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    assert run.train().steps == 2
    with pytest.raises(ConfigError, match=r"checkpoint\.init_weights"):
        load_config([f"checkpoint.init_weights={tmp_path}"])


def test_a_full_disk_is_named_from_the_errno_or_the_writers_logged_worker_error(tmp_path):
    """megatron-core 0.17+ runs its writers in threads and passes a worker's exception on as its class
    only ("... error: <class 'OSError'>"): the logged worker error, added as a note, names the cause."""
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from nemo_rlp.training.checkpoint_writer import describe_failure, writer_layout

    assert hasattr(filesystem_async, writer_layout()[0])  # the table matches the installed release
    assert describe_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path).startswith("no space left")
    wrapped = RuntimeError("Worker failure: An error is caught while starting worker 0, error: <class 'OSError'>")
    assert not describe_failure(wrapped, tmp_path).startswith("no space left")
    wrapped.add_note("megatron-core's checkpoint writer logged: Local worker 0 encountered an error: "
                     "[Errno 28] No space left on device")
    assert describe_failure(wrapped, tmp_path).startswith(f"no space left on the file system of {tmp_path}")
