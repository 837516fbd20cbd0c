"""Held-out evaluation at marked positions: does a sampled thought help the model predict the answer?

For every marked position t of the held-out documents (``nemo_rlp.data.marked``; the bundled held-out
set marks every answer of its walks and word problems) the *same* model, the current policy θ, predicts
x_t twice:

* without thinking: ``log p_θ(x_t | x_<t)`` and whether ``argmax p_θ(· | x_<t) == x_t``;
* with one sampled thought: ``<think>`` is inserted, a thought is sampled exactly as in training
  (``rlp.temperature``, ``top_k``, ``top_p``, at most ``rlp.max_thought_len`` tokens), and
  ``log p_θ(x_t | x_<t, <think> c </think>)`` and its argmax are scored.

The gap between the two is what RLP is meant to open: thoughts that carry information about the next
token. Both use greedy accuracy of the first token of the answer. The thoughts are drawn from a
generator seeded with ``eval.seed``, so two evaluations of one model sample the same noise.

Every rank runs the evaluation (the model's forward is collective over tensor- and pipeline-parallel
ranks); data-parallel replicas compute the same figures.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from nemo_rlp.data.bundled import BUNDLED_HELDOUT
from nemo_rlp.data.marked import MarkedDocuments, load_marked_jsonl
from nemo_rlp.data.tokenizer import Tokenizer
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.rollout.sampler import Markers, SamplingParams, answer_argmax, sample_thoughts

log = logging.getLogger("nemo_rlp")


@dataclass
class AnswerPosition:
    prefix: list[int]
    target: int
    task: str


def answer_positions(documents: MarkedDocuments, max_context: int, limit: int) -> list[AnswerPosition]:
    """The first ``limit`` marked positions (document order), each with at most ``max_context`` tokens
    of its document as context."""
    out: list[AnswerPosition] = []
    for doc, marks, tasks in zip(documents.documents, documents.marks, documents.tasks):
        for position, task in zip(marks, tasks):
            if len(out) == limit:
                return out
            out.append(AnswerPosition(doc[max(0, position - max_context) : position], doc[position], task))
    return out


def load_heldout(eval_cfg: Any, data_cfg: Any, tokenizer: Tokenizer) -> list[AnswerPosition]:
    """The evaluation's positions from ``eval.corpus`` (null: the bundled held-out set)."""
    path = eval_cfg.corpus or BUNDLED_HELDOUT
    documents = load_marked_jsonl(path, tokenizer, data_cfg.text_key, data_cfg.positions_key)
    positions = answer_positions(documents, data_cfg.max_context, eval_cfg.num_positions)
    log.info("evaluation: %d marked positions of %s", len(positions), path)
    return positions


@torch.no_grad()
def no_think_scores(handle: ModelHandle, positions: list[AnswerPosition], markers: Markers, device, batch: int):
    """log p(x_t | x_<t) [n] and the answer argmax [n] (:func:`answer_argmax`), in right-padded batches
    of ``batch`` contexts (a causal model's real tokens never see the padding after them)."""
    logprobs, predicted = [], []
    for first in range(0, len(positions), batch):
        part = positions[first : first + batch]
        lengths = torch.tensor([len(p.prefix) for p in part], device=device)
        tokens = torch.full((len(part), int(lengths.max())), markers.pad, dtype=torch.long, device=device)
        for i, p in enumerate(part):
            tokens[i, : len(p.prefix)] = torch.tensor(p.prefix, device=device)
        logits = handle.next_token_logits(tokens, lengths).float()
        targets = torch.tensor([p.target for p in part], device=device)
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1))
        predicted.append(answer_argmax(logits, markers))
    return torch.cat(logprobs).cpu(), torch.cat(predicted).cpu()


def evaluate_answers(
    handle: ModelHandle,
    positions: list[AnswerPosition],
    rlp_cfg: Any,
    markers: Markers,
    tokenizer: Tokenizer,
    device,
    seed: int,
    batch_contexts: int = 64,
    num_examples: int = 6,
) -> dict[str, Any]:
    """No-think vs one-sampled-thought log-probs and accuracy at ``positions`` (module docstring)."""
    was_training = handle.module.training
    handle.eval()
    try:
        logp_plain, pred_plain = no_think_scores(handle, positions, markers, device, batch_contexts)
    finally:
        handle.train(was_training)
    params = SamplingParams(
        group_size=1, max_thought_len=rlp_cfg.max_thought_len, temperature=rlp_cfg.temperature,
        top_k=rlp_cfg.top_k, top_p=rlp_cfg.top_p, mode=rlp_cfg.rollout_mode,
    )
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for first in range(0, len(positions), batch_contexts):
        part = positions[first : first + batch_contexts]
        batches.append(sample_thoughts(handle, [p.prefix for p in part], [p.target for p in part], params,
                                       markers, generator, device))
    logp_think = torch.cat([b.s_pred for b in batches]).cpu()
    pred_think = torch.cat([b.predicted for b in batches]).cpu()
    thought_len = torch.cat([b.thought_len for b in batches]).cpu().float()
    end_sampled = torch.cat([b.end_sampled for b in batches]).cpu().float()
    targets = torch.tensor([p.target for p in positions])
    right_plain, right_think = pred_plain == targets, pred_think == targets

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(positions):
        by_task[p.task].append(i)
    result = {
        "num_positions": len(positions),
        "no_think": {"logprob": float(logp_plain.mean()), "accuracy": float(right_plain.float().mean())},
        "with_thought": {
            "logprob": float(logp_think.mean()),
            "accuracy": float(right_think.float().mean()),
            "thought_len_mean": float(thought_len.mean()),
            "end_marker_rate": float(end_sampled.mean()),
        },
        "by_task": {
            task: {
                "num_positions": len(rows),
                "no_think_accuracy": float(right_plain[rows].float().mean()),
                "with_thought_accuracy": float(right_think[rows].float().mean()),
                "no_think_logprob": float(logp_plain[rows].mean()),
                "with_thought_logprob": float(logp_think[rows].mean()),
            }
            for task, rows in sorted(by_task.items())
        },
        "examples": [],
    }
    rows = [(b, r) for b in batches for r in range(b.tokens.shape[0])]
    for i in range(min(num_examples, len(positions))):
        batch, r = rows[i]
        start, length = int(batch.thought_start[r]), int(batch.thought_len[r])
        result["examples"].append({
            "context": tokenizer.decode(positions[i].prefix),
            "thought": tokenizer.decode(batch.tokens[r, start : start + length].tolist()),
            "target": tokenizer.decode([positions[i].target]),
            "predicted_no_think": tokenizer.decode([int(pred_plain[i])]),
            "predicted_with_thought": tokenizer.decode([int(pred_think[i])]),
        })
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """The console lines of an evaluation."""
    plain, think = result["no_think"], result["with_thought"]
    lines = [
        f"evaluation on {result['num_positions']} held-out answer positions:",
        f"  no thought:        log p(x_t) {plain['logprob']:+.3f}   accuracy {100 * plain['accuracy']:5.1f}%",
        (
            f"  a sampled thought: log p(x_t) {think['logprob']:+.3f}   accuracy {100 * think['accuracy']:5.1f}%"
            f"   (thought length {think['thought_len_mean']:.1f}, end marker {think['end_marker_rate']:.2f})"
        ),
    ]
    for task, t in result["by_task"].items():
        lines.append(f"    {task:<12} n={t['num_positions']:<4} accuracy {100 * t['no_think_accuracy']:5.1f}% -> "
                     f"{100 * t['with_thought_accuracy']:5.1f}%")
    return "\n".join(lines)
