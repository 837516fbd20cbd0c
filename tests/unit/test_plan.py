"""The plan of an at-scale run (nemo_rlp.planning, python -m nemo_rlp.plan), on CPU.

Both experiments are planned with the models built on the meta device: their parameter counts must
match the published sizes, the memory model's line items must be the formulas its docstring states,
and the command line must refuse what does not fit or cannot run. Run with -s to see the tables.
"""

from __future__ import annotations

import dataclasses

import re
from pathlib import Path

import pytest

from nemo_rlp import planning
from nemo_rlp.config import load_config
from nemo_rlp.plan import main
from nemo_rlp.planning import GiB, Hardware, WhatIf, make_plan

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = {"rlp_nemotron_nano_12b_v2": "rlp_12b.sh", "rlp_qwen3_1p7b": "rlp_qwen3_1p7b.sh"}


def sbatch_nodes(script: str) -> int:
    """The node count of a recipe's #SBATCH header (the layout the recipe runs)."""
    return int(re.search(r"^#SBATCH --nodes=(\d+)$", (REPO / "slurm" / script).read_text(), re.M)[1])


@pytest.fixture(scope="module")
def experiments(experiment_data) -> dict:
    """{experiment: (config, parameter counts)}; each model built once, on the meta device."""
    out = {}
    for name in EXPERIMENTS:
        cfg = load_config([f"+experiment={name}", *experiment_data])
        out[name] = (cfg, planning.count_parameters(cfg.model, cfg.model.vocab_size))
    return out


def recipe_plan(experiments, name: str, nodes: int | None = None, rlp: dict | None = None, **what_if):
    cfg, counts = experiments[name]
    if rlp:
        cfg = dataclasses.replace(cfg, rlp=dataclasses.replace(cfg.rlp, **rlp))
    nodes = nodes or sbatch_nodes(EXPERIMENTS[name])
    return make_plan(cfg, Hardware(nodes=nodes), counts, experiment=name, what_if=WhatIf(**what_if))


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_has_the_paper_settings(experiments, name):
    cfg, _ = experiments[name]
    r, t = cfg.rlp, cfg.trainer
    assert (r.group_size, r.max_thought_len, r.temperature, r.ema_decay, r.kl_beta) == (16, 2048, 0.7, 0.999, 0.0)
    assert (r.contexts_per_step, cfg.data.max_context, t.lr) == (512, 2048, 1e-6)
    assert getattr(t, "lr_decay_style", "constant") == "constant"
    assert cfg.model.max_sequence_length >= cfg.data.max_context + r.max_thought_len + 3
    assert r.micro_batch_contexts >= 1 or r.micro_batch_rows >= 1, "a training microbatch of all contexts cannot fit"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_parameters_match_the_published_size(experiments, name):
    plan = recipe_plan(experiments, name)
    print("\n" + plan.table())
    counts = plan.counts
    assert abs(counts.total / plan.published - 1) < 0.01
    assert counts.total == sum(lp.total for lp in counts.layers) + counts.embedding + counts.output_layer \
        + counts.final_norm + counts.other_first
    # TP shards add up: every rank holds 1/TP of the sharded part and all of the replicated part.
    tp = plan.tp
    replicated = sum(lp.total - lp.tp_sharded for lp in counts.layers) + counts.final_norm + counts.other_first
    assert counts.per_gpu(tp, 1, 0, plan.cfg.model.share_embeddings_and_output_weights) * tp == \
        counts.total + replicated * (tp - 1)


def test_qwen3_recipe_layout_fits(experiments):
    plan = recipe_plan(experiments, "rlp_qwen3_1p7b")
    assert plan.fits, plan.refusal()
    assert plan.worst.peak < 80 * GiB
    # The rollout (all of a rank's rows at once) is the largest phase, not the weights; the training
    # microbatch (G rows of c + L + 2 tokens) comes next.
    phases = sorted(plan.worst.phases, key=lambda p: -p.bytes)
    assert [p.name for p in phases[:2]] == ["rollout", "RLP training microbatch"]
    # The layout the recipe uses is the smallest that fits: one node fewer does not.
    fewer = recipe_plan(experiments, "rlp_qwen3_1p7b", nodes=sbatch_nodes("rlp_qwen3_1p7b.sh") - 1)
    assert not fewer.fits and fewer.fits_from_nodes == sbatch_nodes("rlp_qwen3_1p7b.sh")
    assert fewer.worst.largest_phase.name == "rollout"


def test_nemotron_12b_recipe_layout_fits(experiments):
    """The paper's 12B setting on 8 nodes of 8 x 80 GB: with training microbatches that split groups
    and rollouts/scoring in chunks of 16 contexts (the experiment config), the peak fits."""
    plan = recipe_plan(experiments, "rlp_nemotron_nano_12b_v2")
    assert plan.fits, plan.refusal()
    assert plan.worst.peak < 80 * GiB
    assert "WHAT-IF" not in plan.table()  # nothing assumed that the trainer does not do


def test_nemotron_12b_with_whole_groups_is_refused_and_the_plan_says_why(experiments):
    """Whole-group microbatches (G = 16 rows of 4098 tokens) need ~132 GiB per GPU at TP = 8."""
    plan = recipe_plan(experiments, "rlp_nemotron_nano_12b_v2", rlp={"micro_batch_rows": 0})
    worst = plan.worst
    assert not plan.fits
    assert worst.largest_phase.name == "RLP training microbatch"
    assert plan.fits_from_nodes is None
    refusal = plan.refusal()
    assert "RLP training microbatch" in refusal and "No node count fits TP=8" in refusal
    assert "rlp.micro_batch_rows" in refusal


def test_memory_model_line_items(experiments):
    """The line items are the formulas of nemo_rlp.planning's docstring."""
    plan = recipe_plan(experiments, "rlp_qwen3_1p7b")
    cfg, m = plan.cfg, plan.cfg.model
    stage = plan.stages[0]
    P = stage.params
    assert P == plan.counts.per_gpu(plan.tp, 1, 0, tied=True)
    static = dict(stage.static)
    assert static["weights (bf16)"] == 2 * P
    assert static["EMA teacher (fp32)"] == 4 * P
    assert static["gradients (fp32 main grads)"] == 4 * P
    assert static["optimizer (fp32 master + Adam m, v; not sharded)"] == 12 * P

    rollout = {p.name: p for p in stage.phases}["rollout"]
    R = plan.contexts_per_rank * cfg.rlp.group_size
    positions = cfg.data.max_context + cfg.rlp.max_thought_len + 2
    kv_heads, head_dim = m.num_query_groups // plan.tp, m.kv_channels
    assert dict(rollout.items)["KV cache (28 attention layers)"] == 28 * 2 * R * positions * kv_heads * head_dim * 2

    sharded = recipe_plan(experiments, "rlp_qwen3_1p7b", distributed_optimizer=True)
    items = dict(sharded.stages[0].static)
    assert items[f"optimizer (fp32 master + Adam m, v; sharded over DP={plan.dp})"] == 12 * P / plan.dp
    assert sharded.worst.peak < plan.worst.peak


def test_hybrid_rollout_holds_mamba_states(experiments):
    plan = recipe_plan(experiments, "rlp_nemotron_nano_12b_v2")
    m, tp = plan.cfg.model, plan.tp
    rollout = dict({p.name: p for p in plan.stages[0].phases}["rollout"].items)
    R = min(plan.contexts_per_rank, plan.cfg.rlp.rollout_batch_contexts or plan.contexts_per_rank) * plan.cfg.rlp.group_size
    conv = (m.mamba_num_heads * m.mamba_head_dim + 2 * m.mamba_num_groups * m.mamba_state_dim) // tp * 4
    ssm = m.mamba_num_heads // tp * m.mamba_head_dim * m.mamba_state_dim
    assert rollout["Mamba conv+SSM states (28 layers)"] == 28 * R * (conv + ssm) * 2
    assert "KV cache (6 attention layers)" in rollout


def test_flops_and_cpt_token_budget(experiments):
    plan = recipe_plan(experiments, "rlp_qwen3_1p7b")
    cfg = plan.cfg
    B, G, L, c = cfg.rlp.contexts_per_step, cfg.rlp.group_size, cfg.rlp.max_thought_len, cfg.data.max_context
    N = plan.counts.matmul
    assert N == plan.counts.total  # tied embeddings: the one V x h matrix multiplies in the output layer
    assert plan.flops["RLP step: training (6N x trained tokens)"] == 6 * N * B * G * (c + L + 2)
    ntp_steps, rlp_steps = plan.run["steps (NTP / RLP)"]
    assert ntp_steps + rlp_steps == cfg.trainer.steps
    ntp_tokens = cfg.trainer.ntp_batch_size * cfg.data.ntp_seq_len
    assert plan.run["T_flop"] == G * L * B * rlp_steps + B * c * rlp_steps + ntp_tokens * ntp_steps
    untied = recipe_plan(experiments, "rlp_nemotron_nano_12b_v2").counts
    assert untied.matmul == untied.total - untied.embedding


@pytest.mark.parametrize("steps, warmup, ntp, rlp", [(10, 0, 1, 1), (7, 3, 2, 1), (5, 9, 1, 1), (11, 2, 0, 3)])
def test_schedule_counts(experiment_data, steps, warmup, ntp, rlp):
    from nemo_rlp.training.schedule import RLP, step_kind

    cfg = load_config([f"trainer.steps={steps}", f"trainer.schedule.ntp_warmup_steps={warmup}",
                       f"trainer.schedule.ntp_per_cycle={ntp}", f"trainer.schedule.rlp_per_cycle={rlp}"])
    expected = sum(step_kind(i, cfg.trainer.schedule) == RLP for i in range(steps))
    assert planning.schedule_counts(cfg) == (steps - expected, expected)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_plans_the_qwen3_recipe(experiment_data, capsys):
    assert main(["rlp_qwen3_1p7b", "--nodes", str(sbatch_nodes("rlp_qwen3_1p7b.sh")), *experiment_data]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,720,574,976" in out and out.rstrip().endswith("fits")
    for heading in ("memory per GPU", "tokens per step", "FLOPs per step", "T_flop"):
        assert heading in out


def test_cli_refuses_a_layout_that_does_not_fit(experiment_data, capsys):
    assert main(["rlp_qwen3_1p7b", "--nodes", "12", "--gpu-memory-gib", "40", *experiment_data]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("layout does not fit") and "> 40 GiB (--gpu-memory-gib)" in last


def test_cli_names_the_data_the_experiment_leaves_open(capsys):
    assert main(["rlp_nemotron_nano_12b_v2"]) == 2
    err = capsys.readouterr().err
    assert "config error: data.tokenizer=" in err and "data.corpus=PREFIX" in err


def test_cli_rejects_bad_values_like_the_trainer(experiment_data, capsys):
    assert main(["rlp_qwen3_1p7b", *experiment_data, "rlp.group_size=1"]) == 2
    assert "rlp.group_size=1 is not allowed" in capsys.readouterr().err
    assert main(["rlp_qwen3_1p7b", *experiment_data, "parallel.tensor_model_parallel_size=3"]) == 2
    assert "parallel.tensor_model_parallel_size=3" in capsys.readouterr().err
    assert main(["no_such_experiment"]) == 2
    assert "rlp_qwen3_1p7b" in capsys.readouterr().err
    assert main(["rlp_qwen3_1p7b", *experiment_data, "--what-if", "bogus=1"]) == 2


def test_cli_layout_must_divide_the_gpus(experiment_data, capsys):
    # TP=8 on 4 GPUs: megatron's layout check, by name.
    assert main(["rlp_qwen3_1p7b", "--nodes", "1", "--gpus-per-node", "4", *experiment_data]) == 2
    assert "does not divide the world size 4" in capsys.readouterr().err
