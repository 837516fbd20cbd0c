"""The held-out evaluation of a run (the one its report ends with) on any checkpoint, with overrides.

    python recipes/evaluate_heldout.py outputs/demo_hybrid-<hash>/checkpoints/step_0001400 --out final.json
    python recipes/evaluate_heldout.py outputs/demo_hybrid-<hash>/checkpoints --out greedy.json \\
        rlp.top_k=1 eval.thought_seeds=1          # the most likely thought instead of sampled ones

The checkpoint is a checkpoint directory (any name) or a run's checkpoint folder (its newest complete
`step_XXXXXXX`), loaded as `checkpoint.resume` loads it. The trailing arguments are the training
command's Hydra overrides: the model group must be the run's (a checkpoint that does not fit the model
is refused, as on a resume), and the evaluation takes its settings from `eval.*` (held-out file,
positions, thought seeds, seed) and `rlp.*` (thought length, temperature, top-k/p, rollout path), so
any of them can be changed here without retraining. `nemo_rlp.training.evaluate` says what is scored.

Writes OUT (JSON: the evaluation as the report's summary.json keeps it, the checkpoint, the overrides)
and logs the evaluation's table. Exit status: 0 done; 2 a bad argument, config or checkpoint (one line
on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.config import ConfigError  # noqa: E402
from nemo_rlp.recipe_logging import setup_recipe_logging  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory or a run's checkpoint folder")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("overrides", nargs="*", help="the training command's Hydra overrides, key=value")
    return parser


def evaluate_heldout(checkpoint: Path, overrides: list[str]) -> dict:
    """The held-out evaluation of `checkpoint` under the config `overrides` compose to."""
    from nemo_rlp.config import load_config
    from nemo_rlp.parallel import distributed
    from nemo_rlp.training.loop import Trainer

    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a directory: give a checkpoint directory "
                          "(step_XXXXXXX) or a run's checkpoint folder")
    with tempfile.TemporaryDirectory(prefix="nemo_rlp_eval_") as scratch:
        # The trainer's own output directory is scratch: nothing of the run it came from is touched.
        cfg = load_config([*overrides, f"checkpoint.resume={checkpoint}", f"logging.output_dir={scratch}",
                           "logging.tensorboard=false", "logging.wandb.enabled=false"])
        if not cfg.eval.enabled:
            raise ConfigError("eval.enabled=false: nothing to evaluate (drop the override or set eval=heldout)")
        try:
            trainer = Trainer(cfg, Path(scratch))
            if trainer.resumed_from is None:
                raise ConfigError(f"no complete checkpoint in {str(checkpoint)!r}")
            return {"evaluation": trainer.evaluate("checkpoint"), "checkpoint": str(trainer.resumed_from),
                    "overrides": overrides}
        finally:
            distributed.destroy()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # --out anywhere among the overrides
    setup_recipe_logging()
    try:
        result = evaluate_heldout(Path(args.checkpoint), args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
