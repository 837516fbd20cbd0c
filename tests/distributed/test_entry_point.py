"""The real entry point under torchrun (2 gloo processes): TP=2 and PP=2 train and evaluate, one rank
reports and writes the run report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
FAST = [*TINY_RUN, "trainer.steps=4", "trainer.schedule.ntp_warmup_steps=1"]
# With the held-out evaluation (collective over the TP/PP ranks) and the report (main rank) back on.
FAST_WITH_EVAL = [o for o in FAST if o not in ("eval=none", "logging.report=false")] + [
    "eval=heldout", "eval.num_positions=8", "eval.batch_contexts=4",
]


@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"])
def test_torchrun_entry_point(tmp_path, layout):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nemo_rlp.train", layout,
         *FAST_WITH_EVAL, f"logging.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("done.") == 1, "exactly one rank reports"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["ntp", "ntp", "rlp", "ntp"]
    assert all(r["updated"] == 1.0 for r in records)
    assert records[2]["thought_len_mean"] >= 1
    # Evaluated after the warm-up and at the end, reported once; the report written once.
    assert log.count("evaluation on 8 held-out answer positions") == 2
    figures = json.loads((out / "report" / "summary.json").read_text())
    assert figures["evaluation"]["num_positions"] == 8 and figures["evaluation"]["after_warmup"]["step"] == 1
    assert (out / "report" / "reward.png").stat().st_size > 1000
