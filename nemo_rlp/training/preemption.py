"""Preemption: a signal asks for a checkpoint at the next step boundary, then an exit the batch
script turns into a requeue.

Slurm sends SIGTERM to every task of a job step when it preempts the job (and SIGKILL `KillWait`
seconds later), and with `#SBATCH --signal=USR1@300` sends SIGUSR1 to the tasks 300 s before the
time limit (`--signal=B:USR1@300` sends it to the batch shell only, which must then forward it);
Ctrl-C in a terminal sends SIGINT to the whole foreground process group. The
handlers installed here only record the first signal (a second one terminates the process at
once, whatever it is doing); the training loop asks `requested()` at every step
boundary, saves a checkpoint, and the entry point exits with `REQUEUE_EXIT_CODE`:

    srun ... python -m nemo_rlp.train ...; rc=$?
    if [ "$rc" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi

75 is `EX_TEMPFAIL` (sysexits.h, `os.EX_TEMPFAIL`): "a temporary failure; the user is invited to
retry". srun exits with the highest status of its tasks, and every task exits 75 after a preemption
save. (torchrun reports a failed worker as its own status 1, so the status survives only a direct
launch: srun, one task per GPU, as slurm/ does.)

Ranks may receive a signal at different moments (or only some ranks may receive it), so
`requested()` is one all-reduce (MAX) of the flag over all ranks: every rank stops after the same
step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Optional

import torch

log = logging.getLogger("nemo_rlp")

# EX_TEMPFAIL: the run stopped on a preemption signal after saving a checkpoint; requeue it.
REQUEUE_EXIT_CODE = 75


class PreemptionHandler:
    """Record the configured signals; a context manager that restores the previous handlers."""

    def __init__(self, names: Iterable[str]):
        self.signals = [signal.Signals[name] for name in names]
        self.received: Optional[str] = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionHandler:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            # A second signal must end the process even when this one's save hangs or the main
            # thread is blocked in a collective (where no Python handler would run): from now on
            # the kernel's default action (terminate) handles every configured signal.
            for sig in self.signals:
                signal.signal(sig, signal.SIG_DFL)
            # Logging from a handler is safe enough here: the loop is Python code between steps or
            # inside torch ops, not inside the logging module.
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting (requeue); "
                        "a second signal ends the process at once", name)

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether any rank received a signal: the same answer on every rank (a collective)."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if int(flag.item()) and self.received is None:
            self.received = "a signal on another rank"
        return bool(flag.item())


class signals_ignored:
    """Ignore `names` while starting helper processes, so that they inherit SIG_IGN and survive a
    preemption signal that Slurm sends to every process of the step (megatron-core's checkpoint
    writer keeps such a helper; without this it would die before the preemption save needs it)."""

    def __init__(self, names: Iterable[str]):
        self.signals = [signal.Signals[name] for name in names]
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
