"""The training loop: set up from a validated `RunConfig`, run the interleaved NTP/RLP schedule.

Data flows one way: documents → contexts → rollouts → rewards → loss → optimizer → EMA.

Failure handling. The trainer resumes from a checkpoint when `checkpoint.resume` finds one
(`nemo_rlp.training.checkpoint`), saves every `checkpoint.every_steps` steps, at the steps of
`checkpoint.keep_steps` and at the end, and on a preemption signal saves at the next step boundary and
returns with `summary.preempted` set (the entry point then exits with the requeue status,
`nemo_rlp.training.preemption`). A step whose loss, rewards or gradients are not finite makes no
update; `trainer.max_consecutive_skips` such steps in a row stop the run with `TrainingHalted`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from nemo_rlp.config import ConfigError, RunConfig, as_dict
from nemo_rlp.data.megatron_ntp import MegatronNTPStream, MegatronTokenizerInfo, build_gpt_dataset, choose_ntp_dataset
from nemo_rlp.data.sampling import ContextSampler, NTPBatcher
from nemo_rlp.data.texts import document_lengths
from nemo_rlp.data.tokenizer import Tokenizer
from nemo_rlp.models.vocab import padded_vocab_size
from nemo_rlp.parallel import distributed
from nemo_rlp.planning import local_matmul_parameters
from nemo_rlp.preflight import RunInputs, load_inputs
from nemo_rlp.rollout.sampler import Markers
from nemo_rlp.training.checkpoint import Checkpointer, GeneratorState, checkpoint_dir, load_error
from nemo_rlp.training.evaluate import evaluate_answers, format_evaluation
from nemo_rlp.training.metrics import MetricsLogger, throughput
from nemo_rlp.training.policy import PolicyWithTeacher
from nemo_rlp.training.preemption import PreemptionHandler
from nemo_rlp.training.report import first_and_last_fifth, read_metrics, write_report
from nemo_rlp.training.run_lock import lock_run_directories
from nemo_rlp.training.schedule import NTP, step_kind
from nemo_rlp.training.steps import StepOutput, ntp_step, rlp_step

if TYPE_CHECKING:
    from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("nemo_rlp")


class TrainingHalted(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message says why."""


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
    # Global counts: NTP tokens predicted and RLP contexts trained on; steps whose update was skipped.
    ntp_tokens: int = 0
    rlp_contexts: int = 0
    skipped_steps: int = 0
    checkpoint_dir: str = ""
    resumed_from: str = ""  # the checkpoint this invocation started from ("" : none)
    preempted: Optional[str] = None  # the signal that stopped the run early, if one did
    # Held-out evaluations by when they ran ("after_warmup", "final"; nemo_rlp.training.evaluate).
    evaluations: dict = field(default_factory=dict)
    # Sampled thoughts with their rewards, from the first and from the latest RLP step (for the report).
    samples_first: list = field(default_factory=list)
    samples_last: list = field(default_factory=list)

    def table(self) -> str:
        rows = self.rows()
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)

    def rows(self) -> list[tuple[str, str]]:
        """The summary as (name, value) rows: the console table and the report's."""

        def fifths(values: list[float]) -> str:
            first, last = first_and_last_fifth(values)
            return "-" if first is None else f"{first:+.4f} -> {last:+.4f}"

        rows = [
            ("steps (NTP / RLP)", f"{self.steps} ({self.ntp_steps} / {self.rlp_steps})"),
            ("wall time", f"{self.seconds:.1f} s"),
            ("NTP loss, first -> last fifth", fifths(self.ntp_loss)),
            ("mean reward, first -> last fifth", fifths(self.reward_mean)),
            ("positive rewards, first -> last fifth", fifths(self.reward_pos_frac)),
            ("thought length, first -> last fifth", fifths(self.thought_len_mean)),
            ("end-marker rate, first -> last fifth", fifths(self.end_marker_rate)),
            ("NTP tokens / RLP contexts", f"{self.ntp_tokens} / {self.rlp_contexts}"),
            ("skipped steps (non-finite)", str(self.skipped_steps)),
            ("outputs", self.output_dir),
            ("checkpoints", self.checkpoint_dir + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")),
        ]
        for when, result in self.evaluations.items():
            plain, think = result["no_think"], result["with_thought"]
            rows.append((
                f"held-out accuracy ({when.replace('_', ' ')})",
                f"no thought {100 * plain['accuracy']:.1f}%, a sampled thought {100 * think['accuracy']:.1f}% "
                f"({100 * (think['accuracy'] - plain['accuracy']):+.1f} points, {result['num_positions']} positions)",
            ))
        if self.preempted:
            rows.append(("stopped by", f"{self.preempted} (checkpoint saved; exit for requeue)"))
        return rows


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

    def __init__(self, cfg: RunConfig, output_dir: Path, output_dir_is_stable: bool = True,
                 inputs: Optional[RunInputs] = None):
        """`output_dir_is_stable`: whether a rerun of the same command gets the same `output_dir`;
        if not, checkpoints go to the default directory (nemo_rlp.training.checkpoint.checkpoint_dir).
        `inputs`: the tokenizer and data, already loaded and checked (nemo_rlp.preflight)."""
        self.start_time = time.perf_counter()
        self.cfg = cfg
        self.output_dir = output_dir = Path(output_dir)
        directory = checkpoint_dir(cfg, output_dir if output_dir_is_stable else None)
        self.layout = layout = distributed.initialize(cfg.parallel, cfg.trainer.seed)
        # One voice: the other ranks report only warnings and errors.
        logging.getLogger("nemo_rlp").setLevel(logging.INFO if layout.is_main else logging.WARNING)
        if layout.is_main:  # one run per directory (nemo_rlp.training.run_lock; a no-op after preflight)
            lock_run_directories(output_dir, directory)
        dp_rank = distributed.data_parallel_rank()
        self.contexts_per_rank = _per_rank(
            cfg.rlp.contexts_per_step, layout.data_parallel, dp_rank, "rlp.contexts_per_step"
        )
        self.ntp_per_rank = _per_rank(cfg.trainer.ntp_batch_size, layout.data_parallel, dp_rank, "trainer.ntp_batch_size")

        inputs = inputs if inputs is not None else load_inputs(cfg)
        self.tokenizer = tokenizer = inputs.tokenizer
        documents = inputs.documents
        vocab_size = padded_vocab_size(cfg.model, tokenizer.vocab_size, layout.tensor_parallel)
        log.info(
            "data: %d documents, %d tokens; tokenizer vocabulary %d, model vocabulary %d",
            len(documents), int(document_lengths(documents).sum()), tokenizer.vocab_size, vocab_size,
        )

        torch.manual_seed(cfg.trainer.seed)
        self.model = PolicyWithTeacher(cfg, vocab_size, layout)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %s, %d parameters on this rank; %s", cfg.model.name, n_params, layout)
        # N of the FLOP accounting for this rank's shard (tokens/s and MFU in the logs).
        lm = self.model.language_model
        self.matmul_parameters = local_matmul_parameters(lm, post_process=getattr(lm, "post_process", True))

        # Read (and checked) up front: a bad held-out file should not wait for the end of the run.
        self.eval_positions = inputs.eval_positions

        # Data differs per data-parallel rank and is identical across the TP ranks of a replica.
        self._documents = documents
        try:
            self.ntp_source = inputs.ntp_dataset or choose_ntp_dataset(cfg.data, documents)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.ntp_source == "megatron":  # one dataset for all ranks, each its share of a global batch
            self.ntp_batches = self._megatron_ntp_stream(dp_rank)
        self._seed_data_streams(cfg.trainer.seed + 1000 * dp_rank)
        self.markers = Markers(
            think_start=tokenizer.think_start_id, think_end=tokenizer.think_end_id, pad=tokenizer.pad_id
        )
        self.step = 0
        self.consecutive_skips = 0
        self.summary = RunSummary(output_dir=str(output_dir))

        self.checkpointer = Checkpointer(cfg, layout, directory)
        self.summary.checkpoint_dir = str(self.checkpointer.directory)
        self.resumed_from = self.checkpointer.resume_path()
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
            self.summary.resumed_from = str(self.resumed_from)
            log.info("resumed from %s at step %d of %d", self.resumed_from, self.step, cfg.trainer.steps)
        else:
            log.info("checkpoints: %s (nothing to resume from: starting at step 0)", self.checkpointer.directory)
            if cfg.checkpoint.init_weights:
                self.checkpointer.load_weights(Path(cfg.checkpoint.init_weights), self.model)
                log.info("policy weights from %s", cfg.checkpoint.init_weights)

    def _megatron_ntp_stream(self, dp_rank: int) -> MegatronNTPStream:
        """NTP batches from megatron's GPTDataset (data.ntp_dataset; nemo_rlp.data.megatron_ntp), built for
        data.ntp_samples or one pass over the data and seeded with trainer.seed; indices cached in
        data.ntp_cache_dir or <output_dir>/ntp_dataset_cache, by rank 0 first."""
        cfg, d = self.cfg, self.cfg.data
        blend = [[float(w), str(p)] for w, p in d.blend] if d.blend else [[1.0, str(d.corpus)]]
        global_batch = cfg.trainer.ntp_batch_size
        run_samples = global_batch * sum(step_kind(s, cfg.trainer.schedule) == NTP for s in range(cfg.trainer.steps))
        requested = d.ntp_samples  # None: one pass over the data
        cache = Path(d.ntp_cache_dir) if d.ntp_cache_dir else self.output_dir / "ntp_dataset_cache"
        t0 = time.perf_counter()
        dataset = build_gpt_dataset(
            [p for _, p in blend], [w for w, _ in blend] if d.blend else None, seq_len=d.ntp_seq_len,
            num_samples=requested, seed=cfg.trainer.seed,
            tokenizer=MegatronTokenizerInfo(self.tokenizer.vocab_size, self.tokenizer.eod_id), cache_dir=cache,
        )
        log.info("NTP batches: megatron %s of %d samples (data.ntp_samples=%s; blend weights are token shares) in "
                 "%.2f s, indices in %s; this run reads %d", type(dataset).__name__, len(dataset), requested,
                 time.perf_counter() - t0, cache, run_samples)
        if run_samples > len(dataset):
            log.warning("this run reads %d NTP samples, the dataset has %d: they repeat from the start. Set "
                        "data.ntp_samples=%d for megatron's reshuffled further passes", run_samples, len(dataset),
                        run_samples)
        dp = self.layout.data_parallel
        offset = sum(_per_rank(global_batch, dp, r, "trainer.ntp_batch_size") for r in range(dp_rank))
        identity = {"requested_samples": requested, "seed": cfg.trainer.seed, "seq_len": d.ntp_seq_len, "blend": blend}
        return MegatronNTPStream(dataset, global_batch_size=global_batch, rank_offset=offset, identity=identity)

    def _seed_data_streams(self, data_seed: int) -> None:
        documents, cfg = self._documents, self.cfg
        if self.ntp_source == "ours":  # megatron's stream is seeded with trainer.seed, for all ranks alike
            self.ntp_batches = NTPBatcher(documents, seq_len=cfg.data.ntp_seq_len, eod_id=self.tokenizer.eod_id,
                                          seed=data_seed)
        self.context_sampler = ContextSampler.from_config(documents, cfg.data, seed=data_seed)
        # Seeded identically on every TP rank of a replica, so they sample the same thoughts.
        self.generator = torch.Generator().manual_seed(data_seed)

    def train_step(self) -> StepOutput:
        """One optimizer step of the kind the schedule says."""
        cfg, layout, summary = self.cfg, self.layout, self.summary
        kind = step_kind(self.step, cfg.trainer.schedule)
        lr = self.model.learning_rate  # this step's (the schedule moves after each update)
        if kind == NTP:
            tokens = self.ntp_batches.next_batch(self.ntp_per_rank).to(layout.device)
            output = ntp_step(self.model, tokens, cfg.trainer.ntp_micro_batch_size)
            summary.ntp_steps += 1
            summary.ntp_loss.append(output.metrics["ntp_loss"])
            summary.ntp_tokens += cfg.trainer.ntp_batch_size * cfg.data.ntp_seq_len
        else:
            output = rlp_step(
                self.model, self.context_sampler, self.contexts_per_rank, cfg.rlp, self.markers,
                self.generator, layout.device,
            )
            output.metrics.update({f"data_{k}": float(v) for k, v in self.context_sampler.stats().items()})
            summary.rlp_steps += 1
            summary.rlp_contexts += cfg.rlp.contexts_per_step
            for key in ("reward_mean", "reward_pos_frac", "thought_len_mean", "end_marker_rate"):
                getattr(summary, key).append(output.metrics[key])
            self._keep_samples(output)
        self.step += 1
        summary.steps += 1
        self._count_skip(output)
        output.metrics["lr"] = lr
        return output

    def _keep_samples(self, output: StepOutput) -> None:
        """Show the first sampled thoughts of an RLP step, and keep some for the report."""
        cfg, summary = self.cfg, self.summary
        show = cfg.logging.show_thoughts
        samples = _samples(self.tokenizer, output.batch, output.rewards, self.step,
                           rows=max(show, 2 * cfg.rlp.group_size))
        if self.layout.is_main and show and summary.rlp_steps % cfg.logging.log_every == 0:
            for sample in samples[:show]:
                log.info("  thought: %r -> x_t=%r reward=%+.3f", sample["thought"], sample["target"], sample["reward"])
        samples = samples[: 2 * cfg.rlp.group_size]
        summary.samples_last = samples
        if not summary.samples_first:
            summary.samples_first = samples

    def _count_skip(self, output: StepOutput) -> None:
        """Count a step whose update was skipped; stop after `trainer.max_consecutive_skips` in a row."""
        reason = output.skip_reason
        if reason is None:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        self.summary.skipped_steps += 1
        limit = self.cfg.trainer.max_consecutive_skips
        log.warning("step %d: update skipped (%s); %d in a row, the run stops at %d",
                    self.step, reason, self.consecutive_skips, limit)
        if self.consecutive_skips >= limit:
            last = self.checkpointer.last_saved_step
            raise TrainingHalted(
                f"{self.consecutive_skips} consecutive steps (up to step {self.step}) had a non-finite loss, "
                f"rewards or gradients and made no update (trainer.max_consecutive_skips={limit}); last: {reason}. "
                + (f"The last checkpoint is step {last} in {self.checkpointer.directory}. " if last is not None else "")
                + "Lower trainer.lr, check the data, or raise trainer.max_consecutive_skips."
            )

    def train(self) -> RunSummary:
        cfg = self.cfg
        metrics = MetricsLogger(
            self.output_dir, cfg.logging.metrics_file, cfg.logging.tensorboard, self.layout.is_main, cfg.trainer.steps,
            resume_step=self.step,  # also 0: a fresh start in a used directory begins a new history
            wandb=cfg.logging.wandb, run_config=as_dict(cfg),
        )
        if self.layout.is_main:
            (self.output_dir / "resolved_config.json").write_text(json.dumps(as_dict(cfg), indent=2))
        if self.step >= cfg.trainer.steps:
            log.info(
                "nothing to do: the run is complete at step %d (trainer.steps=%d). Raise trainer.steps to "
                "train on, or pass checkpoint.resume=never to start over.", self.step, cfg.trainer.steps,
            )
        else:
            log.info("training: steps %d..%d, writing to %s", self.step + 1, cfg.trainer.steps, self.output_dir)
        every = cfg.checkpoint.every_steps
        keep_steps = set(cfg.checkpoint.keep_steps)  # saved whatever `every` says (and never pruned)
        try:
            with PreemptionHandler(cfg.checkpoint.signals) as preemption:
                while self.step < cfg.trainer.steps:
                    if preemption.requested(self.layout.device):
                        self.summary.preempted = preemption.received
                        break
                    t0 = time.perf_counter()
                    output = self.train_step()
                    seconds = time.perf_counter() - t0
                    if self.step % cfg.logging.log_every == 0 or self.step == cfg.trainer.steps:
                        output.metrics.update(throughput(output.metrics, seconds, self.matmul_parameters,
                                                         self.layout.data_parallel, cfg.logging.peak_tflops))
                        metrics.log(self.step - 1, output.kind, output.metrics, seconds)
                    warmup = cfg.trainer.schedule.ntp_warmup_steps
                    if cfg.eval.after_warmup and self.step == warmup and self.step < cfg.trainer.steps:
                        self.evaluate("after_warmup")
                    if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < cfg.trainer.steps:
                        self.log_evaluation(metrics)
                    self.checkpointer.poll()
                    if (every and self.step % every == 0) or self.step in keep_steps:
                        self.save()
                # Once per final step: a rerun of a finished run keeps it; a longer run redoes it.
                if not self.summary.preempted and self.summary.evaluations.get("final", {}).get("step") != self.step:
                    self.evaluate("final")
                # The end of the run, or a preemption: nothing is saved twice for one step.
                self.save()
                self.checkpointer.wait()
        finally:
            metrics.close()
            self.checkpointer.close()
        self.summary.seconds = time.perf_counter() - self.start_time
        if cfg.logging.report and self.layout.is_main and not self.summary.preempted:
            self.write_report(metrics)
        return self.summary

    def evaluate(self, when: str) -> Optional[dict]:
        """The held-out evaluation (all ranks run it), kept in the summary under `when`."""
        result = self._evaluation()
        if result is not None:
            self.summary.evaluations[when] = result
        return result

    def log_evaluation(self, metrics: MetricsLogger) -> None:
        """A periodic held-out evaluation (`eval.every_steps`): its headline figures logged as kind
        "eval"; the summary keeps the evaluations after the warm-up and at the end only."""
        t0 = time.perf_counter()
        result = self._evaluation()
        if result is None:
            return
        plain, think = result["no_think"], result["with_thought"]
        metrics.log(self.step - 1, "eval", {
            "heldout_accuracy_no_think": plain["accuracy"], "heldout_accuracy_with_thought": think["accuracy"],
            "heldout_logprob_no_think": plain["logprob"], "heldout_logprob_with_thought": think["logprob"],
            "heldout_thought_len": think["thought_len_mean"],
        }, time.perf_counter() - t0)

    def _evaluation(self) -> Optional[dict]:
        if self.eval_positions is None:
            return None
        t0 = time.perf_counter()
        result = evaluate_answers(
            self.model.policy, self.eval_positions, self.cfg.rlp, self.markers, self.tokenizer,
            self.layout.device, seed=self.cfg.eval.seed, batch_contexts=self.cfg.eval.batch_contexts,
            thought_seeds=self.cfg.eval.thought_seeds,
        )
        result["step"] = self.step
        log.info("%s (step %d, %.1f s)", format_evaluation(result), self.step, time.perf_counter() - t0)
        return result

    def write_report(self, metrics: MetricsLogger) -> None:
        """<output_dir>/report/: the summary, the evaluations, plots of the run's metrics, sampled thoughts."""
        summary = self.summary
        records = read_metrics(metrics.metrics_path) if metrics.metrics_path.is_file() else []
        evaluation = summary.evaluations.get("final")
        if evaluation is not None and "after_warmup" in summary.evaluations:
            evaluation = {**evaluation, "after_warmup": summary.evaluations["after_warmup"]}
        path = write_report(
            self.output_dir, records, summary.samples_first + summary.samples_last, evaluation, summary.rows(),
            title=f"nemo-rlp run report: {self.cfg.model.name}",
        )
        log.info("report: %s", path)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (all ranks call it)."""
        return self.checkpointer.save(self.step, self.model, self.stateful_components(), self.rank_components())

    def stateful_components(self) -> dict[str, Stateful]:
        """What every rank holds alike, by its key in a checkpoint's common part: the learning-rate
        schedule, the EMA counters, and this trainer's counters."""
        return {**self.model.stateful_components(), "trainer": self}

    def rank_components(self) -> dict[str, Stateful]:
        """What differs per rank: the data streams and the rollout generator (the checkpointer adds
        the global RNG states)."""
        return {"ntp_batches": self.ntp_batches, "context_sampler": self.context_sampler,
                "generator": GeneratorState(self.generator)}

    def state_dict(self) -> dict:
        """The trainer's own state: the step, the consecutive skipped steps and the summary so far."""
        summary = asdict(self.summary)
        for key in ("seconds", "output_dir", "checkpoint_dir", "resumed_from", "preempted"):
            summary.pop(key)
        return {"step": self.step, "consecutive_skips": self.consecutive_skips, "summary": summary}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consecutive_skips = int(state["consecutive_skips"])
        for key, value in state["summary"].items():
            setattr(self.summary, key, value)

    def _restore(self, path: Path) -> None:
        from megatron.core.dist_checkpointing.core import CheckpointingException
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            restored = self.checkpointer.load(path, self.model, self.stateful_components(), self.rank_components())
        except ConfigError:
            raise
        except (KeyError, RuntimeError, ValueError, OSError, CheckpointingException, CheckpointException) as err:
            raise load_error(path, err, self.cfg) from err
        if not restored:
            # Another data-parallel size: the saved streams belong to other ranks. Restart them from
            # seeds that depend on the step, so that they do not replay the first batches.
            seed = int(np.random.SeedSequence([self.cfg.trainer.seed, self.step, distributed.data_parallel_rank()])
                       .generate_state(1)[0])
            log.warning(
                "checkpoint %s was saved with another data-parallel size: data streams restart from new seeds "
                "(the data order differs from an uninterrupted run)%s", path,
                "; the NTP batches of megatron's dataset go on where they were" if self.ntp_source == "megatron" else "",
            )
            self._seed_data_streams(seed % 2**62)
            if self.ntp_source == "megatron":  # global, so the saved step says where it was
                self.ntp_batches.consumed_samples = self.summary.ntp_steps * self.cfg.trainer.ntp_batch_size


def _samples(tokenizer: Tokenizer, batch, rewards: torch.Tensor, step: int, rows: int) -> list[dict]:
    """The first `rows` thoughts of a rollout batch, decoded, with their rewards (console and report)."""
    out = []
    for row in range(min(rows, batch.tokens.shape[0])):
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        out.append({
            "step": step,
            "context": tokenizer.decode(batch.tokens[row, max(0, start - 49) : start - 1].tolist()),
            "thought": tokenizer.decode(batch.tokens[row, start : start + length].tolist()),
            "target": tokenizer.decode([int(batch.tokens[row, batch.answer_index[row]])]),
            "reward": float(rewards.view(-1)[row]),
        })
    return out
