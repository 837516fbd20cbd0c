"""Held-out evaluation at marked positions: does a sampled thought help the model predict the answer?

For every marked position t of the held-out documents (``nemo_rlp.data.marked``; the bundled held-out
set marks every answer of its walks and word problems) the *same* model, the current policy θ, predicts
the whole answer a = x_t … x_{t+k} (x_t and the tokens that continue its word: " 1" "5" for 15) twice:

* without thinking: ``log p_θ(a | x_<t)`` (the sum over its tokens) and whether every token of ``a`` is
  the greedy choice given the ones before it;
* with a sampled thought: ``<think>`` is inserted, a thought is sampled exactly as in training
  (``rlp.temperature``, ``top_k``, ``top_p``, at most ``rlp.max_thought_len`` tokens), and
  ``log p_θ(a | x_<t, <think> c </think>)`` and the greedy check are scored; this is repeated for
  ``eval.thought_seeds`` independent thoughts per position.

The gap between the two is what RLP is meant to open: thoughts that carry information about the next
token. Each figure comes with its standard error over positions (for thoughts, of the per-position
mean over seeds), so that two runs a few points apart can be told apart or not. Scoring the whole
answer matters: a two-digit answer scored on its first digit counts a wrong thought as right.
Thoughts are drawn from generators seeded with ``eval.seed`` (+ the seed's index), so two evaluations
of one model sample the same noise.

Every rank runs the evaluation (the model's forward is collective over tensor- and pipeline-parallel
ranks); data-parallel replicas compute the same figures.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nemo_rlp.data.bundled import BUNDLED_HELDOUT
from nemo_rlp.data.marked import MarkedDocuments, load_marked_jsonl
from nemo_rlp.data.tokenizer import Tokenizer
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.rollout.sampler import Markers, SamplingParams, answer_argmax, sample_thoughts

log = logging.getLogger("nemo_rlp")


MAX_ANSWER_TOKENS = 8  # an answer is one word; a longer run of word pieces is cut here


@dataclass
class AnswerPosition:
    prefix: list[int]
    answer: list[int]  # x_t and the tokens that continue its word
    task: str

    @property
    def target(self) -> int:
        return self.answer[0]


def answer_tokens(doc: Sequence[int], position: int, tokenizer: Tokenizer) -> list[int]:
    """The marked token and the tokens after it that continue the same word (their text starts with a
    letter or digit): the whole answer, e.g. " 1" "5" or " Mi" "ra"."""
    answer = [doc[position]]
    for token in doc[position + 1 : position + MAX_ANSWER_TOKENS]:
        if not tokenizer.decode([token])[:1].isalnum():
            break
        answer.append(token)
    return answer


def answer_positions(documents: MarkedDocuments, max_context: int, limit: int,
                     tokenizer: Tokenizer) -> list[AnswerPosition]:
    """The first ``limit`` marked positions (document order; 0: all), each with at most ``max_context``
    tokens of its document as context and its whole answer (:func:`answer_tokens`)."""
    out: list[AnswerPosition] = []
    for doc, marks, tasks in zip(documents.documents, documents.marks, documents.tasks):
        for position, task in zip(marks, tasks):
            if len(out) == limit > 0:
                return out
            out.append(AnswerPosition(doc[max(0, position - max_context) : position],
                                      answer_tokens(doc, position, tokenizer), task))
    return out


def load_heldout(eval_cfg: Any, data_cfg: Any, tokenizer: Tokenizer) -> list[AnswerPosition]:
    """The evaluation's positions from ``eval.corpus`` (null: the bundled held-out set)."""
    path = eval_cfg.corpus or BUNDLED_HELDOUT
    documents = load_marked_jsonl(path, tokenizer, data_cfg.text_key, data_cfg.positions_key)
    positions = answer_positions(documents, data_cfg.max_context, eval_cfg.num_positions, tokenizer)
    log.info("evaluation: %d marked positions of %s", len(positions), path)
    return positions


@torch.no_grad()
def answer_scores(handle: ModelHandle, rows: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  markers: Markers, device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows that end right before their answer: log p(answer | row) summed over the answer's tokens
    [n], and whether each answer token is the greedy choice (markers excluded) given the row and the
    answer tokens before it [n] (bool). Teacher-forced, in right-padded batches of ``batch`` rows, one
    forward per answer token (answers are one word: one to three tokens here)."""
    logprob = torch.zeros(len(rows))
    correct = torch.ones(len(rows), dtype=torch.bool)
    for first in range(0, len(rows), batch):
        idx = list(range(first, min(first + batch, len(rows))))
        for k in range(max(len(answers[i]) for i in idx)):
            live = [i for i in idx if len(answers[i]) > k]
            seqs = [list(rows[i]) + list(answers[i][:k]) for i in live]
            lengths = torch.tensor([len(q) for q in seqs], device=device)
            tokens = torch.full((len(seqs), int(lengths.max())), markers.pad, dtype=torch.long, device=device)
            for j, q in enumerate(seqs):
                tokens[j, : len(q)] = torch.tensor(q, device=device)
            logits = handle.next_token_logits(tokens, lengths).float()
            target = torch.tensor([answers[i][k] for i in live], device=device)
            lp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1).cpu()
            hit = (answer_argmax(logits, markers) == target).cpu()
            live_t = torch.tensor(live)
            logprob[live_t] += lp
            correct[live_t] &= hit
    return logprob, correct


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    stderr = float(values.std(unbiased=True) / len(values) ** 0.5) if len(values) > 1 else 0.0
    return float(values.mean()), stderr


def _sample_and_score(handle, positions, params, markers, device, seed, batch_contexts):
    """One sampled thought per position (noise from ``seed``): log p(answer | thought), correct, and the
    rollout batches (for thought lengths and examples)."""
    generator = torch.Generator().manual_seed(seed)
    batches, rows = [], []
    for first in range(0, len(positions), batch_contexts):
        part = positions[first : first + batch_contexts]
        batch = sample_thoughts(handle, [p.prefix for p in part], [p.target for p in part], params,
                                markers, generator, device)
        batches.append(batch)
        rows += [batch.tokens[r, : int(batch.answer_index[r])].tolist() for r in range(len(part))]
    logprob, correct = answer_scores(handle, rows, [p.answer for p in positions], markers, device, batch_contexts)
    return logprob, correct, batches


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
    thought_seeds: int = 1,
) -> dict[str, Any]:
    """No-think vs sampled-thought log-probs and accuracy of the whole answer at ``positions``, with
    standard errors (module docstring)."""
    was_training = handle.module.training
    handle.eval()
    try:
        logp_plain, right_plain = answer_scores(handle, [p.prefix for p in positions], [p.answer for p in positions],
                                                markers, device, batch_contexts)
        params = SamplingParams(
            group_size=1, max_thought_len=rlp_cfg.max_thought_len, temperature=rlp_cfg.temperature,
            top_k=rlp_cfg.top_k, top_p=rlp_cfg.top_p, mode=rlp_cfg.rollout_mode,
        )
        draws = [_sample_and_score(handle, positions, params, markers, device, seed + s, batch_contexts)
                 for s in range(thought_seeds)]
    finally:
        handle.train(was_training)
    # Per position, the mean over thought seeds: the unit whose spread gives the standard error.
    logp_think = torch.stack([d[0] for d in draws]).mean(0)
    right_think = torch.stack([d[1].float() for d in draws]).mean(0)
    batches = [b for d in draws for b in d[2]]
    thought_len = torch.cat([b.thought_len for b in batches]).cpu().float()
    end_sampled = torch.cat([b.end_sampled for b in batches]).cpu().float()

    def figures(logprob: torch.Tensor, right: torch.Tensor) -> dict[str, float]:
        (lp, lp_se), (acc, acc_se) = _mean_and_stderr(logprob), _mean_and_stderr(right.float())
        return {"logprob": lp, "logprob_stderr": lp_se, "accuracy": acc, "accuracy_stderr": acc_se}

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(positions):
        by_task[p.task].append(i)
    result = {
        "num_positions": len(positions),
        "thought_seeds": thought_seeds,
        "no_think": figures(logp_plain, right_plain),
        "with_thought": {
            **figures(logp_think, right_think),
            "thought_len_mean": float(thought_len.mean()),
            "end_marker_rate": float(end_sampled.mean()),
        },
        "by_task": {
            task: {
                "num_positions": len(rows),
                "no_think_accuracy": float(right_plain[rows].float().mean()),
                "with_thought_accuracy": float(right_think[rows].mean()),
                "no_think_logprob": float(logp_plain[rows].mean()),
                "with_thought_logprob": float(logp_think[rows].mean()),
            }
            for task, rows in sorted(by_task.items())
        },
        "examples": [],
    }
    first_draw = [(b, r) for b in draws[0][2] for r in range(b.tokens.shape[0])]
    for i in range(min(num_examples, len(positions))):
        batch, r = first_draw[i]
        start, length = int(batch.thought_start[r]), int(batch.thought_len[r])
        result["examples"].append({
            "context": tokenizer.decode(positions[i].prefix),
            "thought": tokenizer.decode(batch.tokens[r, start : start + length].tolist()),
            "target": tokenizer.decode(positions[i].answer),
            "correct_no_think": bool(right_plain[i]),
            "correct_with_thought": bool(draws[0][1][i]),
        })
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """The console lines of an evaluation."""
    plain, think = result["no_think"], result["with_thought"]
    seeds = result.get("thought_seeds", 1)

    def pm(figure: dict, key: str, scale: float, fmt: str) -> str:
        digits = 1 if scale != 1 else 3
        return f"{scale * figure[key]:{fmt}} ± {scale * figure.get(key + '_stderr', 0.0):.{digits}f}"

    lines = [
        f"evaluation on {result['num_positions']} held-out answer positions (whole answers; ± standard error):",
        f"  no thought:        log p(answer) {pm(plain, 'logprob', 1, '+.3f')}   accuracy {pm(plain, 'accuracy', 100, '5.1f')}%",
        (
            f"  a sampled thought: log p(answer) {pm(think, 'logprob', 1, '+.3f')}   accuracy "
            f"{pm(think, 'accuracy', 100, '5.1f')}%   ({seeds} thought{'s' if seeds > 1 else ''} per position, "
            f"length {think['thought_len_mean']:.1f}, end marker {think['end_marker_rate']:.2f})"
        ),
    ]
    for task, t in result["by_task"].items():
        lines.append(f"    {task:<12} n={t['num_positions']:<4} accuracy {100 * t['no_think_accuracy']:5.1f}% -> "
                     f"{100 * t['with_thought_accuracy']:5.1f}%")
    return "\n".join(lines)
