"""Crash and resume through the real entry point: a run killed with SIGKILL at a random step (every
process of it, as a node failure would) and restarted with the same command continues with metrics
bitwise identical to an uninterrupted run, at TP=1 (`python -m nemo_rlp.train`) and at TP=2
(`torchrun --nproc-per-node 2`); a checkpoint saved at TP=2 (or PP=2) loads into one process and gives
the same losses.

Checkpoints are written every 2 steps, so a kill lands before, during or after a save; whichever,
the restarted run must pick only a complete checkpoint. The TP=1 crashed run saves asynchronously
(megatron-core's async save: a forked writer), which must make no difference either.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rlp.training.metrics import WALL_CLOCK_KEYS

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
FAST = [f"trainer.steps={STEPS}", "trainer.schedule.ntp_warmup_steps=1", "rlp.group_size=3", "rlp.max_thought_len=6",
        "rlp.contexts_per_step=4", "trainer.ntp_batch_size=4", "data.ntp_seq_len=32", "data.max_context=32",
        "logging.tensorboard=false", "logging.show_thoughts=0", "checkpoint.every_steps=2", "checkpoint.keep_last=8",
        # NTP and RLP steps in turn after the warm-up (the demo's own schedule has RLP steps only), so
        # that a resume is checked across both kinds of step and the optimizer state they share.
        "trainer.schedule.ntp_per_cycle=1"]
# Everything a step reports except what depends on the wall clock (its time, tokens/s, MFU).
VOLATILE = WALL_CLOCK_KEYS
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


LAYOUTS = {"tp1": [], "tp2": ["parallel.tensor_model_parallel_size=2"], "pp2": ["parallel.pipeline_model_parallel_size=2"]}


def _command(out: Path, layout: str, *extra: str) -> list[str]:
    launcher = [sys.executable] if layout == "tp1" else TORCHRUN
    return [*launcher, "-m", "nemo_rlp.train", *LAYOUTS[layout], *FAST, *extra, f"logging.output_dir={out}",
            f"hydra.run.dir={out / 'hydra'}"]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would (torchrun starts
    its workers in sessions of their own, so killing its process group would miss them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree[1:], timeout=30)  # the root is reaped by its Popen


def _run(command: list[str], kill_at_step: int | None = None, timeout: float = 240) -> tuple[int, str]:
    """Run `command`; with `kill_at_step`, SIGKILL every process of it as soon as it reports that step."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_at_step is not None and re.search(rf"step +{kill_at_step}/{STEPS} ", line):
                _kill_tree(proc.pid)
                break
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()
        proc.stdout.close()
    return rc, "".join(lines)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The output directory of one uninterrupted run per layout, run on first use (its checkpoints
    serve the layout-change test)."""
    runs: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted_{layout}")
            rc, log = _run(_command(out, layout))
            assert rc == 0, log[-3000:]
            runs[layout] = out
        return runs[layout]

    return get


@pytest.mark.timeout(900)  # three training runs (the first also makes the uninterrupted one): 266 s alone
@pytest.mark.parametrize("tp", [1, 2])
def test_sigkill_at_a_random_step_then_the_same_command_continues_bitwise(tmp_path, uninterrupted, tp):
    kill_at = random.Random(8 + tp).randint(2, STEPS - 2)
    out = tmp_path / "run"
    extra = ["checkpoint.async_save=true"] if tp == 1 else []
    command = _command(out, f"tp{tp}", *extra)
    rc, log = _run(command, kill_at_step=kill_at)
    assert rc != 0, log[-2000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []

    rc, log = _run(command)
    assert rc == 0, log[-3000:]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    if resumed is None:  # killed before the first checkpoint was complete: a fresh start is right
        assert "nothing to resume from" in log and not any(n.startswith("step_") and "." not in n for n in saved)
    else:
        assert Path(resumed[1]).name in saved and int(resumed[2]) <= kill_at
    ref, got = _metrics(uninterrupted(f"tp{tp}")), _metrics(out)
    assert [r["step"] for r in got] == list(range(STEPS)), "one record per step, none repeated"
    for r, g in zip(ref, got):
        assert {k: v for k, v in r.items() if k not in VOLATILE} == {k: v for k, v in g.items() if k not in VOLATILE}, (
            f"step {r['step']} differs after a kill at step {kill_at} (TP={tp})"
        )


@pytest.mark.timeout(900)  # may make the 2-process uninterrupted run first
@pytest.mark.parametrize("layout, saved_as", [("tp2", "TP=2 PP=1 DP=1"), ("pp2", "TP=1 PP=2 DP=1")])
def test_a_tp2_or_pp2_checkpoint_loads_at_tp1_with_the_same_losses(tmp_path, uninterrupted, layout, saved_as):
    """Resume the 2-process run's step-4 checkpoint in one process: the losses of the next steps
    (same data, same rollouts) equal that run's to float tolerance (TP=2 sums in another order)."""
    source = uninterrupted(layout) / "checkpoints" / "step_0000004"
    out = tmp_path / "tp1"
    rc, log = _run(_command(out, "tp1", f"checkpoint.resume={source}"))
    assert rc == 0, log[-3000:]
    assert f"saved with {saved_as}; loading into TP=1 PP=1 DP=1" in log
    ref = {r["step"]: r for r in _metrics(uninterrupted(layout))}
    got = _metrics(out)
    assert [r["step"] for r in got] == list(range(4, STEPS))
    for g in got:
        r = ref[g["step"]]
        assert g["kind"] == r["kind"]
        for key in ("ntp_loss", "reward_mean", "s_pred_mean", "s_ema_mean", "thought_len_mean"):
            if key in r:
                assert g[key] == pytest.approx(r[key], abs=2e-5), (g["step"], key)
    assert any("ntp_loss" in g for g in got) and any("reward_mean" in g for g in got)
