"""Plan a run before it starts, on any machine (no GPU): `python -m nemo_rlp.plan EXPERIMENT [overrides]`.

    python -m nemo_rlp.plan rlp_qwen3_1p7b --nodes 8 data.corpus=/data/corpus data.tokenizer=tok.json
    python -m nemo_rlp.plan none                 # the base config (the tiny CPU default)
    python -m nemo_rlp.plan rlp_qwen3_1p7b --nodes 8 --time h100 data.corpus=... data.tokenizer=...

`--time h100|h200` adds seconds per phase of one RLP step next to the roofline floor of the same
work, from the sampler's replayed schedule and host work measured on CPU (`nemo_rlp.planning`,
section "Time per RLP step"); it warns when the rollout decode is host-bound.

EXPERIMENT names a file in nemo_rlp/conf/experiment/ (`none`: the base config alone). The overrides are the
same Hydra overrides the training entry point takes, and the config is validated the same way. It
prints the parameters, the memory per GPU phase by phase, tokens and FLOPs per step and the token
budget of a compute-matched CPT baseline (the model and its assumptions: `nemo_rlp.planning`).

Exit status: 0 the layout fits; 1 it does not (the table's last line says why and what would shrink it);
2 a config error (nothing planned). The Slurm recipes run this in their dry run (DRY_RUN=1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from nemo_rlp.config import CONF_DIR, ConfigError

_WHAT_IF_KEYS = ("distributed_optimizer", "rollout_chunk_contexts", "train_microbatch_rows", "teacher_rows")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nemo_rlp.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", help="a name in nemo_rlp/conf/experiment/ (without .yaml), or 'none'")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m nemo_rlp.train")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (tasks) per node (default 8)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument(
        "--reserve-gib", type=float, default=6.0,
        help="kept free for the CUDA context, NCCL, TE workspaces and fragmentation (default 6)",
    )
    parser.add_argument("--time", choices=["h100", "h200"], default=None,
                        help="also print seconds per phase of one RLP step on this GPU")
    parser.add_argument("--thoughts", choices=["full", "geometric"], default="full",
                        help="--time: every thought runs to L (worst case, default), or truncated-geometric "
                        "lengths with a quarter reaching L")
    parser.add_argument(
        "--what-if", action="append", default=[], metavar="KEY=VALUE",
        help="plan a change the trainer does not make today: " + ", ".join(_WHAT_IF_KEYS)
        + " (e.g. --what-if train_microbatch_rows=2); repeatable",
    )
    return parser


def _what_if(items: list[str]):
    from nemo_rlp.planning import WhatIf

    values: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in _WHAT_IF_KEYS:
            raise ConfigError(f"--what-if {item!r} is not allowed: KEY=VALUE with KEY one of {', '.join(_WHAT_IF_KEYS)}")
        if key == "distributed_optimizer":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"--what-if {item!r} is not allowed: distributed_optimizer=true or false")
            values[key] = value.lower() == "true"
        else:
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"--what-if {item!r} is not allowed: {key} takes an integer >= 1") from None
    return WhatIf(**values)


def _experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def build_plan(args: argparse.Namespace):
    """Compose and validate the config, count the parameters on the meta device, plan."""
    from nemo_rlp.config import load_config
    from nemo_rlp.planning import Hardware, count_parameters, make_plan

    if args.experiment != "none" and args.experiment not in _experiments():
        raise ConfigError(
            f"experiment {args.experiment!r} is not in nemo_rlp/conf/experiment/; one of: {', '.join(_experiments())} (or none)"
        )
    for key in ("nodes", "gpus_per_node"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} is not allowed: an integer >= 1")
    overrides = ([f"+experiment={args.experiment}"] if args.experiment != "none" else []) + list(args.overrides)
    try:
        cfg = load_config(overrides)
    except ConfigError as err:
        raise ConfigError(_explain_missing(str(err))) from None
    vocab = _model_vocabulary(cfg)
    counts = count_parameters(cfg.model, vocab)
    hardware = Hardware(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.reserve_gib)
    return make_plan(cfg, hardware, counts, experiment=args.experiment, what_if=_what_if(args.what_if))


PLACEHOLDER = "<SET ON THE COMMAND LINE"  # the experiments' data placeholders (nemo_rlp/conf/experiment/)


def _explain_missing(message: str) -> str:
    if PLACEHOLDER in message or "Missing mandatory value" in message:
        return (
            f"{message}. The experiment leaves the data to you: add data.corpus=PREFIX (a Megatron indexed "
            "dataset, PREFIX.bin + PREFIX.idx, from recipes/preprocess_data.py) and data.tokenizer=PATH (the "
            "base checkpoint's tokenizer.json) to the command line"
        )
    return message


def _model_vocabulary(cfg) -> int:
    """The model's padded vocabulary, checked against the tokenizer the trainer would load (with the
    same markers), so a tokenizer the run would reject fails here too."""
    from nemo_rlp.data.tokenizer import load_tokenizer
    from nemo_rlp.models import padded_vocab_size

    try:
        tokenizer = load_tokenizer(cfg.data, cfg.rlp)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={str(cfg.data.tokenizer)!r}: {err}") from None
    return padded_vocab_size(cfg.model, tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    # megatron-core announces at import what it falls back to on a CPU machine: not our business here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    try:
        plan = build_plan(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.time:
        from nemo_rlp.planning import format_step_time, plan_step_time

        try:
            step_time = plan_step_time(plan, args.time, args.thoughts)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        print(format_step_time(plan, step_time, args.thoughts), end="\n\n")
    print(plan.table(), flush=True)  # its last line: "fits", or why not and what would shrink it
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
