"""The steps of `scripts/gpu_check.sh`, each in a process of its own, and the report they make.

    python3 scripts/gpu_check.py env      --mode cuda|cpu --work DIR
    python3 scripts/gpu_check.py step     NAME --mode cuda|cpu --work DIR --seconds BOX
    python3 scripts/gpu_check.py finalize NAME --work DIR --rc RC --seconds S --box BOX
    python3 scripts/gpu_check.py report   --work DIR --out DIR

`step` runs one check and writes DIR/NAME.json (status PASS, FAIL or SKIPPED, a one-line result,
metrics). `finalize` makes sure every step has a record, also when its process was killed at its
time box or crashed before writing one (then it is a FAIL that says so), and prints the step's line.
`report` writes gpu_check.md (one table) and gpu_check.json.

Mode `cuda` is the lent GPU machine; mode `cpu` runs the same code on the CPU platform, small, up to
the calls that need CUDA, so CI can run the script (tests/integration/test_gpu_check.py). This file imports
only the standard library at the top: `finalize` and `report` must work where torch is broken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Step:
    number: str
    name: str
    title: str


# In the order they run; the numbers are the (2a/2b split the CUDA-vs-CPU step in two).
STEPS = [
    Step("1", "gpu_tests", "gpu-marked tests"),
    Step("2a", "cuda_vs_cpu", "same logits on CUDA and CPU (fp32), tiny GPT and hybrid"),
    Step("2b", "mamba_kernels", "Mamba kernels: mamba-ssm's Triton vs nemo_rlp's torch"),
    Step("3", "rlp_step", "one RLP step (rollout, scoring, update, EMA): tok/s, MFU"),
    Step("4", "rollout_bench", "rollout benchmark (bench/rollout.py)"),
    Step("5", "hf_roundtrip", "Hugging Face import round trip (Megatron-Bridge)"),
]
STEP_BY_NAME = {s.name: s for s in STEPS}


@dataclass
class StepResult:
    status: str
    summary: str  # one line: the table's "result" cell
    metrics: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a step is given: the mode, its scratch directory, and when its time box ends."""

    mode: str
    work: Path
    deadline: float  # time.time() at which the step is killed

    @property
    def on_cuda(self) -> bool:
        return self.mode == "cuda"

    def seconds_left(self, reserve: float = 5.0) -> float:
        """For a subprocess's own timeout: what is left of the box, less time to record a result."""
        return max(1.0, self.deadline - time.time() - reserve)


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def import_error(module: str) -> str | None:
    """None when `import module` works, else why not (an image may hold a package that cannot import)."""
    try:
        __import__(module)
        return None
    except Exception as err:  # ImportError, or a broken build failing at import
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def collect_environment(mode: str) -> dict:
    """Versions and the machine, for the report; the `problem` key says why the steps cannot run."""
    env: dict = {
        "mode": mode,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "git_commit": _git_commit(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = (
                f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
            )
            env["gpu_capability"] = f"{props.major}.{props.minor}"
    except Exception as err:
        env["problem"] = f"torch does not import: {err}"
        return env
    for name in (
        "megatron-core",
        "triton",
        "transformers",
        "hydra-core",
        "omegaconf",
        "tokenizers",
        "einops",
    ):
        env[name] = _version(name)
    for module in ("transformer_engine", "mamba_ssm", "causal_conv1d", "megatron.bridge"):
        env[f"import {module}"] = import_error(module) or "ok"
    try:
        import megatron.core
        import nemo_rlp

        env["megatron_core_path"] = str(Path(megatron.core.__file__).parent)
        env["nemo_rlp_path"] = str(Path(nemo_rlp.__file__).parent)
    except Exception as err:
        env["problem"] = f"megatron-core or nemo_rlp does not import: {type(err).__name__}: {err}"
        return env
    if mode == "cuda" and not env["cuda_available"]:
        env["problem"] = (
            "no CUDA GPU (torch.cuda.is_available() is False): run with --cpu on a machine without one"
        )
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the device's copy of the tree has no .git, or no git


# ------------------------------------------------------------------------------------------------
# Steps that drive other programs: pytest, the rollout benchmark, the import recipe
# ------------------------------------------------------------------------------------------------


def run_gpu_tests(ctx: Context) -> StepResult:
    """`pytest -m gpu`: every gpu-marked test of the suite, read back from its JUnit XML."""
    junit = ctx.work / "gpu_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "--timeout",
        str(int(ctx.seconds_left(10))),
    ]
    proc = _run(cmd, ctx.seconds_left())
    if proc.returncode == 5:
        return StepResult(FAIL, "pytest collected no gpu-marked test")
    if not junit.is_file():
        return StepResult(FAIL, f"pytest exited with status {proc.returncode} and wrote no report")
    counts, skips, failures = _read_junit(junit)
    metrics = {"counts": counts, "skipped": skips, "failed": failures}
    said = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if counts["failed"] or counts["errors"]:
        return StepResult(FAIL, f"{said}: " + "; ".join(failures)[:300], metrics)
    if counts["passed"] == 0:
        reasons = sorted(set(skips.values()))
        return StepResult(SKIPPED, f"{said}: " + "; ".join(reasons)[:300], metrics)
    return StepResult(
        PASS, said + ("; skipped: " + "; ".join(sorted(set(skips.values()))) if skips else ""), metrics
    )


def _read_junit(path: Path) -> tuple[dict, dict, list]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    skips: dict[str, str] = {}
    failures: list[str] = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}.{case.get('name')}"
        outcome = {child.tag: child for child in case}
        if "skipped" in outcome:
            counts["skipped"] += 1
            skips[test] = (outcome["skipped"].get("message") or "").strip()
        elif "failure" in outcome:
            counts["failed"] += 1
            failures.append(f"{test}: {(outcome['failure'].get('message') or '')[:200]}")
        elif "error" in outcome:
            counts["errors"] += 1
            failures.append(f"{test}: {(outcome['error'].get('message') or '')[:200]}")
        else:
            counts["passed"] += 1
    return counts, skips, failures


# The benchmark's arguments per mode: on CPU small enough for CI (the model's context must still
# hold data.ntp_seq_len=128 tokens: context + L + 8 >= 128).
BENCH_ARGS = {
    "cuda": [
        "--models",
        "tiny_gpt",
        "tiny_hybrid",
        "--lengths",
        "64",
        "256",
        "--group-size",
        "16",
        "--contexts",
        "8",
        "--context-len",
        "256",
    ],
    "cpu": [
        "--models",
        "tiny_gpt",
        "tiny_hybrid",
        "--lengths",
        "8",
        "--group-size",
        "2",
        "--contexts",
        "1",
        "--context-len",
        "112",
    ],
}
BENCH_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(True|False)\s*$")


def bench_workload(source: str) -> tuple[str, list[str]]:
    """The `mixed` workload when bench/rollout.py has one (another issue adds it), else its default.
    Read from the benchmark's source: asking its --help would cost a megatron import."""
    if "--workload" in source and re.search(r"""["']mixed["']""", source):
        return "mixed", ["--workload", "mixed"]
    return "default (no `mixed` workload in bench/rollout.py yet)", []


def run_rollout_bench(ctx: Context) -> StepResult:
    bench = [sys.executable, str(REPO / "bench" / "rollout.py")]
    workload, args = bench_workload((REPO / "bench" / "rollout.py").read_text())
    if not ctx.on_cuda:
        # On CPU the uniform workload, small: this mode exercises the step, not the benchmark's sizes
        # (the bench's default became `mixed`, so the uniform table is asked for by name).
        workload, args = "uniform, small (CPU mode)", []
        if "--workload" in (REPO / "bench" / "rollout.py").read_text():
            args = ["--workload", "uniform", *BENCH_ARGS[ctx.mode]]
    args = args or BENCH_ARGS[ctx.mode]
    proc = _run([*bench, *args], ctx.seconds_left())
    metrics = {
        "workload": workload,
        "arguments": args,
        "rows": [],
        "bench_has_mixed_workload": bench_workload((REPO / "bench" / "rollout.py").read_text())[0] == "mixed",
        "engine": "nemo_rlp.rollout.sampler over megatron-core's StaticInferenceContext",
    }
    if proc.returncode != 0:
        return StepResult(
            FAIL, f"bench/rollout.py exited with status {proc.returncode} ({workload})", metrics
        )
    header = next((line for line in proc.stdout.splitlines() if line.startswith("thought rollouts:")), "")
    for line in proc.stdout.splitlines():
        match = BENCH_ROW.match(line.strip())
        if match:
            model, length, mode, tokens, seconds, rate, speedup, same = match.groups()
            metrics["rows"].append(
                {
                    "model": model,
                    "L": int(length),
                    "mode": mode,
                    "tokens": int(tokens),
                    "seconds": float(seconds),
                    "tokens_per_s": float(rate),
                    "vs_recompute": float(speedup),
                    "same_tokens": same == "True",
                }
            )
    metrics["setting"] = header
    summary = [line for line in proc.stdout.splitlines() if line.startswith("mixed G=")]
    if summary:  # the mixed workload's last line: the new path against lockstep and the HF peer
        metrics["summary_line"] = summary[-1]
        return StepResult(PASS, f"workload {workload}: {summary[-1]}", metrics)
    rows = metrics["rows"]
    if not rows:
        # The benchmark ran: a table this parser cannot read is worth a look, not a failure.
        return StepResult(
            PASS, f"workload {workload}: ran; its table was not parsed (see gpu_check.log)", metrics
        )
    best = {}
    for row in rows:
        key = (row["model"], row["mode"])
        best[key] = max(best.get(key, 0.0), row["tokens_per_s"])
    shown = ", ".join(f"{m} {mode} {rate:.0f} tok/s" for (m, mode), rate in best.items() if mode != "cache")
    different = [f"{r['model']} L={r['L']} {r['mode']}" for r in rows if not r["same_tokens"]]
    if different:
        return StepResult(
            FAIL, f"workload {workload}: modes sampled different tokens: {', '.join(different)}", metrics
        )
    return StepResult(PASS, f"workload {workload}: {shown}; every mode sampled the same tokens", metrics)


def run_hf_roundtrip(ctx: Context) -> StepResult:
    """The gpu test of recipes/import_checkpoint.py when Megatron-Bridge imports; else what can run
    without it (a Hugging Face Qwen3 config checked against the model config), and why not."""
    bridge = import_error("megatron.bridge")
    engine = import_error("transformer_engine")
    transformers = import_error("transformers")
    metrics = {
        "import errors": {
            "megatron.bridge": bridge,
            "transformer_engine": engine,
            "transformers": transformers,
        }
    }
    if bridge is None and ctx.on_cuda:
        test = "tests/gpu/test_import_checkpoint.py::test_import_tiny_qwen3_matches_hugging_face_logits"
        proc = _run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", test],
            ctx.seconds_left(),
        )
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        return StepResult(PASS if proc.returncode == 0 else FAIL, f"{test.split('::')[1]}: {last}", metrics)
    why = "Megatron-Bridge needs CUDA" if bridge is None else f"Megatron-Bridge does not import ({bridge})"
    if engine is not None:
        why += f"; it needs Transformer Engine ({engine}): not in the device image, too large to carry"
    if transformers is not None:
        return StepResult(SKIPPED, f"{why}; transformers does not import either ({transformers})", metrics)
    metrics["hf_config_check"] = _check_tiny_qwen3_config(ctx.work)
    return StepResult(SKIPPED, f"{why}. Ran: {metrics['hf_config_check']}", metrics)


def _check_tiny_qwen3_config(work: Path) -> str:
    """A tiny Qwen3 written by transformers; its config.json checked against nemo_rlp/conf/model/qwen3_1p7b."""
    import importlib.util

    import transformers

    spec = importlib.util.spec_from_file_location(
        "import_checkpoint", REPO / "recipes" / "import_checkpoint.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    test_spec = importlib.util.spec_from_file_location(
        "hf_test", REPO / "tests" / "gpu" / "test_import_checkpoint.py"
    )
    hf_test = importlib.util.module_from_spec(test_spec)
    test_spec.loader.exec_module(hf_test)

    from nemo_rlp.config import load_config

    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_test.TINY_QWEN3))
    model.save_pretrained(work / "hf_tiny_qwen3", safe_serialization=True)
    hf_config = json.loads((work / "hf_tiny_qwen3" / "config.json").read_text())
    recipe.check_hf_config(hf_config, load_config(["model=qwen3_1p7b", *hf_test.TINY_OVERRIDES]).model)
    return f"transformers {transformers.__version__} wrote a tiny Qwen3; its config matches the model config"


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a program from the repository root; its output goes to this step's log as well."""
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(out[-4000:], flush=True)
        raise TimeoutError(
            f"{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]} ran past {timeout:.0f} s"
        ) from err
    print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n", flush=True)
    return proc


# ------------------------------------------------------------------------------------------------
# Running a step, finalising its record, the report
# ------------------------------------------------------------------------------------------------


def step_function(name: str) -> Callable[[Context], StepResult]:
    if name == "gpu_tests":
        return run_gpu_tests
    if name == "rollout_bench":
        return run_rollout_bench
    if name == "hf_roundtrip":
        return run_hf_roundtrip
    if name == "mamba_kernels":
        import gpu_check_kernels

        return gpu_check_kernels.run_mamba_kernels
    import gpu_check_models

    return {"cuda_vs_cpu": gpu_check_models.run_cuda_vs_cpu, "rlp_step": gpu_check_models.run_rlp_step}[name]


def run_step(name: str, ctx: Context) -> int:
    start = time.time()
    try:
        result = step_function(name)(ctx)
    except Exception as err:  # a step's failure is its result, recorded with the reason
        traceback.print_exc()
        result = StepResult(
            FAIL, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}"
        )
    record = {
        **asdict(STEP_BY_NAME[name]),
        **asdict(result),
        "seconds": round(time.time() - start, 1),
        "device": _device_of(ctx.mode),
    }
    _write_json(ctx.work / f"{name}.json", record)
    return 0 if result.status != FAIL else 1


def _device_of(mode: str) -> str:
    if mode != "cuda":
        return "cpu"
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (none found)"
    except Exception:
        return "cuda"


def finalize(name: str, work: Path, rc: int, seconds: float, box: float) -> dict:
    """The step's record, made a FAIL when its process died without one; adds its log's tail."""
    path = work / f"{name}.json"
    log_path = work / f"{name}.log"
    log_lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    if path.is_file():
        record = json.loads(path.read_text())
    else:
        if rc in (124, 137):
            reason = f"timed out: killed at its {box:.0f} s time box"
        elif rc == 125 and not log_lines:
            reason = "not run: no time left in the script's budget"
        else:
            reason = f"the step's process exited with status {rc} without recording a result"
        record = {
            **asdict(STEP_BY_NAME[name]),
            "status": FAIL,
            "summary": reason,
            "metrics": {},
            "device": "?",
        }
    record["seconds"] = round(seconds, 1)
    record["box_seconds"] = box
    record["log_tail"] = log_lines[-LOG_TAIL_LINES:]
    _write_json(path, record)
    return record


def report(work: Path, out: Path, started: str, budget: float, total_seconds: float) -> int:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    records = []
    for step in STEPS:
        path = work / f"{step.name}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            why = env.get("problem") or "not run"
            records.append(
                {
                    **asdict(step),
                    "status": FAIL,
                    "summary": f"not run: {why}",
                    "metrics": {},
                    "device": "-",
                    "seconds": 0.0,
                }
            )
    verdict = FAIL if any(r["status"] == FAIL for r in records) or env.get("problem") else PASS
    summary = {
        "started": started,
        "mode": env.get("mode"),
        "verdict": verdict,
        "total_seconds": round(total_seconds, 1),
        "budget_seconds": budget,
        "environment": env,
        "steps": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "gpu_check.json", summary)
    (out / "gpu_check.md").write_text(markdown_table(summary))
    return 0 if verdict == PASS else 1


def markdown_table(summary: dict) -> str:
    env = summary["environment"]
    machine = env.get("gpu") or f"CPU only, {env.get('cpus')} cores"
    lines = [
        f"gpu_check ({summary['mode']} mode), {summary['started']}: **{summary['verdict']}** in "
        f"{summary['total_seconds']:.0f} s of a {summary['budget_seconds']:.0f} s budget. {machine}; "
        f"python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), megatron-core "
        f"{env.get('megatron-core')}, triton {env.get('triton')}, transformers {env.get('transformers')}; "
        f"commit {env.get('git_commit') or 'unknown'}.",
        "",
        "| step | check | status | device | seconds | result |",
        "|---|---|---|---|---:|---|",
    ]
    if env.get("problem"):
        lines.insert(1, f"\nThe steps could not run: {env['problem']}")
    for r in summary["steps"]:
        result = str(r["summary"]).replace("|", "\\|").replace("\n", " ")
        cells = [r["number"], r["title"], r["status"], r["device"], f"{r['seconds']:.0f}", result]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["env", "step", "finalize", "report"])
    parser.add_argument("name", nargs="?", choices=[s.name for s in STEPS])
    parser.add_argument("--mode", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rc", type=int, default=0)
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="step: its time box; finalize/report: elapsed"
    )
    parser.add_argument("--box", type=float, default=0.0)
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument(
        "--started", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    )
    args = parser.parse_args(argv)
    if args.command in ("step", "finalize") and args.name is None:
        parser.error(f"{args.command} needs a step name")
    if args.command == "env":
        env = collect_environment(args.mode)
        _write_json(args.work / "env.json", env)
        print(json.dumps(env, indent=2))
        return 1 if env.get("problem") else 0
    if args.command == "step":
        ctx = Context(mode=args.mode, work=args.work, deadline=time.time() + args.seconds)
        return run_step(args.name, ctx)
    if args.command == "finalize":
        record = finalize(args.name, args.work, args.rc, args.seconds, args.box)
        print(
            f"[gpu_check] {record['number']:>2} {record['name']:<14} {record['status']:<7} "
            f"{record['seconds']:6.1f} s  {record['summary']}",
            flush=True,
        )
        if record["status"] == FAIL:
            print("\n".join("    | " + line for line in record["log_tail"][-15:]), flush=True)
        return 0
    return report(args.work, args.out, args.started, args.budget, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
