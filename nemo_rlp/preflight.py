"""Everything a run reads or writes, checked before any model is built: the output and checkpoint
directories (writable, and not in use by another run: nemo_rlp.training.run_lock), the tokenizer,
the corpus, the held-out set.

A bad input used to surface 20-50 s into a run (after the process group, megatron-core and the
model), inside a Hydra traceback, with exit status 1. Here each problem becomes a `ConfigError`
whose one line names the file, the line or byte, and the fix (the data loaders' messages do), which
the entry point reports like any config error: exit status 2, nothing ran. What is loaded here is
handed to the trainer (`RunInputs`), not loaded twice.

The command line's overrides are checked before Hydra composes them, by `nemo_rlp.config.check_overrides`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nemo_rlp.config import ConfigError, RunConfig


@dataclass
class RunInputs:
    """What a run reads, loaded and checked: the tokenizer, the corpus, the held-out positions."""

    tokenizer: Any
    documents: Any
    eval_positions: Optional[list] = None
    ntp_dataset: Optional[str] = None  # "ours" or "megatron" (nemo_rlp.data.megatron_ntp); None: not chosen yet


def check_writable(directory: Path, key: str) -> list[Path]:
    """Create `directory` if needed and prove that a file can be written in it; returns the
    directories this created (outermost first)."""
    directory = Path(directory)
    created = [p for p in [*reversed(directory.parents), directory] if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        blocker = next((p for p in [directory, *directory.parents] if p.exists()), directory)
        why = ("a file, not a directory, is in the way: " + str(blocker)) if blocker.is_file() else (
            error.strerror or str(error))
        raise ConfigError(f"{key}={str(directory)!r} cannot be written ({why}); give {key} a writable directory") from None
    return created


def load_inputs(cfg: RunConfig) -> RunInputs:
    """Load the tokenizer, the corpus and (if enabled) the held-out set; a problem raises
    `ConfigError` naming the key, the file and the line or byte.

    A file without marks is the first thing a user's own corpus meets (the defaults think at the
    bundled corpus's marked answers and evaluate on its held-out worksheets): its error names the
    override that fits the file's role, `data.rlp_positions=uniform` for the corpus, `eval=none` or
    `eval.corpus` for the held-out set."""
    from nemo_rlp.data.marked import NoMarkedPositions
    from nemo_rlp.data.megatron_ntp import choose_ntp_dataset
    from nemo_rlp.data.sources import load_documents
    from nemo_rlp.data.tokenizer import load_tokenizer
    from nemo_rlp.training.evaluate import load_heldout

    def failed(key: str, error: Exception) -> ConfigError:
        message = " ".join(str(error).split()) or type(error).__name__
        return ConfigError(f"{key}: {message}")

    try:
        tokenizer = load_tokenizer(cfg.data, cfg.rlp)
    except (OSError, ValueError) as error:
        raise failed("data.tokenizer", error) from None
    try:
        documents = load_documents(cfg.data, tokenizer)
    except NoMarkedPositions as error:
        raise ConfigError(
            f"data.corpus: {error.path}: no document marks a position (key {error.positions_key!r}), and "
            "data.rlp_positions=marked thinks at marked positions only. For a corpus without marks pass "
            "data.rlp_positions=uniform (RLP at any position, the paper's setting); if the corpus marks its "
            "positions under another key, set data.positions_key to it"
        ) from None
    except (OSError, ValueError, IndexError, KeyError) as error:
        raise failed("data.blend" if cfg.data.blend else "data.corpus", error) from None
    try:
        ntp_dataset = choose_ntp_dataset(cfg.data, documents)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    positions = None
    if cfg.eval.enabled:
        try:
            positions = load_heldout(cfg.eval, cfg.data, tokenizer)
        except NoMarkedPositions as error:
            raise ConfigError(
                f"eval.corpus: {error.path}: no document marks a position (key {error.positions_key!r}); the "
                "held-out evaluation scores marked answers only. Pass eval=none, or eval.corpus=<a JSONL file "
                "whose lines mark their answers under data.positions_key>"
            ) from None
        except (OSError, ValueError, IndexError, KeyError) as error:
            raise failed("eval.corpus", error) from None
    return RunInputs(tokenizer, documents, positions, ntp_dataset)


def preflight(cfg: RunConfig, output_dir: Path, checkpoints: Path) -> RunInputs:
    """The output paths and the run lock (quick: a second run on a directory in use stops in about
    a second), then the inputs; what this created is removed again when an input is bad, so that a
    run that never started leaves nothing behind."""
    from nemo_rlp.parallel.distributed import launch_rank
    from nemo_rlp.training.run_lock import lock_run_directories, release_directory

    created = check_writable(output_dir, "logging.output_dir") + check_writable(checkpoints, "checkpoint.dir")
    locked = lock_run_directories(output_dir, checkpoints) if launch_rank() == 0 else []
    try:
        return load_inputs(cfg)
    except ConfigError:
        for directory in locked:
            release_directory(directory)
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:  # not empty (another process wrote there): leave it
                pass
        raise
