"""Does RLP beat compute-matched continued pretraining (CPT) on the demo? Three seeds per arm.

    python bench/science.py            # the demo's schedule, 3 seeds (25-45 minutes on 2 cores)
    python bench/science.py --quick    # the same for one seed (under 20 minutes on 2 cores)
    python bench/science.py --seeds 5 --out outputs/science -- rlp.grad_scale=0.5   # extra overrides

Per seed (``trainer.seed``), three runs of ``python -m nemo_rlp.train``:
1. the NTP warm-up alone (``trainer.steps`` = the warm-up), which saves its last checkpoint and
   evaluates the model there; then, side by side (each on half the cores; ``--sequential``: one
   after the other, each on every core):
2. the RLP arm: the demo, resumed from that checkpoint (``checkpoint.resume=<its step directory>``);
3. the CPT arm: ``+experiment=demo_cpt`` resumed from the same checkpoint, which spends on NTP steps
   the FLOPs the RLP arm spends on rollouts, teacher scoring and RLP training (the arithmetic is in
   its log), so both arms start from one model and differ only in how the compute after the warm-up
   is used.

Both arms end with the same held-out evaluation (``nemo_rlp.training.evaluate``: every held-out
position, whole answers, several sampled thoughts per position). The table gives per arm the mean
± standard deviation over seeds of the accuracy with a sampled thought and without one and of the
answer's log-probability with and without a thought; the last line is

    RLP minus CPT: <+D> points held-out thought accuracy (RLP <a>±<s>, CPT <b>±<t>, <n> seeds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SEEDS = [1234, 2345, 3456]  # --quick: the first
COMMON = ["logging.tensorboard=false", "logging.show_thoughts=0"]
REUSED: list[str] = []  # runs taken from an earlier invocation (their wall time is in their own logs)


class Run:
    """One training run (``python -m nemo_rlp.train``), started in the background; :meth:`summary`
    waits for it and returns its summary.json (the report's figures), or raises with the log's tail.
    A run that already finished with the same arguments (``science_args.json`` beside its report) is
    reused, so an interrupted or split comparison continues where it stopped."""

    def __init__(self, args: list[str], out: Path, log_name: str, threads: int | None = None):
        self.args, self.out, self.log_name = args, out, log_name
        out.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"{log_name}.log"
        self.done, self.summary_file = out / "science_args.json", out / "report" / "summary.json"
        self.proc = None
        if self.done.is_file() and self.summary_file.is_file() and json.loads(self.done.read_text()) == args:
            print(f"  {log_name}: reused the finished run in {out}", flush=True)
            REUSED.append(str(out))
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        if threads:  # arms side by side: each gets its share of the cores
            env["OMP_NUM_THREADS"] = str(threads)
        self.t0 = time.perf_counter()
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nemo_rlp.train", *COMMON, *args, f"logging.output_dir={out}"],
            cwd=out.parent, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def summary(self) -> dict:
        if self.proc is not None:
            code = self.proc.wait()
            self._log_file.close()
            if code != 0:
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"{self.log_name} failed (exit {code}); log {self.log}:\n{tail}")
            print(f"  {self.log_name}: {time.perf_counter() - self.t0:.0f} s", flush=True)
            self.done.write_text(json.dumps(self.args))
            self.proc = None
        return json.loads(self.summary_file.read_text())


def demo_schedule(overrides: list[str]) -> dict[str, int]:
    """The demo's schedule as its config sets it, with the overrides given after ``--``: the NTP
    warm-up (``trainer.schedule.ntp_warmup_steps``) and the steps after it (``trainer.steps`` minus
    the warm-up). --quick runs the same schedule for one seed: a shorter one is no quicker check (on
    earlier code, with 150 instead of 200 steps after the warm-up, the RLP arm ended anywhere from 41%
    to 75% by the luck of its rollout noise alone, against 50-52% for CPT)."""
    from nemo_rlp.config import ConfigError, load_config

    try:
        trainer = load_config(overrides).trainer
    except ConfigError as err:
        raise SystemExit(f"the overrides after -- do not make a valid config: {err}") from None
    warmup = trainer.schedule.ntp_warmup_steps
    if trainer.steps <= warmup:
        raise SystemExit(f"trainer.steps={trainer.steps} leaves no steps after the NTP warm-up "
                         f"(trainer.schedule.ntp_warmup_steps={warmup}): there is nothing to compare")
    return {"warmup": warmup, "after_warmup": trainer.steps - warmup}


def one_seed(seed: int, schedule: dict, root: Path, extra: list[str], side_by_side: bool) -> dict[str, dict]:
    warmup, steps = schedule["warmup"], schedule["warmup"] + schedule["after_warmup"]
    base = [f"trainer.seed={seed}", f"trainer.schedule.ntp_warmup_steps={warmup}", f"trainer.lr_decay_steps={warmup}",
            *extra]
    seed_dir = root / f"seed{seed}"
    warm_out = seed_dir / "warmup"
    warm = Run([*base, f"trainer.steps={warmup}", "eval.after_warmup=false", f"checkpoint.every_steps={warmup}",
                "checkpoint.resume=never"], warm_out, "warmup").summary()
    start = warm_out / "checkpoints" / f"step_{warmup:07d}"
    if not start.is_dir():
        raise SystemExit(f"the warm-up left no checkpoint at {start}")
    arms = {"warm-up": warm["evaluation"]}
    # Side by side, each arm gets half the cores: the demo's small model does not use two cores well,
    # so two arms at once finish sooner than one after the other (their figures differ from a
    # sequential run's by the floating-point order that the thread count sets, nothing else).
    threads = max(1, (os.cpu_count() or 2) // 2) if side_by_side else None
    runs = {}
    for arm, more in (("RLP", []), ("CPT", ["+experiment=demo_cpt"])):
        runs[arm] = Run([*base, *more, f"trainer.steps={steps}", f"checkpoint.resume={start}",
                         "checkpoint.every_steps=0", "eval.after_warmup=false"], seed_dir / arm.lower(), arm.lower(),
                        threads)
        if not side_by_side:
            runs[arm].summary()
    try:
        for arm, run in runs.items():
            arms[arm] = run.summary()["evaluation"]
    finally:  # one arm failed (or Ctrl-C): stop the other instead of leaving it running
        for run in runs.values():
            if run.proc is not None and run.proc.poll() is None:
                run.proc.terminate()
    return arms


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def thought_accuracy(evaluation: dict) -> float:
    """Held-out accuracy with a sampled thought, in percent: the figure the comparison is about."""
    return 100 * evaluation["with_thought"]["accuracy"]


FIGURES = (
    ("thought accuracy (%)", thought_accuracy),
    ("no-thought accuracy (%)", lambda e: 100 * e["no_think"]["accuracy"]),
    ("log p(answer), thought", lambda e: e["with_thought"]["logprob"]),
    ("log p(answer), no thought", lambda e: e["no_think"]["logprob"]),
)


def table(results: list[dict[str, dict]]) -> str:
    arms = list(results[0])
    width = max(len(name) for name, _ in FIGURES)
    lines = [f"{'':<{width}}" + "".join(f"  {arm:>16}" for arm in arms)]
    for name, pick in FIGURES:
        cells = []
        for arm in arms:
            m, s = mean_std([pick(r[arm]) for r in results])
            cells.append(f"  {m:>9.2f} ± {s:<4.2f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    lines.append(f"{'(mean ± std over seeds; per seed the evaluation is over every held-out position)':<{width}}")
    if "RLP" in arms and "CPT" in arms:
        # Both arms of a seed start from its warm-up, so a weak warm-up lowers both: the per-seed
        # difference separates RLP's effect from that shared spread (the last line keeps the arms' stds).
        paired = [thought_accuracy(r["RLP"]) - thought_accuracy(r["CPT"]) for r in results]
        m, s = mean_std(paired)
        lines.append(f"RLP minus CPT per seed (thought accuracy, points): "
                     + ", ".join(f"{d:+.1f}" for d in paired) + f"; mean {m:+.1f} ± {s:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed (seed 1234; under 20 minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: 1)")
    parser.add_argument("--seed-values", type=int, nargs="+", default=None,
                        help="these trainer.seed values instead (e.g. one seed per machine; a later run "
                             "with all of them and the same --out reuses the finished ones)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "science")
    parser.add_argument("--sequential", action="store_true",
                        help="run a seed's RLP and CPT arms one after the other, each on every core "
                             "(default: side by side, each on half of them)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    schedule = demo_schedule(args.overrides)
    seeds = SEEDS[:1] if args.quick else SEEDS
    if args.seeds is not None:
        seeds = [1234 + 1111 * i for i in range(args.seeds)]
    if args.seed_values:
        seeds = args.seed_values
    root = args.out / ("quick" if args.quick else "full")
    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        print(f"seed {seed}:", flush=True)
        results.append(one_seed(seed, schedule, root, args.overrides, not args.sequential))
    wall = time.perf_counter() - t0
    print(f"\n{len(seeds)} seed(s), warm-up {schedule['warmup']} NTP steps, then {schedule['after_warmup']} "
          f"steps of the demo's NTP/RLP schedule (RLP arm) or their compute in NTP steps (CPT arm); "
          f"wall time {wall / 60:.1f} min"
          + (f" ({len(REUSED)} of {3 * len(seeds)} runs reused from earlier invocations)" if REUSED else "") + "\n")
    print(table(results))
    rlp = [thought_accuracy(r["RLP"]) for r in results]
    cpt = [thought_accuracy(r["CPT"]) for r in results]
    (a, s), (b, t) = mean_std(rlp), mean_std(cpt)
    print(f"RLP minus CPT: {a - b:+.1f} points held-out thought accuracy (RLP {a:.1f}±{s:.1f}, CPT {b:.1f}±{t:.1f}, "
          f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''})")


if __name__ == "__main__":
    main()
