"""A whole RLP step on CPU, this project vs a plain Hugging Face implementation of the same model and
work: seconds and peak memory, measured in the same run.

    pip install -e '.[bench]'                             # transformers, for the peer only
    python bench/train_step_vs_hf.py                      # tiny_gpt, context 1024, B=2, G=16, L=64
    python bench/train_step_vs_hf.py --context 256 --trials 5

One RLP step, both sides: the EMA teacher scores the B contexts (S_ema); G thoughts per context are
sampled with a KV cache, one prefill per context shared by its G rows, L tokens each (the end marker
is suppressed, so every thought runs to L: the paper's regime) at T = 0.7, and S_pred is read from one
more step; then one training forward and backward over the B*G rows with the RLP loss
(`objective.thought_losses`, advantages from S_pred and S_ema), an Adam step and the EMA update.
- `nemo-rlp`: `sample_thoughts` + `rlp_update` on `PolicyWithTeacher` (megatron-core GPTModel, local
  spec with SDPA attention, megatron DDP and optimizer, packed rows);
- `hf`: transformers' `LlamaForCausalLM` with SDPA attention and the same architecture as tiny_gpt
  (hidden 64, 2 layers, 4 heads / 2 KV groups, SwiGLU 192, RMSNorm, RoPE, tied embeddings), a
  `DynamicCache` repeated G times after the prefill, torch AdamW.
Each trial runs one side in a fresh process with one thread: a warm-up step, then the timed step
(process CPU seconds); peak memory is the process's peak RSS above its RSS before the first step.
Sides alternate trial by trial; the table gives medians, with each phase's CPU seconds (teacher
scoring, rollout, training: forward, backward, optimizer and EMA). The last line is
`whole RLP step vs HF: <r>x the time, <m>x the peak memory` (this project / the peer; <= 1 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

VOCAB = 512
THINK, END, PAD = 2, 3, 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PhaseClock:
    """Process CPU seconds of consecutive phases of a step."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.process_time()

    def lap(self, name: str) -> None:
        now = time.process_time()
        self.phases[name] = now - self._last
        self._last = now


def _workload(args):
    g = torch.Generator().manual_seed(0)
    prefixes = torch.randint(4, VOCAB, (args.contexts, args.context), generator=g)
    targets = torch.randint(4, VOCAB, (args.contexts,), generator=g)
    return prefixes, targets


# ------------------------------------------------------------------------------------------------
# nemo-rlp
# ------------------------------------------------------------------------------------------------


def nemo_rlp_side(args):
    from nemo_rlp.config import load_config
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.parallel import distributed
    from nemo_rlp.rollout.sampler import Markers, SamplingParams, sample_thoughts
    from nemo_rlp.training.policy import PolicyWithTeacher
    from nemo_rlp.training.steps import rlp_update

    class NoEnd(ModelHandle):
        def cached_logits(self, tokens, cache):
            logits = super().cached_logits(tokens, cache)
            logits[:, END] = float("-inf")
            return logits

    layout = distributed.initialize(load_config([]).parallel, seed=0)
    cfg = load_config(["model=tiny_gpt", f"model.max_sequence_length={args.context + args.length + 8}",
                       f"rlp.group_size={args.group}", f"rlp.max_thought_len={args.length}",
                       f"rlp.contexts_per_step={args.contexts}", "trainer=paper", "trainer.lr=1e-4"])
    torch.manual_seed(0)
    model = PolicyWithTeacher(cfg, VOCAB, layout)
    policy = NoEnd(model.ddp)
    prefixes, targets = _workload(args)
    params = SamplingParams(args.group, args.length, 0.7, mode=args.rollout_mode)

    def step(seed):
        clock = _PhaseClock()
        model.seed_teacher()
        with torch.no_grad():
            rows = torch.cat([prefixes, targets[:, None]], dim=1)
            s_ema = model.teacher.token_logprobs(rows)[:, -1]
        clock.lap("teacher")
        batch = sample_thoughts(policy, prefixes.tolist(), targets.tolist(), params, Markers(THINK, END, PAD),
                                torch.Generator().manual_seed(seed), torch.device("cpu"))
        clock.lap("rollout")
        rlp_update(model, batch, s_ema, cfg.rlp)
        clock.lap("training")
        return clock.phases

    return step


# ------------------------------------------------------------------------------------------------
# The Hugging Face peer
# ------------------------------------------------------------------------------------------------


def hf_side(args):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from nemo_rlp.objective import group_advantages, rewards, thought_losses

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=args.context + args.length + 8,
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, hidden_act="silu",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    teacher = LlamaForCausalLM(config).eval()
    teacher.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
    prefixes, targets = _workload(args)
    B, G, L = args.contexts, args.group, args.length

    @torch.no_grad()
    def rollout(seed):
        generator = torch.Generator().manual_seed(seed)
        policy.eval()
        prompts = torch.cat([prefixes, torch.full((B, 1), THINK)], dim=1)
        cache = DynamicCache()
        logits = policy(prompts, past_key_values=cache, use_cache=True).logits[:, -1]
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, dim=0)
        thought, behaviour = [], []
        for u in range(L + 1):
            logits = logits.float()
            if u < L:
                logits[:, END] = float("-inf")
                probs = torch.softmax(logits / 0.7, dim=-1)
                noise = torch.empty_like(probs).exponential_(generator=generator)
                token = torch.argmax(probs / noise, dim=-1)
                behaviour.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0])
            else:
                token = torch.full((B * G,), END)
            thought.append(token)
            logits = policy(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        s_pred = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.repeat_interleave(G)[:, None])[:, 0]
        rows = torch.cat([prompts.repeat_interleave(G, dim=0), torch.stack(thought, 1),
                          targets.repeat_interleave(G)[:, None]], dim=1)
        return rows, torch.stack(behaviour, 1), s_pred

    def step(seed):
        clock = _PhaseClock()
        with torch.no_grad():
            rows = torch.cat([prefixes, targets[:, None]], dim=1)
            s_ema = torch.log_softmax(teacher(rows[:, :-1]).logits[:, -1].float(), -1).gather(1, targets[:, None])[:, 0]
        clock.lap("teacher")
        tokens, _, s_pred = rollout(seed)
        clock.lap("rollout")
        advantages = group_advantages(rewards(s_pred.view(B, G), s_ema)).reshape(-1)
        policy.train()
        optimizer.zero_grad(set_to_none=True)
        logits = policy(tokens[:, :-1]).logits.float()
        start = args.context + 1
        logp = torch.log_softmax(logits[:, start - 1 : start - 1 + L], dim=-1)
        logp_new = logp.gather(2, tokens[:, start : start + L, None])[..., 0]
        mask = torch.ones_like(logp_new, dtype=torch.bool)
        per_thought, *_ = thought_losses(logp_new, logp_new.detach(), mask, advantages, 0.2, 0.2)
        per_thought.mean().backward()
        optimizer.step()
        with torch.no_grad():
            for phi, theta in zip(teacher.parameters(), policy.parameters()):
                phi.lerp_(theta, 1 - 0.999)
        clock.lap("training")
        return clock.phases

    return step


# ------------------------------------------------------------------------------------------------
# Trials
# ------------------------------------------------------------------------------------------------


def run_side(args) -> None:
    """One trial in this process: build, warm up, time one step; print a JSON line."""
    torch.set_num_threads(1)
    step = (nemo_rlp_side if args.side == "nemo-rlp" else hf_side)(args)
    baseline = _rss_bytes()
    step(1)  # warm-up (also the step whose peak the process keeps)
    started = time.process_time()
    phases = step(2)
    seconds = time.process_time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"side": args.side, "seconds": seconds, "peak_bytes": peak, "phases": phases}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rollout-mode", default="rows", help="this project's rollout path (rlp.rollout_mode)")
    parser.add_argument("--side", choices=["nemo-rlp", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)

    results = {"nemo-rlp": [], "hf": []}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for _ in range(args.trials):
        for side in results:  # interleaved: a load change on the machine hits both sides alike
            cmd = [sys.executable, __file__, "--side", side, "--context", str(args.context), "--contexts",
                   str(args.contexts), "--group", str(args.group), "--length", str(args.length),
                   "--rollout-mode", args.rollout_mode]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))

    print(f"\nwhole RLP step (teacher scoring, rollout: `{args.rollout_mode}` here, one prefill per context in the peer, "
          "training forward + backward, Adam, "
          f"EMA): tiny_gpt, B={args.contexts} contexts of {args.context} tokens x G={args.group} thoughts of "
          f"L={args.length}; CPU, 1 thread, {args.trials} trials, medians")
    header = (f"{'side':<10} {'CPU seconds':>12} {'teacher':>8} {'rollout':>8} {'training':>9} "
              f"{'peak memory MiB':>16} {'trials (s)':>24}")
    print(header)
    print("-" * len(header))
    medians = {}
    for side, trials in results.items():
        seconds = statistics.median(t["seconds"] for t in trials)
        peak = statistics.median(t["peak_bytes"] for t in trials)
        phase = {k: statistics.median(t["phases"][k] for t in trials) for k in ("teacher", "rollout", "training")}
        medians[side] = (seconds, peak)
        listed = ", ".join(f"{t['seconds']:.2f}" for t in trials)
        print(f"{side:<10} {seconds:>12.2f} {phase['teacher']:>8.2f} {phase['rollout']:>8.2f} "
              f"{phase['training']:>9.2f} {peak / 2**20:>16.0f} {listed:>24}")
    (ours, our_peak), (peer, peer_peak) = medians["nemo-rlp"], medians["hf"]
    print(f"whole RLP step vs HF: {ours / peer:.2f}x the time, {our_peak / peer_peak:.2f}x the peak memory")


if __name__ == "__main__":
    main()
