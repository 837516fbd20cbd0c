"""A third architecture is its own module and nothing else (nemo_rlp.models.spec).

This module declares a toy architecture entirely here: an attention-only GPT, whose layers are
megatron's local GPT layer with the MLP removed (layer kind '*' for the planner, not the GPT family's
'T'), with its own row-cache walk and its own config check. Registered for this module only, it is
validated by `load_config`, built by `build_model`, planned by the planner, rolled out with a cache
in every rollout mode (log-probs equal to teacher forcing, as tests/unit/test_rollout.py checks for
the built-in families), and trained for one RLP step by the trainer, with no module of `nemo_rlp`
changed or told about it.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ConfigError, ParallelConfig, load_config
from nemo_rlp.models import build_model
from nemo_rlp.models.cache_ops import select_attention_rows
from nemo_rlp.models.gpt import build_gpt, local_block_spec
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.models.row_cache import attention_on_rows
from nemo_rlp.models.spec import (
    ArchitectureSpec,
    CacheOps,
    architecture_names,
    architecture_of,
    get_architecture,
    register_architecture,
    unregister_architecture,
)
from nemo_rlp.parallel import distributed
from nemo_rlp.planning import Hardware, count_parameters, layer_kinds, make_plan
from nemo_rlp.rollout.sampler import MODES, Markers, SamplingParams, sample_thoughts
from nemo_rlp.rollout.schedule import measure_host_work
from nemo_rlp.training.loop import Trainer
from nemo_rlp.training.schedule import RLP

from tests.tiny_run import TINY_RUN

TOY = "toy_attention_only"
TOY_MODEL = ["model=tiny_gpt", f"model.arch={TOY}", "model.max_sequence_length=512"]
VOCAB = 512
MARKERS = Markers(think_start=2, think_end=3, pad=0)
CPU = torch.device("cpu")


# ---- the toy architecture: everything it declares is here ---------------------------------------


def toy_layer_spec(cfg, config):
    """megatron's local GPT layer without its MLP (the identity in its place), always the local spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

    layer = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization)
    layer.submodules.pre_mlp_layernorm = IdentityOp
    layer.submodules.mlp = IdentityOp
    layer.submodules.mlp_bda = IdentityFuncOp
    return local_block_spec(layer, config)


def toy_row_layers(language_model, hidden, cache):
    for layer in language_model.decoder.layers:
        hidden = attention_on_rows(layer, hidden, cache)  # the MLP step is the identity
    return hidden


def toy_validate(cfg, fail):
    if cfg.hybrid_override_pattern is not None:
        fail("model.hybrid_override_pattern", cfg.hybrid_override_pattern, f"null for model.arch={TOY!r}")
    if cfg.num_layers % 2:
        fail("model.num_layers", cfg.num_layers, f"an even number for model.arch={TOY!r} (a toy rule)")
    return {}


TOY_SPEC = ArchitectureSpec(
    name=TOY,
    build=build_gpt,  # the GPT family's provider, with the toy's layers
    local_layer_spec=toy_layer_spec,  # no Transformer Engine spec: the local one everywhere
    layer_kinds=lambda cfg: "*" * cfg.num_layers,
    cache=CacheOps(select_rows=select_attention_rows, row_layers=toy_row_layers),
    validate=toy_validate,
    tiny_model=lambda depth: ["model=tiny_gpt", f"model.arch={TOY}", f"model.num_layers={2 * depth}"],
)


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_architecture(TOY_SPEC)
    yield
    unregister_architecture(TOY)


@pytest.fixture(scope="module")
def handle(toy_registered) -> ModelHandle:
    distributed.initialize(ParallelConfig(), seed=1)
    cfg = load_config(TOY_MODEL).model
    torch.manual_seed(0)
    return ModelHandle(build_model(cfg, VOCAB, 1, CPU))


# ---- the tests --------------------------------------------------------------------------------


def test_the_registry_is_the_list_of_allowed_architectures():
    assert architecture_names()[:2] == ("gpt", "hybrid") and TOY in architecture_names()
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(TOY_SPEC)
    with pytest.raises(ConfigError, match=rf"model.arch='nope'.*'gpt', 'hybrid', '{TOY}'"):
        load_config(["model.arch=nope"])
    # The toy's own check runs in config validation, and names the key.
    with pytest.raises(ConfigError, match="model.num_layers=3"):
        load_config([*TOY_MODEL, "model.num_layers=3"])


def test_the_toy_builds_as_declared(handle):
    model = handle.language_model
    assert architecture_of(model) is TOY_SPEC
    layers = model.decoder.layers
    assert len(layers) == 2 and all(type(layer.mlp).__name__ == "IdentityOp" for layer in layers)
    assert not any("mlp" in name for name, _ in model.named_parameters())


def test_the_planner_plans_the_toy(handle):
    cfg = load_config([*TINY_RUN, *TOY_MODEL])
    assert layer_kinds(cfg.model) == "**"
    counts = count_parameters(cfg.model, VOCAB)
    assert [lp.kind for lp in counts.layers] == ["*", "*"]
    assert counts.total == sum(p.numel() for p in handle.language_model.parameters())
    plan = make_plan(cfg, Hardware(nodes=1, gpus_per_node=1), counts)
    rollout = dict({p.name: p for p in plan.stages[0].phases}["rollout"].items)
    assert rollout["KV cache (2 attention layers)"] > 0
    assert not any("Mamba" in item for item in rollout)
    # The step-time model measures host work on the toy's own tiny model (its `tiny_model`).
    work = measure_host_work(TOY, "rows")
    assert work.ops_per_layer > 10 and work.ops_per_step > 0


@pytest.mark.parametrize("mode", MODES)
def test_the_toy_rolls_out_with_a_cache(handle, mode):
    """Every rollout mode (the cached ones through the toy's CacheOps) gives the log-probs and S_pred
    that teacher forcing gives each row alone."""
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 9)]
    params = SamplingParams(group_size=4, max_thought_len=12, mode=mode)
    batch = sample_thoughts(handle, prefixes, [5, 6, 7], params, MARKERS, torch.Generator().manual_seed(0), CPU)
    assert int(batch.thought_len.min()) >= 1
    for row in range(batch.tokens.shape[0]):
        n = int(batch.answer_index[row]) + 1
        with torch.no_grad():
            logprobs = handle.token_logprobs(batch.tokens[row : row + 1, :n])[0]
        start, length = int(batch.thought_start[row]), int(batch.thought_len[row])
        torch.testing.assert_close(batch.behaviour_logprobs[row, :length], logprobs[start - 1 : start - 1 + length],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.s_pred[row], logprobs[n - 2], atol=1e-4, rtol=0)


def test_the_toy_trains_one_rlp_step(tmp_path):
    """Through the trainer (policy, EMA teacher, scoring, rollout, packed training rows): the step
    cycle starts with one NTP step, then an RLP step, which updates the toy's parameters."""
    cfg = load_config([*TINY_RUN, *TOY_MODEL, "trainer.schedule.ntp_warmup_steps=0", "trainer.steps=2",
                       "trainer.schedule.ntp_per_cycle=1", "trainer.schedule.rlp_per_cycle=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert get_architecture(cfg.model.arch) is TOY_SPEC
    assert architecture_of(trainer.model.language_model) is TOY_SPEC
    assert trainer.train_step().kind != RLP
    before = {n: p.detach().clone() for n, p in trainer.model.language_model.named_parameters()}
    output = trainer.train_step()
    kind, metrics = output.kind, output.metrics
    assert kind == RLP and metrics["updated"] == 1.0
    assert all(v == v for v in metrics.values() if isinstance(v, float))  # no NaN
    after = dict(trainer.model.language_model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
