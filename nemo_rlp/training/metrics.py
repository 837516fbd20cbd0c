"""Metrics out: one JSON line per step, TensorBoard scalars (and W&B's, `logging.wandb`), and a
console line per step.

Only the main rank writes. Every invocation (`resume_step`: the step it starts from, 0 for a fresh
start) first drops the records of steps at or after that step (written by an interrupted invocation,
which this one repeats, or by an earlier history that this one replaces), so that the metrics file
and TensorBoard hold one history. The console line always shows the five numbers that say whether RLP is
healthy (docs/design.md section 1, "known hazards"): NTP loss, mean reward, fraction of positive rewards, thought
length and end-marker rate, carrying each forward from the last step that measured it; then this
step's throughput.

Throughput (`throughput`), from the token counts the steps report (over all data-parallel ranks)
and the step's wall time:
- NTP steps: `tokens_per_s`, NTP tokens trained per second;
- RLP steps: `thought_tokens_per_s`, thought tokens sampled per second of rollout, and
  `trained_tokens_per_s`, tokens of the trained rows per second of update; the time split
  `time_teacher_s`, `time_rollout_s`, `time_update_s` comes from `nemo_rlp.training.steps.rlp_step`;
- both: `tflops_per_device`, the model FLOPs one device ran per second of the step by
  `nemo_rlp.planning`'s accounting (6N per trained token, 2N per forward-only token, N the
  parameters of this rank's shard that multiply, its data-parallel share of the tokens), and `mfu`,
  that over `logging.peak_tflops`, only when a peak is configured. Rank 0 reports its own device:
  under pipeline parallelism, the first stage's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("nemo_rlp")

# What depends on the wall clock (a resumed run's records differ from an uninterrupted run's only here).
WALL_CLOCK_KEYS = frozenset({
    "step_seconds", "time_teacher_s", "time_rollout_s", "time_update_s", "tokens_per_s", "thought_tokens_per_s",
    "trained_tokens_per_s", "tflops_per_device", "mfu",
})

CONSOLE_FIELDS = (
    ("ntp_loss", "ntp_loss", "{:.3f}"),
    ("reward_mean", "reward", "{:+.3f}"),
    ("reward_pos_frac", "pos", "{:.2f}"),
    ("thought_len_mean", "think_len", "{:.1f}"),
    ("end_marker_rate", "end", "{:.2f}"),
    ("clip_frac", "clip", "{:.2f}"),
)


def throughput(metrics: dict[str, float], seconds: float, matmul_parameters: int, data_parallel: int,
               peak_tflops: Optional[float] = None) -> dict[str, float]:
    """A step's throughput figures (module docstring) from its metrics and wall time `seconds`."""
    from nemo_rlp.planning import model_flops

    out: dict[str, float] = {}
    trained, forward = metrics.get("trained_tokens", 0.0), metrics.get("forward_tokens", 0.0)
    if "thought_tokens" in metrics:  # RLP
        out["thought_tokens_per_s"] = metrics["thought_tokens"] / max(metrics["time_rollout_s"], 1e-9)
        out["trained_tokens_per_s"] = trained / max(metrics["time_update_s"], 1e-9)
    elif trained:
        out["tokens_per_s"] = trained / max(seconds, 1e-9)
    if trained or forward:
        tflops = model_flops(matmul_parameters, forward / data_parallel, trained / data_parallel) / max(seconds, 1e-9) / 1e12
        out["tflops_per_device"] = tflops
        if peak_tflops:
            out["mfu"] = tflops / peak_tflops
    return out


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        metrics_file: str,
        tensorboard: bool,
        enabled: bool,
        total_steps: int,
        resume_step: int | None = None,
        wandb: Any = None,
        run_config: Optional[dict] = None,
    ):
        """`wandb`: a `WandbConfig` (`logging.wandb`); `run_config`: the run's config, as W&B's."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.latest: dict[str, float] = {}
        self.start = time.perf_counter()
        self.first_step = resume_step or 0  # steps done before this invocation (for the eta)
        self._file = None
        self._tb = None
        self._wandb = None
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
        if wandb is not None and wandb.enabled:
            self._wandb = _start_wandb(wandb, output_dir, run_config)

    def log(self, step: int, kind: str, metrics: dict[str, float], step_seconds: float) -> None:
        if not self.enabled:
            return
        self.latest.update(metrics)
        record: dict[str, Any] = {"step": step, "kind": kind, "step_seconds": step_seconds, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        # The same names in TensorBoard and W&B.
        scalars = {f"{kind}/{key}": value for key, value in metrics.items()}
        scalars["time/step_seconds"] = step_seconds
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        log.info(self.console_line(step, kind, metrics))

    def console_line(self, step: int, kind: str, metrics: Optional[dict[str, float]] = None) -> str:
        """The health figures (carried forward), then this step's throughput from `metrics`."""
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
            + _throughput_text(metrics or {}) + f" | {elapsed:5.1f}s elapsed, eta {eta:4.0f}s"
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _throughput_text(m: dict[str, float]) -> str:
    parts = []
    if "tokens_per_s" in m:
        parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    if "thought_tokens_per_s" in m:
        parts.append(f"think {m['thought_tokens_per_s']:.0f} tok/s, train {m['trained_tokens_per_s']:.0f} tok/s")
    if "time_rollout_s" in m:
        parts.append(f"teacher/rollout/update {m['time_teacher_s']:.2f}/{m['time_rollout_s']:.2f}/{m['time_update_s']:.2f}s")
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.3g}%")
    return (" | " + ", ".join(parts)) if parts else ""


def _start_wandb(cfg, output_dir: Path, run_config: Optional[dict]):
    """A W&B run for this invocation, grouped with the run's other invocations by the output
    directory's name. `mode: offline` writes it under `<dir>/wandb/` without touching the network."""
    try:
        import wandb
    except ImportError as err:  # validate_logging checks first; this is for a config built by hand
        from nemo_rlp.config import ConfigError

        raise ConfigError(
            "logging.wandb.enabled=true needs the wandb package: pip install 'nemo-rlp[wandb]'"
        ) from err
    directory = Path(cfg.dir) if cfg.dir else output_dir
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.project, entity=cfg.entity, name=cfg.name or output_dir.name, group=output_dir.name,
        mode=cfg.mode, dir=str(directory), config=run_config,
    )


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
