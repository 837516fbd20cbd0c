"""FLOPs of one RLP training step (forward + backward): padded rows vs packed rows, against two ideals.

    python bench/train_step.py                          # qwen3_1p7b, B=8 contexts x G=16, L=256
    python bench/train_step.py --models qwen3_1p7b tiny_gpt --lengths 64 256

The workload is the rollout benchmark's `mixed` one: contexts uniform in [8, 512] tokens, thoughts
uniform in [1, L] sampled tokens (mean about L/2), each row `context, <think>, thought, x_t` as the
sampler lays it out (the thought's last token is its end marker). FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` on the real megatron-core model built by the project's
provider on the meta device (shapes only: nothing is computed, so a 1.7B model costs seconds):
- `padded`: today's default microbatch, all rows right-padded to the longest (`rlp.pack_rows=false`);
- `packed`: the new path: the rows end to end without padding (`rlp.pack_rows=true`,
  nemo_rlp.training.packing), and the output layer run only where the loss reads a log-prob (the
  thought tokens and x_t; `logits_at`), not over the context.
The references, computed from the same rows:
- real-token ideal: 6 x parameters x real tokens (every row's own input tokens, no padding;
  parameters as the planner counts them: the ones that multiply per token);
- shared-context ideal: the same with each context counted once per group, as if the G thoughts of
  a context attended to one copy of it.
The counter sees attention's matmuls in full (megatron's and SDPA's math path do not skip the
causal half), which is the bulk of what packed rows spend above the ideal on long rows.
Attention-only models: the hybrid models' packed Mamba path builds its `seq_idx` on the CPU, which
the meta-device count cannot mix with meta tensors. On tiny_gpt (hidden 64) attention's S^2 term
is as large as the linears, so only a model of real width shows how close packing gets to 6N.
Its last line is `train step FLOPs: padded <P>x ideal, new <N>x ideal` (real-token ideal, the first
model and length given).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from nemo_rlp.config import load_config  # noqa: E402
from nemo_rlp.models import build_model  # noqa: E402
from nemo_rlp.models.vocab import padded_vocab_size  # noqa: E402
from nemo_rlp.models.handle import positions_like  # noqa: E402
from nemo_rlp.parallel import distributed  # noqa: E402
from nemo_rlp.planning import count_parameters  # noqa: E402
from nemo_rlp.training.packing import logits_at, pack_alignment, pack_rows  # noqa: E402

CONTEXTS = (8, 512)
META = torch.device("meta")


def mixed_rows(contexts: int, group: int, max_thought: int, vocab: int, seed: int = 0):
    """Right-padded rows [B*G, S] of the mixed workload, each row's input length (answer index) and
    each context's prompt length (context + start marker)."""
    g = torch.Generator().manual_seed(seed)
    context_len = torch.randint(CONTEXTS[0], CONTEXTS[1] + 1, (contexts,), generator=g).repeat_interleave(group)
    thought_len = torch.randint(1, max_thought + 1, (contexts * group,), generator=g)
    inputs = context_len + 1 + thought_len  # context, <think>, thought: x_t is the last label
    tokens = torch.randint(4, vocab, (len(inputs), int(inputs.max()) + 1), generator=g)
    return tokens, inputs, context_len[::group] + 1


def scored_inputs(inputs: torch.Tensor, prompts: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width]: the inputs whose next token is a thought token or x_t (what the RLP loss reads)."""
    columns = torch.arange(width)[None]
    return (columns >= prompts[:, None] - 1) & (columns < inputs[:, None])


def count_flops(model, tokens: torch.Tensor, inputs: torch.Tensor, prompts: torch.Tensor, packed: bool) -> int:
    """FLOPs of a forward and backward of the policy over these rows (a log-likelihood loss stands in
    for the RLP loss: the loss's own arithmetic is negligible and its backward reaches every layer).
    Packed, as the trainer runs it: logits only where the loss reads them (`logits_at`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        if packed:
            scored = scored_inputs(inputs, prompts, tokens.shape[1] - 1)
            pack = pack_rows(tokens, inputs + 1, align=pack_alignment(model), scored=scored)
            with logits_at(model, pack.where.to(META)):
                logits = model(pack.input_ids.to(META), pack.position_ids.to(META), None,
                               packed_seq_params=pack.packed_seq_params())[0]
            labels = pack.labels.to(META)
        else:
            rows = tokens[:, :-1]
            logits = model(rows.to(META), positions_like(rows).to(META), None).reshape(-1, model.vocab_size)
            labels = tokens[:, 1:].reshape(-1).to(META)
        loss = -F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum()
        loss.backward()
    return counter.get_total_flops()


def bench_model(name: str, lengths: list[int], contexts: int, group: int) -> list[tuple]:
    cfg = load_config([f"model={name}", "model.max_sequence_length=4096"]).model
    vocab = padded_vocab_size(cfg, 1024, 1)
    params = count_parameters(cfg, vocab).matmul
    with torch.device("meta"):
        model = build_model(cfg, vocab, 1, META)
    for module in model.modules():  # RoPE's frequencies are made on the CPU platform's device
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            module.inv_freq = module.inv_freq.to(META)
    rows = []
    for L in lengths:
        tokens, inputs, prompts = mixed_rows(contexts, group, L, vocab)
        real = int(inputs.sum())
        shared = real - int(((group - 1) * prompts).sum())  # each context once per group
        padded_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
        flops = {path: count_flops(model, tokens, inputs, prompts.repeat_interleave(group), path == "packed")
                 for path in ("padded", "packed")}
        ideal, shared_ideal = 6 * params * real, 6 * params * shared
        rows.append((name, L, real, padded_tokens, shared, flops, ideal, shared_ideal))
        model.zero_grad(set_to_none=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3_1p7b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256])
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=16)
    args = parser.parse_args()

    distributed.initialize(load_config([]).parallel, seed=0)
    rows = [r for name in args.models for r in bench_model(name, args.lengths, args.contexts, args.group_size)]
    print(f"\nRLP training step FLOPs (forward + backward), mixed workload: B={args.contexts} contexts in "
          f"{list(CONTEXTS)} x G={args.group_size} thoughts in [1, L]; counted on the meta device")
    header = (f"{'model':<12} {'L':>4} {'path':<7} {'tokens fed':>10} {'TFLOPs':>9} {'vs real-token ideal':>20} "
              f"{'vs shared-context ideal':>24}")
    print(header)
    print("-" * len(header))
    for name, L, real, padded_tokens, shared, flops, ideal, shared_ideal in rows:
        print(f"{name:<12} {L:>4} {'ideal':<7} {real:>10} {ideal / 1e12:>9.2f} {1.0:>19.2f}x {ideal / shared_ideal:>23.2f}x")
        print(f"{'':<12} {'':>4} {'shared':<7} {shared:>10} {shared_ideal / 1e12:>9.2f} "
              f"{shared_ideal / ideal:>19.2f}x {1.0:>23.2f}x")
        for path, fed in (("padded", padded_tokens), ("packed", real)):
            print(f"{'':<12} {'':>4} {path:<7} {fed:>10} {flops[path] / 1e12:>9.2f} "
                  f"{flops[path] / ideal:>19.2f}x {flops[path] / shared_ideal:>23.2f}x")
    _, _, _, _, _, flops, ideal, _ = rows[0]
    print(f"train step FLOPs: padded {flops['padded'] / ideal:.2f}x ideal, new {flops['packed'] / ideal:.2f}x ideal")


if __name__ == "__main__":
    main()
