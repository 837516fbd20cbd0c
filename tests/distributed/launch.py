"""Run a test function in N local gloo processes (torch.multiprocessing spawn), the way torchrun would.

    results = run_distributed(fn, world_size=2, args=(a, b), timeout=90)

`fn` must be importable by name (a module-level function). Each child gets the launch environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free local port), one
intra-op thread, and calls `fn(*args)`; what it returns is saved with `torch.save` and handed back to
the parent as a list indexed by rank. A child's exception is re-raised in the parent as
`ChildProcessError` carrying the child's traceback; a run that outlives `timeout` seconds is killed
and raises `TimeoutError`. The children's process groups are torn down before they exit.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: Sequence[Any]
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        result = fn(*args)
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    torch.save(result, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        # Nobody leaves while another rank may still talk to the store rank 0 hosts.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    out_dir: str | os.PathLike | None = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned ranks; return the per-rank results, rank order.

    The free port is found before the ranks bind it, so another process on the machine can take it
    in between (seen with several test runs at once): such a run is started again, once, on a new
    port."""
    try:
        return _run_once(fn, world_size, args, timeout, out_dir)
    except ChildProcessError as err:
        if "EADDRINUSE" not in str(err):
            raise
        return _run_once(fn, world_size, args, timeout, out_dir)


def _run_once(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any],
    timeout: float,
    out_dir: str | os.PathLike | None,
) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="dist-test-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        context = mp.start_processes(
            _child,
            args=(fn, world_size, free_port(), str(out), tuple(args)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{fn.__qualname__} on {world_size} ranks did not finish within {timeout:.0f} s; "
                        f"finished ranks: {sorted(int(p.stem[4:]) for p in out.glob('rank*.pt'))}"
                    )
        except mp.ProcessRaisedException as err:
            raise ChildProcessError(
                f"{fn.__qualname__} failed on rank {err.error_index}:\n{_child_traceback(out, err)}"
            ) from None
        except mp.ProcessExitedException as err:
            raise ChildProcessError(
                f"{fn.__qualname__}: rank {err.error_index} exited with code {err.exit_code} "
                f"({err.signal_name or 'no signal'})"
            ) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _child_traceback(out: Path, err: mp.ProcessRaisedException) -> str:
    path = out / f"rank{err.error_index}.err"
    return path.read_text() if path.exists() else str(err)
