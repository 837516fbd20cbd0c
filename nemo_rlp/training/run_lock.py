"""One run per directory: a run holds an exclusive lock on its output and checkpoint directories.

Two runs writing to one directory destroy each other's work: a save deletes every `.tmp` directory
(the other run's save in progress among them), and both append to one `metrics.jsonl`. So the main
rank takes `flock(LOCK_EX | LOCK_NB)` on `<directory>/.lock` and writes its PID and host there; a
second run finds the lock held and stops at once, naming the holder. The kernel releases the lock
when the holder exits, however it exits (kill -9 included), so a stale lock never blocks a rerun.

The lock belongs to this process (a registry of held locks), so building a second trainer on the
same directory in one process, as tests do, is not refused. flock is not reliable on some network
file systems (old NFS): there it may not exclude a run on another node.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from nemo_rlp.config import ConfigError

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # resolved directory -> the open lock file's descriptor


class DirectoryInUse(ConfigError):
    """Another live run holds the lock on a directory this run needs."""


def lock_directory(directory: Path, key: str) -> None:
    """Take this process's exclusive lock on `directory` (created if absent), or raise
    `DirectoryInUse` naming the holder. `key`: the config key that chose the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    resolved = str(directory.resolve())
    if resolved in _held:
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DirectoryInUse(
            f"{key}={str(directory)!r} is in use by another run ({holder}); wait for it to finish or stop it, "
            f"or give this run another {key}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[resolved] = fd


def release_directory(directory: Path) -> None:
    """Give up this process's lock on `directory` and remove the lock file (for a run that will
    not start after all: it leaves nothing behind)."""
    fd = _held.pop(str(Path(directory).resolve()), None)
    if fd is not None:
        (Path(directory) / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)


def lock_run_directories(output_dir: Path, checkpoints: Path) -> list[Path]:
    """Lock the output directory, and the checkpoint directory when it lies outside it; returns
    the directories locked."""
    locked = [Path(output_dir)]
    lock_directory(output_dir, "logging.output_dir")
    if not Path(checkpoints).resolve().is_relative_to(Path(output_dir).resolve()):
        lock_directory(checkpoints, "checkpoint.dir")
        locked.append(Path(checkpoints))
    return locked
