"""Train with RLP: `python -m nemo_rlp.train [hydra overrides]`.

With no overrides this is the embedded default (a tiny model on the bundled corpus, CPU, minutes).
The entry point holds no logic: it validates the composed config and hands it to the loop.
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
    from nemo_rlp.training.loop import Trainer

    try:
        summary = Trainer(run_cfg, output_dir).train()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.destroy()
    log.info("done.\n%s", summary.table())


if __name__ == "__main__":
    main()
