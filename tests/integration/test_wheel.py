"""A real wheel: built from the source, installed non-editable into a fresh virtualenv, run from a
directory outside the repository.

The configs (`nemo_rlp/conf/`) and the demo's corpus and tokenizer are package data; before they
were, an installed copy failed at once with Hydra's "Primary config directory not found". The fresh
virtualenv gets nemo-rlp from the wheel and nothing else: its dependencies (torch, megatron-core, ...)
come from the environment running this test, through a `.pth` file that names that environment's
site-packages directories. A directory named in a `.pth` file is added to `sys.path` without its own
`.pth` files being read, so the editable install of the checkout (a `.pth` file there) stays invisible,
and the venv's own site-packages, which holds the wheel, comes first. Offline throughout: the wheel is
built without build isolation (setuptools from the `test` extra) and installed with `--no-index`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _dependency_paths() -> list[str]:
    """The site-packages directories this test's interpreter imports its dependencies from."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return sorted(p for p in paths if Path(p).is_dir() and not Path(p).resolve().is_relative_to(REPO))


# 40-60 s alone on 2 cores (build 3 s, venv 5 s, the run and the plan the rest); far more on a busy machine.
@pytest.mark.timeout(900)
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path, experiment_data: list[str]) -> None:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools (the test extra)")
    # No PYTHONPATH: a checkout on it would let pip and Python find the source instead of the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "nemo_rlp", src / "nemo_rlp", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, src], env=env, timeout=180)
    (wheel,) = dist.glob("nemo_rlp-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], env=env, timeout=120)
    python = venv / "bin" / "python"
    # Installed before the dependencies are visible: pip sees an empty environment.
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], env=env, timeout=120)
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip())
    (venv_site / "_nemo_rlp_test_dependencies.pth").write_text("\n".join(_dependency_paths()) + "\n")

    elsewhere = tmp_path / "elsewhere"  # not the repository, not the source copy
    elsewhere.mkdir()
    where = _run([python, "-c", "import nemo_rlp; print(nemo_rlp.__file__)"], cwd=elsewhere, env=env).stdout
    assert Path(where.strip()).resolve().is_relative_to(venv_site.resolve()), where

    out = elsewhere / "run"
    overrides = [*TINY_RUN, "trainer.steps=4", "trainer.schedule.ntp_warmup_steps=2", f"logging.output_dir={out}",
                 "checkpoint.resume=never"]
    proc = _run([python, "-m", "nemo_rlp.train", *overrides], cwd=elsewhere, env=env, timeout=500)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["ntp", "ntp", "ntp", "rlp"], proc.stderr[-2000:]
    # The experiments are package data too: the planner composes one from the installed copy.
    plan = _run([python, "-m", "nemo_rlp.plan", "rlp_qwen3_1p7b", "--nodes", "8", *experiment_data],
                cwd=elsewhere, env=env, timeout=300)
    assert "FLOP" in plan.stdout
