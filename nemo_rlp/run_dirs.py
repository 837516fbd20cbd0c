"""Where a run writes: its output directory and its checkpoint directory, the same for every
invocation of one run (nemo_rlp.training.checkpoint's docstring). Kept free of torch, so that the
entry point can check these paths before anything heavy is imported."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from nemo_rlp.config import RunConfig, as_dict

# Keys that may differ between invocations of the same run: they are left out of the default
# directory's hash, and differences in them are not reported on resume.
VOLATILE_KEYS = ("logging", "checkpoint", "parallel", "trainer.steps", "trainer.max_consecutive_skips",
                 "data.ntp_cache_dir")


def run_id(cfg: RunConfig) -> str:
    """`<model.name>-<hash>`: the same for every invocation of one run (see `VOLATILE_KEYS`)."""
    stable = _without(as_dict(cfg), VOLATILE_KEYS)
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cfg.model.name}-{digest}"


def default_output_dir(cfg: RunConfig, cwd: Path | None = None) -> Path:
    """`outputs/<run_id>` under `cwd` (default: the working directory): the same for every
    invocation of one run, absolute."""
    return Path(cwd or Path.cwd()).absolute() / "outputs" / run_id(cfg)


def checkpoint_dir(cfg: RunConfig, output_dir: Path | None = None, cwd: Path | None = None) -> Path:
    """Where this run's checkpoints live (module docstring): absolute, the same on every rank.
    `output_dir`: the run's output directory (default: `logging.output_dir`, else
    `default_output_dir`), whose `checkpoints/` is the default."""
    output_dir = output_dir if output_dir is not None else cfg.logging.output_dir
    if cfg.checkpoint.dir is not None:
        path = Path(cfg.checkpoint.dir)
    elif output_dir is not None:
        path = Path(output_dir) / "checkpoints"
    else:
        path = default_output_dir(cfg, cwd) / "checkpoints"
    return path if path.is_absolute() else Path(cwd or Path.cwd()) / path


def _without(tree: dict, dotted_keys: tuple[str, ...]) -> dict:
    tree = copy.deepcopy(tree)
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return tree
