"""The pieces of the RLP-vs-CPT comparison (bench/science.py): a corpus whose shown thoughts are mostly
filler, the compute-matched CPT schedule and its arithmetic, and an evaluation with standard errors."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.data import synthetic
from nemo_rlp.planning import compute_matched_cpt, schedule_counts, step_tokens
from nemo_rlp.rollout.sampler import Markers
from nemo_rlp.training.evaluate import answer_scores


def _walk_thoughts(cfg: synthetic.CorpusConfig) -> list[str]:
    texts = [r["text"] for r in synthetic.iter_records(cfg)]
    return [w.split("<think> ")[1].split("</think>")[0] for t in texts for w in t.split("Walk ")[1:] if "<think>" in w]


def test_most_shown_thoughts_are_filler_and_the_answer_still_follows() -> None:
    thoughts = _walk_thoughts(synthetic.CorpusConfig(num_docs=400, seed=5, thought_fraction=1.0))
    worked = [t for t in thoughts if " -> " in t]
    assert len(thoughts) > 200
    assert 0.4 < len(worked) / len(thoughts) < 0.6  # useful_thought_fraction = 0.5
    fillers = {f.strip() for t in thoughts if " -> " not in t for f in t.split(",")}
    assert fillers <= set(synthetic._FILLER)
    # A corpus of worked thoughts only is still one setting away.
    all_worked = _walk_thoughts(synthetic.CorpusConfig(num_docs=100, seed=5, thought_fraction=1.0,
                                                       useful_thought_fraction=1.0))
    assert all(" -> " in t for t in all_worked)
    with pytest.raises(ValueError, match="useful_thought_fraction"):
        synthetic.CorpusConfig(useful_thought_fraction=1.5)
    with pytest.raises(ValueError, match="wrong_thought_fraction"):
        synthetic.CorpusConfig(useful_thought_fraction=0.6, wrong_thought_fraction=0.5)


def test_wrong_thoughts_slip_at_their_last_step_and_the_right_answer_follows() -> None:
    cfg = synthetic.CorpusConfig(num_docs=300, seed=9, thought_fraction=1.0, useful_thought_fraction=0.0,
                                 wrong_thought_fraction=1.0, marked_tasks=("walk", "story"))
    texts = [r["text"] for r in synthetic.iter_records(cfg)]
    walks = [w for t in texts for w in t.split("Walk ")[1:] if "<think>" in w]
    assert len(walks) > 50
    for walk in walks:
        path = walk.split("<think> ")[1].split("</think>")[0].split(" -> ")
        answer = walk.split("</think> ")[1].split(".")[0]
        assert all(synthetic.ROADS[a] == b for a, b in zip(path[:-2], path[1:-1]))  # right until the last road
        assert synthetic.ROADS[path[-2]] == answer != path[-1]
    stories = [t.split("<think> ")[1] for t in texts for t in t.split("Now ")[1:] if " has<think> " in t]
    assert len(stories) > 50
    for story in stories:
        thought, rest = story.split("</think> ")
        assert int(thought.rpartition(" = ")[2]) != int(rest.split()[0])


def test_the_cpt_arm_spends_the_rlp_steps_flops_on_ntp() -> None:
    cfg = load_config(["+experiment=demo_cpt"])
    assert cfg.trainer.schedule.compute_matched_cpt
    ntp, rlp = schedule_counts(cfg)
    cpt, lines = compute_matched_cpt(cfg)
    tok = step_tokens(cfg)
    B, G, L, c = cfg.rlp.contexts_per_step, cfg.rlp.group_size, cfg.rlp.max_thought_len, cfg.data.max_context
    rlp_flops = 2 * (B * (c + 1) + B * (c + 1) + B * G * (L + 1)) + 6 * B * G * (c + L + 2)  # per parameter
    assert tok.rlp_flops(1.0) == rlp_flops and tok.ntp_flops(1.0) == 6 * 16 * 128
    assert cpt.trainer.steps == ntp + math.ceil(rlp * rlp_flops / (6 * 16 * 128))
    assert schedule_counts(cpt) == (cpt.trainer.steps, 0)
    assert cpt.trainer.schedule.ntp_warmup_steps == cfg.trainer.schedule.ntp_warmup_steps
    assert any(f"{rlp} RLP steps -> {cpt.trainer.steps - ntp} NTP steps" in line for line in lines)
    with pytest.raises(ConfigError, match="rlp_per_cycle"):
        compute_matched_cpt(cpt)


class _Lookup:
    """A 'model' whose next-token logits depend only on the last token: logits = table[last]."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[torch.arange(len(tokens)), lengths - 1]]


def test_whole_answers_are_scored_token_by_token() -> None:
    V = 8
    table = torch.full((V, V), -5.0)
    table[4, 5] = table[5, 6] = table[6, 7] = 5.0  # 4 -> 5 -> 6 -> 7 is the greedy chain
    table[4, 2] = 9.0  # a marker is likelier after 4, but never the answer
    markers = Markers(think_start=2, think_end=3, pad=0)
    rows, answers = [[1, 4], [1, 4], [1, 4]], [[5, 6], [5, 7], [6]]
    logprob, correct = answer_scores(_Lookup(table), rows, answers, markers, "cpu", batch=2)
    assert correct.tolist() == [True, False, False]  # the second's first token is right, its second not
    lsm = torch.log_softmax(table, dim=-1)
    assert torch.allclose(logprob, torch.stack([lsm[4, 5] + lsm[5, 6], lsm[4, 5] + lsm[5, 7], lsm[4, 6]]))


def test_the_comparison_takes_its_schedule_from_the_demo_config() -> None:
    from bench import science

    demo = load_config([]).trainer
    assert science.demo_schedule([]) == {"warmup": demo.schedule.ntp_warmup_steps,
                                         "after_warmup": demo.steps - demo.schedule.ntp_warmup_steps}
    longer = science.demo_schedule([f"trainer.steps={demo.steps + 100}"])
    assert longer["after_warmup"] == demo.steps - demo.schedule.ntp_warmup_steps + 100
    with pytest.raises(SystemExit, match="no steps after the NTP warm-up"):
        science.demo_schedule([f"trainer.steps={demo.schedule.ntp_warmup_steps}"])
    with pytest.raises(SystemExit, match="rlp.grad_scale"):
        science.demo_schedule(["rlp.grad_scale=abc"])
