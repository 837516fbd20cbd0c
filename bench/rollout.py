"""Thought-rollout throughput on two workloads.

    python bench/rollout.py                      # mixed: the paper-like workload (below), tiny_gpt
    python bench/rollout.py --workload uniform   # G=16, L in {64, 256}, context 256, tiny models
    python bench/rollout.py --workload uniform --models tiny_gpt --lengths 64

`mixed` (the default) looks like the paper's rollouts: context lengths uniform in [8, C] (C=512),
thought lengths from a truncated geometric distribution (about a quarter reach L, mean about L/2),
G=16. The lengths are forced the same way in every implementation (end marker suppressed until a
row's length, then inserted), so all generate the same number of tokens. Implementations, measured
in the same run, interleaved, medians of --repeats: today's lockstep sampler (`shared_prefill`,
the baseline), the `rows` path, and Hugging Face `generate(num_return_sequences=G)` with its KV
cache on a Llama config matched to the model, with our weights (logits checked equal first; needs
the `bench` extra). The last line is `mixed G=16: new path <X>x lockstep, <Y>x hf-generate`.

`uniform`: all three lockstep modes run the same sampler (nemo_rlp.rollout.sampler) on the same contexts with the same
seed, so they decode the same tokens; the table checks that and reports thought tokens per second
and the speed-up over full recompute, the reference, measured in the same run. The end marker is
suppressed so every thought runs to L (the paper's regime, where thoughts are long); pass
--allow-end to let thoughts stop.
"""

from __future__ import annotations

import argparse
import statistics
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
from nemo_rlp.rollout.sampler import MODES, Markers, RolloutStats, SamplingParams, sample_thoughts  # noqa: E402

MARKERS = Markers(think_start=2, think_end=3, pad=0)
# The device `nemo_rlp.parallel.distributed` picks (set in main): CUDA when available, else the CPU platform.
DEVICE = torch.device("cpu")

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


def bench_model(name: str, lengths: list[int], group: int, contexts: int, context_len: int, allow_end: bool):
    max_len = max(lengths)
    cfg = load_config([f"model={name}", f"model.max_sequence_length={context_len + max_len + 8}"]).model
    torch.manual_seed(0)
    module = build_model(cfg, VOCAB, 1, DEVICE)
    handle = ModelHandle(module) if allow_end else _NoEnd(module)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(4, VOCAB, (context_len,), generator=g).tolist() for _ in range(contexts)]
    targets = [5] * contexts
    # Warm-up: first calls pay one-time costs (allocator, lazy imports) that are not throughput.
    for mode in MODES:
        warm = SamplingParams(group_size=2, max_thought_len=4, temperature=0.7, mode=mode)
        sample_thoughts(handle, prefixes[:1], targets[:1], warm, MARKERS, torch.Generator().manual_seed(0),
                        DEVICE)
    rows = []
    for L in lengths:
        results = {}
        for mode in MODES:
            params = SamplingParams(group_size=group, max_thought_len=L, temperature=0.7, mode=mode)
            _synchronize()
            start = time.perf_counter()
            batch = sample_thoughts(handle, prefixes, targets, params, MARKERS, torch.Generator().manual_seed(1),
                                    DEVICE)
            _synchronize()
            seconds = time.perf_counter() - start
            results[mode] = (batch, seconds)
        ref_batch, ref_seconds = results["recompute"]
        for mode in MODES:
            batch, seconds = results[mode]
            tokens = int(batch.thought_len.sum())
            # `rows` draws its noise per decode step, not per position: other (equally likely) tokens.
            same = torch.equal(batch.tokens, ref_batch.tokens) if mode != "rows" else "-"
            rows.append((name, L, mode, tokens, seconds, tokens / seconds, ref_seconds / seconds, same))
    return rows


def truncated_geometric(n: int, L: int, reach_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """n thought lengths in [1, L]: 1 + Geometric(p), truncated at L, with P(length = L) = reach_fraction."""
    p = 1.0 - reach_fraction ** (1.0 / (L - 1))
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp_min(1e-12)
    return (1 + torch.floor(torch.log(u) / torch.log(torch.tensor(1.0 - p, dtype=torch.float64)))).clamp(max=L).long()


def mixed_workload(contexts: int, max_context: int, L: int, group: int, seed: int = 0):
    """Prefixes with lengths uniform in [8, max_context], targets, and forced thought lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, max_context + 1, (contexts,), generator=g).tolist()
    prefixes = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]
    caps = truncated_geometric(contexts * group, L, 0.25, g)
    return prefixes, [5] * contexts, caps


def _run_ours(handle, mode, prefixes, targets, caps, group, L):
    stats = RolloutStats()
    params = SamplingParams(group_size=group, max_thought_len=L, temperature=0.7, mode=mode)
    _synchronize()
    start = time.perf_counter()
    batch = sample_thoughts(handle, prefixes, targets, params, MARKERS, torch.Generator().manual_seed(1),
                            DEVICE, thought_caps=caps.tolist(), stats=stats)
    _synchronize()
    seconds = time.perf_counter() - start
    assert torch.equal(batch.thought_len, caps), "forced thought lengths not honoured"
    return seconds, {"tokens": stats.generated_tokens, "steps": stats.decode_steps,
                     "ctx_decoded": stats.context_tokens_decoded, "occupancy": stats.mean_occupancy,
                     "compaction_mb": stats.compaction_bytes / 2**20, "syncs": stats.syncs_per_step}


def _run_hf(model, prefixes, caps, group):
    from bench import hf_peer
    from nemo_rlp.parallel.cpu_platform import device_mode_suspended

    torch.manual_seed(1)
    start = time.perf_counter()
    # Outside our CPU platform's torch function mode: the peer is plain torch.
    with device_mode_suspended():
        forcing = hf_peer.generate(model, prefixes, caps, group, 0.7, MARKERS.think_start, MARKERS.think_end,
                                   MARKERS.pad)
    seconds = time.perf_counter() - start
    # generate() checks `unfinished_sequences.max() == 0` on the host after every step; its cache
    # grows by torch.cat (not counted as compaction: no rows are dropped).
    return seconds, {"tokens": int(caps.sum()), "steps": forcing.steps, "ctx_decoded": 0,
                     "occupancy": forcing.live_row_steps / max(1, forcing.row_steps), "compaction_mb": 0.0,
                     "syncs": 1.0}


def _where() -> str:
    if DEVICE.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(DEVICE)})"
    return f"CPU ({torch.get_num_threads()} threads)"


def _synchronize() -> None:
    # CUDA kernels run asynchronously: a timer must wait for them.
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _hf_peer_or_none(module, cfg):
    """The HF peer with our weights, after checking its logits equal ours; None without transformers
    (or on CUDA: the peer is built and run on CPU only)."""
    if DEVICE.type != "cpu":
        print("no hf-generate peer on CUDA (it runs on CPU only here)", file=sys.stderr)
        return None
    try:
        from bench import hf_peer
    except ImportError:
        return None
    try:
        model = hf_peer.llama_from_gpt(module, cfg, VOCAB)
    except ImportError:
        print("transformers is not installed (pip install -e .[bench]): no hf-generate peer", file=sys.stderr)
        return None
    except ValueError as err:  # e.g. the hybrid: no transformers model with the same weights
        print(f"no hf-generate peer: {err}", file=sys.stderr)
        return None
    tokens = torch.randint(4, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = ModelHandle(module)._logits(tokens).float()
        theirs = model(tokens).logits.float()
    gap = float((ours - theirs).abs().max())
    print(f"hf-generate peer: {sum(p.numel() for p in model.parameters())} parameters (ours "
          f"{sum(p.numel() for p in module.parameters())}), max |logit difference| {gap:.1e}", file=sys.stderr)
    if gap > 1e-4:
        raise RuntimeError(f"the HF peer's logits differ from ours by {gap}")
    return model


def bench_mixed(name: str, contexts: int, max_context: int, L: int, group: int, repeats: int):
    # At least the default data/rlp settings' needs, which the config validates against.
    cfg = load_config([f"model={name}", f"model.max_sequence_length={max(256, max_context + L + 8)}"]).model
    torch.manual_seed(0)
    module = build_model(cfg, VOCAB, 1, DEVICE).eval()
    handle = _NoEnd(module)
    prefixes, targets, caps = mixed_workload(contexts, max_context, L, group)
    peer = _hf_peer_or_none(module, cfg)
    runs = {"lockstep": lambda: _run_ours(handle, "shared_prefill", prefixes, targets, caps, group, L),
            "rows": lambda: _run_ours(handle, "rows", prefixes, targets, caps, group, L)}
    if peer is not None:
        runs["hf-generate"] = lambda: _run_hf(peer, prefixes, caps, group)
    small = mixed_workload(1, 16, 4, 2)  # warm-up: allocator, lazy imports
    _run_ours(handle, "shared_prefill", small[0], small[1], small[2], 2, 4)
    _run_ours(handle, "rows", small[0], small[1], small[2], 2, 4)
    seconds = {k: [] for k in runs}
    counters = {}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit every implementation alike
        for impl, run in runs.items():
            took, counters[impl] = run()
            seconds[impl].append(took)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return median, counters, caps


def print_mixed(args, median, counters, caps) -> None:
    print(f"\nmixed rollouts: {args.model}, B={args.contexts} contexts of 8..{args.max_context} tokens x "
          f"G={args.group_size}, thoughts 1..{args.length} (mean {caps.float().mean():.1f}, "
          f"{(caps == args.length).float().mean():.0%} reach L), temperature 0.7, {_where()}, "
          f"torch {torch.__version__}, median of {args.repeats}")
    header = (f"{'implementation':<14} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'vs lockstep':>12} "
              f"{'decode steps':>13} {'ctx tok in decode':>18} {'occupancy':>10} {'compaction MB':>14} "
              f"{'syncs/step':>11}")
    print(header)
    print("-" * len(header))
    rate = {k: counters[k]["tokens"] / median[k] for k in median}
    for impl in median:
        c = counters[impl]
        print(f"{impl:<14} {c['tokens']:>7} {median[impl]:>8.2f} {rate[impl]:>9.1f} "
              f"{rate[impl] / rate['lockstep']:>11.2f}x {c['steps']:>13} {c['ctx_decoded']:>18} "
              f"{c['occupancy']:>10.2f} {c['compaction_mb']:>14.1f} {c['syncs']:>11.2f}")
    peer = f"{rate['rows'] / rate['hf-generate']:.2f}x" if "hf-generate" in rate else "n/a (no peer)"
    print(f"mixed G={args.group_size}: new path {rate['rows'] / rate['lockstep']:.2f}x lockstep, {peer} hf-generate")


def print_uniform(args, rows) -> None:
    print(f"\nthought rollouts: B={args.contexts} contexts x G={args.group_size}, context {args.context_len} "
          f"tokens, temperature 0.7, {_where()}, torch {torch.__version__}")
    header = f"{'model':<12} {'L':>4} {'mode':<15} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'vs recompute':>13} {'same tokens':>12}"
    print(header)
    print("-" * len(header))
    for name, L, mode, tokens, seconds, rate, speedup, same in rows:
        print(f"{name:<12} {L:>4} {mode:<15} {tokens:>7} {seconds:>8.2f} {rate:>9.1f} {speedup:>12.1f}x {str(same):>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["mixed", "uniform"], default="mixed")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--model", default="tiny_gpt", help="mixed: the model (a GPT one for the HF peer)")
    parser.add_argument("--contexts", type=int, default=None, help="contexts (mixed: 4, uniform: 2)")
    parser.add_argument("--max-context", type=int, default=512, help="mixed: C, contexts are 8..C tokens")
    parser.add_argument("--length", type=int, default=128, help="mixed: L")
    parser.add_argument("--repeats", type=int, default=3, help="mixed: interleaved repeats (median)")
    parser.add_argument("--models", nargs="+", default=["tiny_gpt", "tiny_hybrid"], help="uniform")
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256], help="uniform")
    parser.add_argument("--context-len", type=int, default=256, help="uniform")
    parser.add_argument("--allow-end", action="store_true", help="uniform")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two OpenMP threads "
                             "made a small matmul 10-100x slower, measured)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    global DEVICE
    DEVICE = distributed.initialize(load_config([]).parallel, seed=0).device
    if args.workload == "mixed":
        args.contexts = args.contexts or 4
        median, counters, caps = bench_mixed(args.model, args.contexts, args.max_context, args.length,
                                             args.group_size, args.repeats)
        print_mixed(args, median, counters, caps)
        return
    args.contexts = args.contexts or 2
    available = {p.stem for p in (Path(__file__).resolve().parents[1] / "nemo_rlp" / "conf" / "model").glob("*.yaml")}
    rows = []
    for name in args.models:
        if name not in available:
            print(f"skipping model {name}: no nemo_rlp/conf/model/{name}.yaml", file=sys.stderr)
            continue
        rows += bench_model(name, args.lengths, args.group_size, args.contexts, args.context_len, args.allow_end)
    print_uniform(args, rows)


if __name__ == "__main__":
    main()
