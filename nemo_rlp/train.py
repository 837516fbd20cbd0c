"""Train with RLP: `python -m nemo_rlp.train [hydra overrides]`.

With no overrides this is the embedded default (a tiny model on the bundled corpus, CPU, minutes).
The entry point holds no logic: it validates the composed config and hands it to the loop.

Exit status: 0 done; 2 a config error (nothing ran); 75 (`REQUEUE_EXIT_CODE`) stopped by a
preemption signal after saving a checkpoint: requeue and rerun the same command to continue; 1 the
run stopped on an error (e.g. too many non-finite steps), not worth a requeue.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nemo_rlp.config import ConfigError, to_run_config

log = logging.getLogger("nemo_rlp")

# megatron-core announces at import that Transformer Engine and Apex are absent (expected on CPU),
# and logs every parameter name at INFO when it builds DDP buckets: keep the console for our lines.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine is not installed.*")
logging.getLogger("megatron").setLevel(logging.WARNING)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run_cfg = to_run_config(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    output_dir = Path(run_cfg.logging.output_dir or HydraConfig.get().runtime.output_dir)

    from nemo_rlp.parallel import distributed
    from nemo_rlp.training.loop import Trainer, TrainingHalted
    from nemo_rlp.training.preemption import REQUEUE_EXIT_CODE

    try:
        # Hydra's run directory changes per invocation: checkpoints then go to a directory that the
        # same command finds again (nemo_rlp.training.checkpoint.checkpoint_dir).
        summary = Trainer(run_cfg, output_dir, output_dir_is_stable=run_cfg.logging.output_dir is not None).train()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingHalted as err:
        print(f"training stopped: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.destroy()
    if summary.preempted:
        log.info("preempted (%s) at step %d: checkpoint saved, exiting with %d for a requeue.\n%s",
                 summary.preempted, summary.steps, REQUEUE_EXIT_CODE, summary.table())
        sys.exit(REQUEUE_EXIT_CODE)
    log.info("done.\n%s", summary.table())


if __name__ == "__main__":
    main()
