"""Step 2b of scripts/gpu_check.sh: mamba-ssm's Triton kernels against nemo_rlp's torch kernels.

The device image has triton but not mamba-ssm, whose wheels are built for each CUDA/torch pair (and
mamba_ssm/__init__.py imports a compiled CUDA extension). Its Triton kernels, though, are plain
Python: scripts/gpu_wheels.sh keeps mamba-ssm's source archive next to the wheels, gpu_check.sh
unpacks it and names the folder in GPU_CHECK_MAMBA_SSM_SRC, and this step imports the Triton ops from
there without running the package's __init__. It then compares them with the pure-torch stand-ins
that megatron's MambaMixer runs when mamba-ssm is absent (nemo_rlp.models.mamba_cpu_kernels), on the
same inputs, and times the chunked scan both ways (forward only: the Triton backward kernels take
minutes to compile).

Without CUDA (--cpu) the Triton side cannot run: the torch kernels run on the same (smaller) cases
against the token-by-token recurrence, and the step is SKIPPED with that reason.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_check import PASS, SKIPPED, FAIL, Context, StepResult

MAMBA_SSM_SRC_ENV = "GPU_CHECK_MAMBA_SSM_SRC"
# Relative to the largest |reference| value. Triton's tl.dot multiplies fp32 in TF32 (10-bit
# mantissa) on Hopper: the scan's matmuls differ from fp32 torch by ~1e-3 relative.
TOLERANCE = {
    "chunk_scan": 1e-2,
    "chunk_scan_final_state": 1e-2,
    "state_update": 1e-4,
    "state_update_state": 1e-4,
    "gated_rmsnorm": 1e-4,
}


def load_triton_kernels() -> tuple[dict | None, str]:
    """mamba-ssm's Triton ops (from an installed mamba-ssm, or from its carried sources) and where
    they came from; or None and why not."""
    if not torch.cuda.is_available():
        return None, "mamba-ssm's Triton kernels need CUDA"
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f"triton does not import ({err})"
    source = "installed mamba-ssm"
    try:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception:  # not installed, or its compiled extension does not load
        folder = os.environ.get(MAMBA_SSM_SRC_ENV, "")
        if not folder or not (Path(folder) / "mamba_ssm" / "ops" / "triton").is_dir():
            return None, (
                f"mamba-ssm is not installed and its sources were not carried ({MAMBA_SSM_SRC_ENV} unset "
                "or empty: run scripts/gpu_wheels.sh, carry .whl)"
            )
        _register_package_without_init(Path(folder) / "mamba_ssm")
        source = f"mamba-ssm sources ({Path(folder).name})"
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    kernels = {
        "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
        "selective_state_update": selective_state_update,
        "rmsnorm_fn": rmsnorm_fn,
    }
    return kernels, source


def _register_package_without_init(package_dir: Path) -> None:
    """Make `mamba_ssm.*` importable from `package_dir` without executing mamba_ssm/__init__.py (it
    imports the compiled selective-scan extension, which the Triton ops do not use)."""
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]  # a failed import above may have left half-initialised modules
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(package_dir)]
    sys.modules["mamba_ssm"] = package


def scan_inputs(b, L, h, p, g, n, device, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return dict(
        x=randn(b, L, h, p),
        dt=randn(b, L, h),
        A=-(torch.rand(h, generator=gen) * 4 + 0.5).to(device),
        B=randn(b, L, g, n, scale=n**-0.5),
        C=randn(b, L, g, n, scale=n**-0.5),
        D=randn(h),
        z=randn(b, L, h, p),
        dt_bias=randn(h, scale=0.5),
        initial_states=randn(b, h, p, n, scale=0.5),
    )


def run_scan(scan, inp: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return scan(
        inp["x"],
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        chunk,
        D=inp["D"],
        z=inp["z"],
        dt_bias=inp["dt_bias"],
        initial_states=inp["initial_states"],
        dt_softplus=True,
        return_final_states=True,
    )


def state_update_inputs(b, h, p, g, n, device, seed=1) -> dict:
    """One decoding step in the shapes megatron's mixer passes (per-head dt, A, D, dt_bias expanded
    over the head dimension)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    A = -(torch.rand(h, generator=gen) * 4 + 0.5)
    return dict(
        state=randn(b, h, p, n, scale=0.5),
        x=randn(b, h, p),
        dt=randn(b, h, 1).expand(b, h, p),
        A=A[:, None, None].expand(h, p, n).to(device),
        B=randn(b, g, n, scale=n**-0.5),
        C=randn(b, g, n, scale=n**-0.5),
        D=randn(h, 1).expand(h, p),
        z=randn(b, h, p),
        dt_bias=randn(h, 1, scale=0.5).expand(h, p),
    )


def run_state_update(update, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    state = inp["state"].clone()  # updated in place
    out = update(
        state,
        inp["x"],
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        D=inp["D"],
        z=inp["z"],
        dt_bias=inp["dt_bias"],
        dt_softplus=True,
    )
    return out, state


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float(
        (ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-12)
    )


def compare_kernels(theirs: dict | None, device: torch.device, small: bool) -> dict[str, float]:
    """Relative errors of the torch kernels against mamba-ssm's Triton ones (or, without them,
    against the token-by-token recurrence for the scan and the state update)."""
    from nemo_rlp.models import mamba_cpu_kernels as ours

    # The large case has the timing case's head dim, state size and chunk (Triton compiles per
    # block size: one compilation serves both).
    b, L, h, p, g, n, chunk = (2, 45, 4, 8, 2, 16, 16) if small else (2, 300, 16, 64, 2, 128, 128)
    errors = {}
    inp = scan_inputs(b, L, h, p, g, n, device)
    y, final = run_scan(ours.mamba_chunk_scan_combined, inp, chunk)
    if theirs is not None:
        y_ref, final_ref = run_scan(theirs["mamba_chunk_scan_combined"], inp, chunk)
    else:
        dt = F.softplus(inp["dt"] + inp["dt_bias"])
        y_ref, final_ref = ours.ssd_recurrence_reference(
            inp["x"],
            dt,
            inp["A"],
            inp["B"],
            inp["C"],
            D=inp["D"],
            z=inp["z"],
            initial_states=inp["initial_states"],
        )
    errors["chunk_scan"] = _relative_error(y, y_ref)
    errors["chunk_scan_final_state"] = _relative_error(final, final_ref)

    step = state_update_inputs(8 if not small else 2, h, p, g, n, device)
    out, state = run_state_update(ours.selective_state_update, step)
    if theirs is not None:
        out_ref, state_ref = run_state_update(theirs["selective_state_update"], step)
        errors["state_update"] = _relative_error(out, out_ref)
        errors["state_update_state"] = _relative_error(state, state_ref)

        gen = torch.Generator().manual_seed(2)
        x, z = (torch.randn(8, L, h * p, generator=gen).to(device) for _ in range(2))
        weight = (torch.rand(h * p, generator=gen) + 0.5).to(device)
        mine = ours.rmsnorm_fn(x, weight, None, z=z, eps=1e-5, group_size=p * 2, norm_before_gate=False)
        reference = theirs["rmsnorm_fn"](
            x, weight, None, z=z, eps=1e-5, group_size=p * 2, norm_before_gate=False
        )
        errors["gated_rmsnorm"] = _relative_error(mine, reference)
    return errors


def time_scan(theirs: dict, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Forward milliseconds of the chunked scan at a training-like size, torch vs Triton (median)."""
    from nemo_rlp.models import mamba_cpu_kernels as ours

    inp = scan_inputs(4, 2048, 32, 64, 8, 128, device, seed=3)
    timings = {}
    for label, scan in (
        ("torch_ms", ours.mamba_chunk_scan_combined),
        ("triton_ms", theirs["mamba_chunk_scan_combined"]),
    ):
        samples = []
        for i in range(repeats + 2):  # two warm-ups: Triton compiles and autotunes on the first call
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            run_scan(scan, inp, 128)
            torch.cuda.synchronize(device)
            if i >= 2:
                samples.append((time.perf_counter() - start) * 1000)
        timings[label] = round(sorted(samples)[len(samples) // 2], 2)
    return timings


def run_mamba_kernels(ctx: Context) -> StepResult:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    theirs, source = load_triton_kernels()
    torch.backends.cuda.matmul.allow_tf32 = False  # our side in true fp32
    errors = compare_kernels(theirs, device, small=theirs is None)
    metrics = {
        "triton_source": source if theirs is not None else None,
        "relative_errors": errors,
        "tolerance": TOLERANCE,
    }
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    print(f"relative errors ({source}): {shown}", flush=True)  # in the log even if the timing runs out
    if theirs is None:
        # The torch kernels against the recurrence: a sanity check that this code runs here.
        bad = [k for k, v in errors.items() if not v < 1e-4]
        if bad:
            return StepResult(FAIL, f"torch kernels off the recurrence: {shown}", metrics)
        return StepResult(
            SKIPPED,
            f"{source}; ran the torch kernels on {device.type} against the recurrence: {shown}",
            metrics,
        )
    if ctx.seconds_left() > 30:
        metrics["scan_forward"] = timing = time_scan(theirs, device)
        timed = f"scan fwd (4x2048, 32 heads) torch {timing['torch_ms']} ms, Triton {timing['triton_ms']} ms"
    else:
        timed = "no time left to time the scan"
    # The models of steps 2a and 3 run the torch kernels all the same: megatron's mixer also needs
    # causal-conv1d's CUDA extension for mamba-ssm's fused path, and the image has neither.
    summary = f"Triton from {source} vs torch: {shown}; {timed}"
    bad = [k for k, v in errors.items() if not v <= TOLERANCE[k]]
    return StepResult(
        FAIL if bad else PASS, (f"beyond tolerance: {', '.join(bad)}. " if bad else "") + summary, metrics
    )
