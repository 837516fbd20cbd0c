"""Train with RLP: `python -m nemo_rlp.train [hydra overrides]`.

With no overrides this is the embedded default (a tiny model on the bundled corpus, CPU, minutes).
The entry point holds no logic: it validates the composed config, checks every input and output path
(`nemo_rlp.preflight`) and hands them to the loop.

Exit status: 0 done; 2 a config or input error (one line on stderr; nothing ran): a bad value, an
unknown key, unreadable data, an unwritable output directory, a directory in use by another run, a
checkpoint that does not fit; 75 (`REQUEUE_EXIT_CODE`) stopped by a preemption signal (SIGTERM,
SIGUSR1, SIGINT) after saving a checkpoint: requeue and rerun the same command to continue; 1 a
checkpoint could not be written (e.g. no space left) or the run stopped on an error (e.g. too many
non-finite steps), not worth a requeue.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nemo_rlp.config import ConfigError, check_overrides, to_run_config

log = logging.getLogger("nemo_rlp")

# megatron-core announces at import that Transformer Engine and Apex are absent (expected on CPU),
# and logs every parameter name at INFO when it builds DDP buckets: keep the console for our lines.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine is not installed.*")
logging.getLogger("megatron").setLevel(logging.WARNING)


def _config_error(err: ConfigError) -> None:
    print(f"config error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_rlp.preflight import preflight
    from nemo_rlp.run_dirs import checkpoint_dir, default_output_dir

    try:
        run_cfg = to_run_config(cfg)
        if run_cfg.trainer.schedule.compute_matched_cpt:
            run_cfg = _compute_matched_cpt(run_cfg)
        # One directory per run, the same for every invocation (not Hydra's per-invocation one):
        # a resume finds its checkpoints, metrics.jsonl and report there.
        output_dir = Path(run_cfg.logging.output_dir or default_output_dir(run_cfg)).absolute()
        inputs = preflight(run_cfg, output_dir, checkpoint_dir(run_cfg, output_dir))
    except ConfigError as err:
        _config_error(err)

    from nemo_rlp.parallel import distributed
    from nemo_rlp.training.checkpoint_writer import CheckpointWriteError
    from nemo_rlp.training.loop import Trainer, TrainingHalted
    from nemo_rlp.training.preemption import REQUEUE_EXIT_CODE

    try:
        summary = Trainer(run_cfg, output_dir, inputs=inputs).train()
    except ConfigError as err:
        _config_error(err)
    except TrainingHalted as err:
        print(f"training stopped: {err}", file=sys.stderr)
        sys.exit(1)
    except CheckpointWriteError as err:  # e.g. a full disk: the message says what to fix
        print(f"checkpoint error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.destroy()
    if summary.preempted:
        log.info("preempted (%s) at step %d: checkpoint saved, exiting with %d for a requeue.\n%s",
                 summary.preempted, summary.steps, REQUEUE_EXIT_CODE, summary.table())
        sys.exit(REQUEUE_EXIT_CODE)
    log.info("done.\n%s", summary.table())


def _compute_matched_cpt(run_cfg):
    from nemo_rlp.planning import compute_matched_cpt

    run_cfg, arithmetic = compute_matched_cpt(run_cfg)
    log.info("\n".join(arithmetic))
    return run_cfg


def check_command_line() -> None:
    """Unknown keys, before Hydra sees them (it would exit 1 advising `+key`)."""
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        _config_error(err)


if __name__ == "__main__":
    check_command_line()
    main()
