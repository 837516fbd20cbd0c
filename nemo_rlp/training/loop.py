"""The training loop: set up from a validated `RunConfig`, run the interleaved NTP/RLP schedule.

Data flows one way: documents → contexts → rollouts → rewards → loss → optimizer → EMA.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_rlp.config import ConfigError, RunConfig, as_dict
from nemo_rlp.data.corpus import BUNDLED_TOKENIZER
from nemo_rlp.data.sampling import ContextSampler, NTPBatcher, document_lengths
from nemo_rlp.data.sources import load_documents
from nemo_rlp.data.tokenizer import Tokenizer
from nemo_rlp.models import padded_vocab_size
from nemo_rlp.parallel import distributed
from nemo_rlp.rollout.sampler import Markers
from nemo_rlp.training.metrics import MetricsLogger
from nemo_rlp.training.policy import PolicyWithTeacher
from nemo_rlp.training.schedule import NTP, step_kind
from nemo_rlp.training.steps import ntp_step, rlp_step

log = logging.getLogger("nemo_rlp")


@dataclass
class RunSummary:
    steps: int = 0
    ntp_steps: int = 0
    rlp_steps: int = 0
    seconds: float = 0.0
    ntp_loss: list[float] = field(default_factory=list)
    reward_mean: list[float] = field(default_factory=list)
    reward_pos_frac: list[float] = field(default_factory=list)
    thought_len_mean: list[float] = field(default_factory=list)
    end_marker_rate: list[float] = field(default_factory=list)
    output_dir: str = ""

    def table(self) -> str:
        def fifths(values: list[float]) -> str:
            if not values:
                return "-"
            k = max(1, len(values) // 5)
            first, last = sum(values[:k]) / k, sum(values[-k:]) / k
            return f"{first:+.4f} -> {last:+.4f}"

        rows = [
            ("steps (NTP / RLP)", f"{self.steps} ({self.ntp_steps} / {self.rlp_steps})"),
            ("wall time", f"{self.seconds:.1f} s"),
            ("NTP loss, first -> last fifth", fifths(self.ntp_loss)),
            ("mean reward, first -> last fifth", fifths(self.reward_mean)),
            ("positive rewards, first -> last fifth", fifths(self.reward_pos_frac)),
            ("thought length, first -> last fifth", fifths(self.thought_len_mean)),
            ("end-marker rate, first -> last fifth", fifths(self.end_marker_rate)),
            ("outputs", self.output_dir),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _per_rank(total: int, data_parallel: int, rank: int, key: str) -> int:
    """This rank's share of a global batch size; shares differ by at most one (the losses are
    normalised globally, so an uneven split trains exactly like one process)."""
    if total < data_parallel:
        raise ConfigError(
            f"{key}={total} is smaller than the data-parallel size {data_parallel}: every rank needs "
            f"at least one; use at least {data_parallel}"
        )
    return total // data_parallel + (1 if rank < total % data_parallel else 0)


class Trainer:
    """Everything a run holds, built from a validated config; `train()` runs the schedule."""

    def __init__(self, cfg: RunConfig, output_dir: Path):
        self.start_time = time.perf_counter()
        self.cfg = cfg
        self.output_dir = output_dir
        self.layout = layout = distributed.initialize(cfg.parallel, cfg.trainer.seed)
        # One voice: the other ranks report only warnings and errors.
        logging.getLogger("nemo_rlp").setLevel(logging.INFO if layout.is_main else logging.WARNING)
        dp_rank = distributed.data_parallel_rank()
        self.contexts_per_rank = _per_rank(
            cfg.rlp.contexts_per_step, layout.data_parallel, dp_rank, "rlp.contexts_per_step"
        )
        self.ntp_per_rank = _per_rank(cfg.trainer.ntp_batch_size, layout.data_parallel, dp_rank, "trainer.ntp_batch_size")

        self.tokenizer = tokenizer = Tokenizer.from_file(
            cfg.data.tokenizer or BUNDLED_TOKENIZER, think_start=cfg.rlp.think_start, think_end=cfg.rlp.think_end
        )
        documents = load_documents(cfg.data, tokenizer)
        vocab_size = padded_vocab_size(cfg.model, tokenizer.vocab_size, layout.tensor_parallel)
        log.info(
            "data: %d documents, %d tokens; tokenizer vocabulary %d, model vocabulary %d",
            len(documents), int(document_lengths(documents).sum()), tokenizer.vocab_size, vocab_size,
        )

        torch.manual_seed(cfg.trainer.seed)
        self.model = PolicyWithTeacher(cfg, vocab_size, layout)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %s, %d parameters on this rank; %s", cfg.model.name, n_params, layout)

        # Data differs per data-parallel rank and is identical across the TP ranks of a replica.
        data_seed = cfg.trainer.seed + 1000 * dp_rank
        self.ntp_batches = NTPBatcher(documents, seq_len=cfg.data.ntp_seq_len, eod_id=tokenizer.eod_id, seed=data_seed)
        self.context_sampler = ContextSampler.from_config(documents, cfg.data, seed=data_seed)
        # Seeded identically on every TP rank of a replica, so they sample the same thoughts.
        self.generator = torch.Generator().manual_seed(data_seed)
        self.markers = Markers(
            think_start=tokenizer.think_start_id, think_end=tokenizer.think_end_id, pad=tokenizer.pad_id
        )
        self.step = 0
        self.summary = RunSummary(output_dir=str(output_dir))

    def train_step(self) -> tuple[str, dict[str, float]]:
        """One optimizer step of the kind the schedule says; returns the kind and its metrics."""
        cfg, layout, summary = self.cfg, self.layout, self.summary
        kind = step_kind(self.step, cfg.trainer.schedule)
        if kind == NTP:
            tokens = self.ntp_batches.next_batch(self.ntp_per_rank).to(layout.device)
            step_metrics = ntp_step(self.model, tokens, cfg.trainer.ntp_micro_batch_size)
            summary.ntp_steps += 1
            summary.ntp_loss.append(step_metrics["ntp_loss"])
        else:
            step_metrics, batch, rewards = rlp_step(
                self.model, self.context_sampler, self.contexts_per_rank, cfg.rlp, self.markers,
                self.generator, layout.device,
            )
            step_metrics.update({f"data_{k}": float(v) for k, v in self.context_sampler.stats().items()})
            summary.rlp_steps += 1
            for key in ("reward_mean", "reward_pos_frac", "thought_len_mean", "end_marker_rate"):
                getattr(summary, key).append(step_metrics[key])
            show = cfg.logging.show_thoughts
            if layout.is_main and show and summary.rlp_steps % cfg.logging.log_every == 0:
                _show_thoughts(self.tokenizer, batch, rewards, show)
        self.step += 1
        summary.steps += 1
        return kind, step_metrics

    def train(self) -> RunSummary:
        cfg = self.cfg
        metrics = MetricsLogger(
            self.output_dir, cfg.logging.metrics_file, cfg.logging.tensorboard, self.layout.is_main, cfg.trainer.steps
        )
        if self.layout.is_main:
            (self.output_dir / "resolved_config.json").write_text(json.dumps(as_dict(cfg), indent=2))
        log.info("training: %d steps, writing to %s", cfg.trainer.steps, self.output_dir)
        try:
            while self.step < cfg.trainer.steps:
                t0 = time.perf_counter()
                kind, step_metrics = self.train_step()
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.trainer.steps:
                    metrics.log(self.step - 1, kind, step_metrics, time.perf_counter() - t0)
        finally:
            metrics.close()
        self.summary.seconds = time.perf_counter() - self.start_time
        return self.summary


def _show_thoughts(tokenizer: Tokenizer, batch, rewards: torch.Tensor, count: int) -> None:
    """Print the first thoughts of the batch with their rewards, so a human sees what is sampled."""
    for row in range(min(count, batch.tokens.shape[0])):
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        thought = tokenizer.decode(batch.tokens[row, start : start + length].tolist())
        target = tokenizer.decode([int(batch.tokens[row, batch.answer_index[row]])])
        reward = float(rewards.view(-1)[row])
        log.info("  thought: %r -> x_t=%r reward=%+.3f", thought, target, reward)
