"""Nothing lost, nothing hung, one history (issue 21): a damaged newest checkpoint is skipped, an
explicit resume is honoured, a model mismatch names its keys, checkpoint helpers die with the trainer,
a full disk fails a save cleanly, a run locks its directory, SIGINT saves, and bad inputs exit 2
before any work. Each test reproduces the failure it fixes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.training import checkpoint as ckpt
from nemo_rlp.training import checkpoint_integrity as integrity
from nemo_rlp.training.checkpoint_writer import writer_layout
from nemo_rlp.training.loop import Trainer

from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
FAST = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=1", "trainer.steps=6"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """An output directory whose run saved steps 1 and 2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    trainer = Trainer(load_config(FAST), out)
    for _ in range(2):
        trainer.train_step()
        trainer.save()
    trainer.checkpointer.close()
    return out


def _copy(template: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(template, out)
    return out


# --------------------------------------------------------------------------------------------------
# A damaged newest checkpoint: skipped with a warning naming the damage; the previous one is used
# --------------------------------------------------------------------------------------------------


def _shard(step_dir: Path) -> Path:
    return max((step_dir / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)


DAMAGES = {
    "truncated shard": (lambda d: os.truncate(_shard(d), _shard(d).stat().st_size // 2), r"\.distcp is \d+ bytes"),
    "deleted shard": (lambda d: _shard(d).unlink(), r"\.distcp is missing"),
    "garbage metadata": (lambda d: (d / "dist" / ".metadata").write_bytes(
        b"x" * (d / "dist" / ".metadata").stat().st_size), r"dist/\.metadata has changed"),
    "deleted rank state": (lambda d: (d / "rank_state" / "rank00000.pt").unlink(), r"rank00000\.pt is missing"),
    "garbage marker": (lambda d: (d / "complete.json").write_text("{garbage"), r"complete\.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(two_checkpoints, tmp_path, caplog, damage):
    root = _copy(two_checkpoints, tmp_path) / "checkpoints"
    harm, message = DAMAGES[damage]
    harm(root / "step_0000002")
    assert integrity.problem(root / "step_0000001") is None
    with caplog.at_level(logging.WARNING, logger="nemo_rlp"):
        assert integrity.newest_loadable(root) == root / "step_0000001"
    assert "CHECKPOINT DAMAGED" in caplog.text and "step_0000002" in caplog.text
    assert any(__import__("re").search(message, r.getMessage()) for r in caplog.records), caplog.text
    # Set aside: no later search (or keep-last-k) counts it again.
    assert (root / "step_0000002.damaged").is_dir() and not (root / "step_0000002").exists()


def test_a_truncated_newest_shard_falls_back_and_the_run_goes_on(two_checkpoints, tmp_path, caplog):
    """Used to fail with 'checkpoint ... does not fit this model' and advise resume=never."""
    out = _copy(two_checkpoints, tmp_path)
    shard = _shard(out / "checkpoints" / "step_0000002")
    os.truncate(shard, shard.stat().st_size - 100)
    with caplog.at_level(logging.WARNING, logger="nemo_rlp"):
        resumed = Trainer(load_config(FAST), out)
    assert resumed.resumed_from == out / "checkpoints" / "step_0000001" and resumed.step == 1
    assert "truncated" in caplog.text
    assert resumed.train().steps == 6


def test_an_explicit_older_checkpoint_is_honoured(two_checkpoints, tmp_path):
    """Used to be overridden by 'this run already has checkpoints, continuing from <newest>'."""
    out = _copy(two_checkpoints, tmp_path)
    root = out / "checkpoints"
    resumed = Trainer(load_config(FAST + [f"checkpoint.resume={root / 'step_0000001'}"]), out)
    assert resumed.resumed_from == root / "step_0000001" and resumed.step == 1
    # The newer checkpoint belongs to the abandoned history: moved out of a later resume's way.
    assert [p.name for _, p in ckpt.complete_checkpoints(root)] == ["step_0000001"]
    (aside,) = root.glob("superseded-*")
    assert (aside / "step_0000002" / "complete.json").is_file()


def test_a_model_mismatch_names_the_differing_keys(two_checkpoints, tmp_path):
    with pytest.raises(ConfigError, match=r"does not fit this model: it was saved with .*model\.hidden_size: \d+ -> 96"):
        Trainer(load_config(FAST + ["model.hidden_size=96",
                                    f"checkpoint.resume={two_checkpoints / 'checkpoints'}"]), tmp_path / "other")


# --------------------------------------------------------------------------------------------------
# Checkpoint helper processes die with the trainer; a full disk fails a save by name
# --------------------------------------------------------------------------------------------------


def _dead(process) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_checkpoint_helpers_die_with_a_killed_trainer(tmp_path):
    """kill -9 of the trainer during a save used to leave megatron's Manager and writer processes
    alive for hours (reparented to PID 1, ignoring SIGTERM and SIGUSR1)."""
    import psutil

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

trainer = Trainer(load_config({FAST!r}), Path({str(tmp_path / "run")!r}))
trainer.train_step()
filesystem_async._process_memory = stuck
trainer.save()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    helpers = []
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the save never started"
            time.sleep(0.1)
        time.sleep(0.5)
        helpers = psutil.Process(proc.pid).children(recursive=True)
        names = [" ".join(h.cmdline()) for h in helpers]
        assert any("spawn_main" in n for n in names), names  # megatron's results-queue Manager
        if writer_layout()[1] == "processes":  # megatron-core 0.16; from 0.17 the writers are threads
            assert len(helpers) >= 3, names  # ... and the forked writer processes
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while not all(_dead(h) for h in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_dead(h) for h in helpers), [h.pid for h in helpers if not _dead(h)]
    finally:
        for helper in helpers:
            try:
                helper.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _trainer_with_a_checkpoint(out: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(FAST + list(overrides)), out)
    trainer.train_step()
    trainer.save()  # step 1: the previous complete checkpoint
    trainer.train_step()
    return trainer


def test_a_save_that_runs_out_of_disk_says_so_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Simulated ENOSPC in megatron's writer process: used to surface as 'Worker failure: ...'."""
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    trainer = _trainer_with_a_checkpoint(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"no space left on the file system of .*checkpoints"):
        trainer.save()  # step 2
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]  # the .tmp is gone
    monkeypatch.undo()
    trainer.checkpointer.close()
    assert Trainer(load_config(FAST), tmp_path).resumed_from == root / "step_0000001"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 4.5 MiB tmpfs: room for one tiny checkpoint (3 MB) and not two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4608k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the simulated ENOSPC test covers this case)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_save_on_a_full_tmpfs_says_no_space_left(tmp_path, tiny_tmpfs):
    """The real thing: torch's writer reported 'unexpected pos 704 vs 598' and left a .tmp behind."""
    trainer = _trainer_with_a_checkpoint(tiny_tmpfs)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"no space left on the file system of"):
        trainer.save()
    root = tiny_tmpfs / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]
    assert integrity.newest_loadable(root) == root / "step_0000001"


# --------------------------------------------------------------------------------------------------
# One directory, one history; one run per directory
# --------------------------------------------------------------------------------------------------


def test_resume_never_in_a_used_directory_starts_one_new_history(tmp_path):
    """Used to append a second history to metrics.jsonl, and leave the old checkpoints for a later
    `resume=auto` to pick."""
    Trainer(load_config(FAST + ["trainer.steps=3"]), tmp_path).train()
    fresh = Trainer(load_config(FAST + ["trainer.steps=2", "checkpoint.resume=never"]), tmp_path)
    assert fresh.step == 0
    fresh.train()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [0, 1]
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt.complete_checkpoints(root)] == ["step_0000002"]
    (aside,) = root.glob("superseded-*")
    assert (aside / "step_0000003").is_dir()
    assert Trainer(load_config(FAST + ["trainer.steps=2"]), tmp_path).resumed_from == root / "step_0000002"


def test_a_crash_before_the_first_checkpoint_leaves_one_history(tmp_path):
    # What a run killed at step 3 of its first invocation leaves: records, no checkpoint.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kind": "ntp"}) + "\n" for s in range(3)))
    Trainer(load_config(FAST + ["trainer.steps=2"]), tmp_path).train()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [0, 1]


def _start(out: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "nemo_rlp.train", *FAST, "trainer.steps=500", "checkpoint.every_steps=0",
               f"logging.output_dir={out}", f"hydra.run.dir={out}/hydra", *overrides]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _read_until(proc: subprocess.Popen, pattern: str, lines: list[str]) -> None:
    import re

    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError("".join(lines)[-3000:])


@pytest.fixture(scope="module")
def running_run(tmp_path_factory):
    """A real run (the entry point) in training, shared by the lock and the SIGINT tests (one start
    of a run costs more CPU than both checks): (process, its output directory, its lines so far)."""
    out = tmp_path_factory.mktemp("running")
    proc = _start(out)
    lines: list[str] = []
    try:
        _read_until(proc, r"step +2/500 ", lines)
        yield proc, out, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_a_second_run_on_the_same_directory_fails_at_once_naming_the_holder(running_run, tmp_path):
    """Two runs on one directory used to delete each other's .tmp saves and interleave metrics."""
    first, out, _ = running_run
    start = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "nemo_rlp.train", *FAST, f"logging.output_dir={out}", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another run (PID {first.pid} on " in second.stderr
    assert "training:" not in second.stdout + second.stderr
    assert time.monotonic() - start < 60
    assert first.poll() is None  # the holder is untouched


def test_sigint_saves_a_checkpoint_and_exits_for_requeue(running_run):
    """Ctrl-C used to end the run with a KeyboardInterrupt traceback and lose the work since the last
    checkpoint; now it is a preemption signal (save, exit 75)."""
    proc, out, lines = running_run
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=120)
    log = "".join(lines)
    assert rc == 75, log[-3000:]
    assert "received SIGINT" in log and "KeyboardInterrupt" not in log
    (saved,) = ckpt.complete_checkpoints(out / "checkpoints")
    assert saved[0] >= 2
    assert [r["step"] for r in _records(out / "metrics.jsonl")] == list(range(saved[0]))


def test_a_second_sigint_is_left_to_the_default_action():
    from nemo_rlp.training.preemption import PreemptionHandler

    with PreemptionHandler(load_config([]).checkpoint.signals) as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested() and handler.received == "SIGINT"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the second one terminates


# --------------------------------------------------------------------------------------------------
# Inputs and outputs checked before any work: exit 2, one line naming the file, the line and the fix
# --------------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: (overrides, what the one-line error must say)."""
    from nemo_rlp.data.indexed import write_indexed_dataset
    from nemo_rlp.data.tokenizer import train_byte_level_bpe

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "nokey.jsonl").write_text('{"body": "no text key here"}\n')
    train_byte_level_bpe(["some text to learn from"] * 4, vocab_size=300,
                         special_tokens=["<|endoftext|>", "<pad>"]).save(str(tmp_path / "nomarkers.json"))
    write_indexed_dataset(tmp_path / "corpus", [list(range(1, 40))] * 20, vocab_size=1024)
    shutil.copy(tmp_path / "corpus.idx", tmp_path / "short.idx")
    (tmp_path / "short.bin").write_bytes((tmp_path / "corpus.bin").read_bytes()[:100])
    (tmp_path / "a_file").write_text("")
    return {
        "empty corpus": ([f"data.corpus={tmp_path}/empty.jsonl"], r"empty\.jsonl"),
        "bad JSON line": ([f"data.corpus={tmp_path}/bad.jsonl"], r"bad\.jsonl:2: not valid JSON"),
        "missing text key": ([f"data.corpus={tmp_path}/nokey.jsonl"], r"nokey\.jsonl:1: .*text"),
        "tokenizer without markers": ([f"data.tokenizer={tmp_path}/nomarkers.json"], r"marker '<think>' is not a token"),
        "truncated indexed .bin": (["data.format=indexed", "data.rlp_positions=uniform", f"data.corpus={tmp_path}/short"],
                                   r"short\.bin does not match its index .* rebuild"),
        "indexed corpus given as .bin": (["data.format=indexed", "data.rlp_positions=uniform", f"data.corpus={tmp_path}/corpus.bin"],
                                         r"without \.bin: data\.corpus=.*corpus'?$"),
        "unknown key": (["trainer.stpes=3"], r"no config key 'trainer\.stpes'; did you mean trainer\.steps\?"),
        "output dir under a file": ([f"logging.output_dir={tmp_path}/a_file/run"],
                                    r"logging\.output_dir=.* cannot be written \(a file, not a directory"),
    }


CASES = ["empty corpus", "bad JSON line", "missing text key", "tokenizer without markers", "truncated indexed .bin",
         "indexed corpus given as .bin", "unknown key", "output dir under a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_exit_2_at_once_with_one_line(tmp_path, case):
    """These used to surface 20-50 s in, inside a 15-20 line Hydra traceback, with exit status 1 (an
    unknown key: Hydra's 'use +key' hint)."""
    import re
    import resource

    overrides, message = _bad_inputs(tmp_path)[case]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "nemo_rlp.train", *TINY_RUN, *overrides, "eval=none",
                           f"hydra.run.dir={tmp_path}/hydra"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("config error: ") and re.search(message, line), line
    assert "training:" not in proc.stdout and "model:" not in proc.stdout  # nothing was built
    # Within 10 s: on an idle machine the wall time (2-4 s here); on a shared CI machine the CPU time.
    assert cpu < 10, (cpu, wall)
    assert wall < 60, (cpu, wall)
