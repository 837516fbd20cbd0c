"""Metrics out: one JSON line per step, TensorBoard scalars, and a console line per step.

Only the main rank writes. Every invocation (`resume_step`: the step it starts from, 0 for a fresh
start) first drops the records of steps at or after that step (written by an interrupted invocation,
which this one repeats, or by an earlier history that this one replaces), so that the metrics file
and TensorBoard hold one history. The console line always shows the five numbers that say whether RLP is
healthy (docs/design.md section 1, "known hazards"): NTP loss, mean reward, fraction of positive rewards, thought
length and end-marker rate, carrying each forward from the last step that measured it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("nemo_rlp")

CONSOLE_FIELDS = (
    ("ntp_loss", "ntp_loss", "{:.3f}"),
    ("reward_mean", "reward", "{:+.3f}"),
    ("reward_pos_frac", "pos", "{:.2f}"),
    ("thought_len_mean", "think_len", "{:.1f}"),
    ("end_marker_rate", "end", "{:.2f}"),
    ("clip_frac", "clip", "{:.2f}"),
)


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        metrics_file: str,
        tensorboard: bool,
        enabled: bool,
        total_steps: int,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.latest: dict[str, float] = {}
        self.start = time.perf_counter()
        self.first_step = resume_step or 0  # steps done before this invocation (for the eta)
        self._file = None
        self._tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = output_dir / metrics_file
        if resume_step is not None and self.metrics_path.is_file():
            _drop_records_from(self.metrics_path, resume_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = output_dir / "tensorboard"
            self._tb = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=resume_step)

    def log(self, step: int, kind: str, metrics: dict[str, float], step_seconds: float) -> None:
        if not self.enabled:
            return
        self.latest.update(metrics)
        record: dict[str, Any] = {"step": step, "kind": kind, "step_seconds": step_seconds, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.add_scalar("time/step_seconds", step_seconds, step)
        log.info(self.console_line(step, kind))

    def console_line(self, step: int, kind: str) -> str:
        shown = [
            f"{label}={fmt.format(self.latest[key])}" if key in self.latest else f"{label}=-"
            for key, label, fmt in CONSOLE_FIELDS
        ]
        elapsed = time.perf_counter() - self.start
        done = step + 1
        eta = elapsed / max(done - self.first_step, 1) * (self.total_steps - done)
        width = len(str(self.total_steps))
        return (
            f"step {done:>{width}}/{self.total_steps} [{kind:3}] " + " ".join(shown)
            + f" | {elapsed:5.1f}s elapsed, eta {eta:4.0f}s"
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _drop_records_from(path: Path, step: int) -> None:
    """Rewrite the JSON-lines file at `path` without the records of steps >= `step` (atomically)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
