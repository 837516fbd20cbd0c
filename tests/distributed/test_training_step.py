"""The interleaved NTP/RLP step under TP=2, PP=2, DP=2 and TP2xPP2 computes what one process computes
(gloo, CPU).

Each layout starts from the same weights (full weights initialised on CPU from one seed, then
sharded; pipeline stages copy their layers from the one-stage model, tests/distributed/layouts.py)
and trains on the same global data for three steps, RLP, NTP, RLP. Every rank samples the
same global rollouts (same weights, same seed), then a data-parallel rank trains on its slice of the
contexts and NTP rows: evenly (2+2) or unevenly (3+1). The losses, the updated weights and the EMA
teacher's weights must equal the single-process run's to 1e-5 (fp32). RLP rows train packed (the
default `rlp.pack_rows`); TP=2 also runs with sequence parallelism.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from .launch import run_distributed
from .layouts import gather_tp, layer_names, load_one_stage_weights, mixer_parts, one_stage_weights

pytestmark = pytest.mark.distributed

SEED = 4321
VOCAB = 256
CONTEXTS = 4  # global RLP batch: 4 contexts x G=3 thoughts
NTP_ROWS = 8  # global NTP batch
ATOL = 1e-5
# adam_eps is raised from 1e-8 on purpose. On its first steps Adam moves each weight by about
# lr * g / (|g| + eps): a weight whose gradient is within float rounding of zero moves by ±lr, with a
# sign set by the rounding. Layouts round differently (TP reductions sum in another order), so with
# eps=1e-8 such weights differ by ~lr between layouts although every loss agrees to 1e-5. With eps
# well above the rounding noise the comparison tests the parallel computation, not Adam's sign of noise.
OVERRIDES = ["rlp.group_size=3", "rlp.max_thought_len=6", "rlp.temperature=1.0", "trainer.lr=1e-2",
             "trainer.adam_eps=1e-3", "model.max_sequence_length=128"]


def _global_data():
    g = torch.Generator().manual_seed(SEED)
    prefixes = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 8, 14)]
    targets = torch.randint(4, VOCAB, (CONTEXTS,), generator=g).tolist()
    ntp = torch.randint(4, VOCAB, (NTP_ROWS, 25), generator=g)
    return prefixes, targets, ntp


def _s_ema(model, prefixes, targets):
    rows = [p + [t] for p, t in zip(prefixes, targets)]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        logprobs = model.teacher.token_logprobs(tokens)
    return logprobs[torch.arange(len(rows)), torch.tensor([len(r) for r in rows]) - 2]


def _rank_rows(batch, start: int, stop: int):
    """The rows of contexts [start, stop) of a global ThoughtBatch: one data-parallel rank's share.
    The behaviour log-probs are cut to these rows' longest thought, as the rank's own rollout would be."""
    rows = slice(start * batch.group_size, stop * batch.group_size)
    width = max(1, int(batch.thought_len[rows].max()))
    return dataclasses.replace(
        batch, tokens=batch.tokens[rows], thought_start=batch.thought_start[rows], thought_len=batch.thought_len[rows],
        end_sampled=batch.end_sampled[rows], answer_index=batch.answer_index[rows],
        behaviour_logprobs=None if batch.behaviour_logprobs is None else batch.behaviour_logprobs[rows, :width],
        s_pred=None if batch.s_pred is None else batch.s_pred[rows],
        predicted=None if batch.predicted is None else batch.predicted[rows],
    )


def _train(model_name: str, contexts_split: list[int], ntp_split: list[int], weights=None, extra=()) -> dict:
    """Three steps on this rank's share: contexts_split[r] contexts and ntp_split[r] NTP rows.
    `weights`: the one-stage model's weights for a pipeline stage to start from."""
    from megatron.core import parallel_state

    from nemo_rlp.config import load_config
    from nemo_rlp.parallel.distributed import ParallelLayout
    from nemo_rlp.rollout.sampler import Markers, SamplingParams, sample_thoughts
    from nemo_rlp.training.policy import PolicyWithTeacher
    from nemo_rlp.training.steps import ntp_step, rlp_update

    cfg = load_config([f"model={model_name}", *OVERRIDES, *extra])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    layout = ParallelLayout(world_size=torch.distributed.get_world_size(), rank=torch.distributed.get_rank(),
                            tensor_parallel=tp,
                            pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(),
                            data_parallel=parallel_state.get_data_parallel_world_size(), device=torch.device("cpu"))
    torch.manual_seed(SEED)
    model = PolicyWithTeacher(cfg, VOCAB, layout)
    assert model.language_model.config.sequence_parallel == cfg.parallel.sequence_parallel
    if weights is not None:
        load_one_stage_weights(model.language_model, weights)
    prefixes, targets, ntp = _global_data()
    c0 = sum(contexts_split[:dp_rank])
    c1 = c0 + contexts_split[dp_rank]
    n0 = sum(ntp_split[:dp_rank])
    n1 = n0 + ntp_split[dp_rank]
    markers = Markers(2, 3, 0)
    params = SamplingParams(cfg.rlp.group_size, cfg.rlp.max_thought_len, cfg.rlp.temperature)
    losses = []
    for step, kind in enumerate(("rlp", "ntp", "rlp")):
        if kind == "ntp":
            metrics = ntp_step(model, ntp[n0:n1]).metrics
            losses.append(metrics["ntp_loss"])
            continue
        model.seed_teacher()
        s_ema = _s_ema(model, prefixes, targets)
        batch = sample_thoughts(model.policy, prefixes, targets, params, markers,
                                torch.Generator().manual_seed(SEED + step), torch.device("cpu"))
        metrics = rlp_update(model, _rank_rows(batch, c0, c1), s_ema[c0:c1], cfg.rlp).metrics
        losses.append(metrics["loss_pg"])
        losses.append(metrics["reward_mean"])
    params_ = dict(model.language_model.named_parameters())
    parts = mixer_parts(model.language_model)
    # Named as in the one-stage model; a stage's copy of tied embeddings is not compared.
    names = {n: g for n, g in layer_names(model.language_model).items() if not n.startswith("output_layer.")}
    return {
        "losses": torch.tensor(losses, dtype=torch.float64),
        "weights": {g: gather_tp(g, params_[n], params_[n], parts) for n, g in names.items()},
        "teacher": {g: gather_tp(g, p, params_[n], parts) for n, p in model.ema.teacher.named_parameters()
                    if (g := names.get(n)) is not None},
    }


def _worker(model_name: str, layouts: list[tuple[int, int, list[int], list[int]]], extra=()) -> dict:
    """Train under each (TP, PP, contexts split, NTP split) layout in turn, from the same weights."""
    from megatron.core import parallel_state

    from nemo_rlp.config import ParallelConfig, load_config
    from nemo_rlp.parallel import distributed

    def init(tp: int, pp: int) -> None:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        distributed.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), SEED)

    out = {}
    for tp, pp, contexts_split, ntp_split in layouts:
        weights = None
        if pp > 1:
            init(tp, 1)
            torch.manual_seed(SEED)
            weights = one_stage_weights(load_config([f"model={model_name}", *OVERRIDES]).model, VOCAB, tp)
        init(tp, pp)
        out[(tp, pp, tuple(contexts_split))] = _train(model_name, contexts_split, ntp_split, weights, extra)
    return out


def _merge_stages(results: list[dict], key) -> dict:
    """The union of the weights every rank holds under `key` (pipeline stages hold different layers;
    tensor-parallel ranks hold the same, already gathered)."""
    merged = {"losses": results[0][key]["losses"], "weights": {}, "teacher": {}}
    for result in results:
        for part in ("weights", "teacher"):
            merged[part].update(result[key][part])
    return merged


def _assert_same(got: dict, ref: dict, what: str) -> None:
    torch.testing.assert_close(got["losses"], ref["losses"], atol=ATOL, rtol=0, msg=f"{what}: losses")
    for part in ("weights", "teacher"):
        assert set(got[part]) == set(ref[part]), f"{what}: {part} names differ"
        for name, value in ref[part].items():
            torch.testing.assert_close(got[part][name], value, atol=ATOL, rtol=0, msg=f"{what}: {part} {name}")


def _reference(model_name: str) -> dict:
    (reference,) = run_distributed(_worker, world_size=1, args=(model_name, [(1, 1, [CONTEXTS], [NTP_ROWS])]),
                                   timeout=240)
    return reference[(1, 1, (CONTEXTS,))]


@pytest.mark.parametrize("model_name", ["tiny_gpt", "tiny_hybrid"])
def test_tp2_pp2_dp2_and_uneven_dp2_equal_one_process(model_name):
    ref = _reference(model_name)
    # The run is not trivial: the weights moved and the EMA teacher lags behind them.
    moved = max(float((ref["weights"][n] - ref["teacher"][n]).abs().max()) for n in ref["weights"])
    assert moved > 1e-4
    layouts = [(2, 1, [CONTEXTS], [NTP_ROWS]), (1, 2, [CONTEXTS], [NTP_ROWS]), (1, 1, [2, 2], [4, 4]),
               (1, 1, [3, 1], [6, 2])]
    results = run_distributed(_worker, world_size=2, args=(model_name, layouts), timeout=300)
    for rank, result in enumerate(results):
        _assert_same(result[(2, 1, (CONTEXTS,))], ref, f"TP=2 rank {rank}")
        _assert_same(result[(1, 1, (2, 2))], ref, f"DP=2 even, rank {rank}")
        _assert_same(result[(1, 1, (3, 1))], ref, f"DP=2 uneven 3+1, rank {rank}")
        # Each stage's losses are the last stage's, broadcast.
        torch.testing.assert_close(result[(1, 2, (CONTEXTS,))]["losses"], ref["losses"], atol=ATOL, rtol=0)
    _assert_same(_merge_stages(results, (1, 2, (CONTEXTS,))), ref, "PP=2")


@pytest.mark.parametrize("model_name", ["tiny_gpt", "tiny_hybrid"])
def test_tp2_x_pp2_on_four_processes_equals_one_process(model_name):
    ref = _reference(model_name)
    results = run_distributed(_worker, world_size=4, args=(model_name, [(2, 2, [CONTEXTS], [NTP_ROWS])]),
                              timeout=420)
    _assert_same(_merge_stages(results, (2, 2, (CONTEXTS,))), ref, "TP2xPP2")


@pytest.mark.parametrize("model_name", ["tiny_gpt", "tiny_hybrid"])
def test_sequence_parallel_tp2_equals_one_process(model_name):
    """parallel.sequence_parallel at TP=2: packed RLP rows (the pack padded to a multiple of TP) and
    padded NTP rows train as one process does; rollouts run with sequence parallelism off."""
    ref = _reference(model_name)
    extra = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    results = run_distributed(_worker, world_size=2, args=(model_name, [(2, 1, [CONTEXTS], [NTP_ROWS])], extra),
                              timeout=300)
    for rank, result in enumerate(results):
        _assert_same(result[(2, 1, (CONTEXTS,))], ref, f"TP=2 with sequence parallelism, rank {rank}")
