"""Steps 2a and 3 of scripts/gpu_check.sh: the project's models on the device.

2a, same logits on CUDA and CPU: a process with CUDA hidden (so the CPU platform runs) builds the tiny
GPT and tiny hybrid, saves their weights (megatron-core dist_checkpointing, and a plain state dict)
with fixed input tokens and its fp32 logits; the step's own process builds the same models from
another seed, loads those weights on its device and compares the logits. On the GPU that is CUDA
against CPU; in --cpu mode it is a fresh CPU process against the reference one (the same code up to
the device).

3, one RLP step: the real step of the trainer (`nemo_rlp.training.steps.rlp_step`: contexts scored
by the EMA teacher, G thoughts each through the cached rollout, the update through megatron's
schedule and optimizer, the EMA update) on a ~0.6B GPT and a ~0.24B hybrid in bf16 on the GPU, or the
tiny models in fp32 on CPU (megatron's bf16 optimizer needs CUDA tensors). The first step warms up;
the second is measured: rollout tokens/s, and the model FLOPs utilisation (MFU) of the training
forward/backward.

    python3 scripts/gpu_check_models.py reference DIR    # the CPU side of 2a (run by the step)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from gpu_check import FAIL, PASS, Context, StepResult  # noqa: E402

# ------------------------------------------------------------------------------------------------
# 2a: the same logits on CUDA and on CPU
# ------------------------------------------------------------------------------------------------

EQUALITY_MODELS = ("tiny_gpt", "tiny_hybrid")
EQUALITY_VOCAB = 512
EQUALITY_SEED = 1234
# fp32 with TF32 off: CUDA and CPU differ by summation order only. The tiny models' logits are O(1).
LOGITS_ATOL = 1e-4


def _initialize(seed: int):
    """One process, no model parallelism: the layout (and its device, CUDA or the CPU platform).
    Seeds torch and megatron's RNG tracker; safe to call again."""
    from nemo_rlp.config import load_config
    from nemo_rlp.parallel import distributed

    return distributed.initialize(load_config([]).parallel, seed)


def _model_config(name: str):
    from nemo_rlp.config import load_config

    return load_config([f"model={name}"]).model


def _equality_tokens() -> torch.Tensor:
    # 100 tokens: not a multiple of the hybrid's SSD chunk (16), so the ragged last chunk is compared too.
    return torch.randint(4, EQUALITY_VOCAB, (2, 100), generator=torch.Generator().manual_seed(EQUALITY_SEED))


@torch.no_grad()
def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from nemo_rlp.models.handle import positions_like

    return model(tokens, positions_like(tokens), None).float()


def build_reference(directory: Path) -> None:
    """The CPU side: weights, tokens and logits of each equality model, under DIRECTORY/NAME/."""
    from megatron.core import dist_checkpointing

    from nemo_rlp.models import build_model

    assert not torch.cuda.is_available(), "the reference runs with CUDA hidden (CUDA_VISIBLE_DEVICES='')"
    device = _initialize(EQUALITY_SEED).device
    for name in EQUALITY_MODELS:
        torch.manual_seed(EQUALITY_SEED)
        model = build_model(_model_config(name), EQUALITY_VOCAB, 1, device).eval()
        tokens = _equality_tokens()
        target = directory / name
        (target / "dist").mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(target / "dist"))
        torch.save(
            {"state_dict": model.state_dict(), "tokens": tokens, "logits": _logits(model, tokens)},
            target / "reference.pt",
        )
        print(f"reference {name}: {sum(p.numel() for p in model.parameters())} parameters", flush=True)


def _load_weights(model: torch.nn.Module, directory: Path, state_dict: dict) -> str:
    """Load the reference weights: through dist_checkpointing (which maps local-spec keys onto
    Transformer Engine ones), or the plain state dict if that fails; says which."""
    from megatron.core import dist_checkpointing

    try:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory / "dist")))
        return "dist_checkpointing"
    except Exception as err:  # recorded: a CPU-saved checkpoint that does not load on CUDA is news
        model.load_state_dict(state_dict)
        return f"state dict (dist_checkpointing failed: {type(err).__name__}: {str(err)[:120]})"


def compare_with_reference(name: str, directory: Path, device: torch.device) -> dict:
    from nemo_rlp.models import build_model, mamba_cpu_kernels

    saved = torch.load(directory / name / "reference.pt", weights_only=False)  # our own file
    torch.manual_seed(EQUALITY_SEED + 1)  # other initial weights: every weight must come from the reference
    model = build_model(_model_config(name), EQUALITY_VOCAB, 1, device).eval()
    loaded_by = _load_weights(model, directory / name, saved["state_dict"])
    logits = _logits(model, saved["tokens"].to(device)).cpu()
    reference = saved["logits"]
    result = {
        "weights_loaded_by": loaded_by,
        "max_abs_logit_diff": float((logits - reference).abs().max()),
        "max_abs_logprob_diff": float((logits.log_softmax(-1) - reference.log_softmax(-1)).abs().max()),
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "logit_scale": float(reference.abs().max()),
    }
    if _model_config(name).arch == "hybrid":
        result["mamba_kernels"] = (
            "nemo_rlp torch kernels (mamba-ssm/causal-conv1d not importable)"
            if mamba_cpu_kernels.is_installed()
            else "mamba-ssm + causal-conv1d kernels"
        )
    del model
    return result


def run_cuda_vs_cpu(ctx: Context) -> StepResult:
    reference = ctx.work / "reference"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, __file__, "reference", str(reference)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=ctx.seconds_left() * 0.6,
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return StepResult(FAIL, f"the CPU reference process failed: {last[:250]}")
    # fp32 means fp32: TF32 matmuls would differ from the CPU by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = _initialize(EQUALITY_SEED).device
    results = {name: compare_with_reference(name, reference, device) for name in EQUALITY_MODELS}
    against = (
        "CUDA vs CPU"
        if device.type == "cuda"
        else "CPU vs CPU (no CUDA: a fresh process against the reference)"
    )
    parts = [
        f"{name} max|Δlogit| {r['max_abs_logit_diff']:.1e}, argmax {100 * r['argmax_agreement']:.0f}%"
        for name, r in results.items()
    ]
    kernels = results["tiny_hybrid"].get("mamba_kernels", "")
    summary = f"{against}: {'; '.join(parts)}; Mamba: {kernels}"
    bad = [n for n, r in results.items() if not r["max_abs_logit_diff"] <= LOGITS_ATOL]
    metrics = {"compared": against, "device": str(device), "atol": LOGITS_ATOL, "models": results}
    if bad:
        return StepResult(
            FAIL, f"logits differ beyond {LOGITS_ATOL:g} for {', '.join(bad)}. {summary}", metrics
        )
    return StepResult(PASS, summary, metrics)


# ------------------------------------------------------------------------------------------------
# 3: one RLP step, measured
# ------------------------------------------------------------------------------------------------

# Hydra overrides per mode and model. On the GPU: bf16 models sized for the lease, with the bundled
# corpus's 1024-token vocabulary (so the logits, not the layers, are small).
RLP_MODELS = {
    "cuda": {
        "gpt_0p6b": ["model=qwen3_1p7b", "model.num_layers=12"],
        "hybrid_0p24b": [
            "model=nemotron_nano_12b_v2",
            "model.num_layers=8",
            "model.hybrid_override_pattern=M-M*M-M-",
            "model.hidden_size=2048",
            "model.ffn_hidden_size=8192",
            "model.num_attention_heads=16",
            "model.mamba_num_heads=64",
            "model.mamba_head_dim=64",
        ],
    },
    "cpu": {"tiny_gpt": ["model=tiny_gpt"], "tiny_hybrid": ["model=tiny_hybrid"]},
}
RLP_SETTINGS = {
    # 16 contexts x G=16 thoughts of up to 128 tokens, trained in 4 microbatches of 64 rows. lr 1e-4,
    # not the paper's 1e-6: one Adam step of 1e-6 is below a bf16 weight's resolution, and the check
    # wants to see the weights move.
    "cuda": [
        "model.vocab_size=null",
        "model.max_sequence_length=4096",
        "rlp=paper",
        "rlp.contexts_per_step=16",
        "rlp.max_thought_len=128",
        "rlp.micro_batch_contexts=4",
        "trainer=paper",
        "trainer.lr=1e-4",
    ],
    "cpu": [
        "rlp=tiny",
        "rlp.group_size=2",
        "rlp.max_thought_len=6",
        "rlp.contexts_per_step=2",
        "trainer=tiny",
    ],
}
COMMON_SETTINGS = [
    "eval=none",
    "logging.tensorboard=false",
    "logging.report=false",
    "logging.show_thoughts=0",
]
# H200 SXM bf16 dense peak, NVIDIA's datasheet figure (the device README measured ~790 TFLOP/s on
# an 8192^3 matmul). GPU_CHECK_PEAK_TFLOPS overrides it for another GPU.
DEFAULT_PEAK_TFLOPS = 989.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Seconds spent in the functions that `rlp_step` calls, by wrapping them where
    `nemo_rlp.training.steps` looks them up (it resolves them by name at every call). The device is
    synchronised around each call, so CUDA time is counted where it is spent. Also keeps the
    training microbatches' shapes, for the FLOPs."""

    PHASES = {"scoring": "sample_contexts", "rollout": "sample_thoughts", "forward_backward": "run_schedule"}

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {phase: 0.0 for phase in self.PHASES}
        self.microbatches: list[tuple[int, int]] = []  # (rows, input width) of each training microbatch

    def patches(self, stack: ExitStack) -> None:
        from nemo_rlp.training import steps

        for phase, function in self.PHASES.items():
            stack.enter_context(
                mock.patch.object(steps, function, self._timed(phase, getattr(steps, function)))
            )

    def _timed(self, phase: str, function):
        def wrapper(*args, **kwargs):
            _synchronize(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            _synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start
            if phase == "forward_backward" and not kwargs.get("forward_only", False):
                losses = kwargs.get("losses", args[1] if len(args) > 1 else [])
                self.microbatches += [
                    (int(loss.tokens.shape[0]), int(loss.tokens.shape[1]) - 1) for loss in losses
                ]
            return result

        return wrapper


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix product per token: every 2-D weight, except the input
    embedding lookup (counted once, as the output layer, when the two are tied)."""
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    total = 0
    for name, param in model.named_parameters():
        if param.dim() != 2 or "position_embeddings" in name:
            continue
        if "word_embeddings" in name and not tied:
            continue
        total += param.numel()
    return total


def training_flops(cfg, matmul_params: int, microbatches: list[tuple[int, int]]) -> float:
    """Model FLOPs of the training forward+backward: 3 x the forward, whose FLOPs are 2 per matmul
    parameter per token plus the attention scores and their weighted sum (4 x rows x S^2 x heads x
    head dim per attention layer; full S^2, as megatron's unfused attention computes it). The Mamba
    scan's own FLOPs are left out (small next to its projections)."""
    attention_layers = cfg.num_layers if cfg.arch == "gpt" else cfg.hybrid_override_pattern.count("*")
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    forward = 0.0
    for rows, width in microbatches:
        forward += 2.0 * matmul_params * rows * width
        forward += 4.0 * attention_layers * rows * width**2 * cfg.num_attention_heads * head_dim
    return 3.0 * forward


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    # Every parameter, in its own dtype (1.2 GB for the 0.6B bf16 policy): in bf16 a small update
    # leaves many weights as they were, so any one tensor may not show it.
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(b, a) for b, a in zip(before, _snapshot(module)))


def rlp_step_once(name: str, overrides: list[str], mode: str, work: Path) -> dict:
    """Build the policy, its teacher and the data as the trainer does; run two RLP steps; measure
    the second. Returns the figures and the checks."""
    from nemo_rlp.config import load_config
    from nemo_rlp.data.sampling import ContextSampler
    from nemo_rlp.data.sources import load_documents
    from nemo_rlp.data.tokenizer import load_tokenizer
    from nemo_rlp.models.vocab import padded_vocab_size
    from nemo_rlp.rollout.sampler import Markers
    from nemo_rlp.training.losses import RLPLoss
    from nemo_rlp.training.policy import PolicyWithTeacher, nonfinite_metrics
    from nemo_rlp.training.steps import rlp_step

    cfg = load_config(
        [*overrides, *RLP_SETTINGS[mode], *COMMON_SETTINGS, f"logging.output_dir={work / name}"]
    )
    layout = _initialize(cfg.trainer.seed)
    device = layout.device
    tokenizer = load_tokenizer(cfg.data, cfg.rlp)
    documents = load_documents(cfg.data, tokenizer)
    torch.manual_seed(cfg.trainer.seed)
    start = time.perf_counter()
    model = PolicyWithTeacher(cfg, padded_vocab_size(cfg.model, tokenizer.vocab_size, 1), layout)
    build_seconds = time.perf_counter() - start
    sampler = ContextSampler.from_config(documents, cfg.data, seed=cfg.trainer.seed)
    markers = Markers(
        think_start=tokenizer.think_start_id, think_end=tokenizer.think_end_id, pad=tokenizer.pad_id
    )
    generator = torch.Generator().manual_seed(cfg.trainer.seed)

    def step(timer: PhaseTimer | None):
        with ExitStack() as stack:
            if timer is not None:
                timer.patches(stack)
            return rlp_step(model, sampler, cfg.rlp.contexts_per_step, cfg.rlp, markers, generator, device)

    warm_metrics = step(None).metrics  # seeds the teacher; pays one-time costs (kernels, allocator)
    policy_before, teacher_before = _snapshot(model.language_model), _snapshot(model.ema.teacher)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    _synchronize(device)
    start = time.perf_counter()
    output = step(timer)
    metrics, batch = output.metrics, output.batch
    _synchronize(device)
    total = time.perf_counter() - start
    result = _rlp_figures(cfg, model, timer, batch, total, device)
    result.update(
        build_seconds=round(build_seconds, 1),
        dtype=cfg.model.params_dtype,
        updated=[warm_metrics.get("updated"), metrics.get("updated")],
        nonfinite=[*nonfinite_metrics(warm_metrics, RLPLoss.guarded_metrics),
                   *nonfinite_metrics(metrics, RLPLoss.guarded_metrics)],
        policy_changed=_changed(policy_before, model.language_model),
        teacher_changed=_changed(teacher_before, model.ema.teacher),
        ema_updates=model.ema.num_updates,
        reward_mean=metrics.get("reward_mean"),
        loss_pg=metrics.get("loss_pg"),
    )
    return result


def _rlp_figures(cfg, model, timer: PhaseTimer, batch, total: float, device: torch.device) -> dict:
    seconds = timer.seconds
    thought_tokens = int(batch.thought_len.sum())
    matmul_params = matmul_parameters(model.language_model)
    flops = training_flops(cfg.model, matmul_params, timer.microbatches)
    tflops = flops / max(seconds["forward_backward"], 1e-9) / 1e12
    peak = (
        float(os.environ.get("GPU_CHECK_PEAK_TFLOPS", DEFAULT_PEAK_TFLOPS)) if device.type == "cuda" else None
    )
    figures = {
        "parameters": sum(p.numel() for p in model.language_model.parameters()),
        "matmul_parameters": matmul_params,
        "rows": int(batch.tokens.shape[0]),
        "thought_tokens": thought_tokens,
        "rollout_seconds": round(seconds["rollout"], 3),
        "rollout_tokens_per_s": round(thought_tokens / max(seconds["rollout"], 1e-9), 1),
        "scoring_seconds": round(seconds["scoring"], 3),
        "forward_backward_seconds": round(seconds["forward_backward"], 3),
        "training_tokens": sum(rows * width for rows, width in timer.microbatches),
        "training_tflops": round(tflops, 4),
        "peak_tflops": peak,
        "mfu": round(tflops / peak, 4) if peak else None,
        "optimizer_and_ema_seconds": round(total - sum(seconds.values()), 3),
        "step_seconds": round(total, 3),
    }
    if device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    return figures


def _rlp_problems(result: dict) -> list[str]:
    problems = []
    if result["updated"] != [1.0, 1.0]:
        problems.append(f"updates applied {result['updated']} (expected both)")
    if result["nonfinite"]:
        problems.append("non-finite " + ", ".join(result["nonfinite"]))
    if not result["policy_changed"]:
        problems.append("the policy did not change")
    if not result["teacher_changed"] or result["ema_updates"] != 2:
        problems.append(f"the EMA teacher did not move ({result['ema_updates']} updates)")
    return problems


def run_rlp_step(ctx: Context) -> StepResult:
    results, problems = {}, []
    for name, overrides in RLP_MODELS[ctx.mode].items():
        results[name] = rlp_step_once(name, overrides, ctx.mode, ctx.work)
        gc.collect()  # the model just measured is garbage now: free its memory for the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        problems += [f"{name}: {p}" for p in _rlp_problems(results[name])]
        print(
            f"{name}: {json.dumps(results[name])}", flush=True
        )  # in the log if the next model runs out of time
    parts = []
    for name, r in results.items():
        mfu = (
            f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}"
            if r["mfu"] is not None
            else "MFU n/a (no peak on CPU)"
        )
        parts.append(
            f"{name} {r['parameters'] / 1e6:.1f}M {r['dtype']}: "
            f"rollout {r['rollout_tokens_per_s']:.0f} tok/s ({r['rows']} rows), "
            f"fwd+bwd {r['training_tflops']:.3g} TFLOP/s, {mfu}, step {r['step_seconds']:.1f} s"
        )
    summary = "; ".join(parts)
    if problems:
        return StepResult(FAIL, f"{'; '.join(problems)}. {summary}", {"models": results})
    return StepResult(PASS, summary, {"models": results})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "reference":
        sys.exit(f"usage: {sys.argv[0]} reference DIR")
    build_reference(Path(sys.argv[2]))
