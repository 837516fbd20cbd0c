"""A checkpoint write that cannot hang training: it finishes, or it fails loudly within a bound.

megatron-core's torch_dist writer (`dist_checkpointing/strategies/filesystem_async.py`,
`write_preloaded_data_multiproc`) forks one worker process per write bucket and waits for them on a
`JoinableQueue` with no time limit. A worker that dies before it reports (an exception outside its
own try block, as a missing `psutil` once caused; the OOM killer; kill -9) leaves that wait blocked
forever, and the trainer with it.

`run_bounded` runs such a write on a helper thread while the calling thread watches:
- every process forked during the write: one that exits with a non-zero status (or is killed by a
  signal) fails the write at once, naming the process and its status;
- a deadline (`checkpoint.save_timeout_s`): a write still running then fails.
On failure the processes the write started are killed (multiprocessing would otherwise join the
survivors at interpreter exit) and `CheckpointWriteError` is raised; the thread left blocked in
megatron's wait is a daemon and holds nothing the caller needs. The calling thread waits in short
slices, so signal handlers (preemption, a second SIGTERM) keep running while a save is in progress.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import psutil
import torch

from nemo_rlp.parallel import cpu_platform

# How often the calling thread looks at the writer's processes and the clock.
POLL_SECONDS = 0.1


class CheckpointWriteError(RuntimeError):
    """A checkpoint write failed or did not finish in time; the checkpoint was not completed."""


def child_pids() -> set[int]:
    """The PIDs of this process's direct children, live or exited but not yet reaped."""
    return {child.pid for child in psutil.Process().children(recursive=False)}


def exit_status(pid: int) -> Optional[str]:
    """How child `pid` ended, if it has ('exit status 1', 'killed by SIGKILL'), without reaping it
    (WNOWAIT), so that multiprocessing still collects it; None while it runs or if it exited 0."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped by its owner: it reported its result
        return None
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return None if info.si_status == 0 else f"exit status {info.si_status}"
    return f"killed by {signal.Signals(info.si_status).name}"


def kill_children(pids: set[int], wait_s: float = 10.0) -> None:
    """SIGKILL the processes in `pids` (and their children) that are still alive, and wait until
    they have died (without reaping them: their owners still collect their status)."""
    victims: list[psutil.Process] = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            victims += process.children(recursive=True) + [process]
        except psutil.NoSuchProcess:
            continue
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + wait_s
    while any(_alive(v) for v in victims) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_bounded(write: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run `write()` (a megatron-core checkpoint write) and return its result, or raise
    `CheckpointWriteError` when a process it forked dies or it outlasts `timeout_s` (module
    docstring). `what` names the write in the error ("checkpoint step 100 to /ckpt/...")."""
    before = child_pids()
    outcome: dict[str, Any] = {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def target() -> None:
        # A new thread starts without the CPU platform's torch function mode (modes are per
        # thread) and on CUDA device 0: give it what the calling thread has.
        with cpu_platform.thread_context():
            if device is not None:
                torch.cuda.set_device(device)
            try:
                outcome["value"] = write()
            except BaseException as error:  # re-raised in the calling thread
                outcome["error"] = error

    thread = threading.Thread(target=target, name="checkpoint-write", daemon=True)
    thread.start()
    started: set[int] = set()
    try:
        _watch(thread, before, started, time.monotonic() + timeout_s, timeout_s, what)
    except BaseException:
        # A failed write, or KeyboardInterrupt while waiting: the writer's processes must not
        # outlive it (multiprocessing joins live children at interpreter exit: a stuck one hangs it).
        kill_children(started | (child_pids() - before))
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _watch(thread: threading.Thread, before: set[int], started: set[int], deadline: float, timeout_s: float,
           what: str) -> None:
    """Wait for `thread`, adding the processes it forks to `started`; raise when one of them dies
    with a non-zero status or the deadline passes."""
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        if not thread.is_alive():
            return
        started |= child_pids() - before
        for pid in sorted(started):
            status = exit_status(pid)
            if status is not None:
                raise CheckpointWriteError(
                    f"{what} failed: megatron-core's checkpoint writer process {pid} ended ({status}) before "
                    "reporting its result; its traceback, if it had one, is printed above. The checkpoint "
                    "was not completed; the previous complete checkpoint is still the one a resume picks."
                )
        if time.monotonic() > deadline:
            raise CheckpointWriteError(
                f"{what} did not finish within checkpoint.save_timeout_s={timeout_s:g} s (a slow or stuck file "
                "system, or a writer process that hangs); the checkpoint was not completed and its writer "
                "processes were killed. Raise checkpoint.save_timeout_s if saves are legitimately that slow."
            )
