"""recipes/evaluate_heldout.py: the held-out evaluation of a run, on its checkpoint, with overrides.

A tiny run trains two steps and ends with its held-out evaluation; the recipe, run as a user runs it
(a subprocess), must give that evaluation's figures again from the run's checkpoint folder, and take
evaluation overrides (here the most likely thought, one per position) without retraining.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rlp.config import load_config
from nemo_rlp.training.loop import Trainer

from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
EVAL = ["eval=heldout", "eval.num_positions=6", "eval.thought_seeds=2", "eval.after_warmup=false"]


def _recipe(tmp_path: Path, checkpoint: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / "evaluate_heldout.py"), str(checkpoint), "--out", str(out), *overrides],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=200)


@pytest.mark.timeout(300)
def test_the_recipe_gives_the_runs_own_final_evaluation_and_takes_overrides(tmp_path):
    overrides = [*TINY_RUN, *EVAL, "trainer.steps=2", "trainer.schedule.ntp_warmup_steps=1"]
    summary = Trainer(load_config(overrides), tmp_path / "run").train()
    final = summary.evaluations["final"]
    assert final["num_positions"] == 6 and final["thought_seeds"] == 2

    out = tmp_path / "again.json"
    done = _recipe(tmp_path, tmp_path / "run" / "checkpoints", out, *overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["checkpoint"].endswith("step_0000002") and again["overrides"] == overrides
    assert again["evaluation"]["step"] == 2
    for part in ("with_thought", "no_think"):  # the same model, positions, seeds: the same figures
        assert again["evaluation"][part] == pytest.approx(final[part], abs=1e-6)

    greedy = tmp_path / "greedy.json"
    done = _recipe(tmp_path, tmp_path / "run" / "checkpoints" / "step_0000002", greedy, *overrides,
                   "rlp.top_k=1", "eval.thought_seeds=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(greedy.read_text())["evaluation"]["thought_seeds"] == 1


def test_the_recipe_names_a_missing_checkpoint(tmp_path):
    done = _recipe(tmp_path, tmp_path / "nowhere", tmp_path / "x.json", *TINY_RUN, *EVAL)
    assert done.returncode == 2 and "is not a directory" in done.stderr
    assert not (tmp_path / "x.json").exists()
