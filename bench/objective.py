"""Benchmark: vectorised ``rlp_loss`` against a per-thought Python-loop reference (CPU).

Times forward + backward of both on the same random batch, checks they agree (loss and gradient,
to 1e-5), and prints a table. The reference is the math of docs/design.md section 1, steps 4-7, written
the straightforward way: one thought at a time, its tokens gathered by the mask.

    python bench/objective.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from nemo_rlp.objective import _validate, rlp_loss  # noqa: E402

EPS_LOW, EPS_HIGH = 0.2, 0.28
SHAPES = [(64, 16, 256), (512, 16, 64)]  # (B, G, U)
TOLERANCE = 1e-5


def reference_rlp_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    s_pred: torch.Tensor,
    s_ema: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> torch.Tensor:
    """Steps 4-7 one thought at a time."""
    batch, group, _ = logp_new.shape
    s_pred_rows, s_ema_values = s_pred.tolist(), s_ema.tolist()
    per_thought = []
    for b in range(batch):
        reward = [s_pred_rows[b][g] - s_ema_values[b] for g in range(group)]  # step 4
        mean_reward = sum(reward) / group
        for g in range(group):
            advantage = group / (group - 1) * (reward[g] - mean_reward)  # step 5
            tokens = mask[b, g]
            ratio = torch.exp(logp_new[b, g][tokens] - logp_old[b, g][tokens])  # step 6
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            surrogate = torch.minimum(ratio * advantage, clipped * advantage)  # step 7
            per_thought.append(-surrogate.mean())
    return torch.stack(per_thought).mean()


def random_batch(batch: int, group: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Thoughts of random length 1..U (prefix masks), log-ratios large enough to hit both clips."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch, group, 1), generator=gen)
    mask = torch.arange(length) < lengths
    logp_old = -4.0 * torch.rand(batch, group, length, generator=gen)
    log_ratio = 0.3 * torch.randn(batch, group, length, generator=gen)
    logp_new = torch.where(mask, logp_old + log_ratio, -torch.inf)  # garbage at padding, as in training
    return dict(
        logp_new=logp_new,
        logp_old=logp_old,
        mask=mask,
        s_pred=-5.0 * torch.rand(batch, group, generator=gen),
        s_ema=-5.0 * torch.rand(batch, generator=gen),
    )


def forward_backward(
    loss_fn: Callable[..., torch.Tensor], data: dict[str, torch.Tensor]
) -> tuple[float, torch.Tensor]:
    logp_new = data["logp_new"].clone().requires_grad_(True)
    loss = loss_fn(logp_new, data["logp_old"], data["mask"], data["s_pred"], data["s_ema"], EPS_LOW, EPS_HIGH)
    loss.backward()
    return loss.item(), logp_new.grad


def vectorised(*args) -> torch.Tensor:
    return rlp_loss(*args)[0]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def validation_ms(data: dict[str, torch.Tensor], repeats: int = 20) -> float:
    args = (data["logp_new"], data["logp_old"], data["mask"], data["s_pred"], data["s_ema"])
    validate = lambda: _validate(*args, EPS_LOW, EPS_HIGH, 0.0, None)  # noqa: E731
    validate()  # warm-up
    return median_ms(validate, repeats)


def main() -> None:
    print(f"rlp_loss forward+backward, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    columns = ["B x G x U".rjust(16), "reference ms", "rlp_loss ms", "speed-up", "max abs diff", "validation ms"]
    header = " | ".join(columns)
    print(header)
    print("-" * len(header))
    for batch, group, length in SHAPES:
        data = random_batch(batch, group, length)
        ref_loss, ref_grad = forward_backward(reference_rlp_loss, data)
        loss, grad = forward_backward(vectorised, data)
        diff = max(abs(ref_loss - loss), (ref_grad - grad).abs().max().item())
        if not diff <= TOLERANCE:
            raise SystemExit(f"mismatch at {(batch, group, length)}: max abs diff {diff:.3g} > {TOLERANCE}")

        # The correctness run above was the warm-up for both.
        ref_ms = median_ms(lambda: forward_backward(reference_rlp_loss, data), repeats=3)
        new_ms = median_ms(lambda: forward_backward(vectorised, data), repeats=20)
        shape = f"{batch}x{group}x{length}"
        print(
            f"{shape:>16} | {ref_ms:12.1f} | {new_ms:11.2f} | {ref_ms / new_ms:7.0f}x | {diff:12.2e} | "
            f"{validation_ms(data):13.2f}"
        )


if __name__ == "__main__":
    main()
