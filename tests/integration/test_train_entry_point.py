"""The training entry point as a user runs it (`python -m nemo_rlp.train`, a subprocess each): a
run with both step kinds and its files, bad overrides and values rejected before any work, and the
preemption path (SIGTERM to the job, a save, the requeue exit, the same command continuing; a second
SIGTERM ending a run whose save hangs)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_rlp.config import load_config
from nemo_rlp.training import checkpoint as ckpt
from nemo_rlp.training.preemption import REQUEUE_EXIT_CODE

from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]

# Small and fast: 4 contexts x G=3 thoughts of at most 6 tokens, RLP from the first step on.
FAST = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=0"]
# As tests/unit/test_checkpoint.py: RLP from the second step on.
FAST_AFTER_ONE = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=1"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_second_sigterm_ends_a_run_whose_save_hangs(tmp_path):
    """The first SIGTERM asks for a preemption save; that save hangs (a writer that never reports,
    with no deadline in sight); a second SIGTERM must end the process at once."""
    started = tmp_path / "writer_started"
    script = f"""
import time
from pathlib import Path
from megatron.core.dist_checkpointing.strategies import filesystem_async
from nemo_rlp.config import load_config
from nemo_rlp.training.loop import Trainer

def stuck():
    open({str(started)!r}, "w").close()
    time.sleep(3600)

filesystem_async._process_memory = stuck
cfg = load_config({FAST_AFTER_ONE + ["trainer.steps=500", "checkpoint.every_steps=0"]!r})
trainer = Trainer(cfg, Path({str(tmp_path / "run")!r}))
real_step = trainer.train_step
def step():
    out = real_step()
    if trainer.step == 2:
        print("step 2 done", flush=True)
    return out
trainer.train_step = step
trainer.train()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "step 2 done" in line:
                break
        proc.send_signal(signal.SIGTERM)  # the first: save, then exit for a requeue
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the preemption save never started"
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None  # the save hangs (the writer never reports)
        proc.send_signal(signal.SIGTERM)  # the second
        assert proc.wait(timeout=15) == -signal.SIGTERM
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stuck writer, orphaned by design of this test
        except ProcessLookupError:
            pass
        proc.wait()


def test_sigterm_to_the_job_saves_a_checkpoint_and_exits_for_requeue(tmp_path):
    """SIGTERM to every process of the run, as Slurm sends it; then the same command, from the same
    directory and with no output directory given, finds the checkpoint and finishes the run."""
    command = [sys.executable, "-m", "nemo_rlp.train", *FAST_AFTER_ONE, "trainer.steps=16", "checkpoint.every_steps=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"step +1/16 ", line):
                os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines)
    assert rc == REQUEUE_EXIT_CODE, log[-3000:]
    assert "received SIGTERM" in log and "checkpoint: step" in log
    run_dir = ckpt.default_output_dir(load_config(command[3:]), cwd=tmp_path)
    root = run_dir / "checkpoints"
    (saved,) = ckpt.complete_checkpoints(root)
    assert 1 <= saved[0] < 16

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert f"resumed from {saved[1]} at step {saved[0]}" in log
    assert ckpt.find_latest(root) == root / "step_0000016"
    # One history in one directory: the default output directory did not change with the resume.
    assert [r["step"] for r in _records(run_dir / "metrics.jsonl")] == list(range(16))
    # A finished run's rerun has nothing to do, and its report still plots the whole history (it
    # used to find an empty per-invocation directory and write a report with no plots).
    again = subprocess.run([*command, "logging.report=true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "nothing to do" in again.stdout + again.stderr
    assert (run_dir / "report" / "ntp_loss.png").is_file() and (run_dir / "report" / "reward.png").is_file()
    assert "![ntp_loss](ntp_loss.png)" in (run_dir / "report" / "report.md").read_text()


def test_entry_point_rejects_a_bad_checkpoint_value_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_rlp.train", "checkpoint.signals=[SIGKILL]", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode == 2
    assert "checkpoint.signals[0]='SIGKILL' is not allowed" in proc.stderr
    assert "training:" not in proc.stdout + proc.stderr


def test_entry_point_runs_rlp_and_ntp_steps(tmp_path):
    """`python -m nemo_rlp.train` with overrides: 2 NTP + 2 RLP steps, per-step lines, metrics files."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_rlp.train", *FAST, "trainer.steps=4", "logging.tensorboard=true",
         f"logging.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for kind, n in (("[ntp]", 2), ("[rlp]", 2)):
        assert log.count(kind) == n, log[-3000:]
    assert "reward=" in log and "end=" in log and "done." in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["ntp", "rlp", "ntp", "rlp"]
    for r in records[1::2]:
        for key in ("reward_mean", "reward_pos_frac", "thought_len_mean", "end_marker_rate", "clip_frac"):
            assert key in r and r[key] == r[key]  # present and not NaN
    assert any((out / "tensorboard").iterdir())
    assert json.loads((out / "resolved_config.json").read_text())["rlp"]["group_size"] == 3


@pytest.mark.parametrize("override, key", [("rlp.group_size=1", "rlp.group_size"),
                                           ("rlp.max_thought_len=-5", "rlp.max_thought_len"),
                                           ("rlp.no_such_key=1", "no_such_key")])
def test_entry_point_fails_at_startup_on_bad_override(tmp_path, override, key):
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_rlp.train", override, f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode != 0
    assert key in proc.stderr
    assert "training:" not in proc.stdout + proc.stderr  # rejected before any work
