"""Thought-rollout throughput: full recompute vs KV/SSM cache with G-fold prefill vs shared prefill.

    python bench/rollout.py                      # G=16, L in {64, 256}, context 256, tiny models
    python bench/rollout.py --models tiny_gpt --lengths 64

It runs on the device `nemo_rlp.parallel.distributed` picks: CUDA when available, else the CPU platform.

All three modes run the same sampler (nemo_rlp.rollout.sampler) on the same contexts with the same
seed, so they decode the same tokens; the table checks that and reports thought tokens per second
and the speed-up over full recompute, the reference, measured in the same run. The end marker is
suppressed so every thought runs to L (the paper's regime, where thoughts are long); pass
--allow-end to let thoughts stop.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from nemo_rlp.config import load_config  # noqa: E402
from nemo_rlp.models import build_model  # noqa: E402
from nemo_rlp.models.handle import ModelHandle  # noqa: E402
from nemo_rlp.parallel import distributed  # noqa: E402
from nemo_rlp.rollout.sampler import MODES, Markers, SamplingParams, sample_thoughts  # noqa: E402

MARKERS = Markers(think_start=2, think_end=3, pad=0)
VOCAB = 512


class _NoEnd(ModelHandle):
    """The model with the end marker's logit at -inf, so that every thought runs to L."""

    def next_token_logits(self, tokens, lengths):
        return _drop_end(super().next_token_logits(tokens, lengths))

    def cached_logits(self, tokens, cache):
        return _drop_end(super().cached_logits(tokens, cache))


def _drop_end(logits: torch.Tensor) -> torch.Tensor:
    logits[:, MARKERS.think_end] = float("-inf")
    return logits


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer must wait for them.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, lengths: list[int], group: int, contexts: int, context_len: int, allow_end: bool,
                device: torch.device):
    max_len = max(lengths)
    cfg = load_config([f"model={name}", f"model.max_sequence_length={context_len + max_len + 8}"]).model
    torch.manual_seed(0)
    module = build_model(cfg, VOCAB, 1, device)
    handle = ModelHandle(module) if allow_end else _NoEnd(module)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(4, VOCAB, (context_len,), generator=g).tolist() for _ in range(contexts)]
    targets = [5] * contexts
    # Warm-up: first calls pay one-time costs (allocator, lazy imports) that are not throughput.
    for mode in MODES:
        warm = SamplingParams(group_size=2, max_thought_len=4, temperature=0.7, mode=mode)
        sample_thoughts(handle, prefixes[:1], targets[:1], warm, MARKERS, torch.Generator().manual_seed(0),
                        device)
    rows = []
    for L in lengths:
        results = {}
        for mode in MODES:
            params = SamplingParams(group_size=group, max_thought_len=L, temperature=0.7, mode=mode)
            _synchronize(device)
            start = time.perf_counter()
            batch = sample_thoughts(handle, prefixes, targets, params, MARKERS, torch.Generator().manual_seed(1),
                                    device)
            _synchronize(device)
            seconds = time.perf_counter() - start
            results[mode] = (batch, seconds)
        ref_batch, ref_seconds = results["recompute"]
        for mode in MODES:
            batch, seconds = results[mode]
            tokens = int(batch.thought_len.sum())
            same = torch.equal(batch.tokens, ref_batch.tokens)
            rows.append((name, L, mode, tokens, seconds, tokens / seconds, ref_seconds / seconds, same))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_gpt", "tiny_hybrid"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--allow-end", action="store_true")
    args = parser.parse_args()

    device = distributed.initialize(load_config([]).parallel, seed=0).device
    available = {p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml")}
    rows = []
    for name in args.models:
        if name not in available:
            print(f"skipping model {name}: no conf/model/{name}.yaml", file=sys.stderr)
            continue
        rows += bench_model(name, args.lengths, args.group_size, args.contexts, args.context_len, args.allow_end,
                            device)

    where = (f"CUDA ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    print(f"\nthought rollouts: B={args.contexts} contexts x G={args.group_size}, context {args.context_len} "
          f"tokens, temperature 0.7, {where}, torch {torch.__version__}")
    header = f"{'model':<12} {'L':>4} {'mode':<15} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'vs recompute':>13} {'same tokens':>12}"
    print(header)
    print("-" * len(header))
    for name, L, mode, tokens, seconds, rate, speedup, same in rows:
        print(f"{name:<12} {L:>4} {mode:<15} {tokens:>7} {seconds:>8.2f} {rate:>9.1f} {speedup:>12.1f}x {str(same):>12}")


if __name__ == "__main__":
    main()
