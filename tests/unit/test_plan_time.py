"""The planner's time model (`python -m nemo_rlp.plan ... --time`): its phases are the formulas the
planning module states, fed by the sampler's replayed schedule; today's lockstep rollouts of the 12B
experiment at 16 contexts per chunk are host-bound and the plan names a chunk that fits; the `rows`
path removes the context tokens from decode and halves the decode steps."""

from __future__ import annotations

import dataclasses

import pytest

from nemo_rlp import planning
from nemo_rlp.config import load_config
from nemo_rlp.plan import main
from nemo_rlp.planning import ACCELERATORS, Hardware, make_plan, plan_step_time
from nemo_rlp.rollout.schedule import HostWork

NAMES = ("rlp_nemotron_nano_12b_v2", "rlp_qwen3_1p7b")
# Host work as measured on CPU (tests/unit/test_rollout_schedule.py measures it; fixed here for speed).
HOST = {"shared_prefill": HostWork(ops_per_layer=70.0, ops_per_step=150.0, syncs_per_step=5.0),
        "rows": HostWork(ops_per_layer=70.0, ops_per_step=150.0, syncs_per_step=0.125)}
PHASES = ["rollout prefill", "rollout decode", "rollout cache traffic (compaction, RoPE over the prefix)",
          "rollout host overhead (exposed)", "teacher scoring (S_ema)", "RLP training"]


@pytest.fixture(scope="module")
def plans(experiment_data):
    def plan(name, **rlp):
        cfg = load_config([f"+experiment={name}", *experiment_data])
        cfg = dataclasses.replace(cfg, rlp=dataclasses.replace(cfg.rlp, **rlp))
        return make_plan(cfg, Hardware(nodes=8), planning.count_parameters(cfg.model, cfg.model.vocab_size), name)

    return plan


def test_lockstep_12b_at_16_contexts_is_host_bound_and_a_larger_chunk_fits(plans):
    plan = plans("rlp_nemotron_nano_12b_v2", rollout_mode="shared_prefill", rollout_batch_contexts=16)
    st = plan_step_time(plan, "h100", host_work=HOST["shared_prefill"])
    assert [p[0] for p in st.phases][: len(PHASES)] == PHASES
    assert st.host_bound and st.recommended_chunk is not None and st.recommended_chunk > 16
    # With a host sync every step, host and device serialise: every step's host time is exposed.
    host = dict((p[0], p[1]) for p in st.phases)["rollout host overhead (exposed)"]
    ops = 70.0 * plan.cfg.model.num_layers + 150.0
    assert host == pytest.approx(st.schedule.decode_steps * (ops * planning.LAUNCH_S + 5 * planning.SYNC_S))
    assert st.schedule.context_tokens_decoded > 0
    assert "WARNING: the decode is host-bound" in planning.format_step_time(plan, st, "full")


@pytest.mark.parametrize("name", NAMES)
def test_rows_path_feeds_no_context_through_decode_and_is_faster(plans, name):
    today = plan_step_time(plans(name, rollout_mode="shared_prefill"), "h100", host_work=HOST["shared_prefill"])
    new = plan_step_time(plans(name, rollout_mode="rows"), "h100", host_work=HOST["rows"])
    assert new.schedule.context_tokens_decoded == 0 and new.schedule.compaction_cells == 0  # all thoughts run to L
    assert new.schedule.decode_steps < today.schedule.decode_steps
    assert sum(p[1] for p in new.phases) < sum(p[1] for p in today.phases)
    for st in (today, new):
        for phase, seconds, floor in st.phases:
            if phase != "rollout prefill":  # the lockstep path prefills less and decodes the rest
                assert seconds >= floor * 0.999, phase
    # Training phases do not depend on the rollout path.
    assert today.phases[4:] == new.phases[4:]


def test_decode_is_weight_bandwidth_bound_at_a_few_rows(plans):
    """One context per chunk: the decode time is the weights read once per step, at most."""
    plan = plans("rlp_qwen3_1p7b", rollout_mode="rows", rollout_batch_contexts=1)
    st = plan_step_time(plan, "h200", host_work=HOST["rows"])
    decode = dict((p[0], p[1]) for p in st.phases)["rollout decode"]
    weights = plan.counts.total * 2 / plan.tp / (ACCELERATORS["h200"].hbm * planning.DECODE_BW_EFFICIENCY)
    assert decode > st.schedule.decode_steps * weights


def test_cli_prints_the_time_table(experiment_data, capsys):
    code = main(["rlp_qwen3_1p7b", "--nodes", "8", "--time", "h200", "--thoughts", "geometric", *experiment_data])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("time per RLP step on H200 SXM")
    assert "host per decode step (measured on CPU)" in out and "dominant phase:" in out
    assert out.strip().splitlines()[-1] == "fits"
