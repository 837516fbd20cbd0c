"""A checkpoint write that cannot hang training: it finishes, or it fails loudly within a bound.

megatron-core's torch_dist writer (`dist_checkpointing/strategies/filesystem_async.py`,
`write_preloaded_data_multiproc`) forks one worker process per write bucket (0.16; from 0.17 they
are threads, `WRITER_BY_VERSION`) and waits for them on a `JoinableQueue` with no time limit. A worker
that dies before it reports (an exception outside its own try block, as a missing `psutil` once
caused; the OOM killer; kill -9) leaves that wait blocked forever, and the trainer with it.

`run_bounded` runs such a write on a helper thread while the calling thread watches:
- every process forked during the write: one that exits with a non-zero status (or is killed by a
  signal) fails the write at once, naming the process and its status;
- a deadline (`checkpoint.save_timeout_s`): a write still running then fails.
On failure the processes the write started are killed (multiprocessing would otherwise join the
survivors at interpreter exit) and `CheckpointWriteError` is raised; the thread left blocked in
megatron's wait is a daemon and holds nothing the caller needs. The calling thread waits in short
slices, so signal handlers (preemption, a second SIGTERM) keep running while a save is in progress.

Helpers die with the trainer. megatron-core keeps a `multiprocessing` Manager process (its results
queue, started with the preemption signals ignored so that a job-wide SIGTERM does not kill it) and
forks writer processes (from the trainer for a synchronous save, from its background process for an
async one). When the trainer is killed with SIGKILL nothing tells them: they used to stay alive for
hours, reparented to PID 1 and deaf to SIGTERM. On Linux each now asks the kernel for SIGKILL when
its parent ends (`prctl(PR_SET_PDEATHSIG)`): `start_results_queue` starts the Manager with that as
its initializer, and an at-fork hook sets it in every process forked while `children_die_with_me` is
active (the hook is registered once; the flag keeps it to checkpoint writes). The kernel sends the
signal when the *thread* that forked the child ends: the writers are joined before their thread
returns, and the Manager is started from the main thread.

A full disk. torch's zip writer reports a short write as "unexpected pos 704 vs 598", and a writer
process's OSError arrives wrapped (from 0.17, as its class only: `run_bounded` adds the writer's
logged worker errors to the exception as notes); `describe_failure` says "no space left on <dir>"
when the error chain, those notes or the file system's free space say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import torch

from nemo_rlp.parallel import cpu_platform

# How often the calling thread looks at the writer's processes and the clock.
POLL_SECONDS = 0.1


class CheckpointWriteError(RuntimeError):
    """A checkpoint write failed or did not finish in time; the checkpoint was not completed."""


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the parent thread that started it ends (Linux; a
    no-op elsewhere). `parent_pid`: the parent's PID, to catch a parent that died before this ran."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # reparented already: the signal would never come
        os._exit(1)


# Whether a process forked now must die with this one (inherited by the child, so that a background
# writer's own forks are covered too); the PID of the process about to fork.
_children_die_with_me = False
_forking_pid = os.getpid()


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _children_die_with_me:
        die_with_parent(_forking_pid)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class children_die_with_me:
    """While active, every process forked from this one (and from those) dies with its parent."""

    def __enter__(self) -> None:
        global _children_die_with_me
        self._previous, _children_die_with_me = _children_die_with_me, True

    def __exit__(self, *exc) -> None:
        global _children_die_with_me
        _children_die_with_me = self._previous


# What megatron-core's torch_dist writer (`filesystem_async`) looks like, by release: the function
# that starts its results-queue Manager on first use, and whether its write buckets run in forked
# processes or in threads of the calling process. From 0.17 the function is public and the writers
# are threads, and a worker's exception reaches the caller only as its class
# ("... starting worker 0, error: <class 'OSError'>"): its text is in the writer's error log.
WRITER_BY_VERSION = (
    ("0.16", "0.17", ("_get_write_results_queue", "processes")),
    ("0.17", "0.20", ("get_write_results_queue", "threads")),
)
WRITER_LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"


def writer_layout() -> tuple[str, str]:
    """(results-queue function, "processes" or "threads") of the installed megatron-core's writer."""
    from nemo_rlp.megatron_version import rows_for

    rows = rows_for(WRITER_BY_VERSION)
    return rows[0] if rows else WRITER_BY_VERSION[-1][2]


def start_results_queue() -> bool:
    """Start megatron-core's results-queue Manager (filesystem_async) so that it dies with this
    process; False if megatron-core no longer has that helper (then nothing is started)."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, writer_layout()[0]):
        return False
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        # The queue's proxy keeps the manager alive; megatron reuses a queue that is already set.
        filesystem_async._results_queue = manager.Queue()
    return True


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch's zip writer (torch.save) turns a short write into this, without the errno.
SHORT_WRITE_TEXT = ("unexpected pos", "No space left on device", "Disk quota exceeded")
LOW_FREE_BYTES = 16 * 2**20


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def free_bytes(directory: Path) -> Optional[int]:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def describe_failure(error: BaseException, directory: Path) -> str:
    """What made a checkpoint write fail, in words: 'no space left on <dir> (N MiB free)' when the
    error or the file system says the disk is full, else the error itself. Call it before the failed
    save's files are removed (they hold the space that ran out)."""
    chain = _error_chain(error)
    no_space = any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in chain)
    # With the writer's logged worker errors (`run_bounded` adds them as notes).
    text = " ".join(" ".join([str(e), *getattr(e, "__notes__", ())]) for e in chain)
    free = free_bytes(directory)
    if not no_space and any(marker in text for marker in SHORT_WRITE_TEXT):
        no_space = free is None or free < LOW_FREE_BYTES or "unexpected pos" not in text
    if no_space:
        left = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return (f"no space left on the file system of {directory} ({left}); free some space or point "
                f"checkpoint.dir elsewhere, lower checkpoint.keep_last, then rerun the same command "
                f"(the error: {type(error).__name__}: {str(error).strip()[:200]})")
    return f"{type(error).__name__}: {str(error).strip()[:500]}"


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
    worker_errors = _LoggedErrors()

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
    started: set[int] = set()
    with worker_errors.attached():
        thread.start()
        try:
            _watch(thread, before, started, time.monotonic() + timeout_s, timeout_s, what)
        except BaseException:
            # A failed write, or KeyboardInterrupt while waiting: the writer's processes must not
            # outlive it (multiprocessing joins live children at interpreter exit: a stuck one hangs it).
            kill_children(started | (child_pids() - before))
            raise
    if "error" in outcome:
        error = outcome["error"]
        for message in worker_errors.messages:  # a threaded writer's worker errors (WRITER_BY_VERSION)
            error.add_note(f"megatron-core's checkpoint writer logged: {message}")
        raise error
    return outcome.get("value")


class _LoggedErrors(logging.Handler):
    """The error messages megatron-core's checkpoint writer logs in this process while attached."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @contextlib.contextmanager
    def attached(self):
        logger = logging.getLogger(WRITER_LOGGER)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


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
