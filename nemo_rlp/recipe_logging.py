"""Console logging for the recipes (import, export, evaluate, preprocess): one place that says what a
recipe prints, so that they all read alike."""

from __future__ import annotations

import logging
import warnings


def setup_recipe_logging() -> None:
    """INFO lines with a time stamp; megatron-core's own chatter only from WARNING up, and not its
    notice that Transformer Engine or Apex is missing (expected on CPU, where the recipes also run)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")
